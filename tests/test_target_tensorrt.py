"""The tensorrt target: it refuses at once, writing nothing, without TensorRT (or TensorRT-LLM) or
enough GPUs; its options describe a profile the check fits in; TensorRT-LLM's orchestration runs on a
stand-in package (the memory the plan gives it, tensor parallelism, serve.sh, the parity check); on a
CUDA machine with TensorRT it builds and checks a plain engine."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import types
from pathlib import Path

import pytest
from pydantic import ValidationError

from prunecomp_export.errors import TargetUnavailable
from prunecomp_export.targets import TargetContext
from prunecomp_export.targets import tensorrt as target
from prunecomp_export.targets.export.tensorrt import Range, profile_shapes

CONTEXT = TargetContext(architecture="LlamaForCausalLM")


def test_missing_tensorrt_is_unavailable_and_writes_nothing(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` fail
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(TargetUnavailable, match="pip install tensorrt"):
        target.TARGET.build(tmp_path / "no-checkpoint-needed", out_dir, target.Options(), CONTEXT)
    assert list(out_dir.iterdir()) == []


def test_missing_gpu_is_unavailable_and_writes_nothing(monkeypatch, tmp_path):
    torch = pytest.importorskip("torch")
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(TargetUnavailable, match="GPU"):
        target.TARGET.build(tmp_path / "no-checkpoint-needed", out_dir, target.Options(), CONTEXT)
    assert list(out_dir.iterdir()) == []


def test_tensorrt_llm_is_refused_without_the_package_or_enough_gpus(monkeypatch, tmp_path):
    torch = pytest.importorskip("torch")
    options = target.Options(runtime="tensorrt_llm", tensor_parallel_size=4)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tensorrt_llm" else real(name, *a)
    )
    with pytest.raises(TargetUnavailable, match="needs TensorRT-LLM"):
        target.TARGET.preflight(options, CONTEXT)
    monkeypatch.syspath_prepend(str(_fake(tmp_path)))
    monkeypatch.setattr(importlib.util, "find_spec", real)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(TargetUnavailable, match=r"tensor_parallel_size 4 needs 4 NVIDIA GPU.*sees 2"):
        target.TARGET.preflight(options, CONTEXT)


def _fake(tmp_path: Path) -> Path:
    from tests.fake_tensorrt_llm import fake_tensorrt_llm

    return fake_tensorrt_llm(tmp_path)


def test_tensorrt_llm_orchestration_on_a_stand_in(monkeypatch, tmp_path):
    """Two GPUs (claimed), bf16, the plan's share of the GPU: TensorRT-LLM gets them, its continuations
    are judged against the reference, serve.sh serves the checkpoint with the same settings."""
    torch = pytest.importorskip("torch")
    from tests.tiny_checkpoint import make_checkpoint

    root = _fake(tmp_path)
    monkeypatch.syspath_prepend(str(root))  # find_spec in this process
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH")) if p))
    monkeypatch.setenv("FAKE_TRTLLM_RECORD", str(tmp_path / "llm.json"))
    monkeypatch.setenv("PRUNECOMP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    checkpoint = make_checkpoint(tmp_path / "output" / "checkpoint")
    out = tmp_path / "output" / "targets" / "tensorrt"
    out.mkdir(parents=True)
    options = target.Options(runtime="tensorrt_llm", tensor_parallel_size=2, precision="bf16",
                             prompts=["Hello, world", "The cat"], max_new_tokens=4)  # fmt: skip
    context = CONTEXT.model_copy(update={"vllm_engine": {"gpu_memory_utilization": 0.5}})
    record = target.TARGET.build(checkpoint, out, options, context)
    assert record.passed, record.parity.summary()
    assert (record.parity.runtime, record.parity.dtype) == ("TensorRT-LLM 0.0-fake", "bfloat16")
    given = json.loads((tmp_path / "llm.json").read_text())
    assert (given["tensor_parallel_size"], given["dtype"], given["free_gpu_memory_fraction"]) == (2, "bfloat16", 0.5)
    script = (out / target.SERVE_SCRIPT).read_text()
    assert 'exec trtllm-serve "$MODEL" --tp_size 2 --kv_cache_free_gpu_memory_fraction 0.5' in script
    assert str(checkpoint) not in script  # the checkpoint is found from the script's own place


def test_options_defaults_and_profile_rules():
    options = target.Options()
    assert (options.runtime, options.precision, options.past.min) == ("tensorrt", "fp16", 0)
    with pytest.raises(ValidationError, match="min <= opt <= max"):
        Range(min=4, opt=2, max=8)
    with pytest.raises(ValidationError, match=r"past\.min"):
        target.Options(past={"min": 1, "opt": 8, "max": 128})
    with pytest.raises(ValidationError, match="batch"):
        target.Options(batch={"min": 1, "opt": 1, "max": 1})
    with pytest.raises(ValidationError, match="tensor parallelism"):
        target.Options(tensor_parallel_size=2)
    assert target.Options(runtime="tensorrt_llm", tensor_parallel_size=8).tensor_parallel_size == 8
    with pytest.raises(ValidationError):
        target.Options(precision="fp32")
    for name, field in target.Options.model_fields.items():
        assert field.description, name


def test_profile_shapes_follow_the_ranges():
    options = target.Options(
        batch={"min": 1, "opt": 2, "max": 8},
        seq={"min": 1, "opt": 16, "max": 64},
        past={"min": 0, "opt": 32, "max": 128},
    )
    names = ["input_ids", "attention_mask", "position_ids", "past_key_values.0.key", "past_key_values.0.value"]
    shapes = profile_shapes(options, kv_heads=2, head_dim=16, input_names=names)
    assert shapes["input_ids"] == [(1, 1), (2, 16), (8, 64)]
    assert shapes["position_ids"] == shapes["input_ids"]
    assert shapes["attention_mask"] == [(1, 1), (2, 48), (8, 192)]  # past + seq
    assert shapes["past_key_values.0.value"] == [(1, 2, 0, 16), (2, 2, 32, 16), (8, 2, 128, 16)]


def _tensorrt_and_cuda() -> bool:
    if importlib.util.find_spec("tensorrt") is None:
        return False
    import torch

    return torch.cuda.is_available()


@pytest.mark.skipif(not _tensorrt_and_cuda(), reason="needs tensorrt and an NVIDIA GPU")
def test_engine_passes_the_parity_check(tmp_path: Path):
    from tests.tiny_checkpoint import make_checkpoint

    checkpoint = make_checkpoint(tmp_path / "tiny")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    options = target.Options(
        prompts=["Hello, world", "The cat"], max_new_tokens=4, batch={"min": 1, "opt": 2, "max": 2},
        seq={"min": 1, "opt": 16, "max": 64}, past={"min": 0, "opt": 32, "max": 128},
    )  # fmt: skip
    record = target.TARGET.build(checkpoint, out_dir, options, CONTEXT.model_copy(update={"device": "cuda"}))
    assert record.passed, record.parity.summary()
    assert record.artifact["build"]["strongly_typed"]
    assert (out_dir / target.ENGINE_FILE).stat().st_size > 0
