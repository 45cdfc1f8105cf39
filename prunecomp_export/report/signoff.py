"""Sign-off: compare the final pruned model's figures with the recipe's thresholds.

A threshold whose measurement is missing fails: a pipeline cannot sign off what was not measured.
Accuracy carries its uncertainty: the pruned and the dense model answer the same questions, so the
interval of the accuracy kept is paired over them, and a threshold inside it is named as such.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

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


#: the two-sided 95 % normal quantile: intervals are 95 % confidence intervals
Z95 = 1.959963984540054


@dataclass(frozen=True)
class Interval:
    """A figure and the half-width of its 95 % confidence interval."""

    value: float
    margin: float

    def contains(self, threshold: float) -> bool:
        return abs(self.value - threshold) <= self.margin


def _pairs(rows: Rows, variant: str, layers_removed: int) -> list[tuple[list[int], list[int]]] | None:
    """Per QA task, the dense and the variant's per-question results on the same questions; None when
    a task lacks them (a result from before they were recorded) or was asked other questions."""
    dense = {r.dataset: r for r in rows if r.kind == "accuracy" and r.variant == "dense"}
    model = [r for r in rows if r.kind == "accuracy" and r.variant == variant and r.layers_removed == layers_removed]
    pairs = []
    for row in model:
        reference = dense.get(row.dataset)
        if reference is None or "correct" not in row.details or "correct" not in reference.details:
            return None
        if row.details.get("questions_sha256") != reference.details.get("questions_sha256"):
            return None
        pairs.append((reference.details["correct"], row.details["correct"]))
    return pairs or None


def _variance_of_mean(values: list[float]) -> float:
    n = len(values)
    if n < 2:
        return math.inf
    mean = sum(values) / n
    return sum((v - mean) ** 2 for v in values) / (n - 1) / n


def paired_difference(rows: Rows, variant: str, layers_removed: int, task: str) -> Interval | None:
    """The variant's accuracy minus the dense model's on ``task``, in points, with the 95 % interval
    of the mean per-question difference (paired: the same questions)."""
    pairs = _pairs([r for r in rows if r.dataset == task], variant, layers_removed)
    if pairs is None:
        return None
    ((dense, model),) = pairs
    differences = [m - d for d, m in zip(dense, model, strict=True)]
    mean = sum(differences) / len(differences)
    return Interval(100.0 * mean, 100.0 * Z95 * math.sqrt(_variance_of_mean(differences)))


def accuracy_kept_interval(rows: Rows, variant: str, layers_removed: int) -> Interval | None:
    """Accuracy kept (mean over tasks, % of dense) with its 95 % interval, paired over the questions.
    By the delta method the kept ratio R = M / D varies as (M - R D) / D, M and D the mean accuracies
    over tasks: per question z = m - R d, whose mean's variance per task adds over the (independent)
    tasks. None without per-question results for every task."""
    kept = accuracy_kept(rows, variant, layers_removed)
    pairs = _pairs(rows, variant, layers_removed)
    if kept is None or pairs is None:
        return None
    ratio = kept / 100.0
    dense_mean = sum(sum(d) / len(d) for d, _m in pairs) / len(pairs)
    variance = sum(
        _variance_of_mean([m - ratio * d for d, m in zip(dense, model, strict=True)]) for dense, model in pairs
    )
    margin = 100.0 * Z95 * math.sqrt(variance) / len(pairs) / dense_mean
    return Interval(kept, margin)


def add_paired_differences(rows: Rows) -> None:
    """Every non-dense accuracy row's difference to the dense model on the same questions, in points,
    with its 95 % interval, into its details (``difference_to_dense``), where both have per-question results."""
    for row in rows:
        if row.kind != "accuracy" or row.variant == "dense":
            continue
        difference = paired_difference(rows, row.variant, row.layers_removed, row.dataset)
        if difference is not None:
            row.details["difference_to_dense"] = {"points": difference.value, "ci95": difference.margin}


def corpus_figures(rows: Rows, kind: str, variant: str, layers_removed: int) -> dict[str, float]:
    """A per-corpus figure (``kl_divergence``, ``top1_agreement``) of one variant, by corpus."""
    return {
        r.dataset: r.value
        for r in rows
        if r.kind == kind and r.variant == variant and r.layers_removed == layers_removed
    }


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
        checks.append(_accuracy_check(spec.min_accuracy_kept, rows, layers_removed))
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
    if spec.max_kl_divergence is not None:
        kl = corpus_figures(rows, "kl_divergence", "prunecomp", layers_removed)
        worst = max(kl, key=kl.get) if kl else None
        checks.append(
            SignoffCheck(
                name="max_kl_divergence",
                threshold=spec.max_kl_divergence,
                value=kl[worst] if worst else None,
                passed=worst is not None and kl[worst] <= spec.max_kl_divergence,
                detail=f"mean KL(dense || pruned) per token, nats; worst corpus: {worst}"
                if worst
                else "no divergence measured (evaluation.perplexity)",
            )
        )
    if spec.min_top1_agreement is not None:
        agreement = corpus_figures(rows, "top1_agreement", "prunecomp", layers_removed)
        worst = min(agreement, key=agreement.get) if agreement else None
        checks.append(
            SignoffCheck(
                name="min_top1_agreement",
                threshold=spec.min_top1_agreement,
                value=100.0 * agreement[worst] if worst else None,
                passed=worst is not None and 100.0 * agreement[worst] >= spec.min_top1_agreement,
                detail=f"% of tokens whose top-1 token is the dense model's; worst corpus: {worst}"
                if worst
                else "no divergence measured (evaluation.perplexity)",
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


def _accuracy_check(threshold: float, rows: Rows, layers_removed: int) -> SignoffCheck:
    """Accuracy kept against its threshold; the point estimate decides, and the detail says when the
    threshold lies inside the 95 % interval: the tasks are then too small to tell."""
    kept = accuracy_kept(rows, "prunecomp", layers_removed)
    interval = accuracy_kept_interval(rows, "prunecomp", layers_removed)
    if kept is None:
        detail = "no QA accuracy measured (evaluation.qa)"
    elif interval is None:
        detail = "mean QA accuracy, % of dense (no per-question results: no interval)"
    elif interval.contains(threshold):
        detail = (
            f"accuracy kept {kept:.1f} % ± {interval.margin:.1f} (95 % interval, paired over the same questions): "
            f"the tasks are too small to sign off at {threshold:g} %"
        )
    else:
        detail = (
            f"accuracy kept {kept:.1f} % ± {interval.margin:.1f} (95 % interval, paired over the same questions): "
            f"{'above' if kept > threshold else 'below'} {threshold:g} % beyond the noise"
        )
    return SignoffCheck(
        name="min_accuracy_kept",
        threshold=threshold,
        value=kept,
        passed=kept is not None and kept >= threshold,
        detail=detail,
        margin=None if interval is None else interval.margin,
        inside_noise=interval is not None and interval.contains(threshold),
    )
