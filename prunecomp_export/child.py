"""Run one heavy step in a fresh Python process and get back its JSON result and its peak RSS.

An ONNX export, reloading a checkpoint with transformers or an lm-eval run can each need several GB
that the allocator never hands back; in a child process that memory goes away when the child exits,
so the CLI process stays small, and the child's own peak is measured where it happened.

Parent and child talk through two JSON files (the request and the response), not stdout: the
function may print, and its output goes to the parent's stderr so progress lines stay visible.
Run as ``python -m prunecomp_export.child REQUEST.json RESPONSE.json``.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prunecomp_export.costs import own_peak_rss_bytes
from prunecomp_export.errors import PrunecompError

#: how long a terminated child gets to exit before it is killed
TERMINATE_GRACE_S = 5.0
#: the directory that holds the ``prunecomp_export`` package, put on the child's PYTHONPATH
PACKAGE_PARENT = Path(__file__).resolve().parent.parent


@dataclass
class ChildResult:
    """What the function returned, and what running it cost."""

    value: Any
    #: the child's own ru_maxrss plus that of its largest reaped child, measured just before it exits
    peak_rss_bytes: int
    wall_s: float


# ------------------------------------------------------------------------------------------ parent


def _child_env(env: dict[str, str] | None) -> dict[str, str]:
    merged = {**os.environ, **(env or {})}
    existing = merged.get("PYTHONPATH")
    merged["PYTHONPATH"] = os.pathsep.join([str(PACKAGE_PARENT), *([existing] if existing else [])])
    return merged


def _stderr_fd() -> int:
    """The parent's stderr as a file descriptor (a captured ``sys.stderr`` may have none)."""
    try:
        sys.stderr.flush()
        return sys.stderr.fileno()
    except (AttributeError, ValueError, io.UnsupportedOperation):
        return 2


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the child's process group, then SIGKILL it if it has not gone after a grace period."""
    for sig, grace in ((signal.SIGTERM, TERMINATE_GRACE_S), (signal.SIGKILL, None)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def _load_class(name: str) -> type | None:
    module, _, qualname = name.partition(":")
    try:
        obj: Any = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        return None
    return obj if isinstance(obj, type) and issubclass(obj, PrunecompError) else None


def _rebuild_error(error: dict) -> PrunecompError | None:
    """The child's PrunecompError as the same class, message and attributes (e.g. RecipeError's key/file).

    Built without calling ``__init__``, whose signature varies by subclass: the args and the instance
    attributes are restored as they were, so ``str()`` and ``exit_code`` match the child's exception.
    Falls back to the nearest importable PrunecompError base class.
    """
    for name in error.get("prunecomp_mro", []):
        cls = _load_class(name)
        if cls is not None:
            exc = cls.__new__(cls)
            Exception.__init__(exc, *error["args"])
            exc.__dict__.update(error["attrs"])
            return exc
    return None


def run_in_child(
    target: str,
    kwargs: dict[str, Any],
    *,
    timeout_s: float | None = None,
    env: dict[str, str] | None = None,
) -> ChildResult:
    """Call ``target`` ("package.module:function") with ``**kwargs`` in a fresh interpreter.

    kwargs and the return value must be JSON-serialisable (pass paths as str). A PrunecompError raised
    in the child is re-raised here as the same class; any other failure, a signal, or the timeout
    becomes a RuntimeError naming the target. Ctrl-C here stops the child and re-raises.
    """
    if ":" not in target:
        raise ValueError(f"target must be 'package.module:function', got {target!r}")
    with tempfile.TemporaryDirectory(prefix="prunecomp-child-") as tmp:
        request, response = Path(tmp) / "request.json", Path(tmp) / "response.json"
        request.write_text(json.dumps({"target": target, "kwargs": kwargs}))
        stderr = _stderr_fd()
        start = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "prunecomp_export.child", str(request), str(response)],
            stdin=subprocess.DEVNULL,
            stdout=stderr,
            stderr=stderr,
            env=_child_env(env),
            start_new_session=True,  # its own process group, so _stop also reaches its children
        )
        try:
            returncode = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _stop(proc)
            raise RuntimeError(f"{target} timed out after {timeout_s:g} s in a child process") from None
        except BaseException:  # KeyboardInterrupt above all: never leave the child running
            _stop(proc)
            raise
        wall_s = time.perf_counter() - start
        reply = json.loads(response.read_text()) if response.exists() else None

    if returncode < 0:
        sig = signal.Signals(-returncode).name
        hint = " (out of memory?)" if sig == "SIGKILL" else ""
        raise RuntimeError(f"{target}: the child process was killed by {sig}{hint}")
    if reply is None:
        raise RuntimeError(f"{target} failed in a child process: exit code {returncode} and no result")
    if reply["ok"]:
        return ChildResult(value=reply["value"], peak_rss_bytes=reply["peak_rss_bytes"], wall_s=wall_s)
    error = reply["error"]
    rebuilt = _rebuild_error(error)
    if rebuilt is not None:
        raise rebuilt
    first_line = (error["message"].splitlines() or [""])[0]
    raise RuntimeError(f"{target} failed in a child process: {error['type']}: {first_line}")


# ------------------------------------------------------------------------------------------- child


def _peak_rss_bytes() -> int:
    """This process's own high-water RSS plus its largest reaped descendant's."""
    return own_peak_rss_bytes() + resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024


def _describe_error(exc: BaseException) -> dict:
    def jsonable(value: Any) -> bool:
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            return False
        return True

    prunecomp_mro = [
        f"{cls.__module__}:{cls.__qualname__}"
        for cls in type(exc).__mro__
        if isinstance(cls, type) and issubclass(cls, PrunecompError)
    ]
    args = list(exc.args) if jsonable(list(exc.args)) else [str(exc)]
    attrs = {key: value for key, value in vars(exc).items() if jsonable(value)}
    return {
        "type": type(exc).__name__,
        "message": str(exc),
        "prunecomp_mro": prunecomp_mro,
        "args": args,
        "attrs": attrs,
    }


def _child_main(request_path: str, response_path: str) -> int:
    request = json.loads(Path(request_path).read_text())
    module_name, _, function_name = request["target"].partition(":")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
        value = function(**request["kwargs"])
        payload = json.dumps({"ok": True, "value": value, "peak_rss_bytes": _peak_rss_bytes()})
        status = 0
    except Exception as exc:
        traceback.print_exc()
        payload = json.dumps({"ok": False, "error": _describe_error(exc), "peak_rss_bytes": _peak_rss_bytes()})
        status = 1
    sys.stdout.flush()
    sys.stderr.flush()
    tmp = Path(response_path).with_suffix(".partial")
    tmp.write_text(payload)
    tmp.replace(response_path)  # the parent never reads half a response
    return status


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m prunecomp_export.child REQUEST.json RESPONSE.json")
    sys.exit(_child_main(sys.argv[1], sys.argv[2]))
