"""The pruned checkpoint written from the source files (tensor_surgery) is the one the in-memory
route writes (engine.replay + save_checkpoint): same keys, dtypes, shapes, values up to rounding, same
config, same logits after reload; and the adapters' checkpoint-key methods agree with their module
methods (which tensors are writers, how checkpoint tensors map onto a layer module)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM

from prunecomp_export.adapters import adapter_for
from prunecomp_export.adapters.gemma import GemmaAdapter, norm_gain_offset
from prunecomp_export.engine.loop import Step, replay
from prunecomp_export.engine.variant import dense_variant, variant_after
from prunecomp_export.errors import ModelError
from prunecomp_export.output.checkpoint import save_checkpoint
from prunecomp_export.output.tensor_surgery import AUX_FILES, write_variant_checkpoint
from prunecomp_export.source.weights import INDEX, SINGLE, SafetensorsCheckpoint
from tests.conftest import GEMMAS, make_model
from tests.test_checkpoint import tiny_tokenizer

#: (removed original layers, alpha): a gap in the middle, one near the end, and one at layer 0 (the
#: pre-gap form then scales only the embedding); kept: 1, 3, 5
STEPS = [([2], 1.07), ([4], 0.93), ([0], 1.11)]
SOURCE_SHARD = "150KB"  # the tiny models are 0.5-0.9 MB: several source shards


def save_source(model, directory: Path, max_shard_size: str = SOURCE_SHARD) -> SafetensorsCheckpoint:
    model.save_pretrained(directory, max_shard_size=max_shard_size)
    tiny_tokenizer().save_pretrained(directory)
    return SafetensorsCheckpoint(directory)


def layer_tensors(source: SafetensorsCheckpoint, adapter, index: int) -> dict[str, torch.Tensor]:
    prefix = f"{adapter.layer_prefix}{index}."
    keys = source.keys()
    tensors = source.tensors([k for k in keys if k.startswith(prefix)])
    return {k.removeprefix(prefix): v for k, v in tensors.items()}


def layer_inputs(model, input_ids: torch.Tensor) -> list[tuple[torch.Tensor, dict]]:
    """(input, keyword arguments) of every decoder layer in a forward of ``model``."""
    seen: list = [None] * len(model.model.layers)

    def recorder(k):
        def hook(_module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            seen[k] = (hidden, {n: v for n, v in kwargs.items() if n != "hidden_states"})

        return hook

    handles = [
        layer.register_forward_pre_hook(recorder(k), with_kwargs=True) for k, layer in enumerate(model.model.layers)
    ]
    try:
        with torch.no_grad():
            model(input_ids=input_ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def first(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


# -- adapter methods at the checkpoint-key level ------------------------------------------------------


def test_layer_module_tensors_materialise_a_meta_layer_that_computes_the_same(arch, batches, tmp_path):
    model = make_model(arch)
    adapter = adapter_for(model.config)
    source = save_source(model, tmp_path)
    keys = source.keys()
    assert {k for k in keys if adapter.split_layer_key(k) is None} == set(adapter.non_layer_keys())
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(copy.deepcopy(model.config)).eval()
    inputs = layer_inputs(model, batches[0])
    generator = torch.Generator().manual_seed(3)
    for j, (layer, meta_layer) in enumerate(zip(model.model.layers, meta.model.layers, strict=True)):
        converted = adapter.layer_module_tensors(layer_tensors(source, adapter, j), meta_layer)
        meta_layer.load_state_dict(converted, assign=True, strict=True)
        assert not any(t.is_meta for t in [*meta_layer.parameters(), *meta_layer.buffers()])
        hidden = torch.randn(inputs[j][0].shape, generator=generator)
        with torch.no_grad():
            assert torch.equal(first(meta_layer(hidden, **inputs[j][1])), first(layer(hidden, **inputs[j][1])))
        # the module's own layout (fused experts in transformers 5) passes through unchanged
        state = layer.state_dict()
        assert adapter.layer_module_tensors(state, meta_layer).keys() == state.keys()


def test_scale_writer_tensor_scales_what_scale_residual_writes_scales(arch, tmp_path):
    """Per-expert checkpoint layout and the module's (fused) layout alike, bit for bit."""
    model = make_model(arch)
    adapter = adapter_for(model.config)
    source = save_source(model, tmp_path)
    factor = 1.37
    for j, layer in enumerate(model.model.layers):
        expected = copy.deepcopy(layer)
        adapter.scale_residual_writes(expected, factor)
        expected = expected.state_dict()
        for tensors in (layer_tensors(source, adapter, j), layer.state_dict()):
            written = {k: adapter.scale_writer_tensor(k, t, factor) for k, t in tensors.items()}
            assert any(t is not None for t in written.values())
            got = adapter.layer_module_tensors({k: t if written[k] is None else written[k] for k, t in tensors.items()})
            assert got.keys() == expected.keys()
            for key, tensor in got.items():
                assert torch.equal(tensor, expected[key]), (arch, j, key)


@pytest.mark.parametrize("arch", sorted(GEMMAS))
def test_gemma_key_level_gain_offset_is_the_offset_measured_on_the_modules(arch):
    model = make_model(arch)
    adapter = adapter_for(model.config)
    assert isinstance(adapter, GemmaAdapter)
    for layer in model.model.layers:
        for norm in adapter.residual_writers(layer):
            assert norm_gain_offset(norm) == adapter.gain_offset


# -- the surgery against the in-memory fold -----------------------------------------------------------


def gain_offset(adapter, key: str) -> float:
    """Compare Gemma's writer norms as gains (offset + w): w' = f(1 + w) - 1 is near 0 where f(1 + w)
    is near 1, so an absolute rounding error of the gain is a large relative one of w'."""
    layer = adapter.split_layer_key(key)
    if isinstance(adapter, GemmaAdapter) and layer and layer[1].removesuffix(".weight") in adapter.writer_paths:
        return adapter.gain_offset
    return 0.0


def times_scaled(form: str, variant) -> dict[str, int]:
    """How many steps multiplied each output layer's writes (key: layer prefix) and the embedding:
    a tensor scaled once is rounded once on both routes, so it must be bit-identical."""
    counts = {"embedding": 0}
    for k in range(len(STEPS)):
        before, after = variant_after("", 6, STEPS[:k], form), variant_after("", 6, STEPS[: k + 1], form)
        counts["embedding"] += after.embedding_scale != before.embedding_scale
        for layer in variant.kept:
            counts[layer] = counts.get(layer, 0) + (after.scale_of(layer) != before.scale_of(layer))
    return counts


def rounding_count(adapter, variant, counts: dict, key: str) -> int:
    layer = adapter.split_layer_key(key)
    if layer is not None:
        written = adapter.scale_writer_tensor(layer[1], torch.zeros(1), 2.0) is not None
        return counts[variant.kept[layer[0]]] if written else 0
    return counts["embedding"] if key == adapter.embedding_key else 0


def compare_weights(got_dir: Path, want_dir: Path, adapter, dtype: torch.dtype, rounded_once) -> float:
    """Same keys, dtypes and shapes; tensors rounded at most once on both routes (``rounded_once(key)``)
    bitwise equal, the others equal up to rounding. Returns the fraction of elements not bitwise equal."""
    got, want = SafetensorsCheckpoint(got_dir), SafetensorsCheckpoint(want_dir)
    keys = got.keys()
    assert sorted(keys) == sorted(want.keys())
    a, b = got.tensors(keys), want.tensors(keys)
    different = total = 0
    for key in keys:
        assert a[key].dtype == b[key].dtype == dtype, key
        assert a[key].shape == b[key].shape, key
        if rounded_once(key):
            assert torch.equal(a[key], b[key]), key
        offset = gain_offset(adapter, key)
        x, y = a[key].float() + offset, b[key].float() + offset
        if dtype == torch.float32:
            # the in-memory fold rounds to fp32 after each of up to 3 steps, the surgery once
            torch.testing.assert_close(x, y, rtol=1e-6, atol=0, msg=key)
        else:
            # bf16 keeps 8 significant bits: rounding after each step vs once differs by <= 2 ulps
            # (2 * 2^-7 relative at worst); a Gemma gain's offset w' by up to its bf16 ulp, ~2^-8
            torch.testing.assert_close(x, y, rtol=2**-6, atol=2**-8 if offset else 0, msg=key)
        different += int((a[key] != b[key]).sum())
        total += a[key].numel()
    return different / total


def assert_correctly_rounded(got_dir: Path, exact_dir: Path, adapter) -> None:
    """Each bf16 tensor of ``got_dir`` is the nearest bf16 to the fp32 fold in ``exact_dir`` (to within
    the fp32 fold's own rounding): what rounding once, at the end, gives."""
    got, exact = SafetensorsCheckpoint(got_dir), SafetensorsCheckpoint(exact_dir)
    keys = got.keys()
    a, b = got.tensors(keys), exact.tensors(keys)
    for key in keys:
        x, y = a[key].float(), b[key]
        _, exponent = torch.frexp(y)  # |y| in [2^(e-1), 2^e): bf16 spacing 2^(e-8), half of it 2^(e-9)
        half_ulp = torch.ldexp(torch.ones_like(y), exponent - 9)
        slack = 8 * 2**-24 * (y.abs() + gain_offset(adapter, key))  # the fp32 roundings of both routes
        assert ((x - y).abs() <= half_ulp + slack).all(), key


def surgery_and_memory(arch, tied, untie, form, dtype, tmp_path):
    """The surgery output (tmp/surgery), the in-memory fold's checkpoint (tmp/memory) and, for bf16,
    the in-memory fold of the source upcast to fp32 (tmp/exact); returns the in-memory models."""
    model = make_model(arch, tied=tied).to(dtype)
    adapter = adapter_for(model.config)
    source = save_source(model, tmp_path / "source")
    assert len(source.shards) >= 2
    steps = [Step(list(removed), alpha) for removed, alpha in STEPS]
    memory = copy.deepcopy(model)
    replay(memory, adapter, steps, form, untie)
    save_checkpoint(memory, tiny_tokenizer(), tmp_path / "memory")
    exact = None
    if dtype != torch.float32:
        exact = copy.deepcopy(model).float()
        replay(exact, adapter, steps, form, untie)
        save_checkpoint(exact, tiny_tokenizer(), tmp_path / "exact")
    variant = variant_after("test", 6, STEPS, form, untie)
    assert variant.kept == (1, 3, 5)
    config = AutoConfig.from_pretrained(tmp_path / "source")
    write_variant_checkpoint(source, config, adapter, variant, tmp_path / "surgery")
    return memory, exact, adapter, variant


def check_against_memory(arch, tied, untie, form, dtype, tmp_path, batches):
    memory, exact, adapter, variant = surgery_and_memory(arch, tied, untie, form, dtype, tmp_path)
    surgery, in_memory = tmp_path / "surgery", tmp_path / "memory"
    counts = times_scaled(form, variant)
    fraction = compare_weights(
        surgery, in_memory, adapter, dtype, lambda k: rounding_count(adapter, variant, counts, k) <= 1
    )
    if dtype == torch.bfloat16:
        # only tensors scaled in 2 or 3 steps can differ (checked above), about half their elements:
        # measured <= 6.5% of all elements (fp32: <= 10.5%, all within 1e-6)
        assert fraction < 0.1
        assert_correctly_rounded(surgery, tmp_path / "exact", adapter)

    # config.json: the same, field for field
    assert json.loads((surgery / "config.json").read_text()) == json.loads((in_memory / "config.json").read_text())
    # tokenizer and generation files: copied from the source, as the in-memory route writes them
    assert {p.name for p in surgery.iterdir()} == {p.name for p in in_memory.iterdir()}
    names = {p.name for p in surgery.iterdir()} & set(AUX_FILES)
    assert names >= {"generation_config.json", "tokenizer.json", "tokenizer_config.json"}
    for name in names:
        assert (surgery / name).read_bytes() == (tmp_path / "source" / name).read_bytes()
        assert (surgery / name).read_bytes() == (in_memory / name).read_bytes()

    # untouched tensors are bit-identical to the source; an untied head is the unscaled embedding
    source = SafetensorsCheckpoint(tmp_path / "source")
    out = SafetensorsCheckpoint(surgery)
    for position, (original, scale) in enumerate(zip(variant.kept, variant.writer_scale, strict=True)):
        if scale == 1.0:
            want = layer_tensors(source, adapter, original)
            got = layer_tensors(out, adapter, position)
            assert all(torch.equal(got[k], want[k]) for k in want)
    if tied:
        assert (adapter.lm_head_key in out) == untie
    if untie:
        assert torch.equal(out.tensor(adapter.lm_head_key), source.tensor(adapter.embedding_key))

    # the reloaded surgery checkpoint computes what the in-memory folded model computes. bf16 models
    # are evaluated in fp32: bf16 arithmetic adds noise of its own that can flip MoE top-k routing
    # (measured: 20% of the largest logit on qwen3_moe), which says nothing about the weights.
    attention = memory.config._attn_implementation
    reloaded = AutoModelForCausalLM.from_pretrained(surgery, attn_implementation=attention).eval()
    assert reloaded.dtype == dtype and reloaded.config.num_hidden_layers == 3
    with torch.no_grad():
        got = reloaded.float()(input_ids=batches[0], use_cache=False).logits
        want = memory.float()(input_ids=batches[0], use_cache=False).logits
    scale = want.abs().max().item()
    if dtype == torch.float32:
        assert (got - want).abs().max().item() <= 1e-5 * scale  # measured <= 1.5e-6
    else:
        # weights 1-2 bf16 ulps apart in a few % of elements: measured <= 1.8% of the largest logit
        assert (got - want).abs().max().item() <= 3e-2 * scale
        # against the fp32 fold, the error of storing it in bf16 once: measured <= 1.1% (the
        # in-memory bf16 fold, rounded after every step: up to 1.6%)
        with torch.no_grad():
            ideal = exact(input_ids=batches[0], use_cache=False).logits
        assert (got - ideal).abs().max().item() <= 2e-2 * scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("form", ["pre_gap", "post_gap"])
def test_surgery_equals_the_in_memory_fold(arch, form, dtype, tmp_path, batches):
    check_against_memory(arch, False, False, form, dtype, tmp_path, batches)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("form", ["pre_gap", "post_gap"])
@pytest.mark.parametrize(("arch", "untie"), [("llama", False), ("llama", True), *((g, False) for g in sorted(GEMMAS))])
def test_surgery_equals_the_in_memory_fold_tied(arch, untie, form, dtype, tmp_path, batches):
    check_against_memory(arch, True, untie, form, dtype, tmp_path, batches)


# -- output format and refusals -----------------------------------------------------------------------


def test_dense_variant_copies_every_tensor_bit_for_bit(tmp_path):
    model = make_model("qwen2_moe").to(torch.bfloat16)
    source = save_source(model, tmp_path / "source")
    adapter = adapter_for(model.config)
    config = AutoConfig.from_pretrained(tmp_path / "source")
    write_variant_checkpoint(source, config, adapter, dense_variant(6), tmp_path / "out")
    out = SafetensorsCheckpoint(tmp_path / "out")
    assert sorted(out.keys()) == sorted(source.keys())
    got, want = out.tensors(out.keys()), source.tensors(out.keys())
    assert all(torch.equal(got[k], want[k]) and got[k].dtype == want[k].dtype for k in got)


def test_sharded_output_has_a_correct_index(tmp_path, batches):
    model = make_model("mixtral")
    adapter = adapter_for(model.config)
    source = save_source(model, tmp_path / "source")
    config = AutoConfig.from_pretrained(tmp_path / "source")
    variant = variant_after("test", 6, STEPS, "pre_gap")
    limit = 100_000
    files = write_variant_checkpoint(source, config, adapter, variant, tmp_path / "sharded", max_shard_size=limit)
    write_variant_checkpoint(source, config, adapter, variant, tmp_path / "single")
    count = len(files)
    assert count >= 3
    assert [f.name for f in files] == [f"model-{k:05d}-of-{count:05d}.safetensors" for k in range(1, count + 1)]
    assert not (tmp_path / "sharded" / SINGLE).exists() and not list((tmp_path / "sharded").glob(".*"))
    index = json.loads((tmp_path / "sharded" / INDEX).read_text())
    assert set(index["weight_map"].values()) == {f.name for f in files}
    total = 0
    for f in files:
        with safe_open(f, "pt") as handle:
            assert handle.metadata() == {"format": "pt"}
            keys = set(handle.keys())
            sizes = [handle.get_tensor(k).numel() * handle.get_tensor(k).element_size() for k in keys]
        assert keys == {k for k, name in index["weight_map"].items() if name == f.name}
        assert sum(sizes) <= limit or len(sizes) == 1
        total += sum(sizes)
    assert index["metadata"]["total_size"] == total
    single = SafetensorsCheckpoint(tmp_path / "single")
    assert single.shards == [tmp_path / "single" / SINGLE] and not (tmp_path / "single" / INDEX).exists()
    sharded = SafetensorsCheckpoint(tmp_path / "sharded")
    assert sorted(sharded.keys()) == sorted(single.keys())
    a, b = sharded.tensors(single.keys()), single.tensors(single.keys())
    assert all(torch.equal(a[k], b[k]) for k in a)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded").eval()
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "single").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=batches[0]).logits, reference(input_ids=batches[0]).logits)


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_a_source_saved_with_fused_experts_gives_the_same_model(arch, tmp_path, batches):
    """transformers 5 saves experts per expert, but a checkpoint may hold the module's fused layout."""
    model = make_model(arch)
    adapter = adapter_for(model.config)
    save_source(model, tmp_path / "per_expert")
    fused = tmp_path / "fused"
    fused.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, fused / SINGLE, metadata={"format": "pt"})
    for name in ("config.json", "generation_config.json"):
        (fused / name).write_bytes((tmp_path / "per_expert" / name).read_bytes())
    fused_keys = SafetensorsCheckpoint(fused).keys()
    assert any(k.endswith("mlp.experts.down_proj") for k in fused_keys)
    config = AutoConfig.from_pretrained(fused)
    variant = variant_after("test", 6, STEPS, "pre_gap")
    for name in ("per_expert", "fused"):
        source = SafetensorsCheckpoint(tmp_path / name)
        write_variant_checkpoint(source, config, adapter, variant, tmp_path / f"out_{name}")
    logits = []
    for name in ("per_expert", "fused"):
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / f"out_{name}").eval()
        with torch.no_grad():
            logits.append(reloaded(input_ids=batches[0]).logits)
    assert torch.equal(*logits)


def drop_from_index(directory: Path, key: str) -> None:
    index = json.loads((directory / INDEX).read_text())
    del index["weight_map"][key]
    (directory / INDEX).write_text(json.dumps(index))


@pytest.mark.parametrize(
    ("arch", "key"),
    [
        ("llama", "model.layers.3.mlp.down_proj.weight"),
        ("llama", "model.norm.weight"),
        ("mixtral", "model.layers.3.block_sparse_moe.experts.2.w2.weight"),
        ("qwen2_moe", "model.layers.1.mlp.experts.3.up_proj.weight"),
    ],
)
def test_a_missing_tensor_of_a_kept_layer_is_refused_by_name(arch, key, tmp_path):
    model = make_model(arch)
    save_source(model, tmp_path / "source")
    drop_from_index(tmp_path / "source", key)
    source = SafetensorsCheckpoint(tmp_path / "source")
    config = AutoConfig.from_pretrained(tmp_path / "source")
    variant = variant_after("test", 6, STEPS, "post_gap")
    with pytest.raises(ModelError, match=key.replace(".", r"\.")):
        write_variant_checkpoint(source, config, adapter_for(config), variant, tmp_path / "out")
    assert not list((tmp_path / "out").glob("*.safetensors")) if (tmp_path / "out").exists() else True


def test_a_missing_tensor_of_a_removed_layer_does_not_matter(tmp_path):
    save_source(make_model("llama"), tmp_path / "source")
    drop_from_index(tmp_path / "source", "model.layers.2.mlp.down_proj.weight")
    config = AutoConfig.from_pretrained(tmp_path / "source")
    variant = variant_after("test", 6, STEPS, "post_gap")
    write_variant_checkpoint(
        SafetensorsCheckpoint(tmp_path / "source"), config, adapter_for(config), variant, tmp_path / "o"
    )
    assert SafetensorsCheckpoint(tmp_path / "o").keys()


@pytest.mark.parametrize(
    "key", ["model.layers.3.mlp.extra.weight", "model.layers.6.mlp.down_proj.weight", "extra.weight"]
)
def test_an_unexpected_tensor_is_refused_by_name(key, tmp_path):
    save_source(make_model("llama"), tmp_path / "source")
    save_file({key: torch.zeros(2)}, tmp_path / "source" / "extra.safetensors")
    index = json.loads((tmp_path / "source" / INDEX).read_text())
    index["weight_map"][key] = "extra.safetensors"
    (tmp_path / "source" / INDEX).write_text(json.dumps(index))
    config = AutoConfig.from_pretrained(tmp_path / "source")
    variant = variant_after("test", 6, STEPS, "post_gap")
    with pytest.raises(ModelError, match=key.replace(".", r"\.")):
        write_variant_checkpoint(
            SafetensorsCheckpoint(tmp_path / "source"), config, adapter_for(config), variant, tmp_path / "o"
        )


def test_a_config_without_architectures_gets_the_causal_lm_class(tmp_path):
    """Configs read from GGUF name no class; vLLM and onnxruntime-genai dispatch on it."""
    model = make_model("llama")
    model.config.architectures = None
    model.save_pretrained(tmp_path / "src")
    variant = variant_after("prunecomp", 6, [([2], 1.1)], "pre_gap")
    write_variant_checkpoint(
        SafetensorsCheckpoint(tmp_path / "src"), model.config, adapter_for(model.config), variant, tmp_path / "out"
    )
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
