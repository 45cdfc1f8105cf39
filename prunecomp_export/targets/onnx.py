"""The ``onnx`` target: an ONNX model of the checkpoint, judged by the one parity check.

Two builders (``export``): onnxruntime-genai's model builder where it supports the family (fp32,
fp16, bf16, int4; CPU and CUDA providers; the package runs in onnxruntime-genai, with its own
tokenizer and generation loop), and torch.onnx for the rest (fp32, fp16; a KV-cache decoder run in
ONNX Runtime, the prompts as a left-padded batch, then cached steps). ``exporter: auto`` picks the
genai builder where it can. The export, the runtime and the reference each run in a child process.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from prunecomp_export.errors import RecipeError
from prunecomp_export.targets import Target, TargetContext, TargetRecord
from prunecomp_export.targets.parity import ParityOptions

GENAI_DIR = "genai"
TORCH_PARITY_DTYPES = {"fp32": "float32", "fp16": "float16"}


class Options(ParityOptions):
    """Recipe options of the ``onnx`` target."""

    exporter: Literal["auto", "genai", "torch"] = Field(
        "auto",
        description="genai: onnxruntime-genai's model builder; torch: torch.onnx; auto: genai where it "
        "supports the architecture.",
    )
    dtype: Literal["fp32", "fp16", "bf16", "int8", "int4"] = Field(
        "fp32",
        description="Precision of the exported weights (genai: fp32/int8/int4 on CPU, all on CUDA; torch: fp32/fp16).",
    )
    provider: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Execution provider; auto: CUDA where the run is on a GPU and onnxruntime has it."
    )
    opset: int = Field(20, ge=18, le=23, description="ONNX opset of the torch.onnx graph (dynamo exporter: 18+).")


class Plan:
    """Which builder, provider and parity dtype a set of options means for this run."""

    def __init__(self, options: Options, context: TargetContext):
        from prunecomp_export.targets.export import genai
        from prunecomp_export.targets.runtimes import ort

        supported = genai.supports(context.architecture)
        if options.exporter == "genai" and not supported:
            raise RecipeError(
                f"onnxruntime-genai's model builder does not support {context.architecture or 'this model'} "
                f"(it supports {', '.join(sorted(genai.ARCHITECTURES))}): use exporter: torch",
                key="targets.onnx.exporter",
            )
        self.genai = options.exporter == "genai" or (options.exporter == "auto" and supported)
        self.providers = ort.resolve_providers(options.provider, context.device)
        self.on_cuda = self.providers[0] == ort.CUDA
        provider = "cuda" if self.on_cuda else "cpu"
        if self.genai:
            if provider not in genai.PRECISIONS[options.dtype]:
                raise RecipeError(
                    f"onnxruntime-genai's model builder makes {options.dtype} models for "
                    f"{' and '.join(genai.PRECISIONS[options.dtype])} only, and this run's provider is {provider}",
                    key="targets.onnx.dtype",
                )
            self.parity_dtype = genai.PARITY_DTYPES[options.dtype]
        elif options.dtype not in TORCH_PARITY_DTYPES:
            raise RecipeError(f"the torch.onnx exporter writes fp32 or fp16, not {options.dtype}",
                              key="targets.onnx.dtype")  # fmt: skip
        else:
            self.parity_dtype = TORCH_PARITY_DTYPES[options.dtype]
        self.provider = provider


class OnnxTarget(Target):
    name = "onnx"
    Options = Options

    def preflight(self, options: Options, context: TargetContext) -> None:
        """Before any weight is read: the builder's packages, ONNX Runtime, the provider and the
        precision it can make for this architecture."""
        from prunecomp_export.targets.export import torch_onnx
        from prunecomp_export.targets.runtimes import genai, ort

        ort.require_onnx_runtime()
        plan = Plan(options, context)
        if plan.genai:
            og = genai.require_genai()
            if plan.on_cuda and not og.is_cuda_available():
                from prunecomp_export.errors import TargetUnavailable

                raise TargetUnavailable("the onnx target on cuda needs onnxruntime-genai-cuda, or set provider: cpu")
        else:
            torch_onnx.require_exporter()

    def build(self, checkpoint: Path, out_dir: Path, options: Options, context: TargetContext) -> TargetRecord:
        """Export in a child, run it in a child, compare with the reference."""
        from transformers import AutoTokenizer

        from prunecomp_export.child import ChildRequest, run_child
        from prunecomp_export.targets import parity

        checkpoint, out_dir = Path(checkpoint).resolve(), Path(out_dir)
        plan = Plan(options, context)
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        prompt_ids = [list(tokenizer(p)["input_ids"]) for p in options.prompts]
        stop_ids = parity.stop_token_ids(checkpoint, tokenizer)
        started = time.perf_counter()
        if plan.genai:
            package = out_dir / GENAI_DIR
            export = ChildRequest(
                name="onnx genai build", target="prunecomp_export.targets.export.genai:build",
                kwargs={"checkpoint": str(checkpoint), "out_dir": str(package), "precision": options.dtype,
                        "execution_provider": plan.provider},
                env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
            )  # fmt: skip
            runtime = ChildRequest(
                name="onnx genai check", target="prunecomp_export.targets.runtimes.genai:generate",
                kwargs={"package": str(package), "prompts": list(options.prompts), "prompt_ids": prompt_ids,
                        "max_new_tokens": options.max_new_tokens, "stop_ids": stop_ids, "top_k": options.top_k,
                        "dtype": plan.parity_dtype},
            )  # fmt: skip
        else:
            export = ChildRequest(
                name="onnx export", target="prunecomp_export.targets.export.torch_onnx:export",
                kwargs={"checkpoint": str(checkpoint), "onnx_dir": str(out_dir), "dtype": options.dtype,
                        "opset": options.opset},
            )  # fmt: skip
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stop_ids or [0])[0]
            runtime = ChildRequest(
                name="onnx runtime check", target="prunecomp_export.targets.runtimes.ort:generate",
                kwargs={"onnx_path": str(out_dir / "model.onnx"), "providers": plan.providers,
                        "prompt_ids": prompt_ids, "max_new_tokens": options.max_new_tokens, "stop_ids": stop_ids,
                        "top_k": options.top_k, "pad_id": int(pad), "dtype": plan.parity_dtype},
            )  # fmt: skip
        built = run_child(export).value
        export_s = time.perf_counter() - started
        run = parity.RuntimeRun.model_validate(run_child(runtime).value)
        runtime_s = time.perf_counter() - started - export_s
        report = parity.check(checkpoint, options.prompts, run, options, stop_ids, device=context.device,
                              logits_chunk=context.logits_chunk)  # fmt: skip
        files = sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob("*") if p.is_file())
        artifact: dict[str, Any] = {
            "exporter": "genai" if plan.genai else "torch",
            "model": f"{GENAI_DIR}/model.onnx" if plan.genai else "model.onnx",
            "dtype": options.dtype,
            "providers": plan.providers,
            "build": built,
            "files": files,
            "bytes": sum((out_dir / f).stat().st_size for f in files),
            "seconds": {"export": round(export_s, 1), "runtime": round(runtime_s, 1),
                        "reference": round(time.perf_counter() - started - export_s - runtime_s, 1)},
        }  # fmt: skip
        return TargetRecord.judged(self.name, report, artifact)


TARGET = OnnxTarget()
