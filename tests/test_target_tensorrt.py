"""The tensorrt target: it refuses at once, writing nothing, without TensorRT or a GPU; its options
describe a profile the validation fits in; on a CUDA machine with TensorRT it builds a checked engine."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest
from pydantic import ValidationError

from prunecomp_export.errors import TargetUnavailable
from prunecomp_export.targets import tensorrt as target


def test_missing_tensorrt_is_unavailable_and_writes_nothing(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` fail
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(TargetUnavailable, match="pip install tensorrt"):
        target.build(tmp_path / "no-checkpoint-needed", out_dir, target.Options())
    assert list(out_dir.iterdir()) == []


def test_missing_gpu_is_unavailable_and_writes_nothing(monkeypatch, tmp_path):
    torch = pytest.importorskip("torch")
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(TargetUnavailable, match="GPU"):
        target.build(tmp_path / "no-checkpoint-needed", out_dir, target.Options())
    assert list(out_dir.iterdir()) == []


def test_options_defaults_and_profile_rules():
    options = target.Options()
    assert options.precision == "fp16" and options.past.min == 0
    assert options.resolved_tolerance() == target.DEFAULT_TOLERANCE["fp16"]
    assert target.Options(precision="bf16").resolved_tolerance() == target.DEFAULT_TOLERANCE["bf16"]
    with pytest.raises(ValidationError, match="min <= opt <= max"):
        target.Range(min=4, opt=2, max=8)
    with pytest.raises(ValidationError, match=r"past\.min"):
        target.Options(past={"min": 1, "opt": 8, "max": 128})
    with pytest.raises(ValidationError, match="batch"):
        target.Options(batch={"min": 1, "opt": 1, "max": 1})
    with pytest.raises(ValidationError, match="seq"):
        target.Options(seq={"min": 1, "opt": 8, "max": 16}, max_prompt_tokens=32)
    with pytest.raises(ValidationError):
        target.Options(precision="fp32")
    with pytest.raises(ValidationError):
        target.Options(workspace=4)
    for name, field in target.Options.model_fields.items():
        assert field.description, name


def test_profile_shapes_follow_the_ranges():
    options = target.Options(
        batch={"min": 1, "opt": 2, "max": 4},
        seq={"min": 1, "opt": 16, "max": 64},
        past={"min": 0, "opt": 32, "max": 128},
    )
    names = [
        "input_ids",
        "attention_mask",
        "position_ids",
        "past_key_values.0.key",
        "past_key_values.0.value",
    ]
    shapes = target.profile_shapes(options, kv_heads=2, head_dim=16, input_names=names)
    assert shapes["input_ids"] == [(1, 1), (2, 16), (4, 64)]
    assert shapes["position_ids"] == shapes["input_ids"]
    assert shapes["attention_mask"] == [(1, 1), (2, 48), (4, 192)]  # past + seq
    assert shapes["past_key_values.0.value"] == [(1, 2, 0, 16), (2, 2, 32, 16), (4, 2, 128, 16)]


def _tensorrt_and_cuda() -> bool:
    if importlib.util.find_spec("tensorrt") is None:
        return False
    import torch

    return torch.cuda.is_available()


@pytest.mark.skipif(not _tensorrt_and_cuda(), reason="needs tensorrt and an NVIDIA GPU")
def test_engine_matches_transformers(tmp_path: Path):
    from tests.test_target_onnx import make_checkpoint

    checkpoint = make_checkpoint(tmp_path / "tiny")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    options = target.Options(
        batch={"min": 1, "opt": 2, "max": 2},
        seq={"min": 1, "opt": 16, "max": 64},
        past={"min": 0, "opt": 32, "max": 128},
    )
    record = target.build(checkpoint, out_dir, options)
    assert record["passed"] and record["strongly_typed"]
    assert set(record["checks"]) == {"prefill", "decode", "padded_batch"}
    for check in record["checks"].values():
        assert check["max_abs_diff"] <= record["tolerance"]
    assert (out_dir / target.ENGINE_FILE).stat().st_size > 0
    assert (out_dir / "onnx" / "model.onnx").is_file()
