"""Latency statistics, the cost model and the worker process (never asserting a speed)."""

from __future__ import annotations

import json
import math
import os
import sys

import pytest

from prunecomp_export.bench.timing import ideal_speedup, run_worker, speedups_at, stats, summarise
from prunecomp_export.recipe import BenchSpec, Scenario
from tests.test_recipe_errors import GOOD, write


def test_stats_by_hand():
    figures = stats([5.0, 1.0, 3.0, 2.0, 4.0])
    assert figures["median_ms"] == 3.0
    # inclusive quartiles of 1..5 are 2 and 4
    assert (figures["q1_ms"], figures["q3_ms"], figures["min_ms"], figures["max_ms"]) == (2.0, 4.0, 1.0, 5.0)
    assert figures["repeats"] == 5


def test_ideal_speedup_by_hand():
    # 80 % of the time in 30 layers; removing 6 leaves 0.2 + 0.8 * 24/30 = 0.84 of it
    assert ideal_speedup(0.8, 6, 30) == pytest.approx(1 / 0.84)
    assert ideal_speedup(0.8, 0, 30) == 1.0
    assert ideal_speedup(1.0, 15, 30) == pytest.approx(2.0)


def test_summarise_speedup_ideal_and_efficiency():
    spec = BenchSpec(scenarios=[Scenario(name="p", kind="prefill")], repeats=5)
    raw = {
        "torch": {
            0: {
                "scenarios": {"p": {"times_ms": [10.0] * 5, "layer_share": 0.5}},
                "load_before": 0.1,
                "load_after": 0.2,
                "other_cpu": 0.1,
            },
            2: {
                "scenarios": {"p": {"times_ms": [8.0] * 5, "layer_share": 0.4}},
                "load_before": 3.0,  # the bench's own threads: not a reason to warn
                "load_after": 0.2,
                "other_cpu": 0.2,
            },
        }
    }
    bench = summarise(spec, raw, 4, threads=2)
    pruned = next(r for r in bench["rows"] if r["layers_removed"] == 2)
    assert pruned["speedup"] == pytest.approx(1.25)
    assert pruned["ideal_speedup"] == pytest.approx(1 / (1 - 0.5 * 2 / 4))  # 1.333..
    assert pruned["efficiency"] == pytest.approx(1.25 / (4 / 3))
    assert bench["warnings"] == []
    assert speedups_at(bench, 2) == {"torch": pytest.approx(1.25)}
    assert bench["load_average"]["max"] == 3.0
    busy = summarise(spec, {"torch": {k: {**v, "other_cpu": 1.5} for k, v in raw["torch"].items()}}, 4, 2)
    assert busy["warnings"] and "busy" in busy["warnings"][0]


def test_rounds_alternate_the_order_and_pool_the_repeats(monkeypatch, tmp_path):
    from prunecomp_export.bench import timing as bench
    from prunecomp_export.progress import Reporter

    calls = []

    def fake_worker(job, python, timeout_s):
        calls.append(job["checkpoint"].rsplit("/", 1)[-1])
        n = float(len(calls))  # the n-th process times everything at n ms
        return {"scenarios": {"p": {"times_ms": [n] * 5, "layer_share": n / 10}}, "load_before": n, "load_after": 0.0,
                "other_cpu": 0.0, "runtime_version": "x", "threads": 1}  # fmt: skip

    monkeypatch.setattr(bench, "run_worker", fake_worker)
    spec = BenchSpec(scenarios=[Scenario(name="p", kind="prefill")], rounds=2)
    checkpoints = {0: tmp_path / "dense", 2: tmp_path / "pruned"}
    for k, directory in checkpoints.items():  # the bench checks each checkpoint's layer count
        directory.mkdir()
        (directory / "config.json").write_text(json.dumps({"num_hidden_layers": 4 - k}))
    out = bench.benchmark(spec, ["torch"], checkpoints, 4, 128, Reporter())
    assert calls == ["dense", "pruned", "pruned", "dense"]
    dense = next(r for r in out["rows"] if r["layers_removed"] == 0)
    pruned = next(r for r in out["rows"] if r["layers_removed"] == 2)
    # dense: processes 1 and 4 -> ten times, median (1 + 4) / 2; pruned: processes 2 and 3
    assert (dense["repeats"], dense["median_ms"], pruned["median_ms"]) == (10, 2.5, 2.5)
    assert out["protocol"]["layer_share"]["p"] == pytest.approx((0.1 + 0.4) / 2)
    assert out["protocol"]["rounds"] == 2 and out["load_average"]["max"] == 4.0


def _tiny_job(runtime: str, checkpoint, **extra) -> dict:
    """A worker job for a tiny checkpoint: one scenario of each kind, five repeats, one thread."""
    scenarios = [
        Scenario(name="p", kind="prefill", batch=2, prompt_len=8),
        Scenario(name="d", kind="decode", past_len=8),
        Scenario(name="t", kind="throughput", batch=2, prompt_len=4, new_tokens=3),
    ]
    return {
        "runtime": runtime,
        "checkpoint": str(checkpoint),
        "scenarios": [s.model_dump() for s in scenarios],
        "warmup": 1,
        "repeats": 5,
        "threads": 1,
        "vocab_size": 128,
        "max_model_len": 64,
        **extra,
    }


def _assert_timed(result: dict) -> None:
    assert result["threads"] == 1
    for name in ("p", "d", "t"):
        times = result["scenarios"][name]["times_ms"]
        assert len(times) == 5 and all(math.isfinite(t) and t > 0 for t in times)


def test_torch_worker_times_a_tiny_checkpoint_in_its_own_process(tmp_path):
    from tests.conftest import make_model

    make_model("llama").save_pretrained(tmp_path)
    result = run_worker(_tiny_job("torch", tmp_path), sys.executable, timeout_s=300)
    _assert_timed(result)
    for name in ("p", "d", "t"):
        assert 0 < result["scenarios"][name]["layer_share"] <= 1


def test_worker_errors_are_one_line_naming_the_log(tmp_path, monkeypatch):
    from prunecomp_export.child import ChildFailed

    monkeypatch.setenv("PRUNECOMP_CACHE", str(tmp_path / "cache"))
    job = {**_tiny_job("torch", tmp_path / "missing"), "scenarios": []}
    with pytest.raises(ChildFailed, match=r"^bench torch on missing failed: \w+Error: .*\(log: .*\.log\)$"):
        run_worker(job, sys.executable, timeout_s=120)


def test_onnxruntime_worker_times_an_exported_tiny_checkpoint(tmp_path):
    pytest.importorskip("onnxruntime")
    from prunecomp_export.targets.onnx import ONNX_FILE, export_onnx
    from tests.conftest import make_model

    make_model("llama").save_pretrained(tmp_path / "ckpt")
    export_onnx(tmp_path / "ckpt", tmp_path / "onnx")
    job = _tiny_job("onnxruntime", tmp_path / "ckpt", onnx_path=str(tmp_path / "onnx" / ONNX_FILE))
    result = run_worker(job, sys.executable, timeout_s=300)
    _assert_timed(result)
    for name in ("p", "d", "t"):  # from ONNX Runtime's own profiler
        assert 0 < result["scenarios"][name]["layer_share"] < 1

    # each of the 6 layers exports the same nodes (layer 0 also computes what all layers share, e.g.
    # the mask, the first time it is needed); the embedding and the head are outside every layer
    from prunecomp_export.bench.layer_share import onnx_node_layers

    layers = onnx_node_layers(tmp_path / "onnx" / ONNX_FILE)
    per_layer = [sum(1 for i in layers.values() if i == k) for k in range(6)]
    assert per_layer[1] > 10 and len(set(per_layer[1:])) == 1 and per_layer[0] >= per_layer[1], per_layer
    assert sum(1 for i in layers.values() if i is None) > 0


def test_ort_layer_share_by_hand():
    from prunecomp_export.bench.layer_share import ort_layer_share

    nodes = {"embed": None, "q0": 0, "mlp1": 1, "head": None}
    events = [
        {"cat": "Session", "name": "model_run", "dur": 100},
        {"cat": "Node", "name": "embed_kernel_time", "dur": 5},
        {"cat": "Node", "name": "q0_kernel_time", "dur": 30},
        {"cat": "Node", "name": "q0_fence_before", "dur": 1000},  # not a kernel
        {"cat": "Node", "name": "mlp1/MatMulScaleFusion/_kernel_time", "dur": 45},  # a fusion keeps its first node
        {"cat": "Node", "name": "head_kernel_time", "dur": 20},
    ]
    assert ort_layer_share(events, nodes) == pytest.approx(75 / 100)
    with pytest.raises(ValueError, match="not in the model"):
        ort_layer_share([*events, {"cat": "Node", "name": "other_kernel_time", "dur": 1}], nodes)


def test_each_runtime_gets_the_ideal_from_its_own_layer_share():
    spec = BenchSpec(scenarios=[Scenario(name="p", kind="prefill")], repeats=5)
    point = {"load_before": 0.0, "load_after": 0.0, "other_cpu": 0.0}

    def timed(ms: float, share: float | None = None) -> dict:
        figures = {"times_ms": [ms] * 5} | ({"layer_share": share} if share is not None else {})
        return {**point, "scenarios": {"p": figures}}

    raw = {
        "torch": {0: timed(10.0, 0.8), 2: timed(8.0)},
        "onnxruntime": {0: timed(10.0, 0.5), 2: timed(9.0)},
        "vllm": {0: timed(10.0), 2: timed(9.5)},
    }
    rows = {r["runtime"]: r for r in summarise(spec, raw, 4, threads=1)["rows"] if r["layers_removed"] == 2}
    assert rows["torch"]["ideal_speedup"] == pytest.approx(1 / (1 - 0.8 * 2 / 4))
    assert rows["onnxruntime"]["ideal_speedup"] == pytest.approx(1 / (1 - 0.5 * 2 / 4))
    assert rows["onnxruntime"]["layer_share_from"] == "onnxruntime"
    assert rows["vllm"]["ideal_speedup"] == pytest.approx(1 / (1 - 0.8 * 2 / 4))  # PyTorch eager's share
    assert rows["vllm"]["layer_share_from"] == "torch"


def test_worker_reports_the_cpu_other_processes_used_meanwhile(tmp_path):
    """A process spinning on one core during the worker's run shows up in ``other_cpu``; the worker's
    own CPU time does not (checked against the machine's idle baseline, not a speed)."""
    import subprocess

    from tests.conftest import make_model

    make_model("llama").save_pretrained(tmp_path)
    job = _tiny_job("torch", tmp_path)
    quiet = run_worker(job, sys.executable, timeout_s=300)["other_cpu"]
    if quiet > (os.cpu_count() or 1) - 1.5:
        # the worker takes one core; a spinning process shows only if another core is idle
        pytest.skip(f"other processes already kept {quiet:.2f} cores busy: no idle core to measure a spinner on")
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        busy = run_worker(job, sys.executable, timeout_s=300)["other_cpu"]
    finally:
        spinner.kill()
        spinner.wait()
    assert quiet >= 0 and math.isfinite(busy)
    assert busy > quiet + 0.3, (quiet, busy)  # one spinning core, against whatever else was running


@pytest.mark.parametrize("points", ["all", "[]"])
def test_pipeline_bench_times_the_dense_model_beside_the_evaluated_baseline(points, tmp_path, tiny_dir):
    """With perplexity and the one-shot baseline evaluated, the bench's dense checkpoint must still be
    dense: the final baseline once pruned the kept dense model in place (speedups came out ~1)."""
    from click.testing import CliRunner

    from prunecomp_export.cli import main

    recipe = GOOD + "evaluation:\n  perplexity:\n    corpora: [{text}]\n    seq_len: 16\n  trajectory: all\n"
    scenarios = '[{"name": "p", "kind": "prefill", "batch": 1, "prompt_len": 8}]'
    args = [str(write(tmp_path, recipe, tiny_dir)), "--bench", "--set", 'bench.runtimes=["torch"]']
    args += ["--set", "bench.warmup=1", "--set", f"bench.scenarios={scenarios}", "--set", f"bench.points={points}"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert {m["variant"] for m in results["measurements"]} == {"dense", "prunecomp", "baseline"}
    rows = json.loads((tmp_path / "out" / "bench.json").read_text())["rows"]
    assert sorted(r["layers_removed"] for r in rows) == ([0, 1, 2] if points == "all" else [0, 2])
