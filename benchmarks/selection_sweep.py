"""Selection sweep on the demo recipe: which shortlist and how many judge batches, against block
influence alone and the strongest one-shot block-influence choices, at 6 of 30 layers.

Each row is a fresh CLI run of ``recipes/smollm2-135m-demo.yaml`` (streamed weights, disk streams,
as the demo runs) with some keys set; its figures come from the run's own ``results.json``: held-out
token perplexity on the demo's corpora, KL divergence from the dense model and top-1 agreement on
the news text, the prune stage's wall time, the removed layers, and (``--qa``) QA accuracy kept.
Rows run one after another on the same machine, so their prune times compare.

    python benchmarks/selection_sweep.py [--rows NAME ...] [--qa [--qa-limit N|all]] [--out outputs/selection-sweep]
        [--table-only]

With ``--qa`` each row also carries its accuracy per task and its accuracy kept minus the default's
(``BI, magnitude, check 1``), paired over the same questions, with a 95 % interval: whether a row keeps
less accuracy than the default beyond the noise of the questions asked. ``--qa-limit all`` asks every
question of the offline tasks (280 analogies, 200 reviews) instead of the demo's 100 a task.

The one-shot rows: ``one-shot BI (project)`` is block influence's own one-shot choice on the demo's
calibration (16 x 512), ``one-shot BI (authors)`` the layers the method's authors' code chooses on
32 x 512 windows of the same corpus (14, 17, 13, 12, 15, 16), both without compensation.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from prunecomp_export.report.signoff import Z95

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "recipes" / "smollm2-135m-demo.yaml"
NEWS = "gensim-news"

#: name -> the keys each row sets on top of the demo recipe
ROWS: dict[str, list[str]] = {
    "one-shot BI (project), none": ["prune.schedule=one_shot", "prune.compensation=none", "prune.judge_batches=0"],
    "one-shot BI (authors), none": [
        "prune.num_drop=null", "prune.drop_layers=[14, 17, 13, 12, 15, 16]", "prune.schedule=one_shot",
        "prune.compensation=none", "prune.judge_batches=0",
    ],
    "BI, magnitude, no check (before)": ["prune.shortlist=1", "prune.judge_batches=0"],
    "BI, magnitude, check 1": ["prune.shortlist=1", "prune.judge_batches=1"],
    "BI shortlist 2, judge 1": ["prune.shortlist=2", "prune.judge_batches=1"],
    "BI shortlist 3, judge 1": ["prune.shortlist=3", "prune.judge_batches=1"],
    "BI shortlist 4, judge 1": ["prune.shortlist=4", "prune.judge_batches=1"],
    "BI shortlist 3, judge 2": ["prune.shortlist=3", "prune.judge_batches=2"],
    "BI shortlist 6, judge 1": ["prune.shortlist=6", "prune.judge_batches=1"],
    # which removals cost the shortlist its QA accuracy: its layers with the paper's alpha folded at every
    # gap (no check), and the authors' one-shot layers removed the default's way (alpha + the check)
    "shortlist 3's layers, magnitude, no check": [
        "prune.num_drop=null", "prune.drop_layers=[14, 17, 15, 13, 16, 18]", "prune.judge_batches=0",
    ],
    "authors' one-shot layers, magnitude, check 1": [
        "prune.num_drop=null", "prune.drop_layers=[14, 17, 13, 12, 15, 16]", "prune.judge_batches=1",
    ],
}  # fmt: skip
#: the row that stands for the default keys; the others' accuracy kept is compared to it
DEFAULT_ROW = "BI, magnitude, check 1"
#: every row: no trajectory points, no baseline, no reload check (only the prune choice is compared)
COMMON = ["evaluation.trajectory=[]", "evaluation.baseline=false", "output.verify=false", "output.overwrite=true"]
#: without QA the demo's accuracy threshold has no figure (the run refuses it): dropped with it
NO_QA = ["evaluation.qa=null", "signoff.min_accuracy_kept=null"]


def directory_of(name: str, out: Path) -> Path:
    return out / name.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")


def run_row(name: str, keys: list[str], out: Path, qa: bool, qa_limit: str | None) -> dict:
    directory = directory_of(name, out)
    limit = [f"evaluation.qa.limit={'null' if qa_limit == 'all' else qa_limit}"] if qa and qa_limit else []
    sets = [*COMMON, *([] if qa else NO_QA), *limit, *keys]
    command = [sys.executable, "-m", "prunecomp_export", str(DEMO), "--output", str(directory)]
    command += [arg for key in sets for arg in ("--set", key)]
    started = time.perf_counter()
    log = directory.with_suffix(".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as handle:
        code = subprocess.call(command, stdout=handle, stderr=subprocess.STDOUT, env={**os.environ})
    if code not in (0, 1):
        raise RuntimeError(f"{name}: exit code {code}, see {log}")
    results = json.loads((directory / "results.json").read_text())
    return summarise(name, results, time.perf_counter() - started)


def final_answers(results: dict, variant: str = "prunecomp") -> dict[str, dict]:
    """Per QA task, the final model's accuracy row (``variant`` "dense": the dense model's)."""
    final = 0 if variant == "dense" else results["model"]["layers_removed"]
    return {
        m["dataset"]: m
        for m in results["measurements"]
        if m["kind"] == "accuracy" and m["variant"] == variant and m["layers_removed"] == final
    }


def kept_difference(results: dict, reference: dict) -> tuple[float, float] | None:
    """Accuracy kept of one run's final model minus another's, in points of the dense model's accuracy,
    and the half-width of its 95 % interval, paired over the same questions: per task the per-question
    differences (1 - 0, 0 - 1 or 0), whose means' variances add over the (independent) tasks. The dense
    model's accuracy is the same in both runs (the same questions) and is taken as fixed. None when the
    runs did not ask the same questions (or either has no per-question results)."""
    ours, theirs, dense = final_answers(results), final_answers(reference), final_answers(results, "dense")
    if not ours or ours.keys() != theirs.keys() or ours.keys() != dense.keys():
        return None
    means, variance = [], 0.0
    for task, row in ours.items():
        other = theirs[task]["details"]
        if "correct" not in row["details"] or "correct" not in other:
            return None
        if row["details"].get("questions_sha256") != other.get("questions_sha256"):
            return None
        answers = zip(row["details"]["correct"], other["correct"], strict=True)
        differences = [a - b for a, b in answers]
        means.append(statistics.fmean(differences))
        variance += statistics.variance(differences) / len(differences)
    dense_mean = statistics.fmean(m["value"] for m in dense.values())
    scale = 100.0 / len(means) / dense_mean
    return scale * sum(means), scale * Z95 * math.sqrt(variance)


def summarise(name: str, results: dict, seconds: float) -> dict:
    final = results["model"]["layers_removed"]
    rows = [m for m in results["measurements"] if m["variant"] == "prunecomp" and m["layers_removed"] == final]
    figures = {m["dataset"]: m["value"] for m in rows if m["kind"] == "perplexity"}
    figures |= {f"kl {m['dataset']}": m["value"] for m in rows if m["kind"] == "kl_divergence"}
    figures |= {f"top1 {m['dataset']}": m["value"] for m in rows if m["kind"] == "top1_agreement"}
    prune = next(c for c in results["costs"] if c["name"] == "prune")
    trajectory = results["trajectory"]
    full_forward = trajectory["rounds"][0]["full_forward_layer_forwards"]
    row = {
        "row": name,
        "removed": trajectory["removed_in_order"],
        "prune_s": prune["wall_s"],
        # the prune stage's work in full forwards over the calibration set: the capture, then every round
        "forwards": 1 + sum(r["layer_forwards"] for r in trajectory["rounds"]) / full_forward,
        "run_s": round(seconds, 1),
        "checks": [r["step"]["check"]["kept"] if r["step"].get("check") else None for r in trajectory["rounds"]],
        "accuracy_kept": results["summary"]["accuracy_kept_percent"],
        "accuracy_kept_margin": results["summary"].get("accuracy_kept_margin"),
        "accuracy": {task: m["value"] for task, m in final_answers(results).items()},
        **figures,
    }
    print(json.dumps(row), flush=True)
    return row | {"results": results}


def table(rows: list[dict]) -> str:
    one_shot = [r for r in rows if r["row"].startswith("one-shot")]
    strongest = min((r[NEWS] for r in one_shot), default=None)
    reference = next((r["prune_s"] for r in rows if r["row"].endswith("(before)")), None)
    default = next((r for r in rows if r["row"] == DEFAULT_ROW), None)
    corpora = [c for c in rows[0] if c.startswith("gensim-")]
    tasks = sorted({task for r in rows for task in r["accuracy"]})
    header = ["row", *corpora, "news vs strongest one-shot", "KL news", "top-1 news", "prune s", "vs BI prune",
              "full forwards", *tasks, "QA kept % (95 %)", "vs default (paired)", "removed, in order",
              "compensation kept"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["row"], *(f"{r[c]:.2f}" for c in corpora)]
        cells.append(f"{r[NEWS] / strongest:.3f}" if strongest else "")
        cells.append(f"{r[f'kl {NEWS}']:.3f}" if f"kl {NEWS}" in r else "")
        cells.append(f"{100 * r[f'top1 {NEWS}']:.1f} %" if f"top1 {NEWS}" in r else "")
        one = r["row"].startswith("one-shot")
        cells.append("" if one else f"{r['prune_s']:.0f}")
        cells.append("" if one or not reference else f"{r['prune_s'] / reference:.2f}")
        cells.append(f"{r['forwards']:.1f}" if "forwards" in r else "")
        cells += [f"{100 * r['accuracy'][t]:.1f} %" if t in r["accuracy"] else "" for t in tasks]
        kept, margin = r["accuracy_kept"], r["accuracy_kept_margin"]
        cells.append("" if kept is None else f"{kept:.1f}" + ("" if margin is None else f" ± {margin:.1f}"))
        difference = None if default is None or r is default else kept_difference(r["results"], default["results"])
        cells.append("" if difference is None else f"{difference[0]:+.1f} ± {difference[1]:.1f}")
        cells.append(" ".join(map(str, r["removed"])))
        cells.append(" ".join("-" if c is None else c for c in r["checks"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), help="row names (default: all)")
    parser.add_argument("--qa", action="store_true", help="also lm-eval QA accuracy (slow)")
    parser.add_argument("--qa-limit", help="questions a QA task: a number, or 'all' (default: the demo's 100)")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "selection-sweep")
    parser.add_argument("--json", type=Path, help="write every row here")
    parser.add_argument("--table-only", action="store_true", help="summarise the rows already run in --out")
    args = parser.parse_args()
    if args.table_only:
        done = [n for n in args.rows if (directory_of(n, args.out) / "results.json").is_file()]
        rows = [summarise(n, json.loads((directory_of(n, args.out) / "results.json").read_text()), 0) for n in done]
    else:
        rows = [run_row(name, ROWS[name], args.out, args.qa, args.qa_limit) for name in args.rows]
    if args.json:
        args.json.write_text(json.dumps([{k: v for k, v in r.items() if k != "results"} for r in rows], indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()
