"""Rich tables summarising a run or a dry run."""

from __future__ import annotations

import math

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from prunecomp_export.pipeline import DryRunResult, RunResult
from prunecomp_export.report.render import (
    compensation_text,
    cost_table,
    execution_line,
    plan_line,
    plan_table,
    summary_table,
    target_line,
)
from prunecomp_export.report.results import MemoryPlanRecord, RunResults


def print_dry_run(result: DryRunResult, console: Console) -> None:
    plan = result.plan
    table = Table(title="dry run: recipe and model config are valid", show_header=False)
    table.add_row("architecture", result.model_type)
    table.add_row("layers", f"{result.num_layers} -> {result.num_layers - plan.num_drop}")
    table.add_row("metric", plan.metric.name)
    table.add_row("protected layers", ", ".join(map(str, sorted(plan.protected))) or "none")
    table.add_row("tied embeddings", "yes" if result.tied_embeddings else "no")
    table.add_row(
        "shortlist",
        f"{plan.shortlist} (judged on held-back batches)" if plan.shortlist > 1 else "1 (the metric decides)",
    )
    judge = "a quarter of the batches" if plan.judge_batches is None else str(plan.judge_batches)
    table.add_row("held-back batches", judge + (" (no check)" if plan.judge_batches == 0 else ""))
    table.add_row("compensation", plan.compensation)
    table.add_row("compensation fold", plan.fold_form or "none" + (" (untied first)" if plan.untie else ""))
    table.add_row("targets", ", ".join(result.targets))
    console.print(table)
    print_memory_plan(MemoryPlanRecord.model_validate(result.memory.to_json()), console)
    for warning in result.memory.warnings():
        console.print(f"warning: {warning}")


def print_memory_plan(plan: MemoryPlanRecord, console: Console) -> None:
    header, rows = plan_table(plan)
    table = Table(title=f"memory plan ({plan.machine.device})")
    for column in header:
        table.add_column(column, justify="left" if column in ("stage", "process", "how") else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    console.print(plan_line(plan))


def print_run(result: RunResult, console: Console) -> None:
    trajectory = result.trajectory
    rounds = Table(title=f"Prune&Comp trajectory ({trajectory.metric}, {trajectory.schedule})")
    for column in ("round", "removed (original)", "compensation", "calib loss", "layer-forwards", "vs full forward"):
        rounds.add_column(column, justify="right")
    rounds.add_row("0", "-", "-", f"{trajectory.dense_calibration_loss:.4f}", "-", "-")
    for r in trajectory.rounds:
        loss = "" if math.isnan(r.calibration_loss) else f"{r.calibration_loss:.4f}"
        share = r.layer_forwards / r.full_forward_layer_forwards if r.layer_forwards else 0.0
        rounds.add_row(
            str(r.round),
            ", ".join(map(str, r.step.removed)),
            compensation_text(
                r.step.alpha,
                r.step.paper_alpha,
                r.step.output_map[0] if r.step.output_map else None,
                None if r.step.check is None else r.step.check.kept,
            ),
            loss,
            str(r.layer_forwards),
            f"{share:.2f}x" if r.layer_forwards else "",
        )
    console.print(rounds)
    if result.results is not None:
        _print_results(result, result.results, console)
    console.print(f"wrote {result.output} (report.html, results.json) in {result.seconds:.0f} s")


def _print_results(result: RunResult, results: RunResults, console: Console) -> None:
    header, rows = summary_table(results)
    if rows:
        table = Table(title=f"accuracy, {result.layers_before} -> {result.layers_after} layers")
        for column in header:
            table.add_column(column, justify="right")
        for row in rows:
            table.add_row(*row)
        console.print(table)
    signoff = results.signoff
    for check in signoff.checks:
        value = "missing" if check.value is None else f"{check.value:.3f}"
        verdict = "[green]PASS[/green]" if check.passed else "[red]FAIL[/red]"
        console.print(f"sign-off {check.name}: {value} (required {check.threshold}) {verdict} {check.detail}")
    if signoff.checks:
        console.print("sign-off: " + ("[green]PASS[/green]" if signoff.passed else "[red]FAIL[/red]"))
    for target in results.targets:
        verdict = "[green]PASS[/green]" if target.passed else "[red]FAIL[/red]"
        console.print(f"target {escape(target_line(target))} {verdict}")
    header, rows = cost_table(results)
    table = Table(title="cost per stage")
    for column in header:
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    console.print(execution_line(results))
