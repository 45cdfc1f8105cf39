"""Compensation and selection ablation on the demo model (SmolLM2-135M-Instruct, 30 layers).

Everything is fitted and chosen on the demo recipe's calibration windows (gensim Wikipedia, first
half) and measured on held-out text (the Wikipedia excerpt's second half and the gensim news
articles), with the streamed engine the CLI runs:

1. Same layers: the layers the demo's own run (block influence + the paper's alpha, iterative)
   removes first, at 6 and 9 of 30, removed again with each compensation (none, magnitude = the
   paper's alpha, fitted scalar, linear map, and the linear map with the paper's alpha on top).
2. Ridge of the linear map, at 6 layers: calibration (train) against held-out perplexity.
3. Selection: the whole pipeline with each metric and compensation, against the one-shot baseline
   (block influence's dense scores, no compensation) on the same calibration.

QA accuracy kept (lm-eval on the demo's offline tasks, a checkpoint written per row) with ``--qa``.
Each row is printed as a JSON line when measured; the table at the end.

A compensation named ``NAME/unchecked`` is fitted on every calibration batch and folded as it is
(``prune.judge_batches: 0``); ``NAME`` alone has the recipe's held-back check. ``--source`` runs the
same protocol on another model (e.g. a Qwen2 GGUF), ``--eval-windows`` and ``--corpora`` shrink the
held-out evaluation for a model that is slow on this machine.

    python benchmarks/compensation_ablation.py [--points 6 9] [--parts layers ridge selection] [--qa]
        [--compensations none magnitude magnitude/unchecked fitted linear] [--pipelines METRIC:COMPENSATION ...]
        [--calibration-samples N] [--source MODEL] [--eval-windows N] [--corpora NAME ...] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from prunecomp_export.adapters import adapter_for
from prunecomp_export.engine.layerwise import LayerwiseModel
from prunecomp_export.engine.loop import Plan, Trajectory, baseline_layers, make_plan, prune, variant_of
from prunecomp_export.engine.stream_cache import StreamCache
from prunecomp_export.engine.variant import Variant, variant_after
from prunecomp_export.evaluation.evaluator import Evaluator
from prunecomp_export.progress import Reporter
from prunecomp_export.recipe import load_recipe
from prunecomp_export.source import calibration
from prunecomp_export.source.loading import (
    ResolvedSource,
    load_config,
    load_tokenizer,
    local_checkpoint,
    resolve_source,
    source_identity,
)
from prunecomp_export.source.weights import SafetensorsCheckpoint
from prunecomp_export.variants import ModelVariants

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "recipes" / "smollm2-135m-demo.yaml"


class Quiet(Reporter):
    def log(self, message: str) -> None:
        if message.startswith("round"):
            super().log(f"  {message}")


@dataclass
class Setup:
    recipe: object
    variants: ModelVariants
    batches: list[torch.Tensor]
    evaluator: Evaluator
    tied: bool


def setup(scratch: Path, qa: bool, samples: int | None, source: str | None = None, windows: int | None = None,
          corpora: list[str] | None = None) -> Setup:  # fmt: skip
    overrides = [("execution.memory_budget", None)]
    if samples is not None:
        overrides.append(("calibration.num_samples", samples))
    if source is not None:
        overrides.append(("model.source", source))
    if windows is not None:
        overrides.append(("evaluation.perplexity.max_windows", windows))
    if corpora is not None:
        overrides.append(("evaluation.perplexity.corpora", corpora))
    recipe = load_recipe(DEMO, overrides)
    if not qa:
        recipe = replace_qa(recipe)
    source = resolve_source(recipe.model)
    directory, _peak = local_checkpoint(source, recipe.model, source_identity(source), print)
    config = load_config(ResolvedSource(str(directory), None, True, f"dir:{directory}"), recipe.model)
    adapter = adapter_for(config)
    tokenizer = load_tokenizer(directory, recipe.model)
    batches = list(calibration.calibration_windows(recipe.calibration, tokenizer).split(recipe.calibration.batch_size))
    files = SafetensorsCheckpoint(directory)
    model = LayerwiseModel(files, config, adapter, torch.device("cpu"), torch.float32, resident=True)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    plan = make_plan(recipe.prune, config.num_hidden_layers, tied)
    variants = ModelVariants(directory, files, config, adapter, model, plan, scratch)
    return Setup(recipe, variants, batches, Evaluator(recipe.evaluation, tokenizer, Reporter()), tied)


def replace_qa(recipe):
    evaluation = recipe.evaluation.model_copy(update={"qa": None})
    return recipe.model_copy(update={"evaluation": evaluation})


def plan_for(s: Setup, **prune) -> Plan:
    compensation = prune.get("compensation", "")
    if compensation.endswith("/unchecked"):
        prune = {**prune, "compensation": compensation.removesuffix("/unchecked"), "judge_batches": 0}
    spec = s.recipe.prune.model_copy(update={"num_drop": None, **prune})
    return make_plan(type(spec).model_validate(spec.model_dump()), s.variants.plan.num_layers, s.tied)


def run(s: Setup, plan: Plan, schedule: str = "iterative") -> Trajectory:
    with StreamCache.open("device", torch.device("cpu"), len(s.batches)) as cache:
        return prune(s.variants.model, s.batches, plan, schedule, cache, Quiet())


def measure(s: Setup, variant: Variant, train_loss: float | None) -> dict:
    rows = s.evaluator.evaluate(s.variants, variant)
    prefix = {"perplexity": "", "accuracy": "", "kl_divergence": "kl ", "top1_agreement": "top1 "}
    out = {prefix[m.kind] + m.dataset: m.value for m in rows}
    if train_loss is not None:
        out["calibration"] = math.exp(train_loss)
    return out


def row(s: Setup, label: str, plan: Plan, trajectory: Trajectory, k: int, started: float) -> dict:
    variant = variant_of("prunecomp", plan, trajectory.steps[:k])
    loss = trajectory.rounds[k - 1].calibration_loss
    figures = measure(s, variant, loss if not math.isnan(loss) else None)
    result = {
        "row": label,
        "layers_removed": k,
        "removed": trajectory.removed[:k],
        "scalars": [round(st.alpha, 4) for st in trajectory.steps[:k]],
        "paper_alphas": [None if st.paper_alpha is None else round(st.paper_alpha, 4) for st in trajectory.steps[:k]],
        "kept": [None if st.check is None else st.check.kept for st in trajectory.steps[:k]],
        "prune_s": round(time.perf_counter() - started, 1),
        **figures,
    }
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, nargs="+", default=[6, 9])
    parser.add_argument("--qa", action="store_true", help="also lm-eval QA accuracy (slow)")
    parser.add_argument("--ridges", type=float, nargs="*", default=[0.0, 1e-4, 1e-3, 1e-2, 1e-1])
    parser.add_argument("--parts", nargs="+", default=["layers", "ridge", "selection"])
    parser.add_argument("--compensations", nargs="+", default=["none", "magnitude", "fitted", "linear"])
    parser.add_argument(
        "--pipelines",
        nargs="+",
        default=["block_influence:magnitude", "block_influence:fitted", "block_influence:linear",
                 "compensated_loss:magnitude", "compensated_loss:linear"],
        help="metric:compensation runs for the selection part",
    )  # fmt: skip
    parser.add_argument("--probe-batches", type=int, default=1, help="calibration batches compensated_loss scores on")
    parser.add_argument("--calibration-samples", type=int, help="calibration windows (default: the demo's)")
    parser.add_argument("--source", help="another model (the recipe's model.source syntax)")
    parser.add_argument("--eval-windows", type=int, help="held-out windows per corpus (default: the demo's)")
    parser.add_argument("--corpora", nargs="+", help="held-out corpora (default: the demo's)")
    parser.add_argument("--json", type=Path, help="write every row here")
    args = parser.parse_args()
    torch.manual_seed(0)
    scratch = Path(ROOT / "outputs" / "ablation-scratch")
    s = setup(scratch, args.qa, args.calibration_samples, args.source, args.eval_windows, args.corpora)
    most = max(args.points)
    rows = [{"row": "dense", "layers_removed": 0, **measure(s, s.variants.dense, None)}]
    print(json.dumps(rows[0]), flush=True)

    started = time.perf_counter()
    reference_plan = plan_for(s, num_drop=most, compensation="magnitude")
    reference = run(s, reference_plan)
    order = reference.removed

    if "layers" in args.parts:
        for k in args.points:
            # the reference run's paper alphas (measured on the fit batches), all folded: what its held-back
            # check decided against, at no cost of another run
            steps = [(st.removed, st.paper_alpha or 1.0) for st in reference.steps[:k]]
            paper = variant_after("prunecomp", reference_plan.num_layers, steps, reference_plan.fold_form)
            figures = measure(s, paper, None)
            rows.append({"row": "same layers, every paper alpha folded", "layers_removed": k, **figures})
            print(json.dumps(rows[-1]), flush=True)
            for compensation in args.compensations:
                plan = plan_for(s, drop_layers=order[:k], compensation=compensation)
                started = time.perf_counter()
                if compensation == "none":  # nothing to measure: the same layers, removed as they are
                    steps = [([i], 1.0) for i in order[:k]]
                    figures = measure(s, variant_after("prunecomp", plan.num_layers, steps, None), None)
                    rows.append({"row": "same layers, none", "layers_removed": k, "removed": order[:k], **figures})
                    print(json.dumps(rows[-1]), flush=True)
                    continue
                trajectory = reference if compensation == "magnitude" and k == most else run(s, plan)
                rows.append(row(s, f"same layers, {compensation}", plan, trajectory, k, started))
                if compensation == "linear":  # the paper's alpha folded on top of the map, post hoc
                    alphas = [st.alpha for st in reference.steps[:k]]
                    steps = [(st.removed, a, st.output_map) for st, a in zip(trajectory.steps, alphas, strict=True)]
                    fold = reference_plan.fold_form
                    both = variant_after("prunecomp", plan.num_layers, steps, fold, plan.untie)
                    figures = measure(s, both, None)
                    rows.append({"row": "same layers, linear + paper alpha", "layers_removed": k, **figures})
                    print(json.dumps(rows[-1]), flush=True)

    if "ridge" in args.parts:
        k = min(args.points)
        for ridge in args.ridges:
            plan = plan_for(s, drop_layers=order[:k], compensation="linear", ridge=ridge)
            started = time.perf_counter()
            rows.append(row(s, f"same layers, linear, ridge {ridge:g}", plan, run(s, plan), k, started))

    if "selection" in args.parts:
        baseline_plan = plan_for(s, num_drop=most, compensation="none")
        for k in args.points:
            removed = baseline_layers(baseline_plan, reference, k)
            one_shot = variant_after("baseline", baseline_plan.num_layers, [([i], 1.0) for i in removed], None)
            rows.append({"row": "one-shot block influence, none", "layers_removed": k, "removed": removed,
                         **measure(s, one_shot, None)})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
        for pipeline in args.pipelines:
            metric, compensation = pipeline.split(":")
            plan = plan_for(s, num_drop=most, metric=metric, compensation=compensation)
            if metric == "compensated_loss":
                plan = replace(plan, probe_batches=args.probe_batches)
            started = time.perf_counter()
            trajectory = reference if (metric, compensation) == ("block_influence", "magnitude") else run(s, plan)
            for k in args.points:
                rows.append(row(s, f"pipeline, {metric}, {compensation}", plan, trajectory, k, started))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    print(table(rows))


def table(rows: list[dict]) -> str:
    dense = rows[0]
    corpora = [c for c in dense if c not in ("row", "layers_removed") and not c.startswith("gensim_")]
    tasks = [c for c in dense if c.startswith("gensim_")]
    kl = [f"kl {c}" for c in corpora]
    header = ["layers", "row", *corpora, *kl, "calibration"] + (["QA kept %"] if tasks else []) + ["removed"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [str(r["layers_removed"]), r["row"]]
        cells += [f"{r[c]:.2f}" if c in r else "" for c in corpora]
        cells += [f"{r[c]:.4f}" if c in r else "" for c in kl]
        cells.append(f"{r['calibration']:.2f}" if "calibration" in r else "")
        if tasks:
            kept = sum(r.get(t, math.nan) for t in tasks) / sum(dense[t] for t in tasks)
            cells.append(f"{100 * kept:.1f}")
        cells.append(" ".join(map(str, r.get("removed", []))))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
