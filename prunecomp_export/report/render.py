"""The sign-off report: ``results.json`` (the ``RunResults`` models, versioned schema), ``report.md``
and a self-contained ``report.html`` whose plots are matplotlib PNGs embedded as data URIs."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from prunecomp_export.report.results import (
    SCHEMA,
    MeasurementRow,
    MemoryPlanRecord,
    ParityCheck,
    RunResults,
    TargetParity,
)
from prunecomp_export.report.signoff import accuracy_kept, perplexity_ratios

GB = 1e9
LABELS = {"dense": "dense", "baseline": "one-shot, no compensation", "prunecomp": "Prune&Comp"}


def write_reports(results: RunResults, directory: Path) -> None:
    (directory / "results.json").write_text(json.dumps(results.to_json(), indent=2) + "\n")
    (directory / "report.md").write_text(render_markdown(results))
    (directory / "report.html").write_text(render_html(results))


def _rows(results: RunResults, kind: str) -> list[MeasurementRow]:
    return [r for r in results.measurements if r.kind == kind]


MEASURES = {
    "perplexity": "token perplexity",
    "kl_divergence": "KL(dense ‖ model), nats/token",
    "top1_agreement": "top-1 agreement with dense",
    "accuracy": "accuracy (0-shot)",
}
#: what the dense model is against itself, by definition (the reference of the divergence figures)
DENSE_REFERENCE = {"kl_divergence": "0 (reference)", "top1_agreement": "100 % (reference)"}
SUMMARY_NOTE = (
    "KL and top-1 agreement: every next-token position of the perplexity windows, against the dense model "
    "(p90/p99: percentiles of the per-token KL). Accuracy ± lm-eval's standard error; Δ: the difference to "
    "the dense model in points with its 95 % interval, paired over the same questions."
)


def cell(row: MeasurementRow) -> str:
    """One figure as the summary table shows it, with its spread or uncertainty."""
    if row.kind == "perplexity":
        return f"{row.value:.2f}"
    if row.kind == "kl_divergence":
        return f"{row.value:.4f} (p90 {row.details['p90']:.3f}, p99 {row.details['p99']:.3f})"
    if row.kind == "top1_agreement":
        return f"{100 * row.value:.1f} %"
    text = f"{100 * row.value:.1f} %"
    if row.details.get("stderr") is not None:
        text += f" ± {100 * row.details['stderr']:.1f}"
    if (difference := row.details.get("difference_to_dense")) is not None:
        text += f", Δ {difference['points']:+.1f} ± {difference['ci95']:.1f}"
    return text


def summary_table(results: RunResults) -> tuple[list[str], list[list[str]]]:
    """One row per measure and dataset: dense, baseline and Prune&Comp at the final number of removed layers."""
    final = results.model.layers_removed
    header = ["measure", "dataset", "dense", LABELS["baseline"], LABELS["prunecomp"]]
    table = []
    for kind, label in MEASURES.items():
        datasets = list(dict.fromkeys(r.dataset for r in _rows(results, kind)))
        for dataset in datasets:
            cells = []
            for variant in ("dense", "baseline", "prunecomp"):
                layers = 0 if variant == "dense" else final
                row = next(
                    (
                        r
                        for r in _rows(results, kind)
                        if r.dataset == dataset and r.variant == variant and r.layers_removed == layers
                    ),
                    None,
                )
                reference = DENSE_REFERENCE.get(kind, "") if variant == "dense" else ""
                cells.append(reference if row is None else cell(row))
            table.append([label, dataset, *cells])
    return header, table


def render_markdown(results: RunResults) -> str:
    model, signoff, trajectory = results.model, results.signoff, results.trajectory
    lines = [
        f"# Prune&Comp sign-off: {model.source}",
        "",
        f"**{'PASS' if signoff.passed else 'FAIL'}** — {model.layers_before} → {model.layers_after} layers "
        f"({model.layers_removed} removed, {trajectory.metric}, {trajectory.schedule}).",
        "",
        "## Sign-off",
        "",
        "| threshold | required | measured | result | detail |",
        "|---|---|---|---|---|",
    ]
    for check in signoff.checks:
        value = "missing" if check.value is None else f"{check.value:.3f}"
        lines.append(
            f"| {check.name} | {check.threshold} | {value} | {'PASS' if check.passed else 'FAIL'} | {check.detail} |"
        )
    if not signoff.checks:
        lines.append("| (none set in the recipe's `signoff` section) | | | PASS | |")
    header, table = summary_table(results)
    lines += ["", "## Accuracy", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in table]
    ppl_protocol = results.protocol["perplexity"]
    lines += [
        "",
        accuracy_kept_line(results),
        "",
        SUMMARY_NOTE,
        "",
        f"Perplexity: {ppl_protocol['protocol'] if ppl_protocol else 'not measured'}."
        " This is token-level perplexity; lm-evaluation-harness's `wikitext` task reports word perplexity.",
        "",
        "## Trajectory",
        "",
        f"| round | removed (original index) | compensation ({trajectory.compensation}) | calibration loss |",
        "|---|---|---|---|",
    ]
    for r in trajectory.rounds:
        loss = "" if r.calibration_loss is None else f"{r.calibration_loss:.4f}"
        kept = None if r.step.check is None else r.step.check.kept
        compensation = compensation_text(r.step.alpha, r.step.paper_alpha, r.step.output_map_layer, kept)
        lines.append(f"| {r.round} | {', '.join(map(str, r.step.removed))} | {compensation} | {loss} |")
    lines += ["", "## Deployed targets", "", *targets_markdown(results)]
    if results.bench:
        lines += ["", "## Latency", "", *bench_markdown(results.bench)]
    lines += ["", "## Cost", "", *cost_markdown(results)]
    if results.memory_plan is not None:
        lines += ["", "## Memory plan", "", *plan_markdown(results)]
    lines += [
        "",
        f"Generated by prunecomp-export {results.packages.get('prunecomp-export')}; schema {results.schema_id}.",
        "",
    ]
    return "\n".join(lines)


NO_TARGETS = "No deployment target was built: the output deploys the plain checkpoint (`hf`) only."
COMPARISONS = {"<=": "≤", ">=": "≥"}


def _figure(value: float) -> str:
    """A parity figure: a count as an integer, a difference to 3 significant digits."""
    return str(int(value)) if float(value).is_integer() else f"{value:.3g}"


def _verdict(passed: bool) -> str:
    return "PASS" if passed else "FAIL"


def limit_text(check: ParityCheck) -> str:
    """The bound a parity figure had to meet, e.g. ``≤ 0.005``."""
    return f"{COMPARISONS[check.comparison]} {_figure(check.limit)}"


def targets_table(results: RunResults) -> tuple[list[str], list[list[str]]]:
    """One row per parity check of each built target: what its runtime measured against the
    reference; a target that could not be built or run gets one row with the error."""
    header = ["target", "check", "measured", "limit", "unit", "result", "detail"]
    table = []
    for target in results.targets:
        if target.error is not None:
            table.append([target.target, "built", "", "", "", _verdict(False), target.error])
        table += [
            [target.target, c.name, _figure(c.measured), limit_text(c), c.unit, _verdict(c.passed), c.detail]
            for c in target.checks
        ]
    return header, table


def target_line(target: TargetParity) -> str:
    """A built target's parity in one line (the console summary): its runtime and dtype, the tokens
    compared, each check's figure and bound; or the error that stopped it."""
    if target.error is not None and not target.checks:
        return f"{target.target}: {target.error}"
    checks = ", ".join(f"{c.name} {_figure(c.measured)} {limit_text(c)} ({c.unit})" for c in target.checks)
    return f"{target.target} ({target.runtime} {target.dtype}, {target.tokens_compared} tokens): {checks}"


def _md_cell(text: str) -> str:
    """A markdown table cell: a ``|`` in a prompt must not end the cell."""
    return text.replace("|", "\\|")


def targets_markdown(results: RunResults) -> list[str]:
    if not results.targets:
        return [NO_TARGETS]
    header, table = targets_table(results)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_md_cell(cell) for cell in row) + " |" for row in table]
    verdicts = ", ".join(f"{t.target} {_verdict(t.passed)}" for t in results.targets)
    return [
        *lines,
        "",
        f"Each target's runtime against the checkpoint's fp32 layer-streamed reference, when it was built: {verdicts}.",
    ]


def bench_table(bench: dict) -> tuple[list[str], list[list[str]]]:
    """Every latency figure: one row per runtime, scenario and number of layers removed."""
    header = [
        "runtime", "scenario", "layers removed", "median ms", "q1-q3 ms", "min-max ms",
        "speedup", "ideal", "measured / ideal", "tokens/s",
    ]  # fmt: skip
    table = [
        [
            f"{row['runtime']} {row.get('runtime_version') or ''}".strip(),
            row["scenario"],
            str(row["layers_removed"]),
            f"{row['median_ms']:.2f}",
            f"{row['q1_ms']:.2f}-{row['q3_ms']:.2f}",
            f"{row['min_ms']:.2f}-{row['max_ms']:.2f}",
            _fmt(row.get("speedup"), ".3f"),
            _fmt(row.get("ideal_speedup"), ".3f"),
            _fmt(row.get("efficiency"), ".2f"),
            _fmt(row.get("tokens_per_s"), ".1f") if row.get("tokens_per_s") is not None else "",
        ]
        for row in bench.get("rows", [])
    ]
    return header, table


def bench_notes(bench: dict) -> tuple[list[str], str]:
    """The busy-machine warnings, and one line on how the figures were taken."""
    protocol, load, other = bench["protocol"], bench["load_average"], bench.get("other_cpu", {})
    by_runtime = protocol.get("layer_share_by_runtime") or {"torch": protocol.get("layer_share", {})}
    shares = "; ".join(
        f"{runtime}: " + ", ".join(f"{name} {share:.2f}" for name, share in figures.items())
        for runtime, figures in by_runtime.items()
        if figures
    )
    busiest = "n/a" if load.get("max") is None else f"{load['max']:.1f}"
    others = "n/a" if other.get("max") is None else f"{other['max']:.2f}"
    how = (
        f"{protocol['process']}; warm-up runs: {protocol['warmup']}, measured repeats: {protocol['repeats']}, "
        f"rounds: {protocol.get('rounds', 1)}, "
        f"threads: {protocol['threads']}; load average up to {busiest} on {load['cores']} cores (the bench's "
        f"own threads included), other processes up to {others} cores busy. "
        f"Speedup: {protocol['speedup']}. Ideal: {protocol['ideal']}" + (f" (s: {shares})." if shares else ".")
    )
    return list(bench.get("warnings", [])), how


def bench_markdown(bench: dict) -> list[str]:
    header, table = bench_table(bench)
    warnings, how = bench_notes(bench)
    lines = [f"**Warning: {w}.**" for w in warnings] + ([""] if warnings else [])
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in table]
    return [*lines, "", how]


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "n/a" if value is None else format(value, spec)


def _gb(size: int | None) -> str:
    return _fmt(None if size is None else size / GB, ".2f")


def accuracy_kept_line(results: RunResults) -> str:
    """Accuracy kept of Prune&Comp and the baseline, each with its paired 95 % interval."""
    summary = results.summary

    def kept(value: float | None, margin: float | None) -> str:
        return _fmt(value) + ("" if value is None or margin is None else f" % ± {margin:.1f}")

    return (
        "Accuracy kept (mean over QA tasks, % of dense, 95 % interval paired over the same questions): "
        f"Prune&Comp {kept(summary.accuracy_kept_percent, summary.accuracy_kept_margin)}, "
        f"baseline {kept(summary.baseline_accuracy_kept_percent, summary.baseline_accuracy_kept_margin)}."
    )


def compensation_text(
    alpha: float, paper_alpha: float | None, output_map_layer: int | None, kept: str | None = None
) -> str:
    """One removal's compensation: the scalar folded (with the paper's alpha beside a fitted one), or
    the layer whose down projection carries the linear map, and what the held-back check kept."""
    if kept in ("half", "none"):
        measured = "map" if paper_alpha is None else f"alpha {paper_alpha:.4f}"
        folded = (
            "" if kept == "none" else (f" {alpha:.4f}" if output_map_layer is None else f" on layer {output_map_layer}")
        )
        why = "raised the held-back loss" if kept == "none" else "halved: the lowest held-back loss"
        return f"{kept}{folded} ({measured} {why})"
    if output_map_layer is not None:
        return f"map on layer {output_map_layer}"
    if paper_alpha is not None and paper_alpha != alpha:
        return f"{alpha:.4f} (paper {paper_alpha:.4f})"
    return f"{alpha:.4f}"


def plan_table(plan: MemoryPlanRecord) -> tuple[list[str], list[list[str]]]:
    """The memory plan, one row per stage: the process, the planned peak on the device and in host
    memory (beyond each process's own interpreter, torch and transformers), what the processes it runs
    at once hold of their own, and how."""
    header = ["stage", "process", "device GB", "host GB", "+ processes GB", "how"]
    table = [
        [s.stage, s.process, _gb(s.device_bytes), _gb(s.host_bytes), _gb(s.process_overhead_bytes),
         s.how + ("" if s.fits else " (over budget)")]
        for s in plan.stages
    ]  # fmt: skip
    return header, table


def plan_line(plan: MemoryPlanRecord) -> str:
    machine = plan.machine
    device = f"{machine.device}, device budget {_gb(plan.device_budget_bytes)} GB, " if machine.device != "cpu" else ""
    return (
        f"Memory plan for {device}host budget {_gb(plan.host_budget_bytes)} GB: weights {_gb(plan.weights_bytes)} GB, "
        f"largest slice {_gb(plan.slice_bytes)} GB, head in chunks of {plan.logits_chunk_tokens} tokens; each "
        f"Python process also holds about {_gb(plan.process_overhead_bytes)} GB of its own."
    )


def plan_markdown(results: RunResults) -> list[str]:
    if results.memory_plan is None:
        return []
    return [*_markdown_table(*plan_table(results.memory_plan)), "", plan_line(results.memory_plan)]


def cost_table(results: RunResults) -> tuple[list[str], list[list[str]]]:
    """One row per measured stage: wall time, this process's peak RSS, the largest child process's peak,
    the whole process tree's peak (this process and its children together), and the device's peak (a
    column only when a stage has one)."""
    device = any(c.peak_device_bytes is not None for c in results.costs)
    header = ["stage", "wall time s", "peak RSS GB", "largest child GB", "whole tree GB"]
    header += ["device peak GB"] if device else []
    table = [
        [c.name, f"{c.wall_s:.2f}", _gb(c.peak_rss_bytes), _gb(c.child_peak_rss_bytes), _gb(c.tree_peak_rss_bytes)]
        + ([_gb(c.peak_device_bytes)] if device else [])
        for c in results.costs
    ]
    return header, table


def child_table(results: RunResults) -> tuple[list[str], list[list[str]]]:
    """One row per child process of the run (the reload check, each QA run, each target, each bench
    worker): its stage, wall time, its whole process tree's peak RSS and its device peak."""
    header = ["stage", "child process", "wall time s", "peak RSS GB", "device peak GB"]
    table = [
        [c.name, child.name, f"{child.wall_s:.2f}", _gb(child.peak_rss_bytes), _gb(child.peak_device_bytes)]
        for c in results.costs
        for child in c.children
    ]
    return header, table


def execution_line(results: RunResults) -> str:
    """Where the weights and the stream cache lived, and the whole run's peak RSS."""
    e = results.execution
    tree = max((c.tree_peak_rss_bytes or 0 for c in results.costs), default=0)
    return (
        f"Execution on {e.device}: weights {e.weights} ({_gb(e.weights_bytes)} GB), stream cache on {e.stream_cache} "
        f"({_gb(e.stream_cache_bytes)} GB); memory budget {_gb(e.budget_bytes)} GB. "
        f"Peak RSS of the run's own process: {_gb(results.peak_rss_bytes)} GB; of the whole process tree "
        f"(children included, sampled): {_gb(tree or None)} GB."
    )


def _markdown_table(header: list[str], table: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in table)]


def _html_table(header: list[str], table: list[list[str]], *, table_id: str) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in table)
    return f"<table id='{table_id}'><tr>{head}</tr>{body}</table>"


def cost_markdown(results: RunResults) -> list[str]:
    lines = _markdown_table(*cost_table(results))
    header, children = child_table(results)
    if children:
        lines += ["", "Child processes:", "", *_markdown_table(header, children)]
    return [*lines, "", execution_line(results)]


def perplexity_curve(rows: list[MeasurementRow], variant: str, corpus_name: str) -> list[tuple[int, float]]:
    """(layers removed, perplexity / dense) from the dense model at 0 through every evaluated point."""
    points = sorted({r.layers_removed for r in rows if r.variant == variant})
    curve = [(k, perplexity_ratios(rows, variant, k).get(corpus_name)) for k in points]
    return [(0, 1.0), *((k, v) for k, v in curve if v is not None)]


def accuracy_curve(rows: list[MeasurementRow], variant: str) -> list[tuple[int, float]]:
    """(layers removed, accuracy kept %) from the dense model at 0 through every evaluated point."""
    points = sorted({r.layers_removed for r in rows if r.variant == variant})
    curve = [(k, accuracy_kept(rows, variant, k)) for k in points]
    return [(0, 100.0), *((k, v) for k, v in curve if v is not None)]


def plots(results: RunResults) -> dict[str, bytes]:
    """PNG bytes of each plot: PPL and accuracy kept versus layers removed (and speed, if measured)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results.measurements
    points = sorted({r.layers_removed for r in rows if r.variant != "dense"})
    images = {}
    corpora = list(dict.fromkeys(r.dataset for r in rows if r.kind == "perplexity"))
    if corpora and points:
        fig, ax = plt.subplots(figsize=(6.4, 4))
        for corpus_name in corpora:
            for variant, style in (("prunecomp", "-o"), ("baseline", "--s")):
                curve = perplexity_curve(rows, variant, corpus_name)
                if len(curve) > 1:
                    ax.plot(*zip(*curve, strict=True), style, label=f"{LABELS[variant]} — {Path(corpus_name).name}")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set(xlabel="layers removed", ylabel="perplexity / dense", title="Held-out token perplexity")
        ax.legend(fontsize=7)
        images["perplexity"] = _png(fig)
    if any(r.kind == "kl_divergence" for r in rows) and points:
        images["divergence"] = divergence_plot(rows)
    if any(r.kind == "accuracy" for r in rows) and points:
        fig, ax = plt.subplots(figsize=(6.4, 4))
        for variant, style in (("prunecomp", "-o"), ("baseline", "--s")):
            curve = accuracy_curve(rows, variant)
            if len(curve) > 1:
                ax.plot(*zip(*curve, strict=True), style, label=LABELS[variant])
        ax.axhline(100.0, color="gray", lw=0.8)
        ax.set(xlabel="layers removed", ylabel="accuracy kept (% of dense)", title="Zero-shot accuracy kept")
        ax.legend(fontsize=8)
        images["accuracy"] = _png(fig)
    if results.bench:
        images.update(bench_plots(results, rows))
    return images


def figure_curve(rows: list[MeasurementRow], kind: str, variant: str, corpus_name: str) -> list[tuple[int, float]]:
    """(layers removed, figure) of a divergence measure, from the dense model (KL 0, agreement 1)."""
    curve = sorted(
        (r.layers_removed, r.value) for r in rows if (r.kind, r.variant, r.dataset) == (kind, variant, corpus_name)
    )
    return [(0, 0.0 if kind == "kl_divergence" else 1.0), *curve]


def divergence_plot(rows: list[MeasurementRow]) -> bytes:
    """Mean KL from the dense model and top-1 agreement versus layers removed, side by side."""
    import matplotlib.pyplot as plt

    corpora = list(dict.fromkeys(r.dataset for r in rows if r.kind == "kl_divergence"))
    fig, (kl_axis, top1_axis) = plt.subplots(1, 2, figsize=(9.6, 4))
    for corpus_name in corpora:
        for variant, style in (("prunecomp", "-o"), ("baseline", "--s")):
            label = f"{LABELS[variant]} — {Path(corpus_name).name}"
            kl = figure_curve(rows, "kl_divergence", variant, corpus_name)
            top1 = figure_curve(rows, "top1_agreement", variant, corpus_name)
            if len(kl) > 1:
                kl_axis.plot(*zip(*kl, strict=True), style, label=label)
            if len(top1) > 1:
                top1_axis.plot(*zip(*[(k, 100 * v) for k, v in top1], strict=True), style, label=label)
    kl_axis.set(xlabel="layers removed", ylabel="mean KL(dense ‖ model), nats/token", title="Divergence from dense")
    top1_axis.set(xlabel="layers removed", ylabel="top-1 agreement with dense (%)", title="Top-1 agreement")
    kl_axis.legend(fontsize=7)
    return _png(fig)


def bench_plots(results: RunResults, rows: list[MeasurementRow]) -> dict[str, bytes]:
    import matplotlib.pyplot as plt

    bench_rows = results.bench["rows"]
    images = {}
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for key in dict.fromkeys((r["runtime"], r["scenario"]) for r in bench_rows):
        series = sorted(
            (r for r in bench_rows if (r["runtime"], r["scenario"]) == key), key=lambda r: r["layers_removed"]
        )
        line = ax.plot(
            [r["layers_removed"] for r in series], [r["speedup"] for r in series], "-o", label=" / ".join(key)
        )
        ax.plot(
            [r["layers_removed"] for r in series], [r["ideal_speedup"] for r in series], ":", color=line[0].get_color()
        )
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set(xlabel="layers removed", ylabel="speedup vs dense (dotted: ideal)", title="Measured latency speedup")
    ax.legend(fontsize=7)
    images["speedup"] = _png(fig)
    if any(r.kind == "accuracy" for r in rows):
        fig, ax = plt.subplots(figsize=(6.4, 4))
        for key in dict.fromkeys((r["runtime"], r["scenario"]) for r in bench_rows):
            pairs = [
                (r["speedup"], accuracy_kept(rows, "prunecomp", r["layers_removed"]))
                for r in bench_rows
                if (r["runtime"], r["scenario"]) == key
            ]
            pairs = [p for p in pairs if p[1] is not None]
            if pairs:
                ax.plot(*zip(*sorted(pairs), strict=True), "-o", label=" / ".join(key))
        ax.set(xlabel="speedup vs dense", ylabel="accuracy kept (%)", title="Accuracy versus speedup")
        ax.legend(fontsize=7)
        images["pareto"] = _png(fig)
    return images


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def targets_html(results: RunResults) -> list[str]:
    """The deployed targets' parity checks as the page's table (a result cell coloured by verdict)."""
    if not results.targets:
        return ["<h2>Deployed targets</h2>", f"<p id='targets'>{html.escape(NO_TARGETS)}</p>"]
    header, table = targets_table(results)
    result = header.index("result")
    parts = ["<h2>Deployed targets</h2><table id='targets'><tr>" + "".join(f"<th>{h}</th>" for h in header) + "</tr>"]
    for row in table:
        cells = [
            f"<td class='{c}'>{c}</td>" if i == result else f"<td>{html.escape(c)}</td>" for i, c in enumerate(row)
        ]
        parts.append("<tr>" + "".join(cells) + "</tr>")
    parts.append("</table>")
    return parts


def render_html(results: RunResults) -> str:
    """The markdown's content as a standalone page with the plots inlined (no external requests)."""
    signoff, model, trajectory = results.signoff, results.model, results.trajectory
    verdict = "PASS" if signoff.passed else "FAIL"
    header, table = summary_table(results)
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>Prune&amp;Comp sign-off: {verdict}</title>",
        "<style>body{font-family:sans-serif;max-width:980px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:4px 8px;text-align:right}"
        ".PASS{color:#06702c;font-weight:bold}.FAIL{color:#b00020;font-weight:bold}img{max-width:100%}</style>",
        "</head><body>",
        f"<h1>Prune&amp;Comp sign-off: <span class='{verdict}' id='verdict'>{verdict}</span></h1>",
        f"<p>{html.escape(model.source)}: {model.layers_before} → "
        f"{model.layers_after} layers ({html.escape(trajectory.metric)}, "
        f"{html.escape(trajectory.schedule)}).</p>",
        "<h2>Thresholds</h2><table><tr><th>threshold</th><th>required</th><th>measured</th><th>result</th><th>detail</th></tr>",
    ]
    for check in signoff.checks:
        value = "missing" if check.value is None else f"{check.value:.3f}"
        result = "PASS" if check.passed else "FAIL"
        parts.append(
            f"<tr><td>{check.name}</td><td>{check.threshold}</td><td>{value}</td>"
            f"<td class='{result}'>{result}</td><td>{html.escape(check.detail)}</td></tr>"
        )
    parts.append(
        "</table><h2>Accuracy</h2><table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"
    )
    parts += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in table]
    parts.append(f"</table><p id='accuracy-kept'>{html.escape(accuracy_kept_line(results))}</p>")
    parts.append(f"<p><small>{html.escape(SUMMARY_NOTE)}</small></p>")
    parts += targets_html(results)
    if results.bench:
        bench_header, bench_rows = bench_table(results.bench)
        warnings, how = bench_notes(results.bench)
        parts.append("<h2>Latency</h2>")
        parts += [f"<p class='FAIL warning'>Warning: {html.escape(w)}.</p>" for w in warnings]
        parts.append("<table id='latency'><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in bench_header) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in bench_rows]
        parts.append(f"</table><p><small>{html.escape(how)}</small></p>")
    parts += ["<h2>Cost</h2>", _html_table(*cost_table(results), table_id="cost")]
    child_header, child_rows = child_table(results)
    if child_rows:
        parts += ["<p>Child processes:</p>", _html_table(child_header, child_rows, table_id="children")]
    parts.append(f"<p id='execution'>{html.escape(execution_line(results))}</p>")
    if results.memory_plan is not None:
        parts += ["<h2>Memory plan</h2>", _html_table(*plan_table(results.memory_plan), table_id="memory-plan")]
        parts.append(f"<p>{html.escape(plan_line(results.memory_plan))}</p>")
    for name, png in plots(results).items():
        data = base64.b64encode(png).decode()
        parts.append(f"<figure><img alt='{name}' id='plot-{name}' src='data:image/png;base64,{data}'></figure>")
    parts.append(f"<p><small>schema {SCHEMA}; see results.json for every figure and its protocol.</small></p>")
    parts.append("</body></html>")
    return "\n".join(parts)
