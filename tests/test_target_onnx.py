"""The onnx target on tiny random models: the torch.onnx export and its KV-cache I/O, ONNX Runtime
against transformers, onnxruntime-genai's build, and the one parity check passing on the right
artifact and failing on a broken cache, ignored padding or corrupted weights."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import onnx
import torch
from onnx import numpy_helper

from prunecomp_export.errors import RecipeError, TargetUnavailable
from prunecomp_export.targets import TargetContext, parity
from prunecomp_export.targets import onnx as target
from prunecomp_export.targets.export import torch_onnx
from prunecomp_export.targets.runtimes import ort
from prunecomp_export.targets.runtimes.decoder import greedy_continuations, left_pad
from tests.tiny_checkpoint import EOS, VOCAB, make_checkpoint

PROMPTS = ["Hello, world", "The cat sat"]
IDS = [[72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100], [84, 104, 101, 32, 99, 97, 116]]
OPTIONS = parity.ParityOptions(prompts=PROMPTS, max_new_tokens=6)
LLAMA = TargetContext(architecture="LlamaForCausalLM")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("torch-onnx")
    torch_onnx.export(str(checkpoint), str(out))
    return out


@pytest.fixture(scope="module")
def decoder(exported) -> ort.OrtDecoder:
    return ort.OrtDecoder(exported / torch_onnx.ONNX_FILE, [ort.CPU])


@pytest.fixture(scope="module")
def reference(checkpoint):
    return torch_onnx.load_hf_model(checkpoint)


def judged(checkpoint, step, prompts=IDS, max_new_tokens=6) -> parity.ParityReport:
    continuations = greedy_continuations(step, prompts, max_new_tokens=max_new_tokens, stop_ids=[EOS], top_k=5,
                                         pad_id=EOS)  # fmt: skip
    run = parity.RuntimeRun(runtime="ort", dtype="float32", continuations=continuations)
    return parity.check(checkpoint, PROMPTS, run, OPTIONS, [EOS])


# --- the torch.onnx export ------------------------------------------------------------------------


def test_exported_graph_has_dynamic_kv_io(exported):
    model = onnx.load(str(exported / "model.onnx"), load_external_data=False)
    dims = {
        v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in [*model.graph.input, *model.graph.output]
    }
    assert dims["input_ids"] == ["batch", "seq"]
    assert dims["attention_mask"] == ["batch", "total"]
    for i in range(2):
        assert dims[f"past_key_values.{i}.key"] == ["batch", 2, "past", 16]
        assert dims[f"present.{i}.value"] == ["batch", 2, "total", 16]
    assert dims["logits"] == ["batch", "seq", VOCAB]
    assert any(init.data_location == onnx.TensorProto.EXTERNAL for init in model.graph.initializer)
    assert {o.domain: o.version for o in model.opset_import}[""] == 20


def test_onnx_runtime_matches_transformers_on_unseen_shapes(decoder, reference):
    """Batch 3, a 6-token prefill then a 4-token chunk on top of the runtime's cache, compared with
    one cache-free transformers forward over all 10 tokens."""
    ids = torch.randint(0, 256, (3, 10), generator=torch.Generator().manual_seed(3)).numpy()
    positions = np.broadcast_to(np.arange(10), (3, 10))
    ones = np.ones((3, 10), dtype=np.int64)
    first, presents = decoder(ids[:, :6], ones[:, :6], positions[:, :6])
    second, presents = decoder(ids[:, 6:], ones, positions[:, 6:], presents)
    assert presents[0].shape == (3, 2, 10, 16)
    with torch.no_grad():
        expected = reference(input_ids=torch.as_tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.concatenate([first, second], axis=1), expected, atol=1e-4, rtol=0)


def test_sliding_window_model_exports_with_its_window(tmp_path):
    """Qwen2 with a 4-token sliding window on layer 1, prompts longer than the window: the export
    passes the parity check against the windowed checkpoint's reference."""
    checkpoint = make_checkpoint(tmp_path / "qwen2", arch="qwen2-sliding")
    torch_onnx.export(str(checkpoint), str(tmp_path / "onnx"))
    report = judged(checkpoint, ort.OrtDecoder(tmp_path / "onnx" / torch_onnx.ONNX_FILE, [ort.CPU]))
    assert report.passed, report.summary()


# --- the parity check on ONNX Runtime ---------------------------------------------------------------


def test_the_export_passes_the_parity_check_exactly(checkpoint, decoder):
    report = judged(checkpoint, decoder)
    assert report.passed and report.max_abs_diff < 1e-4, report.summary()
    assert report.new_tokens >= 2 * 2  # both prompts generated several tokens with the runtime's own cache


def test_a_broken_cache_fails(checkpoint, decoder):
    """A runtime whose present tensors are wrong: the prompts' log-probabilities are right, the
    cached steps' are not."""

    def forgetful(ids, mask, positions, past=None):
        logits, presents = decoder(ids, mask, positions, past)
        return logits, [np.zeros_like(p) for p in presents]

    report = judged(checkpoint, forgetful)
    assert not report.passed
    assert max(p.max_abs_diff for p in report.prompts) > report.tolerance.max_abs


def test_ignored_padding_fails(checkpoint, decoder):
    """A runtime that attends to pad tokens: the shorter prompt of the left-padded batch goes wrong."""

    def no_mask(ids, mask, positions, past=None):
        return decoder(ids, np.ones_like(mask), positions, past)

    assert not judged(checkpoint, no_mask).logprobs_passed


def test_corrupted_weights_fail(checkpoint, exported, tmp_path):
    model = onnx.load(str(exported / "model.onnx"))
    init = next(i for i in model.graph.initializer if i.name.endswith(("lm_head.weight", "embed_tokens.weight")))
    weight = numpy_helper.to_array(init)
    factors = np.random.default_rng(0).uniform(0.5, 1.5, weight.shape).astype(weight.dtype)
    init.CopyFrom(numpy_helper.from_array(weight * factors, init.name))
    onnx.save(model, str(tmp_path / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    report = judged(checkpoint, ort.OrtDecoder(tmp_path / "model.onnx", [ort.CPU]))
    assert not report.passed


def test_left_pad_positions_match_generate_convention():
    ids, mask, positions = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert positions.tolist() == [[0, 1, 2], [1, 1, 0]]


# --- the whole target: onnxruntime-genai's builder, in child processes ------------------------------


@pytest.fixture(scope="module")
def built(checkpoint, tmp_path_factory) -> tuple[Path, object]:
    """The target on the tiny Llama (genai's builder supports it: fp32 on the CPU), run once."""
    out = tmp_path_factory.mktemp("onnx-target")
    options = target.Options(prompts=PROMPTS, max_new_tokens=6, provider="cpu")
    return out, target.TARGET.build(checkpoint, out, options, LLAMA)


def test_the_genai_build_passes_the_parity_check(built):
    out, record = built
    assert record.passed, record.parity.summary()
    assert record.artifact["exporter"] == "genai" and record.artifact["model"] == "genai/model.onnx"
    assert record.parity.runtime.startswith("onnxruntime-genai") and record.parity.dtype == "float32"
    assert record.parity.max_abs_diff < 1e-3
    assert all(p.tokenizer_match for p in record.parity.prompts)  # genai's own tokenizer agrees
    config = json.loads((out / "genai" / "genai_config.json").read_text())
    assert config["model"]["decoder"]["num_hidden_layers"] == 2  # the builder read the config's depth
    for name in record.artifact["files"]:
        assert (out / name).is_file()


def test_a_corrupted_genai_package_fails(checkpoint, built, tmp_path):
    import shutil

    out, _ = built
    package = tmp_path / "genai"
    shutil.copytree(out / "genai", package)
    model = onnx.load(str(package / "model.onnx"))
    rng = np.random.default_rng(1)
    init = next(i for i in model.graph.initializer if "layers.0.mlp.down_proj" in i.name and i.data_type == 1)
    weight = numpy_helper.to_array(init)
    init.CopyFrom(numpy_helper.from_array(weight + rng.normal(0, 1.0, weight.shape).astype(weight.dtype), init.name))
    (package / "model.onnx.data").unlink()
    onnx.save(model, str(package / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    from prunecomp_export.targets.runtimes.genai import generate

    run = parity.RuntimeRun.model_validate(generate(str(package), PROMPTS, IDS, 6, [EOS], 5, "float32"))
    assert not parity.check(checkpoint, PROMPTS, run, OPTIONS, [EOS]).passed


# --- options, refused before any weight is read ------------------------------------------------------


def test_options_and_what_each_builder_can_make():
    options = target.Options()
    assert (options.exporter, options.dtype, options.provider) == ("auto", "fp32", "auto")
    for name, field in target.Options.model_fields.items():
        assert field.description, name
    with pytest.raises(RecipeError, match="exporter"):
        target.Plan(target.Options(exporter="genai"), TargetContext(architecture="MixtralForCausalLM"))
    assert not target.Plan(target.Options(), TargetContext(architecture="MixtralForCausalLM")).genai  # torch.onnx
    with pytest.raises(RecipeError, match="fp16 models for cuda only"):
        target.Plan(target.Options(dtype="fp16"), LLAMA)  # the builder has no fp16 CPU model
    with pytest.raises(RecipeError, match="fp32 or fp16"):
        target.Plan(target.Options(exporter="torch", dtype="int4"), LLAMA)
    plan = target.Plan(target.Options(dtype="int4"), LLAMA)
    assert (plan.genai, plan.provider, plan.parity_dtype) == (True, "cpu", "int4")


def test_cuda_provider_without_gpu_is_target_unavailable():
    with pytest.raises(TargetUnavailable, match="cuda"):
        ort.resolve_providers("cuda", "cpu")
    assert ort.resolve_providers("auto", "cpu") == [ort.CPU]


def test_missing_onnxruntime_is_target_unavailable(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    with pytest.raises(TargetUnavailable, match="pip install"):
        target.TARGET.preflight(target.Options(), LLAMA)


def test_target_modules_import_no_runtime():
    code = (
        "import sys; import prunecomp_export.targets.onnx, prunecomp_export.targets.tensorrt, "
        "prunecomp_export.targets.vllm; "
        "heavy = {'torch', 'transformers', 'onnx', 'onnxruntime', 'onnxscript', 'tensorrt', 'onnxruntime_genai'}; "
        "loaded = sorted(heavy & set(sys.modules)); print(loaded); sys.exit(bool(loaded))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
