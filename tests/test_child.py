"""run_in_child: results, the child's peak RSS, errors carried across, timeouts and Ctrl-C."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import psutil
import pytest

from prunecomp_export.child import run_in_child
from prunecomp_export.errors import RecipeError, ValidationFailed

MB = 1024 * 1024
#: tests.child_targets lives in the repository, not in the installed package
ENV = {"PYTHONPATH": str(Path(__file__).resolve().parent.parent)}


def test_result_and_child_peak_rss_come_back_while_the_parent_stays_small():
    before = psutil.Process().memory_info().rss
    result = run_in_child("tests.child_targets:allocate", {"mb": 300}, env=ENV, timeout_s=120)
    grown = psutil.Process().memory_info().rss - before
    assert result.value == {"mb": 300, "pages_touched": 300 * MB // 4096}
    assert result.peak_rss_bytes >= 300 * MB
    assert grown < 100 * MB
    assert result.wall_s > 0


def test_prunecomp_errors_keep_their_class_and_message():
    with pytest.raises(ValidationFailed, match=r"^x$"):
        run_in_child("tests.child_targets:fail_validation", {"message": "x"}, env=ENV, timeout_s=60)
    with pytest.raises(RecipeError) as info:
        kwargs = {"message": "must be > 0", "key": "prune.num_drop", "file": "r.yaml"}
        run_in_child("tests.child_targets:fail_recipe", kwargs, env=ENV, timeout_s=60)
    assert (info.value.key, info.value.file) == ("prune.num_drop", "r.yaml")
    assert str(info.value) == "r.yaml, prune.num_drop: must be > 0"
    assert info.value.exit_code == 2


def test_other_errors_become_runtime_errors_naming_the_type(capfd):
    with pytest.raises(
        RuntimeError, match=r"tests.child_targets:fail_value failed in a child process: ValueError: bad"
    ):
        run_in_child("tests.child_targets:fail_value", {"message": "bad\nsecond line"}, env=ENV, timeout_s=60)
    assert "Traceback" in capfd.readouterr().err  # the child's traceback reaches the parent's stderr


def test_timeout_and_signal_become_runtime_errors():
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match="timed out after 3 s"):
        run_in_child("tests.child_targets:sleep", {"seconds": 60}, env=ENV, timeout_s=3)
    assert time.perf_counter() - start < 30
    with pytest.raises(RuntimeError, match="SIGKILL"):
        run_in_child("tests.child_targets:kill_self", {}, env=ENV, timeout_s=60)


def test_ctrl_c_in_the_parent_stops_the_child(tmp_path):
    pid_file = tmp_path / "pid"
    main = threading.main_thread().ident

    def interrupt_once_started():
        deadline = time.monotonic() + 60
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        signal.pthread_kill(main, signal.SIGINT)

    threading.Thread(target=interrupt_once_started, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        run_in_child("tests.child_targets:sleep", {"seconds": 60, "pid_file": str(pid_file)}, env=ENV, timeout_s=90)
    pid = int(pid_file.read_text())
    assert not psutil.pid_exists(pid)


def test_the_child_peak_does_not_include_the_parent_memory_at_fork():
    """Linux's ru_maxrss of an exec'd child starts at the parent's RSS when it forked."""
    held = bytearray(600 * MB)
    held[::4096] = b"\x01" * len(range(0, len(held), 4096))
    result = run_in_child("tests.child_targets:allocate", {"mb": 50}, env=ENV, timeout_s=60)
    assert 50 * MB <= result.peak_rss_bytes < 400 * MB
    del held
