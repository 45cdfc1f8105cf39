"""Where the work runs: the device, the dtype, and where the weights and the stream cache live.

A 70B model does not fit one device, and its calibration streams do not fit host memory: the
engine therefore runs the model one decoder layer at a time (weights read from the source files
when needed) and keeps the residual streams on the device, in host memory or on disk. ``plan_placement``
chooses from a memory budget when the recipe does not say, before any weight is read.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from prunecomp_export.errors import RecipeError
from prunecomp_export.recipe import ExecutionSpec, parse_size

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


def memory_budget(spec: ExecutionSpec, device) -> int:
    if spec.memory_budget is not None:
        return parse_size(spec.memory_budget)
    if device.type == "cuda":
        import torch

        free, _total = torch.cuda.mem_get_info(device)
        return int(0.8 * free)
    import psutil

    return int(0.5 * psutil.virtual_memory().available)


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


def plan_placement(
    spec: ExecutionSpec, device, *, weights_bytes: int, largest_slice_bytes: int, cache_bytes: int
) -> Placement:
    """Weights resident if they fit beside the cache; else streamed, one slice (a layer, or the
    embedding and head) at a time. The cache goes to the device when it fits beside what is resident,
    then host memory (GPU runs), then disk. A budget too small for one slice is an error."""
    budget = memory_budget(spec, device)
    working = 2 * largest_slice_bytes  # the slice being run and the next one being read
    cache_dir = check_cache_dir(spec)
    if working > budget and spec.weights != "resident":
        raise RecipeError(
            f"the memory budget ({budget / 1e9:.2f} GB) is smaller than what running one layer needs "
            f"({working / 1e9:.2f} GB)",
            key="execution.memory_budget",
        )
    resident = weights_bytes + cache_bytes <= budget if spec.weights == "auto" else spec.weights == "resident"
    on_device = (weights_bytes if resident else working) + cache_bytes <= budget
    cache: CachePlace
    if spec.stream_cache != "auto":
        cache = spec.stream_cache  # type: ignore[assignment]
    elif on_device:
        cache = "device"
    elif device.type == "cuda" and cache_bytes <= memory_budget(ExecutionSpec(device="cpu"), _cpu()):
        cache = "host"
    else:
        cache = "disk"
    if device.type == "cpu" and cache == "host":
        cache = "device"  # on the CPU, host memory is the device
    return Placement(str(device), budget, resident, cache, cache_dir, weights_bytes, cache_bytes, working)


def _cpu():
    import torch

    return torch.device("cpu")
