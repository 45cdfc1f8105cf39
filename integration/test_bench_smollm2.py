"""--bench on the real SmolLM2 with a small scenario: PyTorch eager, ONNX Runtime and (where it is
installed) vLLM. Checks the files and that every figure is finite and positive; never a speed."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest

from integration.conftest import DEMO, vllm_version
from prunecomp_export import pipeline
from prunecomp_export.recipe import load_recipe


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    if importlib.util.find_spec("onnxruntime") is None:
        pytest.fail("onnxruntime is not installed (make setup installs it)")
    runtimes = ["torch", "onnxruntime", *(["vllm"] if vllm_version() else [])]
    output = tmp_path_factory.mktemp("bench") / "out"
    overrides = [
        f"output.dir={output}",
        "calibration.num_samples=4",
        # the demo's budget (0.6 GB) is below the model: the plan refuses to time an offloaded model
        "execution.memory_budget=null",
        "evaluation.perplexity=null",
        "evaluation.qa=null",
        "signoff.max_perplexity_ratio=null",
        "signoff.min_accuracy_kept=null",
        "signoff.min_speedup=0.01",
        "bench.points=[]",  # the dense model and the final checkpoint: two ONNX exports, not three
        f"bench.runtimes={json.dumps(runtimes)}",
        "bench.warmup=1",
        "bench.repeats=5",
        'bench.scenarios=[{"name": "prefill", "kind": "prefill", "batch": 1, "prompt_len": 32},'
        ' {"name": "decode", "kind": "decode", "batch": 1, "past_len": 32},'
        ' {"name": "throughput", "kind": "throughput", "batch": 2, "prompt_len": 16, "new_tokens": 8}]',
    ]
    return runtimes, pipeline.run(load_recipe(DEMO, overrides), ["hf"], bench=True)


def test_bench_files_and_figures(bench_run):
    runtimes, result = bench_run
    bench = json.loads((result.output / "bench.json").read_text())
    rows = bench["rows"]
    assert {r["runtime"] for r in rows} == set(runtimes)
    assert {r["layers_removed"] for r in rows} == {0, 6}
    assert {r["scenario"] for r in rows} == {"prefill", "decode", "throughput"}
    for row in rows:
        for key in ("median_ms", "q1_ms", "q3_ms", "min_ms", "max_ms", "speedup", "ideal_speedup", "efficiency"):
            assert math.isfinite(row[key]) and row[key] > 0, (key, row)
        assert row["repeats"] == 5
        if row["layers_removed"] == 0:
            assert row["speedup"] == 1.0 and row["ideal_speedup"] == 1.0
    shares = bench["protocol"]["layer_share"]
    assert set(shares) == {"prefill", "decode", "throughput"} and all(0 < s < 1 for s in shares.values())
    # every runtime's ideal comes from its own profile of the dense run (ONNX Runtime's profiler, hooks
    # inside vLLM's worker), the share each row used is the one measured for its runtime
    by_runtime = bench["protocol"]["layer_share_by_runtime"]
    for row in rows:
        assert row["layer_share_from"] == row["runtime"], row
        assert row["layer_share"] == by_runtime[row["runtime"]][row["scenario"]]
        assert 0 < row["layer_share"] <= 1
    results = json.loads((result.output / "results.json").read_text())
    assert results["bench"]["rows"] == rows
    check = results["signoff"]["checks"][0]
    assert check["name"] == "min_speedup" and check["value"] is not None and math.isfinite(check["value"])
    page = (result.output / "report.html").read_text()
    assert "id='plot-speedup'" in page
    assert "## Latency" in (result.output / "report.md").read_text()
