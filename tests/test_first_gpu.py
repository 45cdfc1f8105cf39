"""benchmarks/first_gpu.sh's CPU dry path, as CI runs it: it prints the command it will run on a CUDA
machine, that machine's memory plan (every stage, the targets and the bench included) and what the run
will measure, and writes nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "first_gpu.sh"


def test_the_dry_run_prints_what_it_will_run_and_measure(tmp_path):
    out = tmp_path / "first-gpu"
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(out), "COLUMNS": "200", "HF_HUB_OFFLINE": "1",
           "PRUNECOMP_CACHE": os.environ.get("PRUNECOMP_CACHE", str(tmp_path / "cache"))}  # fmt: skip
    done = subprocess.run([str(SCRIPT), "--dry-run"], env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    text = done.stdout
    command = next(line for line in text.splitlines() if "recipes/smollm2-135m-demo.yaml" in line)
    for part in ("--target onnx", "--target vllm", "--bench", "execution.device=cuda", "model.dtype=bfloat16",
                 "targets.vllm.dtype=bfloat16", "targets.onnx.dtype=fp16"):  # fmt: skip
        assert part in command, part
    assert "memory plan (cuda)" in text
    for stage in ("prune", "save: reload check", "bench", "targets: onnx", "targets: vllm"):
        assert stage in text, stage
    assert "gpu_memory_utilization 0.8" in text  # vLLM told the budget's share of the GPU (80 % of 80 GB free)
    assert "will measure" in text and "largest and mean |log-prob diff|" in text
    assert not out.exists()  # a dry run writes nothing


def test_without_a_gpu_the_run_refuses_in_one_line(tmp_path):
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the real run belongs to benchmarks/first_gpu.sh itself")
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out")}
    done = subprocess.run([str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2 and "no CUDA GPU here" in done.stderr
    assert not (tmp_path / "out").exists()
