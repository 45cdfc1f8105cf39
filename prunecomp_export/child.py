"""The one way this tool runs another process: a Python function in a fresh interpreter
(``run_child``: the reload check, lm-eval, exports, runtime checks, bench workers, GGUF
dequantisation) or a long-running command (``spawned``: vLLM's server).

Why children at all: loading a checkpoint with transformers, an ONNX export or lm-eval each take
memory that the allocator never hands back, and vLLM binds threads and installs signal handlers;
in a child all of that goes away when it exits, and its own peak is measured where it happened.

What every child gets, from this module alone:
- a session of its own (its own process group), so stopping it stops everything it started: on
  exit, error, timeout, Ctrl-C or SIGTERM the whole group is terminated, then killed; a function's
  child also takes its group down when this process dies, even by SIGKILL;
- its memory sampled from outside its process tree (``TreeSampler``: the RSS of the child and all
  its descendants, every ``SAMPLE_INTERVAL_S``, a process forked and not yet exec'd counted beyond
  its parent only: ``costs.resident_bytes``), and its own report of peak device memory; the cost
  is recorded with the running stage (``costs.record_child``);
- its output (stdout and stderr) passed through to this process's stderr as it comes, and kept in a
  log file, which is removed when the child succeeds;
- a typed result, or exactly one error: a ``PrunecompError`` raised in the child is raised here as
  the same class and message (an expected failure: one line, no traceback); anything else becomes
  ``ChildFailed`` naming the log file that holds the child's traceback.

``interrupting_signals`` is the run's one signal handler: SIGTERM and SIGINT raise
``KeyboardInterrupt`` in the main thread, which stops the running children on the way out.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import IO, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from prunecomp_export.costs import ChildCost, record_child, resident_bytes
from prunecomp_export.errors import PrunecompError, StageFailed

#: the directory that holds the ``prunecomp_export`` package
PACKAGE_DIR = Path(__file__).resolve().parent
#: how often a child's process tree is sampled
SAMPLE_INTERVAL_S = 0.1
#: how long a stopped child gets after each signal before the next, harder one
STOP_GRACE_S = 5.0


class ChildFailed(StageFailed):
    """A child failed in a way the user cannot fix by changing the input: a crash, a timeout, a signal.
    The message names the log file that holds what the child printed (and its traceback)."""

    def __init__(self, message: str, log: Path | None = None):
        self.log = None if log is None else str(log)
        super().__init__(f"{message} (log: {log})" if log is not None else message)


class ChildRequest(BaseModel):
    """One function call in a fresh interpreter."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: what the run calls this step, in progress lines, costs and errors (e.g. "reload check")
    name: str = Field(min_length=1)
    #: "package.module:function", called with ``kwargs`` (JSON-serialisable: paths as str)
    target: str
    kwargs: dict[str, Any] = Field(default_factory=dict)
    #: the interpreter (None: this one); another virtualenv's gets only this package on its path
    python: str | None = None
    #: added to this process's environment
    env: dict[str, str] = Field(default_factory=dict)
    timeout_s: float | None = Field(None, gt=0)
    #: keep the child's output in this file (an artifact); default: a file in ``logs_directory()``,
    #: removed when the child succeeds
    log_file: str | None = None

    @field_validator("target")
    @classmethod
    def _target_form(cls, value: str) -> str:
        module, _, function = value.partition(":")
        if not module or not function:
            raise ValueError(f"target must be 'package.module:function', got {value!r}")
        return value

    @field_validator("kwargs")
    @classmethod
    def _json_kwargs(cls, value: dict[str, Any]) -> dict[str, Any]:
        json.dumps(value)  # TypeError for a path or a tensor: pass plain values
        return value


class ChildResult(BaseModel):
    """What the function returned and what running it cost."""

    model_config = ConfigDict(frozen=True)

    name: str
    value: Any
    wall_s: float
    #: the largest RSS of the child's whole process tree seen from outside it
    peak_rss_bytes: int
    #: the child's own high-water RSS, as it reported it (catches a spike between two samples)
    own_peak_rss_bytes: int | None = None
    #: peak CUDA memory the child allocated, as it reported it; None without CUDA
    peak_device_bytes: int | None = None
    #: CPU seconds its whole process tree was seen to use
    cpu_s: float = 0.0

    @property
    def cost(self) -> ChildCost:
        return ChildCost(
            name=self.name, wall_s=self.wall_s, peak_rss_bytes=self.peak_rss_bytes,
            peak_device_bytes=self.peak_device_bytes,
        )  # fmt: skip


# ------------------------------------------------------------------------------------- signals


@contextlib.contextmanager
def interrupting_signals() -> Iterator[None]:
    """While active, SIGTERM (and SIGINT, as always) raise ``KeyboardInterrupt`` in the main thread:
    the staging directory is removed and every running child stopped on the way out, as on Ctrl-C.
    The previous handlers are restored on exit. A no-op outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: FrameType | None) -> Any:
        _RECEIVED.append(signum)
        raise KeyboardInterrupt(f"signal {signum}")

    received_before = len(_RECEIVED)
    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        del _RECEIVED[received_before:]


#: signals received under ``interrupting_signals``, in order
_RECEIVED: list[int] = []


def _raise_if_interrupted() -> None:
    """Raise the ``KeyboardInterrupt`` of a signal received under ``interrupting_signals`` again.

    Python raises a handler's exception wherever the main thread is; when that is a finalizer or a
    weakref callback (a psutil object being collected), the exception is printed and dropped. A loop
    that waits calls this, so such a signal still stops the run."""
    if _RECEIVED:
        raise KeyboardInterrupt(f"signal {_RECEIVED[-1]}")


# ------------------------------------------------------------------------------------- processes

_LIVE: set[subprocess.Popen] = set()
_LIVE_LOCK = threading.Lock()


def _start(cmd: Sequence[str], env: dict[str, str], output: IO[bytes] | int | None) -> subprocess.Popen:
    proc = subprocess.Popen(
        list(cmd),
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=output,
        stderr=subprocess.STDOUT if output is not None else None,
        start_new_session=True,  # its own process group: stop_group reaches everything it starts
    )
    with _LIVE_LOCK:
        _LIVE.add(proc)
    return proc


def wait_interruptibly(proc: subprocess.Popen, timeout_s: float | None = None) -> int:
    """``proc.wait(timeout_s)``, its exit code, in slices of at most a second, raising a signal's
    interrupt that Python dropped (``_raise_if_interrupted``) between them: every wait of the run on a
    process goes through here."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        _raise_if_interrupted()
        left = None if deadline is None else deadline - time.monotonic()
        try:
            return proc.wait(timeout=1.0 if left is None else max(0.0, min(1.0, left)))
        except subprocess.TimeoutExpired:
            if left is not None and left <= 1.0:
                raise


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def stop_group(proc: subprocess.Popen, signals: Sequence[tuple[int, float]] = ((signal.SIGTERM, STOP_GRACE_S),)) -> int:
    """Stop ``proc``'s whole process group: each ``(signal, grace)`` in turn while it runs, then
    SIGKILL; stragglers of the group are killed either way. Returns its exit code."""
    for sig, grace in signals:
        if proc.poll() is not None:
            break
        _signal_group(proc, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
    if proc.poll() is None:
        _signal_group(proc, signal.SIGKILL)
    code = proc.wait()
    _signal_group(proc, signal.SIGKILL)  # what it started and left behind
    with _LIVE_LOCK:
        _LIVE.discard(proc)
    return code


@atexit.register
def _stop_leftovers() -> None:
    """Nothing this process started outlives it, whatever path it exits by."""
    with _LIVE_LOCK:
        left = list(_LIVE)
    for proc in left:
        stop_group(proc, ((signal.SIGTERM, 1.0),))


class TreeSampler:
    """Samples a process and all its descendants from outside their tree, in a thread: the largest
    sum of their RSS (``costs.resident_bytes``), each one's largest, and the CPU seconds each was last
    seen to have used."""

    def __init__(self, pid: int, interval_s: float = SAMPLE_INTERVAL_S):
        import psutil

        self._psutil = psutil
        try:
            self._root: Any = psutil.Process(pid)
        except psutil.Error:  # it has exited already
            self._root = None
        self._interval_s = interval_s
        self._cpu: dict[int, float] = {}
        #: pid -> (its command line, shortened; its largest RSS seen)
        self.process_peaks: dict[int, tuple[str, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"prunecomp-sampler-{pid}", daemon=True)
        self.peak_rss_bytes = 0

    def sample(self) -> None:
        psutil = self._psutil
        if self._root is None:
            return
        try:
            members = [self._root, *self._root.children(recursive=True)]
        except psutil.Error:
            return
        resident = resident_bytes(members)
        for member in members:
            if member.pid not in resident:
                continue
            with contextlib.suppress(psutil.Error):
                name, peak = self.process_peaks.get(member.pid) or (" ".join(member.cmdline())[:160], 0)
                self.process_peaks[member.pid] = (name, max(peak, resident[member.pid]))
                times = member.cpu_times()
                self._cpu[member.pid] = max(self._cpu.get(member.pid, 0.0), times.user + times.system)
        self.peak_rss_bytes = max(self.peak_rss_bytes, sum(resident.values()))

    @property
    def cpu_s(self) -> float:
        return sum(self._cpu.values())

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.sample()

    def __enter__(self) -> TreeSampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()


def _stderr_stream() -> IO[bytes] | None:
    """Where a child's output is passed through: this process's stderr, as bytes."""
    try:
        sys.stderr.flush()
        return os.fdopen(os.dup(sys.stderr.fileno()), "wb", buffering=0)
    except (AttributeError, ValueError, OSError, io.UnsupportedOperation):
        return None  # a captured stderr without a descriptor: the log keeps everything


class _Tee(threading.Thread):
    """Copies a child's output to the log file and to this process's stderr, as it comes."""

    def __init__(self, source: IO[bytes], log: IO[bytes]):
        super().__init__(name="prunecomp-child-output", daemon=True)
        self._source, self._log = source, log
        self._echo = _stderr_stream()

    def run(self) -> None:
        try:
            for chunk in iter(lambda: self._source.read1(1 << 16), b""):
                self._log.write(chunk)
                if self._echo is not None:
                    with contextlib.suppress(OSError):
                        self._echo.write(chunk)
        finally:
            self._log.flush()
            if self._echo is not None:
                self._echo.close()


def logs_directory() -> Path:
    """Where children's logs go: ``$PRUNECOMP_CACHE/logs`` (a failed child's log stays there)."""
    from prunecomp_export.source.loading import cache_root

    directory = cache_root() / "logs"
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def log_path_for(name: str) -> Path:
    """A new log file's path in ``logs_directory()`` for the child called ``name``."""
    slug = "".join(c if c.isalnum() else "-" for c in name).strip("-") or "child"
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return logs_directory() / f"{stamp}-{os.getpid()}-{slug}.log"


def child_env(python: str | None, extra: dict[str, str]) -> tuple[dict[str, str], Path | None]:
    """The child's environment: this one, ``extra``, and this package importable. Another
    interpreter gets a directory holding only a link to the package (putting site-packages of this
    virtualenv on its path would shadow its own torch and transformers); returned for removal."""
    env = {**os.environ, **extra}
    link_root = None
    if python is None or Path(python).absolute() == Path(sys.executable).absolute():
        root = str(PACKAGE_DIR.parent)
    else:
        link_root = Path(tempfile.mkdtemp(prefix="prunecomp-path-"))
        (link_root / PACKAGE_DIR.name).symlink_to(PACKAGE_DIR, target_is_directory=True)
        root = str(link_root)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env, link_root


def _load_class(name: str) -> type | None:
    module, _, qualname = name.partition(":")
    try:
        obj: Any = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        return None
    return obj if isinstance(obj, type) and issubclass(obj, PrunecompError) else None


def rebuild_error(error: dict[str, Any]) -> PrunecompError | None:
    """The child's PrunecompError as the same class, message and attributes (e.g. RecipeError's key),
    built without ``__init__`` (whose signature varies by subclass); the nearest importable base
    class where the exact one is not importable here."""
    for name in error.get("prunecomp_mro", []):
        cls = _load_class(name)
        if cls is not None:
            exc = cls.__new__(cls)
            Exception.__init__(exc, *error["args"])
            exc.__dict__.update(error["attrs"])
            return exc
    return None


def run_child(request: ChildRequest) -> ChildResult:
    """Call ``request.target`` in a fresh interpreter and return its result (see the module's docstring
    for everything that comes with it). Ctrl-C or SIGTERM here stops the child's group and re-raises."""
    with tempfile.TemporaryDirectory(prefix="prunecomp-child-") as tmp:
        request_file, response_file = Path(tmp) / "request.json", Path(tmp) / "response.json"
        request_file.write_text(json.dumps({"target": request.target, "kwargs": request.kwargs}))
        env, link_root = child_env(request.python, request.env)
        log_path = Path(request.log_file) if request.log_file else log_path_for(request.name)
        cmd = [
            request.python or sys.executable,
            "-m",
            "prunecomp_export.child_main",
            str(request_file),
            str(response_file),
            str(os.getpid()),  # the child dies with this process, even when it is killed
        ]
        start = time.perf_counter()
        try:
            with log_path.open("wb") as log:
                proc = _start(cmd, env, subprocess.PIPE)
                tee = _Tee(proc.stdout, log)
                tee.start()
                try:
                    with TreeSampler(proc.pid) as sampler:
                        wait_interruptibly(proc, request.timeout_s)
                except subprocess.TimeoutExpired:
                    stop_group(proc)
                    raise ChildFailed(f"{request.name} took over {request.timeout_s:g} s", log_path) from None
                except BaseException:  # KeyboardInterrupt above all: never leave the child running
                    stop_group(proc)
                    raise
                finally:
                    stop_group(proc)  # an exited child's leftovers (no-op for a clean exit)
                    tee.join(timeout=30)  # EOF once every process holding the pipe is gone
        finally:
            if link_root is not None:
                import shutil

                shutil.rmtree(link_root, ignore_errors=True)
        wall_s = time.perf_counter() - start
        reply = json.loads(response_file.read_text()) if response_file.exists() else None

    if reply is None:
        code = proc.returncode
        if code < 0:
            name = signal.Signals(-code).name
            hint = " (out of memory?)" if name == "SIGKILL" else ""
            raise ChildFailed(f"{request.name}: the child process was killed by {name}{hint}", log_path)
        raise ChildFailed(f"{request.name}: the child process exited with code {code} and no result", log_path)
    result = ChildResult(
        name=request.name, value=reply.get("value"), wall_s=wall_s,
        peak_rss_bytes=max(sampler.peak_rss_bytes, reply.get("own_peak_rss_bytes") or 0),
        own_peak_rss_bytes=reply.get("own_peak_rss_bytes"), peak_device_bytes=reply.get("device_peak_bytes"),
        cpu_s=sampler.cpu_s,
    )  # fmt: skip
    record_child(result.cost)
    if reply["ok"]:
        if request.log_file is None:
            log_path.unlink(missing_ok=True)
        return result
    error = reply["error"]
    with log_path.open("a") as log:
        log.write(f"\n--- {request.name} ({request.target}) failed ---\n{error['traceback']}")
    rebuilt = rebuild_error(error) if error.get("expected") else None
    if rebuilt is not None:
        raise rebuilt
    first_line = (error["message"].splitlines() or [""])[0]
    raise ChildFailed(f"{request.name} failed: {error['type']}: {first_line}", log_path)


# ------------------------------------------------------------------------------------- servers


@dataclass
class Spawned:
    """A long-running child (a server) and what is known of it."""

    name: str
    proc: subprocess.Popen
    log_path: Path | None
    sampler: TreeSampler | None = field(default=None, repr=False)

    def stop(self, signals: Sequence[tuple[int, float]] = ((signal.SIGTERM, STOP_GRACE_S),)) -> int:
        return stop_group(self.proc, signals)


@contextlib.contextmanager
def spawned(
    name: str,
    cmd: Sequence[str],
    env: dict[str, str],
    *,
    log_path: Path | None = None,
    stop_signals: Sequence[tuple[int, float]] = ((signal.SIGTERM, STOP_GRACE_S),),
) -> Iterator[Spawned]:
    """Run ``cmd`` (its output into ``log_path``, or onto this terminal) for the duration of the block;
    its whole process group is stopped on the way out, whatever ends the block. Its tree's peak RSS
    is recorded with the running stage."""
    start = time.perf_counter()
    log = log_path.open("wb") if log_path is not None else None
    try:
        proc = _start(cmd, env, log)
        child = Spawned(name, proc, log_path)
        try:
            with TreeSampler(proc.pid) as child.sampler:
                yield child
        finally:
            stop_group(proc, stop_signals)
            record_child(
                ChildCost(name=name, wall_s=time.perf_counter() - start, peak_rss_bytes=child.sampler.peak_rss_bytes)
            )
    finally:
        if log is not None:
            log.close()
