"""The onnx target on tiny random models: export, ONNX Runtime parity with transformers, and parity
checks that fail when the artifact is wrong.

One tiny Llama is exported once per module (the dynamo exporter takes a while even for two
layers); the tests then reuse its artifact.
"""

from __future__ import annotations

import json
import shutil
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
from pydantic import ValidationError

from prunecomp_export.errors import TargetUnavailable, ValidationFailed
from prunecomp_export.targets import onnx as target

EOS = 256
VOCAB = 260


def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges (one token per byte) plus an end-of-text token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(["<|endoftext|>"])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def make_checkpoint(directory: Path, *, arch: str = "llama", layers: int = 2, seed: int = 0) -> Path:
    """A random causal LM saved as a plain HF checkpoint (with a tokenizer). Weights are large enough
    that greedy decoding does not collapse to one repeated token."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    common = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=256,
        bos_token_id=EOS,
        eos_token_id=EOS,
        pad_token_id=EOS,
        tie_word_embeddings=True,
    )
    if arch == "llama":
        config = LlamaConfig(**common)
    elif arch == "qwen2-sliding":
        # Layer 1 attends to a 4-token window only; validation prompts are longer than that.
        config = Qwen2Config(**common, use_sliding_window=True, sliding_window=4, max_window_layers=1)
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0, 0.3)
    model.save_pretrained(directory)
    byte_tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def built(checkpoint, tmp_path_factory) -> tuple[Path, dict]:
    """The whole target (export, ORT parity, genai package + greedy parity), run once."""
    out_dir = tmp_path_factory.mktemp("onnx-target")
    record = target.build(checkpoint, out_dir, target.Options(provider="cpu", genai_max_new_tokens=12))
    return out_dir, record


@pytest.fixture(scope="module")
def reference(checkpoint):
    return target.load_hf_model(checkpoint)


@pytest.fixture(scope="module")
def decoder(built) -> target.OrtDecoder:
    return target.OrtDecoder(built[0] / target.ONNX_FILE, ["CPUExecutionProvider"])


PROMPTS = [[72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100], [84, 104, 101, 32, 99, 97, 116]]


def test_build_writes_a_validated_package(built):
    out_dir, record = built
    assert record["passed"] is True
    assert record["target"] == "onnx" and record["dtype"] == "fp32" and record["opset"] == 20
    assert record["providers"][0] == "CPUExecutionProvider"
    assert set(record["checks"]) == {"prefill", "decode", "padded_batch"}
    for check in record["checks"].values():
        assert check["passed"] and 0 <= check["max_abs_diff"] <= record["tolerance"]
    assert record["checks"]["padded_batch"]["lengths"][0] != record["checks"]["padded_batch"]["lengths"][1]
    # every listed file exists, weights are in the external data file
    for name in record["files"]:
        assert (out_dir / name).is_file()
    assert {"model.onnx", "model.onnx.data", "genai/genai_config.json"} <= set(record["files"])
    assert (out_dir / "model.onnx.data").stat().st_size > 0
    json.dumps(record)  # manifest material


def test_the_built_record_gives_the_reports_parity_rows(built):
    """The report reads the record ``build`` returns: each logit check against the tolerance, then
    the genai package's greedy tokens (all of them equal)."""
    _, record = built
    rows = target.parity_checks(record)
    assert [r["name"] for r in rows] == ["prefill", "decode", "padded_batch", "genai_greedy"]
    for row, check in zip(rows[:3], record["checks"].values(), strict=True):
        assert (row["measured"], row["limit"], row["passed"]) == (check["max_abs_diff"], record["tolerance"], True)
    greedy = record["genai"]["greedy"]
    assert rows[3]["measured"] == rows[3]["limit"] == len(greedy["hf_tokens"]) > 0
    assert rows[3]["passed"] is True


def test_genai_package_generates_like_transformers(built, checkpoint, reference):
    out_dir, record = built
    greedy = record["genai"]["greedy"]
    assert greedy["passed"] and greedy["tokenizer_match"]
    # Recompute HF greedy tokens here, independently of the target's own comparison.
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(checkpoint)(greedy["prompt"], return_tensors="pt").input_ids
    with torch.no_grad():
        out = reference.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12)
    expected = out[0, ids.shape[1] :].tolist()
    expected = expected[: expected.index(EOS)] if EOS in expected else expected
    assert greedy["genai_tokens"] == expected
    assert len(set(expected)) > 1  # the tiny model does not just repeat one token
    config = json.loads((out_dir / "genai" / "genai_config.json").read_text())
    assert config["model"]["decoder"]["num_hidden_layers"] == 2


def test_exported_graph_has_dynamic_kv_io(built):
    out_dir, _ = built
    model = onnx.load(str(out_dir / "model.onnx"), load_external_data=False)
    dims = {
        v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in [*model.graph.input, *model.graph.output]
    }
    assert dims["input_ids"] == ["batch", "seq"]
    assert dims["attention_mask"] == ["batch", "total"]
    assert dims["position_ids"] == ["batch", "seq"]
    for i in range(2):
        assert dims[f"past_key_values.{i}.key"] == ["batch", 2, "past", 16]
        assert dims[f"present.{i}.value"] == ["batch", 2, "total", 16]
    assert dims["logits"] == ["batch", "seq", VOCAB]
    assert any(init.data_location == onnx.TensorProto.EXTERNAL for init in model.graph.initializer)
    assert {o.domain: o.version for o in model.opset_import}[""] == 20


def test_onnx_runtime_matches_transformers_on_unseen_shapes(decoder, reference):
    """Batch 3, a 6-token prefill then a 4-token chunk on top of the runtime's cache, compared with
    one cache-free transformers forward over all 10 tokens."""
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 256, (3, 10), generator=generator).numpy()
    positions = np.broadcast_to(np.arange(10), (3, 10))
    ones = np.ones((3, 10), dtype=np.int64)
    first, presents = decoder(ids[:, :6], ones[:, :6], positions[:, :6])
    second, presents = decoder(ids[:, 6:], ones, positions[:, 6:], presents)
    assert presents[0].shape == (3, 2, 10, 16)
    with torch.no_grad():
        expected = reference(input_ids=torch.as_tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.concatenate([first, second], axis=1), expected, atol=1e-4, rtol=0)


def test_parity_checks_pass_on_the_real_export(decoder, reference):
    checks = target.check_parity(decoder, reference, PROMPTS, tolerance=1e-4, decode_steps=3, pad_id=EOS)
    assert all(c["passed"] for c in checks.values()), checks
    assert checks["decode"]["tokens"] == 3


def test_corrupted_weights_fail_validation(built, checkpoint, reference, tmp_path):
    """Scaling the (tied) embedding / output projection by random factors must be caught."""
    out_dir, _ = built
    model = onnx.load(str(out_dir / "model.onnx"))
    init = next(i for i in model.graph.initializer if i.name.endswith(("lm_head.weight", "embed_tokens.weight")))
    weight = numpy_helper.to_array(init)
    factors = np.random.default_rng(0).uniform(0.5, 1.5, weight.shape).astype(weight.dtype)
    init.CopyFrom(numpy_helper.from_array(weight * factors, init.name))
    onnx.save(model, str(tmp_path / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    options = target.Options(provider="cpu", genai=False)
    with pytest.raises(ValidationFailed, match="max abs logit diff"):
        target.validate_onnx(checkpoint, tmp_path / "model.onnx", options, model=reference)


def test_broken_cache_fails_only_the_cached_checks(decoder, reference):
    """A runtime whose present tensors are wrong passes the prefill but not the decode checks."""

    def forgetful(ids, mask, positions, past=None):
        logits, presents = decoder(ids, mask, positions, past)
        return logits, [np.zeros_like(p) for p in presents]

    checks = target.check_parity(forgetful, reference, PROMPTS, tolerance=1e-3, pad_id=EOS)
    assert checks["prefill"]["passed"]
    assert not checks["decode"]["passed"]
    assert checks["padded_batch"]["prefill_max_abs_diff"] <= 1e-3
    assert checks["padded_batch"]["decode_max_abs_diff"] > 1e-3


def test_ignored_padding_fails_the_padded_batch_check(decoder, reference):
    """A runtime that attends to pad tokens passes unpadded checks but not the left-padded batch."""

    def no_mask(ids, mask, positions, past=None):
        return decoder(ids, np.ones_like(mask), positions, past)

    checks = target.check_parity(no_mask, reference, PROMPTS, tolerance=1e-3, pad_id=EOS)
    assert checks["prefill"]["passed"] and checks["decode"]["passed"]
    assert not checks["padded_batch"]["passed"]


def test_genai_check_fails_for_a_corrupted_package(built, checkpoint, reference, tmp_path):
    out_dir, _ = built
    package = tmp_path / "genai"
    shutil.copytree(out_dir / "genai", package)
    model = onnx.load(str(package / "model.onnx"))
    rng = np.random.default_rng(1)
    for init in model.graph.initializer:
        if "layers.0.mlp.down_proj" in init.name and init.data_type == onnx.TensorProto.FLOAT:
            weight = numpy_helper.to_array(init)
            init.CopyFrom(
                numpy_helper.from_array(weight + rng.normal(0, 1.0, weight.shape).astype(weight.dtype), init.name)
            )
            break
    else:
        pytest.fail("no float down_proj weight in the genai model")
    (package / "model.onnx.data").unlink()
    onnx.save(model, str(package / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    result = target.check_genai_greedy(checkpoint, package, reference, "The cat sat", 12)
    assert not result["passed"] and result["first_mismatch"] is not None


def test_sliding_window_model_exports_with_its_window(tmp_path):
    """Qwen2 with a 4-token sliding window on layer 1: the export honours the window (it matches the
    windowed model on prompts longer than the window, and not the same weights without a window)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    checkpoint = make_checkpoint(tmp_path / "qwen2", arch="qwen2-sliding", layers=2)
    target.export_onnx(checkpoint, tmp_path / "onnx")
    run = target.OrtDecoder(tmp_path / "onnx" / target.ONNX_FILE, ["CPUExecutionProvider"])
    windowed = target.load_hf_model(checkpoint)
    checks = target.check_parity(run, windowed, PROMPTS, tolerance=1e-4, decode_steps=3, pad_id=EOS)
    assert all(c["passed"] for c in checks.values()), checks

    full_config = Qwen2Config(**{**windowed.config.to_dict(), "use_sliding_window": False, "layer_types": None})
    unwindowed = AutoModelForCausalLM.from_config(full_config).eval()
    unwindowed.load_state_dict(windowed.state_dict())
    checks = target.check_parity(run, unwindowed, PROMPTS, tolerance=1e-4, pad_id=EOS)
    assert not checks["prefill"]["passed"]


def test_max_abs_diff_treats_non_finite_as_failure():
    a = np.zeros((2, 3), dtype=np.float32)
    assert target.max_abs_diff(a, a + 0.25) == pytest.approx(0.25)
    assert target.max_abs_diff(np.full_like(a, np.nan), a) == float("inf")
    with pytest.raises(ValidationFailed, match="shape"):
        target.max_abs_diff(a, a[:1])


def test_left_pad_positions_match_generate_convention():
    ids, mask, positions = target.left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert positions.tolist() == [[0, 1, 2], [1, 1, 0]]


def test_options_defaults_and_strictness():
    options = target.Options()
    assert options.dtype == "fp32" and options.genai and options.provider == "auto"
    assert options.resolved_tolerance() == target.DEFAULT_TOLERANCE["fp32"]
    assert target.Options(dtype="fp16").resolved_tolerance() > options.resolved_tolerance()
    assert target.Options(tolerance=0.1).resolved_tolerance() == 0.1
    with pytest.raises(ValidationError):
        target.Options(dtyp="fp16")
    with pytest.raises(ValidationError):
        target.Options(dtype="fp16", provider="cpu")  # genai has no fp16 CPU model
    with pytest.raises(ValidationError):
        target.Options(prompts=["only one"])
    for name, field in target.Options.model_fields.items():
        assert field.description, name


def test_missing_onnxruntime_is_target_unavailable(monkeypatch, tmp_path, checkpoint):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    with pytest.raises(TargetUnavailable, match="pip install"):
        target.build(checkpoint, tmp_path, target.Options())
    assert list(tmp_path.iterdir()) == []


def test_cuda_provider_without_gpu_is_target_unavailable():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(TargetUnavailable, match="cuda"):
        target.resolve_providers("cuda")
    assert target.resolve_providers("auto") == ["CPUExecutionProvider"]


def test_target_module_imports_no_runtime():
    code = (
        "import sys; import prunecomp_export.targets.onnx, prunecomp_export.targets.tensorrt; "
        "heavy = {'torch', 'transformers', 'onnx', 'onnxruntime', 'onnxscript', 'tensorrt'}; "
        "loaded = sorted(heavy & set(sys.modules)); print(loaded); sys.exit(bool(loaded))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
