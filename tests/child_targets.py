"""Functions that tests/test_child.py runs in a child process (importable as ``tests.child_targets``)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from prunecomp_export.errors import RecipeError, ValidationFailed

MB = 1024 * 1024


def allocate(mb: int) -> dict:
    """Hold ``mb`` MB resident, print to stdout (which must not corrupt the result), return figures."""
    buf = bytearray(mb * MB)
    buf[::4096] = b"\x01" * len(range(0, len(buf), 4096))  # touch every page so it is resident
    print(f"allocated {mb} MB", flush=True)
    return {"mb": mb, "pages_touched": sum(buf[::4096])}


def fail_validation(message: str) -> None:
    raise ValidationFailed(message)


def fail_recipe(message: str, key: str, file: str) -> None:
    raise RecipeError(message, key=key, file=file)


def fail_value(message: str) -> None:
    raise ValueError(message)


def sleep(seconds: float, pid_file: str | None = None) -> None:
    if pid_file:
        Path(pid_file).write_text(str(os.getpid()))
    time.sleep(seconds)


def kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)
