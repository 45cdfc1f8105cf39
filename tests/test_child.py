"""The child runner: results, memory of the child's whole tree measured from outside it, errors
carried across as one line (expected) or a named log (unexpected), timeouts, signals, output."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from prunecomp_export.child import ChildFailed, ChildRequest, interrupting_signals, run_child, spawned
from prunecomp_export.costs import CostMeter
from prunecomp_export.errors import RecipeError, ValidationFailed

MB = 1024 * 1024
#: tests.child_targets lives in the repository, not in the installed package
ENV = {"PYTHONPATH": str(Path(__file__).resolve().parent.parent)}


@pytest.fixture(autouse=True)
def _logs_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNECOMP_CACHE", str(tmp_path / "cache"))


def logs(tmp_path: Path) -> list[Path]:
    directory = tmp_path / "cache" / "logs"
    return sorted(directory.iterdir()) if directory.is_dir() else []


def run(target: str, timeout_s: float = 120, python: str | None = None, **kwargs):
    request = ChildRequest(
        name=f"test {target}", target=f"tests.child_targets:{target}", kwargs=kwargs, env=ENV,
        timeout_s=timeout_s, python=python,
    )  # fmt: skip
    return run_child(request)


def test_result_and_the_peak_of_the_whole_child_tree_come_back_while_the_parent_stays_small():
    before = psutil.Process().memory_info().rss
    result = run("allocate_with_grandchild", mb=200)
    assert result.value == {"mb": 200}
    # sampled from outside: the child and its grandchild held 200 MB each at the same time
    assert result.peak_rss_bytes >= 400 * MB
    assert 200 * MB <= result.own_peak_rss_bytes < 400 * MB  # what the child alone reported
    assert psutil.Process().memory_info().rss - before < 100 * MB
    assert result.wall_s > 0 and result.cpu_s > 0
    assert result.peak_device_bytes is None  # no CUDA here


def test_the_cost_goes_to_the_running_stage():
    meter = CostMeter()
    with meter.stage("evaluate"):
        run("allocate", mb=100)
    (stage,) = meter.stages
    (child,) = stage.children
    assert child.name == "test allocate" and child.peak_rss_bytes >= 100 * MB
    assert stage.child_peak_rss_bytes == child.peak_rss_bytes
    assert stage.tree_peak_rss_bytes >= child.peak_rss_bytes


def test_an_expected_error_keeps_its_class_and_message_and_prints_no_traceback(capfd, tmp_path):
    with pytest.raises(ValidationFailed, match=r"^x$"):
        run("fail_validation", message="x")
    with pytest.raises(RecipeError) as info:
        run("fail_recipe", message="must be > 0", key="prune.num_drop", file="r.yaml")
    assert (info.value.key, info.value.file) == ("prune.num_drop", "r.yaml")
    assert str(info.value) == "r.yaml, prune.num_drop: must be > 0"
    assert info.value.exit_code == 2
    assert "Traceback" not in capfd.readouterr().err
    assert all("Traceback" in log.read_text() for log in logs(tmp_path))  # kept, as evidence


def test_an_unexpected_error_is_one_line_naming_the_log_that_holds_its_traceback(capfd, tmp_path):
    with pytest.raises(ChildFailed) as info:
        run("fail_value", message="bad\nsecond line")
    message = str(info.value)
    assert message.startswith("test fail_value failed: ValueError: bad (log: ")
    assert "second line" not in message
    assert info.value.exit_code == 3
    log = Path(info.value.log)
    assert log in logs(tmp_path)
    assert "Traceback" in log.read_text() and "ValueError: bad" in log.read_text()
    assert "Traceback" not in capfd.readouterr().err


def test_timeout_and_signal_become_child_failures_naming_the_log():
    start = time.perf_counter()
    with pytest.raises(ChildFailed, match=r"took over 3 s \(log: "):
        run("sleep", timeout_s=3, seconds=60)
    assert time.perf_counter() - start < 30
    with pytest.raises(ChildFailed, match="killed by SIGKILL"):
        run("kill_self")


def _interrupt_when_started(pid_file: Path, signum: int, via_kill: bool) -> None:
    main = threading.main_thread().ident

    def interrupt() -> None:
        deadline = time.monotonic() + 60
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        if via_kill:
            os.kill(os.getpid(), signum)  # as `kill PID` from outside would
        else:
            signal.pthread_kill(main, signum)

    threading.Thread(target=interrupt, daemon=True).start()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_the_parent_stops_the_child_and_everything_it_started(tmp_path, signum):
    pid_file = tmp_path / "pids"
    _interrupt_when_started(pid_file, signum, via_kill=signum == signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), interrupting_signals():
        run("spawn_sleeper", pid_file=str(pid_file))
    for pid in map(int, pid_file.read_text().split()):
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_signal_whose_interrupt_python_dropped_still_stops_the_child(tmp_path):
    """A signal that lands while a finalizer runs: Python prints the handler's KeyboardInterrupt and
    drops it (seen under load: in a psutil object's weakref callback). The runner's wait raises it
    again rather than waiting for the child to finish."""

    class SignalledWhileCollected:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)  # the handler runs here, inside the finalizer, and its exception is dropped

    pid_file = tmp_path / "pids"
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt), interrupting_signals():
        SignalledWhileCollected()  # collected at once
        run("spawn_sleeper", pid_file=str(pid_file))
    assert time.monotonic() - started < 30  # the sleeper sleeps far longer
    for pid in map(int, pid_file.read_text().split()) if pid_file.exists() else ():
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_output_is_passed_through_and_the_log_of_a_success_removed(capfd, tmp_path):
    result = run("chatter", lines=["step 1/3", "step 2/3", "step 3/3"])
    assert result.value == 3
    err = capfd.readouterr().err
    assert all(f"step {n}/3" in err for n in (1, 2, 3))
    assert logs(tmp_path) == []


def test_another_interpreter_does_not_get_this_environments_packages(tmp_path):
    """vLLM may live in another virtualenv: it gets this package, never this venv's site-packages."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "venv")], check=True)
    other = str(tmp_path / "venv" / "bin" / "python")
    assert run("importable", python=other, module="prunecomp_export").value is True
    assert run("importable", python=other, module="psutil").value is False
    assert run("importable", module="psutil").value is True  # this interpreter has it
    assert not list(Path("/tmp").glob(f"prunecomp-path-*/{os.getpid()}"))


def test_a_request_is_checked_before_anything_starts():
    with pytest.raises(ValueError, match=r"package\.module:function"):
        ChildRequest(name="x", target="no_colon")
    with pytest.raises(TypeError):
        ChildRequest(name="x", target="a:b", kwargs={"path": Path("/tmp")})


def test_stopping_escalates_to_sigkill_when_a_child_ignores_signals(tmp_path):
    ignore = (
        "import signal, time; [signal.signal(s, signal.SIG_IGN) for s in (2, 15)]; "
        "print('up', flush=True); time.sleep(60)"
    )
    with spawned("stubborn", [sys.executable, "-c", ignore], dict(os.environ), log_path=tmp_path / "log") as child:
        deadline = time.monotonic() + 30
        while "up" not in (tmp_path / "log").read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        started = time.monotonic()
        code = child.stop(((signal.SIGINT, 0.5), (signal.SIGTERM, 0.5)))
    assert code == -signal.SIGKILL
    assert time.monotonic() - started < 10


def test_a_child_dies_with_a_parent_that_was_killed(tmp_path):
    """SIGKILL leaves the parent no chance to stop anything: the child (and what it started) must go
    by itself."""
    pid_file = tmp_path / "pids"
    parent = (
        "import sys; sys.path[:0] = sys.argv[1:2]\n"
        "from prunecomp_export.child import ChildRequest, run_child\n"
        f"run_child(ChildRequest(name='orphan', target='tests.child_targets:spawn_sleeper', "
        f"kwargs={{'pid_file': {str(pid_file)!r}}}, env={ENV!r}))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", parent, ENV["PYTHONPATH"]])
    deadline = time.monotonic() + 60
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    pids = list(map(int, pid_file.read_text().split()))
    deadline = time.monotonic() + 15
    while any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in pids):
        assert time.monotonic() < deadline, "the child outlived its killed parent"
        time.sleep(0.1)
