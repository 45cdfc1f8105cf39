"""An onnxruntime-genai package built by its model builder (``python -m
onnxruntime_genai.models.builder``), for the families it supports: fp32 (CPU, CUDA), fp16 and bf16
(CUDA), int4 (CPU, CUDA). It reads ``num_hidden_layers`` from the config, so a reduced-depth
checkpoint builds as it is. ``build`` runs the builder's own command line in a child process
(``child.run_child``): it prints a lot and keeps module state.

Host memory: the builder loads the whole checkpoint with transformers in its stored dtype (bf16 for
most models: 2 bytes a parameter), then writes the ONNX weights a tensor at a time (int4: each
tensor quantised as it is written); the memory plan counts the checkpoint once plus its largest
tensor twice. The torch.onnx path needs about three fp32 copies of the model instead.
"""

from __future__ import annotations

import runpy
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

#: transformers architectures the builder supports, among those prunecomp-export prunes
ARCHITECTURES = frozenset(
    {
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
        "Phi3ForCausalLM",
        "Gemma2ForCausalLM",
        "Gemma3ForCausalLM",
    }
)
#: precision -> the execution providers the builder makes it for (its own list of valid combinations)
PRECISIONS = {
    "fp32": ("cpu", "cuda"),
    "fp16": ("cuda",),
    "bf16": ("cuda",),
    "int8": ("cpu", "cuda"),
    "int4": ("cpu", "cuda"),
}
#: the parity tolerance each precision is judged by
PARITY_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "int8": "int8", "int4": "int4"}


def supports(architecture: str) -> bool:
    return architecture in ARCHITECTURES


def build(
    checkpoint: str, out_dir: str, precision: str, execution_provider: str, extra_options: dict[str, str] | None = None
) -> dict[str, Any]:
    """In a child process: the builder's command line on ``checkpoint``, writing ``out_dir``
    (``extra_options``: the builder's ``--extra_options key=value ...``)."""
    from prunecomp_export.errors import ModelError
    from prunecomp_export.targets.runtimes.genai import genai_version, require_genai

    require_genai()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="prunecomp-genai-") as cache:
        argv = ["builder", "-i", checkpoint, "-o", out_dir, "-p", precision, "-e", execution_provider, "-c", cache]
        if extra_options:
            argv += ["--extra_options", *(f"{key}={value}" for key, value in extra_options.items())]
        saved, sys.argv = sys.argv, argv
        try:
            runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__", alter_sys=False)
        except SystemExit as exc:  # argparse or the builder refusing the combination
            if exc.code not in (0, None):
                raise ModelError(f"onnxruntime-genai's model builder exited with {exc.code}") from None
        finally:
            sys.argv = saved
    directory = Path(out_dir)
    if not (directory / "genai_config.json").is_file():
        raise ModelError("onnxruntime-genai's model builder wrote no genai_config.json")
    return {
        "builder": " ".join(
            [
                "onnxruntime_genai.models.builder",
                "-p",
                precision,
                "-e",
                execution_provider,
                *(f"{key}={value}" for key, value in (extra_options or {}).items()),
            ]
        ),
        "onnxruntime_genai": genai_version(),
        "seconds": round(time.perf_counter() - started, 1),
    }
