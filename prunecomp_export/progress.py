"""How long-running stages report progress. The library calls ``Reporter``; the CLI passes a rich
one, tests and library users get plain lines on stderr."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


class Reporter:
    """Plain lines on stderr, each with the time of day: what a non-interactive log (CI) needs."""

    def log(self, message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    def track(self, items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
        yield from items


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
