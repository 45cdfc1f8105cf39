"""Measure what the parity tolerances (``targets/parity.py``, ``TOLERANCES``) are set from: each
runtime, in each dtype, on a run's pruned checkpoint (the right model) and on two wrong models, all
judged against the fp32 layer-streamed reference of the right checkpoint.

Wrong models: the same layers removed without the compensation (written from the source by the same
tensor surgery, every alpha 1), and the right checkpoint with two decoder layers swapped.

    python benchmarks/parity_tolerances.py OUT [--runtimes vllm genai] [--vllm-dtypes float32 bfloat16]
        [--genai-precisions fp32 int4] [--work DIR] [--json FILE]

OUT is an output of prunecomp-export (e.g. of the demo recipe). Every runtime runs in a child
process (``child.run_child``); nothing is downloaded. Prints one row per checkpoint, runtime and dtype.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from prunecomp_export.child import ChildRequest, run_child
from prunecomp_export.targets import parity

SWAPPED = (3, 4)


def write_wrong_models(out: Path, work: Path) -> dict[str, Path]:
    """The two wrong checkpoints beside the right one."""
    from transformers import AutoConfig

    from prunecomp_export.adapters import adapter_for
    from prunecomp_export.commands import open_output, source_directory
    from prunecomp_export.engine.variant import variant_after
    from prunecomp_export.output.tensor_surgery import write_variant_checkpoint
    from prunecomp_export.source.weights import SafetensorsCheckpoint

    output = open_output(out)
    models = {"right": out / "checkpoint"}
    no_comp = work / "no-compensation"
    if not (no_comp / "config.json").is_file():
        source = source_directory(output, print)
        config = AutoConfig.from_pretrained(source)
        removed = [step.removed for step in output.manifest.removed]
        variant = variant_after("no-compensation", config.num_hidden_layers, [(r, 1.0) for r in removed], None)
        write_variant_checkpoint(SafetensorsCheckpoint(source), config, adapter_for(config), variant, no_comp)
    models["no compensation"] = no_comp
    swapped = work / "swapped"
    if not (swapped / "config.json").is_file():
        swap_layers(out / "checkpoint", swapped, *SWAPPED)
    models[f"layers {SWAPPED[0]} and {SWAPPED[1]} swapped"] = swapped
    return models


def swap_layers(checkpoint: Path, target: Path, a: int, b: int) -> None:
    """A copy of ``checkpoint`` (a single safetensors file) with decoder layers ``a`` and ``b`` swapped."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(checkpoint, target, ignore=shutil.ignore_patterns("*.safetensors"))
    tensors = load_file(checkpoint / "model.safetensors")
    names = {f"model.layers.{a}.": f"model.layers.{b}.", f"model.layers.{b}.": f"model.layers.{a}."}
    renamed = {}
    for key, value in tensors.items():
        prefix = next((p for p in names if key.startswith(p)), None)
        renamed[key if prefix is None else names[prefix] + key.removeprefix(prefix)] = value
    save_file(renamed, target / "model.safetensors", metadata={"format": "pt"})


def vllm_run(model: Path, dtype: str, prompt_ids, stop_ids, options: parity.ParityOptions) -> parity.RuntimeRun:
    from prunecomp_export.targets.runtimes import vllm

    settings = vllm.Settings(dtype=dtype, kv_cache_gib=1, max_model_len=1024)
    request = ChildRequest(
        name=f"vLLM {dtype}", target="prunecomp_export.targets.runtimes.vllm:generate",
        kwargs={"checkpoint": str(model), "prompts": options.prompts, "prompt_ids": prompt_ids,
                "max_new_tokens": options.max_new_tokens, "stop_ids": stop_ids, "top_k": options.top_k,
                "engine": settings.engine()},
        python=vllm.resolve_python(settings), env=vllm.vllm_env(settings),
    )  # fmt: skip
    value = run_child(request).value
    run = parity.RuntimeRun.model_validate({k: value[k] for k in parity.RuntimeRun.model_fields})
    return run.model_copy(update={"dtype": dtype})


def genai_run(model: Path, precision: str, work: Path, prompt_ids, stop_ids, options, extra) -> parity.RuntimeRun:
    from prunecomp_export.targets.export.genai import PARITY_DTYPES

    tag = "-".join(f"{k}-{v}" for k, v in extra.items())
    package = work / f"genai-{model.name}-{precision}{'-' + tag if tag else ''}"
    if not (package / "genai_config.json").is_file():
        run_child(ChildRequest(name=f"genai build {precision}", target="prunecomp_export.targets.export.genai:build",
                               kwargs={"checkpoint": str(model), "out_dir": str(package), "precision": precision,
                                       "execution_provider": "cpu", "extra_options": extra}))  # fmt: skip
    request = ChildRequest(
        name=f"genai {precision}", target="prunecomp_export.targets.runtimes.genai:generate",
        kwargs={"package": str(package), "prompts": options.prompts, "prompt_ids": prompt_ids,
                "max_new_tokens": options.max_new_tokens, "stop_ids": stop_ids, "top_k": options.top_k,
                "dtype": PARITY_DTYPES[precision]},
    )  # fmt: skip
    return parity.RuntimeRun.model_validate(run_child(request).value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--runtimes", nargs="+", default=["vllm", "genai"], choices=["vllm", "genai"])
    parser.add_argument("--vllm-dtypes", nargs="+", default=["float32", "bfloat16", "float16"])
    parser.add_argument("--genai-precisions", nargs="+", default=["fp32", "int4"])
    parser.add_argument("--genai-extra", nargs="*", default=[], help="builder extra options, key=value")
    parser.add_argument("--models", nargs="+", default=None, help="right, 'no compensation', swapped (default all)")
    parser.add_argument("--work", type=Path, default=Path("parity-work"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    args.work.mkdir(parents=True, exist_ok=True)
    right = args.out / "checkpoint"
    models = write_wrong_models(args.out, args.work)
    if args.models:
        models = {name: path for name, path in models.items() if any(name.startswith(m) for m in args.models)}
    options = parity.ParityOptions()
    tokenizer = AutoTokenizer.from_pretrained(right)
    prompt_ids = [list(tokenizer(p)["input_ids"]) for p in options.prompts]
    stop_ids = parity.stop_token_ids(right, tokenizer)
    rows = []
    print("| model | runtime | dtype | tokens | max | mean | close | divergences (gap nats) | passes |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, model in models.items():
        runs = []
        if "vllm" in args.runtimes:
            runs += [vllm_run(model, d, prompt_ids, stop_ids, options) for d in args.vllm_dtypes]
        if "genai" in args.runtimes:
            extra = dict(item.split("=", 1) for item in args.genai_extra)
            runs += [
                genai_run(model, p, args.work, prompt_ids, stop_ids, options, extra) for p in args.genai_precisions
            ]
        for run in runs:
            # judged against the RIGHT checkpoint's reference: what a target's check would say
            report = parity.check(right, options.prompts, run, options, stop_ids)
            gaps = ", ".join(
                f"{d.position}: {d.gap:.3f}{'' if d.close else ' (not close)'}" for d in report.divergences
            )
            close = sum(p.close for p in report.prompts)
            print(f"| {name} | {run.runtime} | {run.dtype} | {report.tokens_compared} | {report.max_abs_diff:.3g} | "
                  f"{report.mean_abs_diff:.3g} | {close}/{len(report.prompts)} | {gaps or 'none'} | "
                  f"{'yes' if report.passed else 'no'} |", flush=True)  # fmt: skip
            rows.append({"model": name, "report": report.model_dump(mode="json")})
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
