"""What each stage of a run costs: wall time, peak host memory, peak device memory, for this process,
for each child process it ran, and for the whole process tree together.

A run's summary should say where the time and the memory went (calibration vs. a target's export vs.
evaluation), so that a user on a small machine knows which stage to move or to shrink. ``CostMeter``
measures that without a profiler: a sampling thread for host RSS (this process, and every process
below it), torch's own peak counter for CUDA memory, and each child's cost as the child runner
measured it (``record_child``: the runner records into whichever stage is running).
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from pydantic import BaseModel

from prunecomp_export.child_main import own_peak_rss_bytes

#: how often the sampling thread reads the process's RSS
SAMPLE_INTERVAL_S = 0.02
#: the whole process tree is sampled every this many samples of this process (a tree walk reads /proc)
TREE_EVERY = 5
#: the kernel's PF_FORKNOEXEC, in the flags of /proc/<pid>/stat: forked and not exec'd yet
_FORKED_NOT_EXECED = 0x40


class ChildCost(BaseModel):
    """What one child process cost, measured by the child runner from outside the child's tree."""

    name: str
    wall_s: float
    #: largest RSS of the child and its descendants together
    peak_rss_bytes: int
    #: peak CUDA memory the child allocated, as it reported it; None without CUDA
    peak_device_bytes: int | None = None


class StageCost(BaseModel):
    """The measured cost of one stage, as it goes into the run's summary."""

    name: str
    wall_s: float
    #: peak host RSS of this process during the stage
    peak_rss_bytes: int
    #: peak host RSS of this process and every process below it together, sampled
    tree_peak_rss_bytes: int | None = None
    #: ``torch.cuda.max_memory_allocated`` during the stage when CUDA is in use, else None
    peak_device_bytes: int | None = None
    #: every child process the stage ran, in order
    children: list[ChildCost] = []
    #: free-form figures, e.g. the stream cache's size and where it lived
    notes: dict[str, Any] = {}

    @property
    def child_peak_rss_bytes(self) -> int | None:
        return max((child.peak_rss_bytes for child in self.children), default=None)


@dataclass
class StageHandle:
    """What the body of ``with meter.stage(...)`` may fill in while the stage runs."""

    name: str
    notes: dict[str, Any] = field(default_factory=dict)
    children: list[ChildCost] = field(default_factory=list)


_RUNNING: contextvars.ContextVar[StageHandle | None] = contextvars.ContextVar("prunecomp_stage", default=None)


def record_child(cost: ChildCost) -> None:
    """Count a child process's cost in the stage that is running (if a ``CostMeter`` stage is)."""
    handle = _RUNNING.get()
    if handle is not None:
        handle.children.append(cost)


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


def _parent_if_forked_not_execed(pid: int) -> int | None:
    """The parent's pid when ``pid`` was forked and has not exec'd yet, else None (also where /proc
    cannot say)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return int(fields[1]) if int(fields[6]) & _FORKED_NOT_EXECED else None
    except (OSError, ValueError, IndexError):
        return None


def resident_bytes(members: Sequence[psutil.Process]) -> dict[int, int]:
    """Each live member's resident memory (pid -> bytes), to be summed over a process tree. A member
    forked and not exec'd yet counts only the RSS it has beyond its parent's: the rest are its parent's
    pages, shared until it execs (or all of them: a vfork shares the parent's memory), which a sum of RSS
    would count twice. Caught between its fork and its exec, lm-eval's `git describe` read as a second
    copy of the 1 GB QA child that launched it. A fork worker's copies of the pages it wrote to are
    not counted (an undercount, where a sum of RSS counts every page it shares twice)."""
    rss: dict[int, int] = {}
    for member in members:
        with contextlib.suppress(psutil.Error):
            rss[member.pid] = int(member.memory_info().rss)
    counted = {}
    for pid, own in rss.items():
        parent = _parent_if_forked_not_execed(pid)
        counted[pid] = own if parent not in rss else max(0, own - rss[parent])
    return counted


class _RssSampler:
    """Samples this process's RSS in a daemon thread and keeps the maximum; every ``TREE_EVERY``
    samples also the RSS of this process and all its descendants together."""

    def __init__(self, interval_s: float = SAMPLE_INTERVAL_S):
        self._process = psutil.Process()
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="prunecomp-rss-sampler", daemon=True)
        self.peak = 0
        self.tree_peak = 0

    def sample(self) -> int:
        rss = int(self._process.memory_info().rss)
        self.peak = max(self.peak, rss)
        return rss

    def sample_tree(self) -> None:
        self.sample()
        with contextlib.suppress(psutil.Error):
            members = [self._process, *self._process.children(recursive=True)]
            self.tree_peak = max(self.tree_peak, sum(resident_bytes(members).values()))

    def _run(self) -> None:
        tick = 0
        while not self._stop.wait(self._interval_s):
            tick += 1
            self.sample_tree() if tick % TREE_EVERY == 0 else self.sample()

    def start(self) -> int:
        self.sample_tree()
        self._thread.start()
        return self.peak

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self.sample_tree()
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
        token = _RUNNING.set(handle)
        try:
            yield handle
        finally:
            _RUNNING.reset(token)
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
                    # never below what this process or a child alone reached between two tree samples
                    tree_peak_rss_bytes=max(sampler.tree_peak, peak, *(c.peak_rss_bytes for c in handle.children)),
                    peak_device_bytes=device_peak,
                    children=list(handle.children),
                    notes=dict(handle.notes),
                )
            )
