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


def allocate_with_grandchild(mb: int, hold_s: float = 1.0) -> dict:
    """Hold ``mb`` MB here and ``mb`` MB in a grandchild at the same time, for ``hold_s`` seconds."""
    import subprocess
    import sys

    code = (
        f"b = bytearray({mb * MB}); b[::4096] = b'\\x01' * len(range(0, len(b), 4096)); "
        f"import time; print('ready', flush=True); time.sleep({hold_s})"
    )
    grandchild = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    grandchild.stdout.readline()  # it holds its memory now
    buf = bytearray(mb * MB)
    buf[::4096] = b"\x01" * len(range(0, len(buf), 4096))
    time.sleep(hold_s)
    grandchild.wait()
    del buf
    return {"mb": mb}


def spawn_sleeper(pid_file: str) -> None:
    """Start a grandchild, write ``child_pid grandchild_pid``, then wait to be stopped."""
    import subprocess

    grandchild = subprocess.Popen(["sleep", "120"])
    Path(pid_file).write_text(f"{os.getpid()} {grandchild.pid}")
    time.sleep(120)


def chatter(lines: list[str]) -> int:
    """Progress lines on stdout and stderr, as a library in a child would print them."""
    import sys

    for number, line in enumerate(lines):
        print(line, file=sys.stderr if number % 2 else sys.stdout, flush=True)
    return len(lines)


def importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None
