"""TensorRT: a plain engine (``export/tensorrt.py``) called like the ONNX Runtime decoder (numpy ids,
mask and positions in; float32 logits and the present tensors, kept on the GPU, out), and
``generate``, its greedy continuations for the parity check, in a child process."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from prunecomp_export.errors import ModelError, TargetUnavailable, ValidationFailed

INSTALL_HINT = "pip install tensorrt (and onnx, onnxscript), on a machine with an NVIDIA GPU and CUDA driver"


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

    names = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
             "INT64": torch.int64, "BOOL": torch.bool}  # fmt: skip
    table = {getattr(trt.DataType, n): t for n, t in names.items() if hasattr(trt.DataType, n)}
    if dtype not in table:
        raise ModelError(f"TensorRT I/O tensor of unsupported type {dtype}")
    return table[dtype]


class TrtDecoder:
    """A TensorRT engine called like ``ort.OrtDecoder``."""

    def __init__(self, trt, engine_bytes: bytes):
        import torch

        self.trt = trt
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(engine_bytes)
        if self.engine is None:
            raise ModelError("TensorRT could not deserialize the engine")
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

    def __call__(self, input_ids, attention_mask, position_ids, past=None):
        import torch

        batch = input_ids.shape[0]
        if past is None:
            dtype = self.dtypes[self.past_names[0]]
            empty = torch.empty((batch, self.kv_heads, 0, self.head_dim), dtype=dtype, device="cuda")
            past = [empty] * len(self.past_names)
        feed = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
                **dict(zip(self.past_names, past, strict=True))}  # fmt: skip
        tensors = {}
        for name in self.inputs:
            value = torch.as_tensor(feed[name]).to(device="cuda", dtype=self.dtypes[name]).contiguous()
            tensors[name] = value
            if not self.context.set_input_shape(name, tuple(value.shape)):
                raise ValidationFailed(f"input {name} of shape {tuple(value.shape)} is outside the engine's profile")
            self.context.set_tensor_address(name, self._address(value))
        for name in self.outputs:
            value = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=self.dtypes[name], device="cuda")
            tensors[name] = value
            self.context.set_tensor_address(name, self._address(value))
        torch.cuda.synchronize()
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise ModelError("TensorRT execution failed (execute_async_v3 returned false)")
        self.stream.synchronize()
        return tensors["logits"].float().cpu().numpy(), [tensors[n] for n in self.present_names]

    def _address(self, value) -> int:
        # Zero-sized tensors (the empty cache at prefill) have no storage; give TensorRT a valid pointer.
        return value.data_ptr() if value.numel() else self._placeholder.data_ptr()


def generate(
    engine_path: str,
    prompt_ids: list[list[int]],
    max_new_tokens: int,
    stop_ids: list[int],
    top_k: int,
    pad_id: int,
    dtype: str,
) -> dict[str, Any]:
    """In a child process: the engine's greedy continuations (``decoder.greedy_continuations``); a
    ``parity.RuntimeRun`` as JSON."""
    from prunecomp_export.targets.parity import RuntimeRun
    from prunecomp_export.targets.runtimes.decoder import greedy_continuations

    trt = require_tensorrt()
    engine = TrtDecoder(trt, Path(engine_path).read_bytes())
    continuations = greedy_continuations(
        engine, prompt_ids, max_new_tokens=max_new_tokens, stop_ids=stop_ids, top_k=top_k, pad_id=pad_id
    )
    return RuntimeRun(runtime=f"TensorRT {trt.__version__}", dtype=dtype, continuations=continuations).model_dump()
