"""The ``tensorrt`` target: a TensorRT engine built from the ONNX export, proven against the checkpoint.

Precision lives in the graph, not in builder flags: TensorRT 11 removed the weak-typing flags
(``BuilderFlag.FP16``/``BF16``; deprecated since 10.12) and builds every network strongly typed.
So the decoder is exported from torch in fp16/bf16 (``onnx.export_onnx``, into ``out_dir/onnx``;
transformers keeps RMSNorm and softmax in fp32 inside the graph) and the network is created with
``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` (required on 10.x, the default on 11.x).

One optimization profile covers the dynamic axes (batch, new tokens, cached tokens); prefill runs
with zero cached tokens, so the cache axis starts at 0. The engine is checked with the same parity
checks as the ``onnx`` target (prefill, cached decode fed the engine's own present tensors, a
left-padded batch) against the fp32 transformers model on the GPU.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from prunecomp_export.errors import ModelError, TargetUnavailable, ValidationFailed
from prunecomp_export.targets.onnx import ParityOptions, logit_checks
from prunecomp_export.validation import FiniteFloat

ENGINE_FILE = "model.plan"
INSTALL_HINT = "pip install tensorrt (and onnx, onnxscript), on a machine with an NVIDIA GPU and CUDA driver"
DEFAULT_TOLERANCE = {"fp16": 0.5, "bf16": 2.0}


class Range(BaseModel):
    """min/opt/max of one dynamic axis in the TensorRT optimization profile."""

    model_config = ConfigDict(extra="forbid")

    min: int = Field(ge=0, description="Smallest size the engine accepts.")
    opt: int = Field(ge=0, description="Size TensorRT tunes kernels for.")
    max: int = Field(ge=1, description="Largest size the engine accepts.")

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if not self.min <= self.opt <= self.max:
            raise ValueError(f"need min <= opt <= max, got {self.min}/{self.opt}/{self.max}")
        return self

    def triple(self) -> tuple[int, int, int]:
        return self.min, self.opt, self.max


class Options(ParityOptions):
    """Recipe options of the ``tensorrt`` target."""

    precision: Literal["fp16", "bf16"] = Field("fp16", description="Precision of the exported graph/engine.")
    workspace_gb: FiniteFloat = Field(4.0, gt=0, description="Builder workspace memory pool limit, GiB.")
    batch: Range = Field(
        default_factory=lambda: Range(min=1, opt=1, max=8), description="Batch size range of the profile."
    )
    seq: Range = Field(
        default_factory=lambda: Range(min=1, opt=128, max=2048),
        description="New tokens per call (prefill chunk; 1 when decoding).",
    )
    past: Range = Field(
        default_factory=lambda: Range(min=0, opt=512, max=2048),
        description="Cached tokens; min must be 0 so the engine can prefill.",
    )

    @model_validator(mode="after")
    def _profile_covers_validation(self) -> Options:
        if self.past.min != 0:
            raise ValueError("past.min must be 0: prefill runs with an empty cache")
        if self.batch.min > 1 or self.batch.max < 2:
            raise ValueError("the batch range must include 1 and 2 (the validation runs both)")
        if self.seq.min > 1 or self.seq.max < self.max_prompt_tokens:
            raise ValueError(f"the seq range must include 1..max_prompt_tokens ({self.max_prompt_tokens})")
        if self.past.max < self.max_prompt_tokens + self.decode_steps:
            raise ValueError("past.max must be at least max_prompt_tokens + decode_steps")
        return self

    def resolved_tolerance(self) -> float:
        return self.tolerance if self.tolerance is not None else DEFAULT_TOLERANCE[self.precision]


def require_tensorrt() -> Any:
    """Import tensorrt and check for an NVIDIA GPU, before anything is written."""
    try:
        trt = importlib.import_module("tensorrt")
    except ImportError as exc:
        raise TargetUnavailable(f"the tensorrt target needs TensorRT ({exc}): {INSTALL_HINT}") from exc
    import torch

    if not torch.cuda.is_available():
        raise TargetUnavailable(
            f"the tensorrt target needs an NVIDIA GPU, and torch built with CUDA sees none (torch {torch.__version__})"
        )
    return trt


def _torch_dtype(trt, dtype):
    import torch

    names = {
        "FLOAT": torch.float32,
        "HALF": torch.float16,
        "BF16": torch.bfloat16,
        "INT32": torch.int32,
        "INT64": torch.int64,
        "BOOL": torch.bool,
    }
    table = {getattr(trt.DataType, n): t for n, t in names.items() if hasattr(trt.DataType, n)}
    if dtype not in table:
        raise ModelError(f"TensorRT I/O tensor of unsupported type {dtype}")
    return table[dtype]


def profile_shapes(options: Options, kv_heads: int, head_dim: int, input_names: list[str]) -> dict[str, Any]:
    """min/opt/max shape of every engine input from the batch/seq/past ranges."""
    batch, seq, past = options.batch.triple(), options.seq.triple(), options.past.triple()
    total = tuple(p + s for p, s in zip(past, seq, strict=True))
    shapes: dict[str, Any] = {}
    for name in input_names:
        if name in ("input_ids", "position_ids"):
            shapes[name] = [(b, s) for b, s in zip(batch, seq, strict=True)]
        elif name == "attention_mask":
            shapes[name] = [(b, t) for b, t in zip(batch, total, strict=True)]
        else:
            shapes[name] = [(b, kv_heads, p, head_dim) for b, p in zip(batch, past, strict=True)]
    return shapes


def build_engine(trt, onnx_path: Path, engine_path: Path, options: Options, kv_heads: int, head_dim: int) -> dict:
    """Parse the ONNX file (its external data beside it) and build a strongly typed engine."""
    started = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ModelError(f"TensorRT's ONNX parser rejected {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gb * (1 << 30)))
    if not flags and hasattr(trt.BuilderFlag, options.precision.upper()):
        # TensorRT without strong typing (< 9): fall back to the precision flag.
        config.set_flag(getattr(trt.BuilderFlag, options.precision.upper()))
    input_names = [network.get_input(i).name for i in range(network.num_inputs)]
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in profile_shapes(options, kv_heads, head_dim, input_names).items():
        profile.set_shape(name, low, opt, high)
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ModelError("TensorRT could not build an engine from the exported decoder (see its log above)")
    engine_path.write_bytes(bytes(serialized))
    return {
        "engine": engine_path.name,
        "bytes": engine_path.stat().st_size,
        "strongly_typed": bool(flags),
        "profile": {
            "batch": options.batch.triple(),
            "seq": options.seq.triple(),
            "past": options.past.triple(),
        },
        "workspace_gb": options.workspace_gb,
        "seconds": round(time.perf_counter() - started, 1),
    }


class TrtDecoder:
    """A TensorRT engine called like ``onnx.OrtDecoder``: numpy ids/mask/positions in, float32 logits
    and the present tensors (kept on the GPU) out."""

    def __init__(self, trt, engine_bytes: bytes):
        import torch

        self.trt = trt
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(engine_bytes)
        if self.engine is None:
            raise ModelError("TensorRT could not deserialize the engine it just built")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.inputs = [n for n in names if is_input[n]]
        self.outputs = [n for n in names if not is_input[n]]
        self.past_names = [n for n in self.inputs if n.startswith("past_key_values.")]
        self.present_names = [n for n in self.outputs if n.startswith("present.")]
        self.dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        first_past = self.engine.get_tensor_shape(self.past_names[0])
        self.kv_heads, self.head_dim = int(first_past[1]), int(first_past[3])
        self.stream = torch.cuda.Stream()
        self._placeholder = torch.empty(1, dtype=torch.float32, device="cuda")

    def __call__(self, input_ids, attention_mask, position_ids, past=None) -> tuple[np.ndarray, list]:
        import torch

        batch = input_ids.shape[0]
        if past is None:
            dtype = self.dtypes[self.past_names[0]]
            empty = torch.empty((batch, self.kv_heads, 0, self.head_dim), dtype=dtype, device="cuda")
            past = [empty] * len(self.past_names)
        feed = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            **dict(zip(self.past_names, past, strict=True)),
        }
        tensors = {}
        for name in self.inputs:
            value = torch.as_tensor(feed[name]).to(device="cuda", dtype=self.dtypes[name]).contiguous()
            tensors[name] = value
            if not self.context.set_input_shape(name, tuple(value.shape)):
                raise ValidationFailed(f"input {name} of shape {tuple(value.shape)} is outside the engine's profile")
            self.context.set_tensor_address(name, self._address(value))
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            value = torch.empty(shape, dtype=self.dtypes[name], device="cuda")
            tensors[name] = value
            self.context.set_tensor_address(name, self._address(value))
        torch.cuda.synchronize()
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise ModelError("TensorRT execution failed (execute_async_v3 returned false)")
        self.stream.synchronize()
        logits = tensors["logits"].float().cpu().numpy()
        return logits, [tensors[n] for n in self.present_names]

    def _address(self, value) -> int:
        # Zero-sized tensors (the empty cache at prefill) have no storage; give TensorRT a valid pointer.
        return value.data_ptr() if value.numel() else self._placeholder.data_ptr()


def parity_checks(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The parity figures of a ``tensorrt`` record: the engine's logit checks (those of the ``onnx``
    target, run on the engine)."""
    return logit_checks(record["checks"], record["tolerance"])


def preflight(options: Options) -> None:
    """Before any weight is read: TensorRT and an NVIDIA GPU must be there."""
    require_tensorrt()


def build(checkpoint: Path, out_dir: Path, options: Options) -> dict:
    """Export to ONNX in ``options.precision``, build the engine, check its logits; return the record."""
    trt = require_tensorrt()  # before anything is written
    from prunecomp_export.targets import onnx as onnx_target

    onnx_target.require_exporter()
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)

    source = onnx_target.load_hf_model(checkpoint, options.precision)
    kv_heads, head_dim = onnx_target.kv_shape(source.config)
    export = onnx_target.export_onnx(
        checkpoint, out_dir / "onnx", dtype=options.precision, opset=options.opset, model=source
    )
    del source
    engine_path = out_dir / ENGINE_FILE
    engine = build_engine(trt, out_dir / "onnx" / onnx_target.ONNX_FILE, engine_path, options, kv_heads, head_dim)

    started = time.perf_counter()
    reference = onnx_target.load_hf_model(checkpoint, "fp32", "cuda")
    onnx_target._no_tf32()
    prompts = onnx_target.tokenize_prompts(checkpoint, options.prompts, options.max_prompt_tokens)
    run = TrtDecoder(trt, engine_path.read_bytes())
    tolerance = options.resolved_tolerance()
    checks = onnx_target.check_parity(
        run,
        reference,
        prompts,
        tolerance=tolerance,
        decode_steps=options.decode_steps,
        pad_id=onnx_target._pad_id(reference.config),
    )
    import torch

    record: dict[str, Any] = {
        "target": "tensorrt",
        "engine": ENGINE_FILE,
        "precision": options.precision,
        "onnx": {k: export[k] for k in ("exporter", "opset", "dtype", "files", "inputs", "outputs")},
        "tensorrt": trt.__version__,
        "device": torch.cuda.get_device_name(),
        **{k: engine[k] for k in ("strongly_typed", "profile", "workspace_gb")},
        "reference": f"transformers {importlib.metadata.version('transformers')} fp32 on cuda (no TF32)",
        "tolerance": tolerance,
        "checks": checks,
        "seconds": {
            "export": export["seconds"],
            "engine": engine["seconds"],
            "validate": round(time.perf_counter() - started, 1),
        },
    }
    record["files"] = sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob("*") if p.is_file())
    record["bytes"] = sum((out_dir / f).stat().st_size for f in record["files"])
    record["passed"] = all(c["passed"] for c in checks.values())
    if not record["passed"]:
        failed = ", ".join(
            f"{name} max abs logit diff {c['max_abs_diff']:.3g}" for name, c in checks.items() if not c["passed"]
        )
        raise ValidationFailed(f"TensorRT engine output differs from the checkpoint: {failed} > {tolerance:g}")
    return record
