"""ONNX Runtime on the torch.onnx export (``export/torch_onnx.py``): a decoder session with explicit
KV-cache inputs and outputs, and ``generate``, its greedy continuations for the parity check (run in
a child process)."""

from __future__ import annotations

import importlib
import importlib.metadata
from pathlib import Path
from typing import Any

from prunecomp_export.errors import TargetUnavailable

INSTALL_HINT = "pip install 'onnx>=1.23' 'onnxscript>=0.7' 'onnxruntime>=1.32'"
CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"


def require_onnx_runtime() -> Any:
    """Import onnxruntime, or say how to install it."""
    try:
        return importlib.import_module("onnxruntime")
    except ImportError as exc:
        raise TargetUnavailable(f"the onnx target needs onnxruntime ({exc}): {INSTALL_HINT}") from exc


def ort_version() -> str:
    for name in ("onnxruntime", "onnxruntime-gpu"):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


def resolve_providers(requested: str, device: str) -> list[str]:
    """ONNX Runtime providers for ``requested`` (auto|cpu|cuda) on the run's ``device``: auto means
    CUDA where the run is on a GPU and this onnxruntime has the CUDA provider; CPU always last."""
    ort = require_onnx_runtime()
    has_cuda = CUDA in ort.get_available_providers()
    on_gpu = device.startswith("cuda")
    if requested == "cpu":
        return [CPU]
    if requested == "cuda" and not (has_cuda and on_gpu):
        why = "the run is not on a GPU (execution.device)" if not on_gpu else "this onnxruntime has no CUDA provider"
        raise TargetUnavailable(
            f"onnx provider cuda: {why} (on a CUDA machine: pip uninstall onnxruntime && pip install onnxruntime-gpu)"
        )
    return [CUDA, CPU] if has_cuda and on_gpu else [CPU]


class OrtDecoder:
    """The exported decoder in an ONNX Runtime session, called with numpy arrays."""

    def __init__(self, onnx_path: Path, providers: list[str], threads: int | None = None):
        import numpy as np

        ort = require_onnx_runtime()
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads is not None:
            options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        self.session = ort.InferenceSession(str(onnx_path), options, providers=providers)
        inputs = self.session.get_inputs()
        self.past_names = [i.name for i in inputs if i.name.startswith("past_key_values.")]
        first = next(i for i in inputs if i.name in self.past_names)
        self.kv_heads, self.head_dim = int(first.shape[1]), int(first.shape[3])
        self.kv_dtype = {"tensor(float)": np.float32, "tensor(float16)": np.float16}[first.type]
        self.output_names = [o.name for o in self.session.get_outputs()]

    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers())

    def __call__(self, input_ids, attention_mask, position_ids, past=None):
        """Logits (float32) and the present key/values; ``past=None`` means an empty cache."""
        import numpy as np

        batch = input_ids.shape[0]
        if past is None:
            empty = np.zeros((batch, self.kv_heads, 0, self.head_dim), dtype=self.kv_dtype)
            past = [empty] * len(self.past_names)
        feed = {
            "input_ids": np.asarray(input_ids, dtype=np.int64),
            "attention_mask": np.asarray(attention_mask, dtype=np.int64),
            "position_ids": np.asarray(position_ids, dtype=np.int64),
            **dict(zip(self.past_names, past, strict=True)),
        }
        logits, *presents = self.session.run(self.output_names, feed)
        return logits.astype(np.float32), presents


def generate(
    onnx_path: str,
    providers: list[str],
    prompt_ids: list[list[int]],
    max_new_tokens: int,
    stop_ids: list[int],
    top_k: int,
    pad_id: int,
    dtype: str,
) -> dict[str, Any]:
    """In a child process: the prompts as one left-padded batch, then greedy cached steps
    (``decoder.greedy_continuations``); a ``parity.RuntimeRun`` as JSON."""
    from prunecomp_export.targets.parity import RuntimeRun
    from prunecomp_export.targets.runtimes.decoder import greedy_continuations

    session = OrtDecoder(Path(onnx_path), providers)
    continuations = greedy_continuations(
        session, prompt_ids, max_new_tokens=max_new_tokens, stop_ids=stop_ids, top_k=top_k, pad_id=pad_id
    )
    runtime = f"ONNX Runtime {ort_version()} ({session.providers[0]})"
    return RuntimeRun(runtime=runtime, dtype=dtype, continuations=continuations).model_dump()
