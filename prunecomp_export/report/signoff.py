"""Sign-off: compare the final pruned model's figures with the recipe's thresholds.

A threshold whose measurement is missing fails: a pipeline cannot sign off what was not measured.
"""

from __future__ import annotations

from collections.abc import Sequence

from prunecomp_export.evaluation.evaluator import Measurement
from prunecomp_export.recipe import SignoffSpec
from prunecomp_export.report.results import MeasurementRow, Signoff, SignoffCheck, TargetParity

#: a run's rows as the pipeline holds them, or as results.json holds them: the same fields
Rows = Sequence[Measurement | MeasurementRow]


def mean_accuracy(rows: Rows, variant: str, layers_removed: int) -> float | None:
    values = [
        r.value for r in rows if r.kind == "accuracy" and r.variant == variant and r.layers_removed == layers_removed
    ]
    return sum(values) / len(values) if values else None


def accuracy_kept(rows: Rows, variant: str, layers_removed: int) -> float | None:
    """Mean accuracy over the QA tasks as a percentage of the dense model's (the paper's 'kept %')."""
    dense = mean_accuracy(rows, "dense", 0)
    pruned = mean_accuracy(rows, variant, layers_removed)
    if dense is None or pruned is None or dense == 0:
        return None
    return 100.0 * pruned / dense


def perplexity_ratios(rows: Rows, variant: str, layers_removed: int) -> dict[str, float]:
    dense = {r.dataset: r.value for r in rows if r.kind == "perplexity" and r.variant == "dense"}
    return {
        r.dataset: r.value / dense[r.dataset]
        for r in rows
        if r.kind == "perplexity" and r.variant == variant and r.layers_removed == layers_removed and r.dataset in dense
    }


def evaluate_signoff(
    spec: SignoffSpec, rows: Rows, layers_removed: int, speedups: dict[str, float] | None = None
) -> Signoff:
    checks: list[SignoffCheck] = []
    if spec.min_accuracy_kept is not None:
        kept = accuracy_kept(rows, "prunecomp", layers_removed)
        checks.append(
            SignoffCheck(
                name="min_accuracy_kept",
                threshold=spec.min_accuracy_kept,
                value=kept,
                passed=kept is not None and kept >= spec.min_accuracy_kept,
                detail="mean QA accuracy, % of dense"
                if kept is not None
                else "no QA accuracy measured (evaluation.qa)",
            )
        )
    if spec.max_perplexity_ratio is not None:
        ratios = perplexity_ratios(rows, "prunecomp", layers_removed)
        worst = max(ratios.values()) if ratios else None
        worst_corpus = max(ratios, key=ratios.get) if ratios else None
        checks.append(
            SignoffCheck(
                name="max_perplexity_ratio",
                threshold=spec.max_perplexity_ratio,
                value=worst,
                passed=worst is not None and worst <= spec.max_perplexity_ratio,
                detail=f"worst corpus: {worst_corpus}" if ratios else "no perplexity measured (evaluation.perplexity)",
            )
        )
    if spec.min_speedup is not None:
        slowest = min(speedups.values()) if speedups else None
        slowest_runtime = min(speedups, key=speedups.get) if speedups else None
        checks.append(
            SignoffCheck(
                name="min_speedup",
                threshold=spec.min_speedup,
                value=slowest,
                passed=slowest is not None and slowest >= spec.min_speedup,
                detail=f"slowest runtime: {slowest_runtime}" if speedups else "no latency measured (run with --bench)",
            )
        )
    return Signoff(checks=checks, passed=all(c.passed for c in checks))


def with_target_parity(signoff: Signoff, targets: Sequence[TargetParity]) -> Signoff:
    """The sign-off with the deployed targets' parity as one more check: a target that failed its
    parity check, or could not be built or run, fails the sign-off (exit 1), while the output stays
    complete. Replaces an earlier such check (``export`` rebuilds targets)."""
    checks = [check for check in signoff.checks if check.name != "target_parity"]
    if targets:
        failed = [target.target for target in targets if not target.passed]
        checks.append(
            SignoffCheck(
                name="target_parity",
                threshold=len(targets),
                value=len(targets) - len(failed),
                passed=not failed,
                detail=f"failed: {', '.join(failed)}" if failed else "every target passed its parity check",
            )
        )
    return Signoff(checks=checks, passed=all(check.passed for check in checks))
