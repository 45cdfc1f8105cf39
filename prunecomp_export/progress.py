"""How long-running stages report progress. The library calls ``Reporter``; the CLI passes a rich
one, tests and library users get plain lines on stderr."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


#: a non-interactive log gets a line about a long loop at most this often
PLAIN_PROGRESS_EVERY_S = 60.0


class Reporter:
    """Plain lines on stderr, each with the time of day: what a non-interactive log (CI) needs. A long
    loop says how far it got every ``PLAIN_PROGRESS_EVERY_S`` seconds, so the log never sits silent."""

    def log(self, message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    def track(self, items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
        if total is None and hasattr(items, "__len__"):
            total = len(items)  # type: ignore[arg-type]
        last = time.monotonic()
        for done, item in enumerate(items, start=1):
            yield item
            if time.monotonic() - last >= PLAIN_PROGRESS_EVERY_S:
                self.log(f"{description}: {done}/{total if total is not None else '?'}")
                last = time.monotonic()


class RichReporter(Reporter):
    """Transient rich progress bars and timestamped log lines, on stderr."""

    def __init__(self) -> None:
        from rich.console import Console

        self.console = Console(stderr=True)

    def log(self, message: str) -> None:
        self.console.log(message)

    def track(self, items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
        from rich.progress import track

        yield from track(items, description=description, total=total, console=self.console, transient=True)
