"""Sign-off thresholds, exit codes, and the report files (results.json against its JSON schema)."""

from __future__ import annotations

import json

import jsonschema
import pytest
from click.testing import CliRunner

from prunecomp_export.cli import main
from prunecomp_export.evaluation.evaluator import Measurement
from prunecomp_export.recipe import SignoffSpec
from prunecomp_export.report.render import NO_TARGETS, accuracy_curve, perplexity_curve
from prunecomp_export.report.results import SCHEMA, SCHEMA_FILE, RunResults, schema_text
from prunecomp_export.report.signoff import accuracy_kept, evaluate_signoff, perplexity_ratios
from tests.test_recipe_errors import GOOD, write

ROWS = [
    Measurement("dense", 0, "accuracy", "a", 0.80),
    Measurement("dense", 0, "accuracy", "b", 0.60),
    Measurement("prunecomp", 2, "accuracy", "a", 0.70),
    Measurement("prunecomp", 2, "accuracy", "b", 0.56),
    Measurement("baseline", 2, "accuracy", "a", 0.50),
    Measurement("baseline", 2, "accuracy", "b", 0.50),
    Measurement("dense", 0, "perplexity", "wiki", 20.0),
    Measurement("dense", 0, "perplexity", "news", 30.0),
    Measurement("prunecomp", 2, "perplexity", "wiki", 30.0),
    Measurement("prunecomp", 2, "perplexity", "news", 60.0),
]


def test_kept_percent_and_perplexity_ratio_by_hand():
    # dense mean 0.70; Prune&Comp mean 0.63 -> 90 %; baseline 0.50 -> 71.43 %
    assert accuracy_kept(ROWS, "prunecomp", 2) == pytest.approx(90.0)
    assert accuracy_kept(ROWS, "baseline", 2) == pytest.approx(100 * 0.5 / 0.7)
    assert perplexity_ratios(ROWS, "prunecomp", 2) == {"wiki": 1.5, "news": 2.0}


def test_plot_curves_run_from_the_dense_model_through_every_evaluated_point():
    rows = [
        *ROWS,
        Measurement("prunecomp", 4, "perplexity", "wiki", 50.0),
        Measurement("prunecomp", 4, "accuracy", "a", 0.60),
        Measurement("prunecomp", 4, "accuracy", "b", 0.52),
    ]
    assert perplexity_curve(rows, "prunecomp", "wiki") == [(0, 1.0), (2, 1.5), (4, 2.5)]
    assert perplexity_curve(rows, "prunecomp", "news") == [(0, 1.0), (2, 2.0)]  # not measured at 4
    (x0, y0), (x2, y2), (x4, y4) = accuracy_curve(rows, "prunecomp")  # dense mean 0.70
    assert (x0, x2, x4) == (0, 2, 4) and (y0, y2, y4) == pytest.approx((100.0, 90.0, 80.0))


@pytest.mark.parametrize(
    ("spec", "passed", "failing"),
    [
        (SignoffSpec(min_accuracy_kept=90.0), True, []),
        (SignoffSpec(min_accuracy_kept=90.5), False, ["min_accuracy_kept"]),
        (SignoffSpec(max_perplexity_ratio=2.0), True, []),
        (SignoffSpec(max_perplexity_ratio=1.9), False, ["max_perplexity_ratio"]),
        (SignoffSpec(min_speedup=1.1), False, ["min_speedup"]),  # not measured: cannot sign off
        (SignoffSpec(), True, []),
    ],
)
def test_signoff_thresholds(spec, passed, failing):
    result = evaluate_signoff(spec, ROWS, 2)
    assert result.passed is passed
    assert [c.name for c in result.checks if not c.passed] == failing


DIVERGENCE = [
    Measurement("prunecomp", 2, "kl_divergence", "wiki", 0.30, {"p90": 0.7, "p99": 2.0, "tokens": 10}),
    Measurement("prunecomp", 2, "kl_divergence", "news", 0.45, {"p90": 0.9, "p99": 2.5, "tokens": 10}),
    Measurement("prunecomp", 2, "top1_agreement", "wiki", 0.80, {"tokens": 10}),
    Measurement("prunecomp", 2, "top1_agreement", "news", 0.70, {"tokens": 10}),
]


@pytest.mark.parametrize(
    ("spec", "passed", "value"),
    [
        (SignoffSpec(max_kl_divergence=0.5), True, 0.45),  # the worst corpus decides
        (SignoffSpec(max_kl_divergence=0.4), False, 0.45),
        (SignoffSpec(min_top1_agreement=70), True, 70.0),
        (SignoffSpec(min_top1_agreement=75), False, 70.0),
    ],
)
def test_divergence_thresholds_use_the_worst_corpus(spec, passed, value):
    (check,) = evaluate_signoff(spec, ROWS + DIVERGENCE, 2).checks
    assert check.passed is passed and check.value == pytest.approx(value)
    (missing,) = evaluate_signoff(spec, ROWS, 2).checks  # not measured: cannot sign off
    assert not missing.passed and missing.value is None


def paired_rows(dense: dict[str, list[int]], pruned: dict[str, list[int]]) -> list[Measurement]:
    def row(variant: str, k: int, task: str, correct: list[int]) -> Measurement:
        details = {"correct": correct, "questions_sha256": f"{task}-{len(correct)}", "n": len(correct)}
        return Measurement(variant, k, "accuracy", task, sum(correct) / len(correct), details)

    return [row("dense", 0, t, c) for t, c in dense.items()] + [row("prunecomp", 2, t, c) for t, c in pruned.items()]


def test_accuracy_kept_interval_is_the_paired_delta_method():
    import numpy as np

    from prunecomp_export.report.signoff import Z95, accuracy_kept_interval, paired_difference

    rng = np.random.default_rng(0)
    dense = {t: (rng.random(n) < p).astype(int).tolist() for t, n, p in (("a", 200, 0.75), ("b", 120, 0.6))}
    # the pruned model mostly answers as the dense one did: the pairing shrinks the interval
    pruned = {t: [c if rng.random() < 0.85 else 1 - c for c in v] for t, v in dense.items()}
    rows = paired_rows(dense, pruned)
    interval = accuracy_kept_interval(rows, "prunecomp", 2)
    d = {t: np.array(v, float) for t, v in dense.items()}
    m = {t: np.array(v, float) for t, v in pruned.items()}
    ratio = np.mean([m[t].mean() for t in d]) / np.mean([d[t].mean() for t in d])
    # independent: the delta method, variance of M - R D over the independent tasks, the mean over tasks
    variance = sum(np.var(m[t] - ratio * d[t], ddof=1) / len(d[t]) for t in d) / len(d) ** 2
    assert interval.value == pytest.approx(100 * ratio)
    assert interval.margin == pytest.approx(100 * Z95 * np.sqrt(variance) / np.mean([d[t].mean() for t in d]))
    unpaired = Z95 * np.sqrt(sum(d[t].var(ddof=1) / len(d[t]) + m[t].var(ddof=1) / len(m[t]) for t in d)) / 2
    assert interval.margin / 100 < unpaired / np.mean([d[t].mean() for t in d]), "pairing narrows it"
    difference = paired_difference(rows, "prunecomp", 2, "a")
    assert difference.value == pytest.approx(100 * (m["a"].mean() - d["a"].mean()))
    assert difference.margin == pytest.approx(100 * Z95 * np.std(m["a"] - d["a"], ddof=1) / np.sqrt(200))


def test_a_threshold_inside_the_interval_is_named_as_noise():
    dense = {"a": [1] * 80 + [0] * 20}
    pruned = {"a": [1] * 74 + [0] * 6 + [0] * 20}  # 74 of the dense model's 80: kept 92.5 %
    rows = paired_rows(dense, pruned)
    (inside,) = evaluate_signoff(SignoffSpec(min_accuracy_kept=95), rows, 2).checks
    assert inside.value == pytest.approx(92.5) and not inside.passed and inside.inside_noise
    assert "the tasks are too small to sign off at 95 %" in inside.detail
    assert inside.detail.startswith(f"accuracy kept 92.5 % ± {inside.margin:.1f}")
    (outside,) = evaluate_signoff(SignoffSpec(min_accuracy_kept=70), rows, 2).checks
    assert outside.passed and not outside.inside_noise and "above 70 % beyond the noise" in outside.detail
    (unpaired,) = evaluate_signoff(SignoffSpec(min_accuracy_kept=70), ROWS, 2).checks  # no per-question results
    assert unpaired.margin is None and "no interval" in unpaired.detail


def test_speedup_threshold_uses_the_slowest_runtime():
    result = evaluate_signoff(SignoffSpec(min_speedup=1.2), ROWS, 2, {"torch": 1.3, "onnxruntime": 1.15})
    assert not result.passed and result.checks[0].value == 1.15


def _run(tmp_path, tiny_dir, signoff: str):
    recipe = GOOD + "evaluation:\n  perplexity:\n    corpora: [{text}]\n    seq_len: 16\n  trajectory: all\n" + signoff
    path = write(tmp_path, recipe, tiny_dir)
    return CliRunner().invoke(main, [str(path)])


def test_cli_exits_0_when_signoff_passes_and_reports_parse(tmp_path, tiny_dir):
    result = _run(tmp_path, tiny_dir, "signoff:\n  max_perplexity_ratio: 1000\n")
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    results = json.loads((out / "results.json").read_text())
    jsonschema.validate(results, json.loads(SCHEMA_FILE.read_text()))
    assert results["schema"] == SCHEMA == "prunecomp-results/5"
    assert RunResults.model_validate(results).to_json() == results
    assert results["signoff"]["passed"] is True
    # trajectory 'all': Prune&Comp and the baseline at 1 and 2 removed layers, dense once
    points = {(m["variant"], m["layers_removed"]) for m in results["measurements"]}
    assert points == {("dense", 0), ("prunecomp", 1), ("prunecomp", 2), ("baseline", 1), ("baseline", 2)}
    # every evaluated model but the dense one carries its divergence from the dense model, per corpus
    for variant, k in points - {("dense", 0)}:
        kinds = {m["kind"] for m in results["measurements"] if (m["variant"], m["layers_removed"]) == (variant, k)}
        assert {"kl_divergence", "top1_agreement"} <= kinds, (variant, k)
    assert set(results["summary"]["kl_divergence"]) == set(results["summary"]["perplexity_ratio"])
    markdown = (out / "report.md").read_text()
    assert "**PASS**" in markdown
    assert "| KL(dense ‖ model), nats/token |" in markdown and "| top-1 agreement with dense |" in markdown
    assert results["targets"] == []  # no --target: the plain checkpoint only
    assert f"## Deployed targets\n\n{NO_TARGETS}\n" in markdown
    # every stage measured before the report, with where the weights and the stream cache lived
    stages = [cost["name"] for cost in results["costs"]]
    assert stages == ["load", "prune", "evaluate", "save", "targets"]
    cost = markdown[markdown.index("## Cost") : markdown.index("Child processes:")]
    names = [line.split(" | ")[0].removeprefix("| ") for line in cost.splitlines() if line.startswith("| ")]
    assert names == ["stage", *stages]
    # the reload check ran in a child process, measured from outside it
    children = [(cost["name"], child["name"]) for cost in results["costs"] for child in cost["children"]]
    assert ("save", "reload check") in children
    assert f"weights {results['execution']['weights']}" in markdown[markdown.index("## Cost") :]
    page = (out / "report.html").read_text()
    assert "id='verdict'>PASS" in page and "data:image/png;base64," in page and "id='plot-divergence'" in page
    assert "<table id='cost'>" in page and "<p id='execution'>" in page


def test_cli_exits_1_when_a_threshold_fails_and_still_writes_the_report(tmp_path, tiny_dir):
    result = _run(tmp_path, tiny_dir, "signoff:\n  max_perplexity_ratio: 1.0e-6\n")
    assert result.exit_code == 1, result.output
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["signoff"]["passed"] is False
    (check,) = results["signoff"]["checks"]
    assert check["name"] == "max_perplexity_ratio" and check["passed"] is False and check["value"] > 1.0e-6
    assert "**FAIL**" in (tmp_path / "out" / "report.md").read_text()


def test_bad_signoff_key_is_a_recipe_error(tmp_path, tiny_dir):
    result = _run(tmp_path, tiny_dir, "signoff:\n  min_acuracy_kept: 90\n")
    assert result.exit_code == 2
    assert "signoff.min_acuracy_kept: unknown key (did you mean 'min_accuracy_kept'?)" in result.output


def test_committed_schema_is_the_one_the_models_generate():
    """schemas/results.schema.json is RunResults.model_json_schema(): regenerate it with
    `python -m prunecomp_export.report.results` after changing a model."""
    assert SCHEMA_FILE.read_text() == schema_text()
    schema = json.loads(SCHEMA_FILE.read_text())
    assert schema["$id"] == SCHEMA
    assert {"execution", "targets", "costs", "peak_rss_bytes"} <= set(schema["required"])
    jsonschema.Draft202012Validator.check_schema(schema)


def hand_made(**fields) -> RunResults:
    """A complete results.json, 4 -> 2 layers, with nothing measured; ``fields`` replace its parts."""
    round_ = {"scored_layers": None, "scores": None, "calibration_loss": 4.5, "layer_forwards": 8}
    base = {
        "schema": SCHEMA,
        "created": "2025-01-01T00:00:00+00:00",
        "model": {"source": "m", "sha256": None, "model_type": "llama", "layers_before": 4, "layers_after": 2,
                  "layers_removed": 2},
        "recipe": {},
        "seeds": {"calibration": 0},
        "trajectory": {
            "metric": "block_influence", "schedule": "iterative", "compensation": "magnitude", "fold_form": "pre_gap",
            "untie": False,
            "dense_calibration_loss": 4.0, "removed_in_order": [3, 2],
            "rounds": [
                {"round": 1, "step": {"removed": [3], "alpha": 1.0}, **round_, "full_forward_layer_forwards": 8},
                {"round": 2, "step": {"removed": [2], "alpha": 1.25}, **round_, "full_forward_layer_forwards": 6},
            ],
        },
        "protocol": {"perplexity": None, "qa": None},
        "measurements": [],
        "summary": {"perplexity_ratio": {}, "baseline_perplexity_ratio": {}, "accuracy_kept_percent": None,
                    "baseline_accuracy_kept_percent": None},
        "bench": None,
        "signoff": {"passed": True, "checks": []},
        "execution": {"device": "cpu", "budget_bytes": 16_000_000_000, "weights": "streamed",
                      "weights_bytes": 140_000_000_000, "stream_cache": "disk", "stream_cache_bytes": 12_340_000_000,
                      "working_bytes": 3_000_000_000},
        "memory_plan": None,
        "targets": [],
        "costs": [],
        "peak_rss_bytes": 3_200_000_000,
        "packages": {},
        "machine": {},
    }  # fmt: skip
    return RunResults.model_validate({**base, **fields})


def test_cost_section_shows_every_stage_its_children_and_where_things_lived():
    from prunecomp_export.costs import ChildCost, StageCost
    from prunecomp_export.report.render import render_html, render_markdown

    reload = ChildCost(name="reload check", wall_s=9.5, peak_rss_bytes=1_250_000_000)
    qa = [ChildCost(name=f"QA {n}", wall_s=3.0, peak_rss_bytes=peak, peak_device_bytes=2_000_000_000)
          for n, peak in ((1, 4_020_000_000), (2, 3_000_000_000))]  # fmt: skip
    costs = [
        StageCost(name="load", wall_s=1.234, peak_rss_bytes=2_500_000_000, tree_peak_rss_bytes=3_750_000_000,
                  children=[reload]),
        StageCost(name="prune", wall_s=61.0, peak_rss_bytes=3_000_000_000, peak_device_bytes=7_500_000_000),
        StageCost(name="evaluate", wall_s=0.25, peak_rss_bytes=3_100_000_000, peak_device_bytes=1_000_000,
                  tree_peak_rss_bytes=7_000_000_000, children=qa),
    ]  # fmt: skip
    results = hand_made(costs=costs)
    markdown = render_markdown(results)
    cost = markdown[markdown.index("## Cost") : markdown.index("Generated by")]
    # GB = 1e9 bytes; a figure a stage did not have is n/a; the largest child is each stage's largest
    assert "| stage | wall time s | peak RSS GB | largest child GB | whole tree GB | device peak GB |" in cost
    assert "| load | 1.23 | 2.50 | 1.25 | 3.75 | n/a |" in cost
    assert "| prune | 61.00 | 3.00 | n/a | n/a | 7.50 |" in cost
    assert "| evaluate | 0.25 | 3.10 | 4.02 | 7.00 | 0.00 |" in cost
    assert "| stage | child process | wall time s | peak RSS GB | device peak GB |" in cost
    assert "| load | reload check | 9.50 | 1.25 | n/a |" in cost
    assert "| evaluate | QA 1 | 3.00 | 4.02 | 2.00 |" in cost and "| evaluate | QA 2 | 3.00 | 3.00 | 2.00 |" in cost
    assert len([line for line in cost.splitlines() if line.startswith("| ")]) == (1 + 3) + (1 + 3)
    assert (
        "Execution on cpu: weights streamed (140.00 GB), stream cache on disk (12.34 GB); memory budget 16.00 GB. "
        "Peak RSS of the run's own process: 3.20 GB; of the whole process tree (children included, sampled): "
        "7.00 GB." in cost
    )
    page = render_html(results)
    assert "<tr><td>load</td><td>1.23</td><td>2.50</td><td>1.25</td><td>3.75</td><td>n/a</td></tr>" in page
    assert "<tr><td>prune</td><td>61.00</td><td>3.00</td><td>n/a</td><td>n/a</td><td>7.50</td></tr>" in page
    assert "<tr><td>evaluate</td><td>QA 1</td><td>3.00</td><td>4.02</td><td>2.00</td></tr>" in page
    assert "weights streamed (140.00 GB), stream cache on disk (12.34 GB)" in page
    # no stage measured device memory: no device column; no child: no child table
    cpu_only = render_markdown(hand_made(costs=[StageCost(name="load", wall_s=2.0, peak_rss_bytes=10**9)]))
    assert "| stage | wall time s | peak RSS GB | largest child GB | whole tree GB |\n" in cpu_only
    assert "| load | 2.00 | 1.00 | n/a | n/a |\n" in cpu_only
    assert "Child processes" not in cpu_only


def test_latency_section_shows_every_row_the_spread_and_the_busy_warning():
    from prunecomp_export.bench.timing import summarise
    from prunecomp_export.recipe import BenchSpec, Scenario
    from prunecomp_export.report.render import render_html, render_markdown

    spec = BenchSpec(scenarios=[Scenario(name="p", kind="prefill"), Scenario(name="t", kind="throughput")])
    timing = {"p": {"times_ms": [10.0, 11.0, 12.0, 13.0, 14.0]}, "t": {"times_ms": [100.0] * 5}}
    measured = {"scenarios": timing, "runtime_version": "9.9", "load_before": 0.1, "load_after": 9.0, "other_cpu": 1.9}
    raw = {"onnxruntime": {0: measured, 2: measured}}
    # the rest of a results.json, with nothing measured
    results = hand_made(bench=json.loads(json.dumps(summarise(spec, raw, 4, threads=2))))
    markdown = render_markdown(results)
    latency = markdown[markdown.index("## Latency") :]
    assert "**Warning: the machine was busy" in latency
    table = [line for line in latency.splitlines() if line.startswith("| onnxruntime 9.9 |")]
    assert len(table) == 4
    # prefill 10..14 ms: median 12, inclusive quartiles 11 and 13; throughput: 1 x 32 tokens in 0.1 s
    assert "| onnxruntime 9.9 | p | 2 | 12.00 | 11.00-13.00 | 10.00-14.00 | 1.000 |" in latency
    assert "| 320.0 |" in table[-1]
    page = render_html(results)
    assert "<p class='FAIL warning'>Warning: the machine was busy" in page
    assert page.count("<td>onnxruntime 9.9</td>") == 4
