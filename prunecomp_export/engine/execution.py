"""Where the work runs: the device, and where the weights and the stream cache live.

A 70B model does not fit one device, and its calibration streams do not fit host memory: the
engine therefore runs the model one decoder layer at a time (weights read from the source files
when needed) and keeps the residual streams on the device, in host memory or on disk. The memory
plan (``memory.py``) chooses the ``Placement`` from the budget before any weight is read.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from prunecomp_export.errors import RecipeError
from prunecomp_export.recipe import ExecutionSpec

CachePlace = Literal["device", "host", "disk"]


def resolve_device(spec: ExecutionSpec):
    """The torch device the recipe asks for, checked to exist (a one-line error otherwise)."""
    import torch

    if spec.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RecipeError("CUDA is not available here (no GPU, or a CPU-only torch)", key="execution.device")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise RecipeError(f"{spec.device} does not exist: this machine has {count} CUDA device(s)",
                              key="execution.device")  # fmt: skip
    return device


def check_cache_dir(spec: ExecutionSpec) -> Path:
    """The directory under which a disk stream cache would go; it must exist and be writable."""
    directory = Path(spec.cache_dir).expanduser() if spec.cache_dir else Path(tempfile.gettempdir())
    if not directory.is_dir():
        raise RecipeError(f"{directory} is not a directory", key="execution.cache_dir")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise RecipeError(f"{directory} is not writable", key="execution.cache_dir")
    return directory


@dataclass(frozen=True)
class Placement:
    """Where the weights and the stream cache live for one run, and why (for the record)."""

    device: str
    budget_bytes: int
    weights_resident: bool
    cache: CachePlace
    cache_dir: Path
    weights_bytes: int
    cache_bytes: int
    working_bytes: int

    def describe(self) -> dict:
        return {
            "device": self.device,
            "budget_bytes": self.budget_bytes,
            "weights": "resident" if self.weights_resident else "streamed",
            "weights_bytes": self.weights_bytes,
            "stream_cache": self.cache,
            "stream_cache_bytes": self.cache_bytes,
            "working_bytes": self.working_bytes,
        }
