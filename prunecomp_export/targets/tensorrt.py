"""The ``tensorrt`` target, judged by the one parity check, in one of two runtimes (``runtime``):

- ``tensorrt`` (default): a plain TensorRT engine for one GPU, built from the torch.onnx decoder
  exported in ``precision`` (``export/tensorrt.py``), run with its own KV cache;
- ``tensorrt_llm``: TensorRT-LLM's ``LLM`` API on the plain checkpoint, over
  ``tensor_parallel_size`` GPUs: the way to serve 7B-70B models. Its artifact is the serving
  command (``serve.sh``: ``trtllm-serve`` on the checkpoint with the same settings).

Both are refused before pruning where the package or the GPUs are missing. Each step (export,
engine, runtime) runs in a child process; the reference is the layer-streamed fp32 engine.
"""

from __future__ import annotations

import json
import os
import shlex
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from prunecomp_export.targets import Target, TargetContext, TargetRecord
from prunecomp_export.targets.export.tensorrt import Profile
from prunecomp_export.targets.parity import ParityOptions

ENGINE_FILE = "model.plan"
SERVE_SCRIPT = "serve.sh"
PARITY_DTYPES = {"fp16": "float16", "bf16": "bfloat16"}
LLM_DTYPES = {"fp16": "float16", "bf16": "bfloat16"}
#: the largest share of free GPU memory TensorRT-LLM's KV cache is given
MAX_KV_FRACTION = 0.9


class Options(ParityOptions, Profile):
    """Recipe options of the ``tensorrt`` target."""

    runtime: Literal["tensorrt", "tensorrt_llm"] = Field(
        "tensorrt", description="tensorrt: a plain engine from ONNX, one GPU; tensorrt_llm: TensorRT-LLM's LLM API."
    )
    precision: Literal["fp16", "bf16"] = Field("fp16", description="Precision of the engine (or TensorRT-LLM's dtype).")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs TensorRT-LLM splits the model over (tensorrt_llm).")
    opset: int = Field(20, ge=18, le=23, description="ONNX opset of the exported decoder (runtime tensorrt).")

    @model_validator(mode="after")
    def _consistent(self) -> Options:
        if self.runtime == "tensorrt":
            if self.tensor_parallel_size != 1:
                raise ValueError(
                    "a plain TensorRT engine runs on one GPU: use runtime: tensorrt_llm for tensor parallelism"
                )
            if self.past.min != 0:
                raise ValueError("past.min must be 0: prefill runs with an empty cache")
            if self.batch.min > 1 or self.batch.max < len(self.prompts):
                raise ValueError(f"the batch range must include 1..{len(self.prompts)} (the prompts run as one batch)")
        return self


class TensorrtTarget(Target):
    name = "tensorrt"
    Options = Options

    def preflight(self, options: Options, context: TargetContext) -> None:
        """Before any weight is read: TensorRT (or TensorRT-LLM) and enough NVIDIA GPUs."""
        if options.runtime == "tensorrt_llm":
            from prunecomp_export.targets.runtimes.tensorrt_llm import require_tensorrt_llm

            require_tensorrt_llm(options.tensor_parallel_size)
        else:
            from prunecomp_export.targets.export.torch_onnx import require_exporter
            from prunecomp_export.targets.runtimes.tensorrt import require_tensorrt

            require_tensorrt()
            require_exporter()

    def build(self, checkpoint: Path, out_dir: Path, options: Options, context: TargetContext) -> TargetRecord:
        from transformers import AutoConfig, AutoTokenizer

        from prunecomp_export.child import ChildRequest, run_child
        from prunecomp_export.targets import parity

        self.preflight(options, context)  # before anything is written
        checkpoint, out_dir = Path(checkpoint).resolve(), Path(out_dir)
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        prompt_ids = [list(tokenizer(p)["input_ids"]) for p in options.prompts]
        stop_ids = parity.stop_token_ids(checkpoint, tokenizer)
        started = time.perf_counter()
        artifact: dict[str, Any] = {"runtime": options.runtime, "precision": options.precision}
        if options.runtime == "tensorrt_llm":
            engine = llm_engine(options, context)
            request = ChildRequest(
                name="TensorRT-LLM check", target="prunecomp_export.targets.runtimes.tensorrt_llm:generate",
                kwargs={"checkpoint": str(checkpoint), "prompt_ids": prompt_ids,
                        "max_new_tokens": options.max_new_tokens, "stop_ids": stop_ids, "top_k": options.top_k,
                        "engine": engine},
            )  # fmt: skip
            value = run_child(request).value
            run = parity.RuntimeRun.model_validate({k: value[k] for k in parity.RuntimeRun.model_fields})
            script = out_dir / SERVE_SCRIPT
            script.write_text(serve_script(checkpoint, out_dir, engine))
            script.chmod(0o755)
            artifact.update(engine=engine, serve_script=SERVE_SCRIPT)
        else:
            from prunecomp_export.targets.export.torch_onnx import kv_shape

            onnx_dir = out_dir / "onnx"
            export = run_child(ChildRequest(
                name="tensorrt onnx export", target="prunecomp_export.targets.export.torch_onnx:export",
                kwargs={"checkpoint": str(checkpoint), "onnx_dir": str(onnx_dir), "dtype": options.precision,
                        "opset": options.opset},
            )).value  # fmt: skip
            kv_heads, head_dim = kv_shape(AutoConfig.from_pretrained(checkpoint))
            profile = Profile.model_validate(options.model_dump(include=set(Profile.model_fields))).model_dump()
            engine = run_child(ChildRequest(
                name="tensorrt engine", target="prunecomp_export.targets.export.tensorrt:build",
                kwargs={"onnx_path": str(onnx_dir / "model.onnx"), "engine_path": str(out_dir / ENGINE_FILE),
                        "profile": profile, "kv_heads": kv_heads, "head_dim": head_dim},
            )).value  # fmt: skip
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stop_ids or [0])[0]
            run = parity.RuntimeRun.model_validate(run_child(ChildRequest(
                name="tensorrt check", target="prunecomp_export.targets.runtimes.tensorrt:generate",
                kwargs={"engine_path": str(out_dir / ENGINE_FILE), "prompt_ids": prompt_ids,
                        "max_new_tokens": options.max_new_tokens, "stop_ids": stop_ids, "top_k": options.top_k,
                        "pad_id": int(pad), "dtype": PARITY_DTYPES[options.precision]},
            )).value)  # fmt: skip
            onnx = {k: export[k] for k in ("exporter", "opset", "dtype")}
            artifact.update(engine=ENGINE_FILE, build=engine, onnx=onnx, profile=profile)
        run = run.model_copy(update={"dtype": PARITY_DTYPES[options.precision]})
        report = parity.check(checkpoint, options.prompts, run, options, stop_ids, device=context.device,
                              logits_chunk=context.logits_chunk)  # fmt: skip
        artifact["seconds"] = round(time.perf_counter() - started, 1)
        artifact["files"] = sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob("*") if p.is_file())
        record = TargetRecord.judged(self.name, report, artifact)
        (out_dir / "tensorrt_check.json").write_text(json.dumps(record.model_dump(mode="json"), indent=2) + "\n")
        return record


def llm_engine(options: Options, context: TargetContext) -> dict[str, Any]:
    """TensorRT-LLM's settings: the options, and its KV cache's share of free GPU memory from the plan
    (the device budget's share of the GPU, as vLLM's ``gpu_memory_utilization``)."""
    planned = context.vllm_engine.get("gpu_memory_utilization", MAX_KV_FRACTION)
    return {
        "tensor_parallel_size": options.tensor_parallel_size,
        "dtype": LLM_DTYPES[options.precision],
        "kv_cache_free_gpu_memory_fraction": round(min(MAX_KV_FRACTION, planned), 3),
    }


def serve_script(checkpoint: Path, directory: Path, engine: dict[str, Any]) -> str:
    """``serve.sh``: ``trtllm-serve`` on the checkpoint (relative to the script), with the checked settings."""
    relative = os.path.relpath(checkpoint, directory.resolve())
    args = ["--tp_size", str(engine["tensor_parallel_size"]),
            "--kv_cache_free_gpu_memory_fraction", str(engine["kv_cache_free_gpu_memory_fraction"])]  # fmt: skip
    return "\n".join([
        "#!/bin/sh",
        "# Serve the pruned checkpoint with TensorRT-LLM's OpenAI-compatible server (written by prunecomp-export).",
        "set -eu",
        f'[ -n "${{MODEL:-}}" ] || MODEL=$(CDPATH= cd -- "$(dirname -- "$0")"/{shlex.quote(relative)} && pwd)',
        f'exec trtllm-serve "$MODEL" {" ".join(args)} "$@"',
        "",
    ])  # fmt: skip


TARGET = TensorrtTarget()
