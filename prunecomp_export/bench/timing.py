"""Measured latency of the dense and pruned models on each runtime, against an ideal cost model.

Every model-and-runtime pair runs in a fresh process (``bench_worker``) with warm-up runs, at least
five measured repeats and pinned threads; the load average is recorded around it, and the CPU time
other processes used while it ran (the report warns when that was high). Speedup is the
dense median over the pruned median, measured in the same run on the same machine.

The ideal: only the decoder layers shrink. With ``s`` the share of a dense run spent inside the
decoder layers, removing ``k`` of ``L`` layers ideally gives ``1 / (1 - s * k / L)``. Each runtime's
``s`` is its own where it can be measured (PyTorch eager: hooks on the layers; ONNX Runtime: its
profiler, ``layer_share.py``), per scenario; vLLM's is PyTorch eager's. measured / ideal then tells
"the runtime did not deliver" from "the model is head-heavy" (a large LM head keeps ``s`` small).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from prunecomp_export.errors import TargetUnavailable
from prunecomp_export.progress import Reporter
from prunecomp_export.recipe import BenchSpec

#: which runtime a deployment target is timed on
TARGET_RUNTIMES = {"onnx": "onnxruntime", "vllm": "vllm"}


def stats(times_ms: list[float]) -> dict:
    """Median and spread of repeated timings (quartiles with the inclusive method)."""
    q1, _median, q3 = statistics.quantiles(times_ms, n=4, method="inclusive")
    return {
        "median_ms": statistics.median(times_ms),
        "q1_ms": q1,
        "q3_ms": q3,
        "min_ms": min(times_ms),
        "max_ms": max(times_ms),
        "repeats": len(times_ms),
    }


def ideal_speedup(layer_share: float, layers_removed: int, num_layers: int) -> float:
    """1 / (1 - s k / L): only the decoder layers' share of the dense time shrinks."""
    return 1.0 / (1.0 - layer_share * layers_removed / num_layers)


def runtimes_for(spec: BenchSpec, targets: list[str]) -> list[str]:
    if spec.runtimes is not None:
        return list(dict.fromkeys(spec.runtimes))
    if "tensorrt" in targets:
        raise TargetUnavailable("benchmarking TensorRT is not supported here: no TensorRT on this machine")
    return ["torch", *(TARGET_RUNTIMES[t] for t in targets if t in TARGET_RUNTIMES)]


def require_runtimes(runtimes: list[str]) -> None:
    """A bench runtime that is not installed is found before any weight is read."""
    if "onnxruntime" in runtimes:
        from prunecomp_export.targets.onnx import require_exporter, require_onnx_runtime

        require_exporter()
        require_onnx_runtime()
    if "vllm" in runtimes:
        from prunecomp_export.targets.vllm import require_vllm, resolve_python

        require_vllm(resolve_python())


def onnx_exporter(scratch: Path, exported: dict[Path, Path]) -> Callable[[Path], Path]:
    """``benchmark``'s ``onnx_export``: a checkpoint's ONNX file, reusing the onnx target's export
    where ``exported`` maps the checkpoint to one (its ``targets/onnx``), else exporting into
    ``scratch`` (the caller removes it)."""

    def onnx_export(directory: Path) -> Path:
        from prunecomp_export.targets.onnx import ONNX_FILE, export_onnx

        existing = exported.get(directory)
        if existing is not None and (existing / ONNX_FILE).is_file():
            return existing / ONNX_FILE
        out = scratch / "onnx" / directory.name
        export_onnx(directory, out)
        return out / ONNX_FILE

    return onnx_export


def _machine_busy_seconds() -> float:
    """CPU seconds every core of the machine has spent busy since boot, all processes together."""
    import psutil

    times = psutil.cpu_times()
    fields = ("user", "nice", "system", "irq", "softirq", "steal")  # guest time is inside user/nice
    return sum(getattr(times, name, 0.0) for name in fields)


def _children_cpu_seconds() -> float:
    """CPU seconds of this process's finished (waited-for) children and their descendants."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_worker(job: dict, python: str, timeout_s: float) -> dict:
    """One fresh process for one model on one runtime; its result, with ``other_cpu``: how many
    cores other processes kept busy, on average, while it ran (the load average counts the worker's
    own threads, so it cannot tell a busy machine from a bench that uses every core)."""
    from prunecomp_export.child import ChildRequest, run_child

    threads = str(job["threads"])
    env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
    if job["runtime"] == "vllm":
        env["VLLM_CPU_OMP_THREADS_BIND"] = os.environ.get("VLLM_CPU_OMP_THREADS_BIND", f"0-{job['threads'] - 1}")
        env["VLLM_HOST_IP"] = os.environ.get("VLLM_HOST_IP", "127.0.0.1")
    request = ChildRequest(
        name=f"bench {job['runtime']} on {Path(job['checkpoint']).name}",
        target="prunecomp_export.bench.worker:run_job",
        kwargs={"job": job},
        python=python,
        env=env,
        timeout_s=timeout_s,
    )
    busy_before, own_before, started = _machine_busy_seconds(), _children_cpu_seconds(), time.monotonic()
    child = run_child(request)
    wall = time.monotonic() - started
    # The worker's own CPU: what the kernel accounts to reaped children, or what sampling its process
    # tree saw (vLLM's engine process may outlive the worker's wait and escape the first).
    own = max(_children_cpu_seconds() - own_before, child.cpu_s)
    other_cpu = max(0.0, _machine_busy_seconds() - busy_before - own) / wall
    return {**child.value, "other_cpu": other_cpu}


def benchmark(
    spec: BenchSpec,
    runtimes: list[str],
    checkpoints: dict[int, Path],
    num_layers: int,
    vocab_size: int,
    reporter: Reporter,
    onnx_export=None,
) -> dict:
    """Time every checkpoint (keyed by layers removed; 0 is dense) on every runtime.

    ``onnx_export(checkpoint) -> Path`` exports a checkpoint for ONNX Runtime. The checkpoints come
    from the run's model variants, which guarantee each has ``num_layers - k`` layers.
    """
    threads = spec.threads or os.cpu_count() or 1
    onnx_paths: dict[int, str] = {}  # one export per checkpoint, whatever the rounds
    max_len = max(max(s.prompt_len, s.past_len) + s.new_tokens + 1 for s in spec.scenarios)
    raw: dict[str, dict[int, dict]] = {}
    for runtime in runtimes:
        python = sys.executable
        if runtime == "vllm":
            from prunecomp_export.targets import vllm as vllm_target

            python = vllm_target.resolve_python()
            vllm_target.require_vllm(python)
        raw[runtime] = {}
        # Rounds alternate the order (dense..pruned, then pruned..dense), so a machine that slows
        # down or speeds up over the run weighs on every point alike.
        runs = [
            (k, checkpoints[k])
            for round_index in range(spec.rounds)
            for k in (sorted(checkpoints) if round_index % 2 == 0 else sorted(checkpoints, reverse=True))
        ]
        for k, checkpoint in reporter.track(runs, f"bench {runtime}"):
            job = {
                "runtime": runtime,
                "checkpoint": str(checkpoint),
                "scenarios": [s.model_dump() for s in spec.scenarios],
                "warmup": spec.warmup,
                "repeats": spec.repeats,
                "threads": threads,
                "vocab_size": vocab_size,
                "max_model_len": max_len,
            }
            if runtime == "onnxruntime":
                if k not in onnx_paths:
                    onnx_paths[k] = str(onnx_export(checkpoint))
                job["onnx_path"] = onnx_paths[k]
            started = time.perf_counter()
            raw[runtime][k] = merge_rounds(raw[runtime].get(k), run_worker(job, python, spec.timeout_s))
            reporter.log(f"bench {runtime}, {k} layers removed: {time.perf_counter() - started:.0f} s")
    return summarise(spec, raw, num_layers, threads)


def merge_rounds(previous: dict | None, result: dict) -> dict:
    """One point's rounds as one result: every repeat's time, the busiest load, the mean layer share."""
    if previous is None:
        return result
    merged = {**result, **{key: max(previous[key], result[key]) for key in ("load_before", "load_after", "other_cpu")}}
    merged["scenarios"] = {}
    for name, figures in result["scenarios"].items():
        before = previous["scenarios"][name]
        merged["scenarios"][name] = {"times_ms": before["times_ms"] + figures["times_ms"]}
        if "layer_share" in figures:
            merged["scenarios"][name]["layer_share"] = (before["layer_share"] + figures["layer_share"]) / 2
    return merged


def summarise(spec: BenchSpec, raw: dict[str, dict[int, dict]], num_layers: int, threads: int) -> dict:
    """Rows of median/spread, speedup against the dense run, and the ideal from the cost model."""
    by_runtime = {
        runtime: {
            name: figures["layer_share"] for name, figures in points[0]["scenarios"].items() if "layer_share" in figures
        }
        for runtime, points in raw.items()
        if 0 in points
    }
    shares = by_runtime.get("torch", {})
    rows, loads, others = [], [], []
    for runtime, points in raw.items():
        dense = points[0]["scenarios"]
        own = by_runtime.get(runtime, {})
        for k, result in sorted(points.items()):
            loads += [result["load_before"], result["load_after"]]
            others.append(result["other_cpu"])
            for scenario in spec.scenarios:
                figures = stats(result["scenarios"][scenario.name]["times_ms"])
                speedup = stats(dense[scenario.name]["times_ms"])["median_ms"] / figures["median_ms"]
                source = runtime if scenario.name in own else "torch"
                share = own.get(scenario.name, shares.get(scenario.name))
                ideal = ideal_speedup(share, k, num_layers) if share is not None else None
                rows.append(
                    {
                        "runtime": runtime,
                        "runtime_version": result.get("runtime_version"),
                        "scenario": scenario.name,
                        "layers_removed": k,
                        **figures,
                        "speedup": speedup,
                        "ideal_speedup": ideal,
                        "layer_share": share,
                        "layer_share_from": source if share is not None else None,
                        "efficiency": speedup / ideal if ideal else None,
                        "tokens_per_s": scenario.batch * scenario.new_tokens / (figures["median_ms"] / 1000)
                        if scenario.kind == "throughput"
                        else None,
                    }
                )
    cores = os.cpu_count() or 1
    busiest = max(others, default=0.0)
    warnings = []
    if busiest / cores > spec.busy_load_per_core:
        warnings.append(
            f"the machine was busy while timing (other processes kept {busiest:.1f} of {cores} cores busy "
            "on average during a measurement): treat these figures with care"
        )
    return {
        "protocol": {
            "scenarios": [s.model_dump() for s in spec.scenarios],
            "warmup": spec.warmup,
            "repeats": spec.repeats,
            "rounds": spec.rounds,
            "threads": threads,
            "process": "one fresh process per model, runtime and round",
            "speedup": "dense median / pruned median, same run",
            "ideal": "1 / (1 - s*k/L), s = decoder-layer share of the runtime's own dense run per scenario "
            "(PyTorch eager: layer hooks; ONNX Runtime: its profiler); PyTorch eager's for runtimes without one",
            "layer_share": shares,
            "layer_share_by_runtime": by_runtime,
        },
        "rows": rows,
        "load_average": {"max": max(loads) if loads else None, "cores": cores},
        "other_cpu": {"max": busiest if others else None, "cores": cores},
        "warnings": warnings,
    }


def speedups_at(bench: dict, layers_removed: int) -> dict[str, float]:
    """The smallest speedup per runtime at ``layers_removed`` (for the sign-off threshold)."""
    found: dict[str, float] = {}
    for row in bench["rows"]:
        if row["layers_removed"] == layers_removed:
            found[row["runtime"]] = min(found.get(row["runtime"], float("inf")), row["speedup"])
    return found
