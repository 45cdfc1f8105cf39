"""What each stage of a run costs: wall time, peak host memory, peak device memory.

A run's summary should say where the time and the memory went (calibration vs. a target's export vs.
evaluation), so that a user on a small machine knows which stage to move to a child process or to
shrink. ``CostMeter`` measures that without a profiler: a sampling thread for host RSS and torch's
own peak counter for CUDA memory.
"""

from __future__ import annotations

import contextlib
import resource
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from pydantic import BaseModel

#: how often the sampling thread reads the process's RSS
SAMPLE_INTERVAL_S = 0.02


class StageCost(BaseModel):
    """The measured cost of one stage, as it goes into the run's summary."""

    name: str
    wall_s: float
    #: peak host RSS of this process during the stage
    peak_rss_bytes: int
    #: ``torch.cuda.max_memory_allocated`` during the stage when CUDA is in use, else None
    peak_device_bytes: int | None = None
    #: peak RSS of a child process that did the stage's heavy work, if any
    child_peak_rss_bytes: int | None = None
    #: free-form figures, e.g. the stream cache's size and where it lived
    notes: dict[str, Any] = {}


@dataclass
class StageHandle:
    """What the body of ``with meter.stage(...)`` may fill in while the stage runs."""

    name: str
    notes: dict[str, Any] = field(default_factory=dict)
    child_peak_rss_bytes: int | None = None


def own_peak_rss_bytes() -> int:
    """This process's own high-water RSS. Linux's ru_maxrss of an exec'd process starts at its
    parent's RSS when it forked, so /proc/self/status (VmHWM, reset by exec) is read where it exists."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        status = Path("/proc/self/status").read_text().splitlines()
        return int(next(line for line in status if line.startswith("VmHWM:")).split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _cuda_in_use() -> Any | None:
    """torch.cuda when CUDA is available and already initialised, else None.

    Only looks at torch if something else imported it: importing torch here would itself cost a
    few hundred MB of RSS, and a process that never imported torch has no CUDA memory to report.
    """
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            return torch.cuda
    except Exception:  # a broken CUDA install must not break the measurement of a CPU run
        return None
    return None


class _RssSampler:
    """Samples this process's RSS in a daemon thread and keeps the maximum."""

    def __init__(self, interval_s: float = SAMPLE_INTERVAL_S):
        self._process = psutil.Process()
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="prunecomp-rss-sampler", daemon=True)
        self.peak = 0

    def sample(self) -> int:
        rss = int(self._process.memory_info().rss)
        self.peak = max(self.peak, rss)
        return rss

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.sample()

    def start(self) -> int:
        start_rss = self.sample()
        self._thread.start()
        return start_rss

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self.sample()
        return self.peak


class CostMeter:
    """Collects one ``StageCost`` per ``with meter.stage(name):`` block, in order.

    Stages are not nested: each measures the whole process while its block runs.
    """

    def __init__(self, sample_interval_s: float = SAMPLE_INTERVAL_S):
        self._sample_interval_s = sample_interval_s
        self._stages: list[StageCost] = []

    @property
    def stages(self) -> list[StageCost]:
        return list(self._stages)

    @staticmethod
    def process_peak_rss_bytes() -> int:
        """This process's peak RSS over its whole life so far (the kernel's high-water mark)."""
        return own_peak_rss_bytes()

    @contextmanager
    def stage(self, name: str) -> Iterator[StageHandle]:
        """Measure the block; the cost is recorded even when the block raises."""
        handle = StageHandle(name)
        cuda = _cuda_in_use()
        if cuda is not None:
            cuda.synchronize()
            cuda.reset_peak_memory_stats()
        maxrss_before = own_peak_rss_bytes()
        sampler = _RssSampler(self._sample_interval_s)
        sampler.start()
        start = time.perf_counter()
        try:
            yield handle
        finally:
            wall_s = time.perf_counter() - start
            peak = sampler.stop()
            # A spike shorter than the sampling interval is missed by the sampler, but if it raised the
            # process's lifetime high-water mark during this stage, that mark is the stage's true peak.
            maxrss_after = own_peak_rss_bytes()
            if maxrss_after > maxrss_before:
                peak = max(peak, maxrss_after)
            device_peak = None
            cuda = cuda or _cuda_in_use()  # CUDA may have been initialised inside the block
            if cuda is not None:
                cuda.synchronize()
                device_peak = int(cuda.max_memory_allocated())
            self._stages.append(
                StageCost(
                    name=name,
                    wall_s=wall_s,
                    peak_rss_bytes=peak,
                    peak_device_bytes=device_peak,
                    child_peak_rss_bytes=handle.child_peak_rss_bytes,
                    notes=dict(handle.notes),
                )
            )
