"""The child side of ``prunecomp_export.child``:
``python -m prunecomp_export.child_main REQUEST RESPONSE [PARENT_PID]``.

Calls ``module:function(**kwargs)`` from the request and writes the response: the value, or the
error described so the parent can rebuild it (a ``PrunecompError``: the same class and message, shown
as one line) or log it (anything else: its traceback goes into the response, never onto the
terminal). Also reports this process's own peak RSS and, where CUDA was used, its peak device memory.

Imports nothing but the standard library and ``prunecomp_export.errors`` at start-up: the interpreter
may be another virtualenv's (vLLM's), which has only this package's directory on its path.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Any

from prunecomp_export.errors import PrunecompError


def own_peak_rss_bytes() -> int:
    """This process's high-water RSS (VmHWM is reset by exec, unlike ru_maxrss)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        status = Path("/proc/self/status").read_text().splitlines()
        return int(next(line for line in status if line.startswith("VmHWM:")).split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def device_peak_bytes() -> int | None:
    """Peak CUDA memory allocated by torch in this process, summed over devices; None without CUDA.
    torch is only looked at if the function imported it."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
            return None
        return sum(int(torch.cuda.max_memory_allocated(i)) for i in range(torch.cuda.device_count()))
    except Exception:  # a broken CUDA install must not turn a result into a failure
        return None


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def describe_error(exc: BaseException) -> dict[str, Any]:
    """What the parent needs to rebuild a PrunecompError, or to log anything else."""
    prunecomp_mro = [
        f"{cls.__module__}:{cls.__qualname__}"
        for cls in type(exc).__mro__
        if isinstance(cls, type) and issubclass(cls, PrunecompError)
    ]
    return {
        "type": type(exc).__name__,
        "message": str(exc),
        "expected": bool(prunecomp_mro),
        "prunecomp_mro": prunecomp_mro,
        "args": list(exc.args) if _jsonable(list(exc.args)) else [str(exc)],
        "attrs": {key: value for key, value in vars(exc).items() if _jsonable(value)},
        "traceback": "".join(traceback.format_exception(exc)),
    }


def _stop_own_group(signum: int, frame: Any) -> None:
    """SIGTERM (from the parent, or because the parent died): take this child's whole process group
    (its own children, e.g. vLLM's engine) down with it."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    with contextlib.suppress(OSError):
        os.killpg(os.getpgrp(), signal.SIGKILL)
    os._exit(128 + signum)


def _die_with_parent(parent: int) -> None:
    """SIGTERM when the parent dies, even by SIGKILL (Linux's parent-death signal), so a killed run
    leaves no child behind; set here, after exec (a pre-exec hook is unsafe in a threaded parent)."""
    with contextlib.suppress(OSError, AttributeError, ValueError):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the signal was armed
        _stop_own_group(signal.SIGTERM, None)


def main(request_path: str, response_path: str, parent: int | None = None) -> int:
    signal.signal(signal.SIGTERM, _stop_own_group)
    if parent is not None:
        _die_with_parent(parent)
    request = json.loads(Path(request_path).read_text())
    module_name, _, function_name = request["target"].partition(":")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
        reply: dict[str, Any] = {"ok": True, "value": function(**request["kwargs"])}
        if not _jsonable(reply["value"]):
            raise TypeError(f"{request['target']} returned a value that is not JSON-serialisable")
        status = 0
    except Exception as exc:
        reply = {"ok": False, "error": describe_error(exc)}
        status = 1
    reply.update(own_peak_rss_bytes=own_peak_rss_bytes(), device_peak_bytes=device_peak_bytes())
    sys.stdout.flush()
    sys.stderr.flush()
    partial = Path(response_path).with_suffix(".partial")
    partial.write_text(json.dumps(reply))
    partial.replace(response_path)  # the parent never reads half a response
    return status


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        sys.exit("usage: python -m prunecomp_export.child_main REQUEST.json RESPONSE.json [PARENT_PID]")
    sys.exit(main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) == 4 else None))
