"""The pieces the streamed engine stands on: a source checkpoint is checked before it runs
(``LayerwiseModel``), the stream cache (``StreamCache``) and where the work is placed (``execution``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from prunecomp_export.adapters import adapter_for
from prunecomp_export.engine import execution
from prunecomp_export.engine.layerwise import LayerwiseModel
from prunecomp_export.engine.loop import make_plan, prune
from prunecomp_export.engine.stream_cache import StreamCache
from prunecomp_export.errors import ModelError, RecipeError
from prunecomp_export.recipe import ExecutionSpec, PruneSpec, validate_recipe
from prunecomp_export.source.weights import SafetensorsCheckpoint
from tests.conftest import make_model

# -- a damaged source is refused with ModelError -------------------------------------------------------

Edit = Callable[[dict[str, torch.Tensor]], None]


def _drop_layer(tensors):
    for key in [k for k in tensors if k.startswith("model.layers.3.")]:
        del tensors[key]


def _drop_one_tensor(tensors):
    del tensors["model.layers.2.self_attn.o_proj.weight"]


def _extra_top_level(tensors):
    tensors["model.extra.weight"] = torch.zeros(3)


def _extra_in_a_layer(tensors):
    tensors["model.layers.2.mlp.extra.weight"] = torch.zeros(3)


def _extra_layer_index(tensors):
    tensors["model.layers.6.mlp.down_proj.weight"] = torch.zeros(64, 128)


def _missing_head(tensors):
    del tensors["lm_head.weight"]


def _wrong_shape_in_a_layer(tensors):
    tensors["model.layers.2.mlp.down_proj.weight"] = torch.zeros(64, 100)


def _wrong_shape_embedding(tensors):
    tensors["model.embed_tokens.weight"] = torch.zeros(128, 60)


def _wrong_shape_final_norm(tensors):
    tensors["model.norm.weight"] = torch.ones(60)


def _wrong_shape_head(tensors):
    tensors["lm_head.weight"] = torch.zeros(128, 60)


def _nan_in_a_layer(tensors):
    tensors["model.layers.2.mlp.down_proj.weight"][0, 0] = float("nan")


def _inf_in_the_embedding(tensors):
    tensors["model.embed_tokens.weight"][5, 0] = float("inf")


DAMAGES = [
    pytest.param(_drop_layer, "model.layers.3.* is missing", id="layer-missing"),
    pytest.param(_drop_one_tensor, "model.layers.2.* is missing", id="tensor-missing-in-layer"),
    pytest.param(_missing_head, "missing", id="lm-head-missing"),
    pytest.param(_extra_top_level, "unexpected tensor", id="extra-tensor"),
    pytest.param(_extra_in_a_layer, "unexpected tensor 'model.layers.2.", id="extra-tensor-in-layer"),
    pytest.param(_extra_layer_index, "config has 6 layers", id="extra-layer"),
    pytest.param(_wrong_shape_in_a_layer, "model.layers.2.* has shape", id="wrong-shape-in-layer"),
    pytest.param(_wrong_shape_embedding, "embed_tokens", id="wrong-shape-embedding"),
    pytest.param(_wrong_shape_final_norm, "norm", id="wrong-shape-final-norm"),
    pytest.param(_wrong_shape_head, "lm_head", id="wrong-shape-lm-head"),
    pytest.param(_nan_in_a_layer, "non-finite", id="nan-in-layer"),
    pytest.param(_inf_in_the_embedding, "non-finite", id="inf-in-embedding"),
]


@pytest.fixture(scope="module")
def dense():
    return make_model("llama")


def damaged(model, directory: Path, edit: Edit) -> Path:
    model.save_pretrained(directory)
    tensors = load_file(directory / "model.safetensors")
    edit(tensors)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


def open_source(model, directory: Path, resident: bool) -> LayerwiseModel:
    return LayerwiseModel(
        SafetensorsCheckpoint(directory), model.config, adapter_for(model.config), torch.device("cpu"),
        torch.float32, resident=resident, attn_implementation="sdpa",
    )  # fmt: skip


def use_every_slice(model: LayerwiseModel) -> list[str]:
    """Materialise each slice once, recording which ones were used before an error (if any)."""
    used = []
    hidden, _kwargs = model.layer_inputs(torch.randint(3, 128, (1, 8)))
    used.append("embedding")
    for index in range(model.num_layers):
        with model.layer(index):
            used.append(f"layer {index}")
    with model.head() as logits_of:
        logits_of(hidden)
    used.append("head")
    return used


@pytest.mark.parametrize("resident", [True, False], ids=["resident", "streamed"])
@pytest.mark.parametrize(("edit", "message"), DAMAGES)
def test_a_damaged_source_is_refused_at_construction_or_first_use(dense, edit, message, resident, tmp_path):
    """Never initialised at random, never run with NaN weights: ModelError when the model is opened,
    or at the latest when the damaged slice is first materialised (nothing of it has run)."""
    directory = damaged(dense, tmp_path, edit)
    with pytest.raises(ModelError, match=message):
        use_every_slice(open_source(dense, directory, resident))


def test_a_sound_source_passes_the_same_checks(dense, tmp_path):
    directory = damaged(dense, tmp_path, lambda tensors: None)
    for resident in (True, False):
        used = use_every_slice(open_source(dense, directory, resident))
        assert used == ["embedding", *(f"layer {i}" for i in range(6)), "head"]


@pytest.mark.parametrize(("edit", "message"), [p for p in DAMAGES if not p.marks])
def test_the_engine_refuses_a_damaged_source(dense, edit, message, batches, tmp_path):
    directory = damaged(dense, tmp_path / "src", edit)
    plan = make_plan(PruneSpec(num_drop=2), 6, False)
    with pytest.raises(ModelError, match=message):
        model = open_source(dense, directory, resident=False)
        with StreamCache.open("device", torch.device("cpu"), len(batches)) as cache:
            prune(model, batches, plan, "iterative", cache)


@pytest.mark.parametrize("edit", [_drop_one_tensor, _extra_in_a_layer, _wrong_shape_in_a_layer])
def test_a_mismatched_layer_is_refused_before_any_layer_runs(dense, edit, tmp_path):
    directory = damaged(dense, tmp_path, edit)
    with pytest.raises(ModelError):
        open_source(dense, directory, resident=False)


# -- the stream cache --------------------------------------------------------------------------------


def _parts(generator: torch.Generator) -> list[torch.Tensor]:
    return [torch.randn(2, 5, 8, generator=generator) for _ in range(2)]


@pytest.mark.parametrize("place", ["device", "host", "disk"])
def test_stream_cache_stores_rescales_and_forgets(place, tmp_path):
    generator = torch.Generator().manual_seed(0)
    first, second = _parts(generator), _parts(generator)
    with StreamCache.open(place, torch.device("cpu"), 2, tmp_path) as cache:
        cache.insert(0)
        cache.insert(1)
        for b in range(2):
            cache.put(0, b, first[b])
            cache.put(1, b, second[b])
        size = first[0].numel() * first[0].element_size()
        assert cache.nbytes == cache.peak_nbytes == 4 * size
        assert [torch.equal(cache.get(0, b), first[b]) for b in range(2)] == [True, True]
        cache.rescale(0, 1.5)
        cache.rescale(0, 2.0)
        for b, got in enumerate(cache.batches(0)):
            torch.testing.assert_close(got, first[b] * 3.0)
        assert all(torch.equal(cache.get(1, b), second[b]) for b in range(2))  # only that boundary
        cache.delete(1)
        assert len(cache) == 1 and cache.nbytes == 2 * size and cache.peak_nbytes == 4 * size
        cache.insert(1)
        with pytest.raises(KeyError):
            cache.get(1, 0)  # a new boundary is empty


def test_disk_cache_records_a_rescale_lazily_and_removes_its_directory(tmp_path):
    generator = torch.Generator().manual_seed(1)
    streams, replacement = _parts(generator), torch.randn(2, 5, 8, generator=generator)
    cache = StreamCache.open("disk", torch.device("cpu"), 2, tmp_path)
    directory = cache.directory
    assert directory is not None and directory.parent == tmp_path and directory.is_dir()
    with cache:
        cache.insert(0)
        for b in range(2):
            cache.put(0, b, streams[b])
        files = sorted(directory.iterdir())
        assert len(files) == 2
        written = {path: path.stat().st_mtime_ns for path in files}
        cache.rescale(0, 0.5)
        # nothing rewritten: the files still hold the unscaled streams, the factor is applied on read
        assert {path: path.stat().st_mtime_ns for path in files} == written
        stored = sorted((load_file(path)["h"] for path in files), key=lambda t: t.sum().item())
        expected = sorted(streams, key=lambda t: t.sum().item())
        assert all(torch.equal(s, e) for s, e in zip(stored, expected, strict=True))
        torch.testing.assert_close(cache.get(0, 0), streams[0] * 0.5)
        torch.testing.assert_close(cache.get(0, 1), streams[1] * 0.5)
        # writing one part of a scaled boundary folds the factor into the others first
        cache.put(0, 1, replacement)
        torch.testing.assert_close(cache.get(0, 0), streams[0] * 0.5)
        assert torch.equal(cache.get(0, 1), replacement)
        assert len(list(directory.iterdir())) == 2  # the replaced part's file is gone
        cache.delete(0)
        assert list(directory.iterdir()) == []
        cache.insert(0)
        cache.put(0, 0, replacement)
    assert not directory.exists()
    assert list(tmp_path.iterdir()) == []


CPU = torch.device("cpu")


def test_devices():
    assert execution.resolve_device(ExecutionSpec(device="cpu")) == CPU
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert execution.resolve_device(ExecutionSpec(device="auto")) == CPU
    with pytest.raises(RecipeError, match="CUDA is not available") as info:
        execution.resolve_device(ExecutionSpec(device="cuda"))
    assert info.value.key == "execution.device"
    with pytest.raises(RecipeError) as info:
        validate_recipe({"model": {"source": "x"}, "prune": {"num_drop": 1}, "execution": {"device": "cuda:x"}})
    assert info.value.key == "execution.device"
    assert "is not a device" in str(info.value)
