"""CostMeter must see a stage's real memory peak and attribute it to that stage only."""

from __future__ import annotations

import time

import psutil
import pytest

from prunecomp_export.costs import ChildCost, CostMeter, StageCost, record_child

MB = 1024 * 1024


def _resident_buffer(size: int) -> bytearray:
    buf = bytearray(size)
    buf[::4096] = b"\x01" * len(range(0, size, 4096))  # touch every page so it is resident
    return buf


@pytest.mark.parametrize("earlier_peak_mb", [0, 400])
def test_stage_peak_rss_wall_time_and_notes(earlier_peak_mb):
    # with an earlier, higher lifetime peak (as after other tests) only the sampling thread sees the stage's
    _resident_buffer(earlier_peak_mb * MB)  # allocated, touched and freed at once
    meter = CostMeter()
    start_rss = psutil.Process().memory_info().rss
    with meter.stage("allocate") as stage:
        buf = _resident_buffer(200 * MB)
        stage.notes["cache"] = {"bytes": len(buf), "device": "cpu"}
        record_child(ChildCost(name="helper", wall_s=0.5, peak_rss_bytes=123))
        time.sleep(0.1)  # a real stage holds its memory for longer than a few sampling intervals
        del buf
    with meter.stage("empty"):
        pass

    allocate, empty = meter.stages
    assert isinstance(allocate, StageCost)
    assert allocate.name == "allocate" and empty.name == "empty"
    assert allocate.peak_rss_bytes - start_rss >= 150 * MB
    assert empty.peak_rss_bytes < allocate.peak_rss_bytes
    assert empty.peak_rss_bytes - start_rss < 100 * MB
    assert allocate.wall_s > 0 and empty.wall_s > 0
    assert allocate.notes == {"cache": {"bytes": 200 * MB, "device": "cpu"}}
    assert allocate.child_peak_rss_bytes == 123 and empty.child_peak_rss_bytes is None
    assert [child.name for child in allocate.children] == ["helper"] and empty.children == []
    assert allocate.tree_peak_rss_bytes >= allocate.peak_rss_bytes
    assert empty.notes == {}
    assert meter.process_peak_rss_bytes() >= allocate.peak_rss_bytes - MB  # ru_maxrss is KiB-rounded


def test_stage_is_recorded_when_the_block_raises():
    meter = CostMeter()
    with pytest.raises(ValueError), meter.stage("fails") as stage:
        stage.notes["step"] = 1
        raise ValueError("boom")
    (cost,) = meter.stages
    assert cost.name == "fails" and cost.notes == {"step": 1} and cost.peak_rss_bytes > 0


def test_the_tree_peak_counts_a_child_process_that_this_process_does_not_see():
    import subprocess
    import sys

    meter = CostMeter()
    code = "b = bytearray(300 * 2**20); b[::4096] = b'x' * len(range(0, len(b), 4096)); import time; time.sleep(1)"
    with meter.stage("child"):
        subprocess.run([sys.executable, "-c", code], check=True)
    (stage,) = meter.stages
    assert stage.tree_peak_rss_bytes - stage.peak_rss_bytes >= 250 * MB


#: a process holding 300 MB that forks once without exec: the fork allocates ``argv[1]`` MB of its own
_FORKS = """
import os, sys, time
held = bytearray(300 * 2**20); held[::4096] = b'x' * len(range(0, len(held), 4096))
if os.fork() == 0:
    own = bytearray(int(sys.argv[1]) * 2**20); own[::4096] = b'y' * len(range(0, len(own), 4096))
    print('ready', flush=True)
time.sleep(60)
"""


@pytest.fixture
def forked_tree():
    """Start ``_FORKS`` with the fork's own MB; yield its tree (parent, fork) once both hold their memory."""
    import os
    import signal
    import subprocess
    import sys

    started: list[subprocess.Popen] = []

    def start(own_mb: int) -> list[psutil.Process]:
        proc = subprocess.Popen(
            [sys.executable, "-c", _FORKS, str(own_mb)], stdout=subprocess.PIPE, start_new_session=True
        )
        started.append(proc)
        assert proc.stdout.readline() == b"ready\n"
        root = psutil.Process(proc.pid)
        return [root, *root.children(recursive=True)]

    yield start
    for proc in started:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _pss(members: list[psutil.Process]) -> int:
    """What the kernel says the tree holds, shared pages split among the processes sharing them."""
    return sum(member.memory_full_info().pss for member in members)


@pytest.mark.parametrize("own_mb", [0, 200])
def test_a_fork_that_has_not_execed_counts_only_beyond_its_parent(forked_tree, own_mb):
    from prunecomp_export.child import TreeSampler
    from prunecomp_export.costs import resident_bytes

    members = forked_tree(own_mb)
    assert len(members) == 2
    raw = sum(member.memory_info().rss for member in members)
    pss = _pss(members)
    assert raw - pss >= 250 * MB  # a plain sum of RSS counts the 300 MB the two share twice
    counted = resident_bytes(members)
    assert abs(sum(counted.values()) - pss) <= 40 * MB
    assert abs(counted[members[1].pid] - own_mb * MB) <= 40 * MB
    sampler = TreeSampler(members[0].pid)
    sampler.sample()
    assert abs(sampler.peak_rss_bytes - pss) <= 40 * MB
    assert abs(sampler.process_peaks[members[1].pid][1] - own_mb * MB) <= 40 * MB
