"""Sign-off thresholds, exit codes, and the report files (results.json against its JSON schema)."""

from __future__ import annotations

import json

import jsonschema
import pytest
from click.testing import CliRunner

from prunecomp_export.cli import main
from prunecomp_export.evaluation import Measurement
from prunecomp_export.recipe import SignoffSpec
from prunecomp_export.report import SCHEMA_FILE
from prunecomp_export.signoff import accuracy_kept, evaluate_signoff, perplexity_ratios
from tests.test_recipe_errors import GOOD, tiny_dir, write  # noqa: F401  (fixture)

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
    assert result["passed"] is passed
    assert [c["name"] for c in result["checks"] if not c["passed"]] == failing


def test_speedup_threshold_uses_the_slowest_runtime():
    result = evaluate_signoff(SignoffSpec(min_speedup=1.2), ROWS, 2, {"torch": 1.3, "onnxruntime": 1.15})
    assert not result["passed"] and result["checks"][0]["value"] == 1.15


def _run(tmp_path, tiny_dir, signoff: str):  # noqa: F811
    recipe = GOOD + "evaluation:\n  perplexity:\n    corpora: [{text}]\n    seq_len: 16\n  trajectory: all\n" + signoff
    path = write(tmp_path, recipe, tiny_dir)
    return CliRunner().invoke(main, [str(path)])


def test_cli_exits_0_when_signoff_passes_and_reports_parse(tmp_path, tiny_dir):  # noqa: F811
    result = _run(tmp_path, tiny_dir, "signoff:\n  max_perplexity_ratio: 1000\n")
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    results = json.loads((out / "results.json").read_text())
    jsonschema.validate(results, json.loads(SCHEMA_FILE.read_text()))
    assert results["signoff"]["passed"] is True
    # trajectory 'all': Prune&Comp and the baseline at 1 and 2 removed layers, dense once
    points = {(m["variant"], m["layers_removed"]) for m in results["measurements"]}
    assert points == {("dense", 0), ("prunecomp", 1), ("prunecomp", 2), ("baseline", 1), ("baseline", 2)}
    assert "**PASS**" in (out / "report.md").read_text()
    page = (out / "report.html").read_text()
    assert "id='verdict'>PASS" in page and "data:image/png;base64," in page


def test_cli_exits_1_when_a_threshold_fails_and_still_writes_the_report(tmp_path, tiny_dir):  # noqa: F811
    result = _run(tmp_path, tiny_dir, "signoff:\n  max_perplexity_ratio: 1.0e-6\n  min_accuracy_kept: 50\n")
    assert result.exit_code == 1, result.output
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["signoff"]["passed"] is False
    details = {c["name"]: c for c in results["signoff"]["checks"]}
    assert details["min_accuracy_kept"]["value"] is None and "no QA accuracy" in details["min_accuracy_kept"]["detail"]
    assert "**FAIL**" in (tmp_path / "out" / "report.md").read_text()


def test_bad_signoff_key_is_a_recipe_error(tmp_path, tiny_dir):  # noqa: F811
    result = _run(tmp_path, tiny_dir, "signoff:\n  min_acuracy_kept: 90\n")
    assert result.exit_code == 2
    assert "signoff.min_acuracy_kept: unknown key (did you mean 'min_accuracy_kept'?)" in result.output


def test_latency_section_shows_every_row_the_spread_and_the_busy_warning():
    from prunecomp_export.bench import summarise
    from prunecomp_export.recipe import BenchSpec, Scenario
    from prunecomp_export.report import render_html, render_markdown

    spec = BenchSpec(scenarios=[Scenario(name="p", kind="prefill"), Scenario(name="t", kind="throughput")])
    timing = {"p": {"times_ms": [10.0, 11.0, 12.0, 13.0, 14.0]}, "t": {"times_ms": [100.0] * 5}}
    measured = {"scenarios": timing, "runtime_version": "9.9", "load_before": 0.1, "load_after": 9.0, "other_cpu": 1.9}
    raw = {"onnxruntime": {0: measured, 2: measured}}
    results = json.loads(json.dumps({"bench": summarise(spec, raw, 4, threads=2)}))
    # the rest of a results.json, with nothing measured
    base = {
        "schema": "prunecomp-results/1",
        "model": {"source": "m", "layers_before": 4, "layers_after": 2, "layers_removed": 2},
        "signoff": {"passed": True, "checks": []},
        "measurements": [],
        "summary": {"accuracy_kept_percent": None, "baseline_accuracy_kept_percent": None},
        "protocol": {"perplexity": None},
        "trajectory": {"metric": "block_influence", "schedule": "iterative", "rounds": []},
        "packages": {},
    }
    markdown = render_markdown({**base, **results})
    latency = markdown[markdown.index("## Latency") :]
    assert "**Warning: the machine was busy" in latency
    table = [line for line in latency.splitlines() if line.startswith("| onnxruntime 9.9 |")]
    assert len(table) == 4
    # prefill 10..14 ms: median 12, inclusive quartiles 11 and 13; throughput: 1 x 32 tokens in 0.1 s
    assert "| onnxruntime 9.9 | p | 2 | 12.00 | 11.00-13.00 | 10.00-14.00 | 1.000 |" in latency
    assert "| 320.0 |" in table[-1]
    page = render_html({**base, **results})
    assert "<p class='FAIL warning'>Warning: the machine was busy" in page
    assert page.count("<td>onnxruntime 9.9</td>") == 4
