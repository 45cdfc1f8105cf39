"""A plain TensorRT engine for one GPU, built from the torch.onnx decoder (``export/torch_onnx.py``).

Precision lives in the graph, not in builder flags: TensorRT 11 removed the weak-typing flags
(``BuilderFlag.FP16``/``BF16``; deprecated since 10.12) and builds every network strongly typed. So
the decoder is exported from torch in fp16/bf16 (transformers keeps RMSNorm and softmax in fp32
inside the graph) and the network is created with ``NetworkDefinitionCreationFlag.STRONGLY_TYPED``
(required on 10.x, the default on 11.x). One optimization profile covers the dynamic axes (batch,
new tokens, cached tokens); prefill runs with zero cached tokens, so the cache axis starts at 0.
``build`` runs in a child process (``child.run_child``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from prunecomp_export.errors import ModelError
from prunecomp_export.validation import FiniteFloat


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


class Profile(BaseModel):
    """The engine's optimization profile and builder workspace."""

    model_config = ConfigDict(extra="forbid")

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


def profile_shapes(profile: Profile, kv_heads: int, head_dim: int, input_names: list[str]) -> dict[str, Any]:
    """min/opt/max shape of every engine input from the batch/seq/past ranges."""
    batch, seq, past = profile.batch.triple(), profile.seq.triple(), profile.past.triple()
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


def build(onnx_path: str, engine_path: str, profile: dict[str, Any], kv_heads: int, head_dim: int) -> dict[str, Any]:
    """In a child process: parse the ONNX file (its external data beside it) and build a strongly
    typed engine into ``engine_path``."""
    from prunecomp_export.targets.runtimes.tensorrt import require_tensorrt

    trt = require_tensorrt()
    chosen = Profile.model_validate(profile)
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
        raise ModelError(f"TensorRT's ONNX parser rejected {Path(onnx_path).name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(chosen.workspace_gb * (1 << 30)))
    input_names = [network.get_input(i).name for i in range(network.num_inputs)]
    optimization = builder.create_optimization_profile()
    for name, (low, opt, high) in profile_shapes(chosen, kv_heads, head_dim, input_names).items():
        optimization.set_shape(name, low, opt, high)
    config.add_optimization_profile(optimization)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ModelError("TensorRT could not build an engine from the exported decoder (see its log above)")
    Path(engine_path).write_bytes(bytes(serialized))
    return {
        "tensorrt": trt.__version__,
        "bytes": Path(engine_path).stat().st_size,
        "strongly_typed": bool(flags),
        "seconds": round(time.perf_counter() - started, 1),
    }
