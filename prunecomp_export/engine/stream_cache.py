"""The residual stream at each layer boundary, per calibration batch, kept where the run's
placement says: on the device, in host memory, or on disk (one safetensors file per batch and
boundary, under a directory removed when the cache is closed).

A pre-gap fold multiplies the stream before the gap by alpha; the cache records that as a factor
per boundary, applied when the stream is read, instead of rewriting every file each round.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from prunecomp_export.engine.execution import CachePlace


@dataclass
class _Boundary:
    parts: list[torch.Tensor | Path | None]
    sizes: list[int]
    scale: float = 1.0


@dataclass
class StreamCache:
    place: CachePlace
    device: torch.device
    num_batches: int
    directory: Path | None = None
    boundaries: list[_Boundary] = field(default_factory=list)
    nbytes: int = 0
    peak_nbytes: int = 0

    @classmethod
    def open(cls, place: CachePlace, device: torch.device, num_batches: int, parent: Path | None = None):
        directory = None
        if place == "disk":
            directory = Path(tempfile.mkdtemp(prefix="prunecomp-streams-", dir=parent))
        return cls(place, device, num_batches, directory)

    def close(self) -> None:
        self.boundaries.clear()
        self.nbytes = 0
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> StreamCache:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self.boundaries)

    # -- boundaries -----------------------------------------------------------------------------
    def insert(self, k: int) -> None:
        """A new, empty boundary at position ``k``."""
        self.boundaries.insert(k, _Boundary([None] * self.num_batches, [0] * self.num_batches))

    def delete(self, k: int) -> None:
        for b in range(self.num_batches):
            self._forget(self.boundaries[k], b)
        del self.boundaries[k]

    def rescale(self, k: int, factor: float) -> None:
        self.boundaries[k].scale *= factor

    # -- parts ----------------------------------------------------------------------------------
    def put(self, k: int, b: int, hidden: torch.Tensor) -> None:
        """Store the stream entering boundary ``k`` for batch ``b`` (replacing what was there, scale 1)."""
        boundary = self.boundaries[k]
        if boundary.scale != 1.0:
            self._materialise_scale(boundary)
        self._forget(boundary, b)
        hidden = hidden.detach()
        size = hidden.numel() * hidden.element_size()
        if self.place == "device":
            stored: torch.Tensor | Path = hidden
        elif self.place == "host":
            stored = hidden.to("cpu", non_blocking=False)
        else:
            assert self.directory is not None
            stored = self.directory / f"{uuid.uuid4().hex}.safetensors"
            save_file({"h": hidden.contiguous().cpu()}, stored)
        boundary.parts[b], boundary.sizes[b] = stored, size
        self.nbytes += size
        self.peak_nbytes = max(self.peak_nbytes, self.nbytes)

    def get(self, k: int, b: int) -> torch.Tensor:
        boundary = self.boundaries[k]
        part = boundary.parts[b]
        if part is None:
            raise KeyError(f"no stream at boundary {k} for batch {b}")
        hidden = load_file(part)["h"] if isinstance(part, Path) else part
        hidden = hidden.to(self.device)
        if boundary.scale != 1.0:
            hidden = (hidden.float() * boundary.scale).to(hidden.dtype)
        return hidden

    def batches(self, k: int):
        """The streams at boundary ``k``, one batch at a time (only one is loaded at once)."""
        for b in range(self.num_batches):
            yield self.get(k, b)

    def _materialise_scale(self, boundary: _Boundary) -> None:
        """Writing one part of a scaled boundary: fold the scale into every part first."""
        scale, boundary.scale = boundary.scale, 1.0
        for b, part in enumerate(boundary.parts):
            if part is None:
                continue
            hidden = load_file(part)["h"] if isinstance(part, Path) else part
            scaled = (hidden.float() * scale).to(hidden.dtype)
            if isinstance(part, Path):
                save_file({"h": scaled.contiguous().cpu()}, part)
            else:
                boundary.parts[b] = scaled.to(part.device)

    def _forget(self, boundary: _Boundary, b: int) -> None:
        part = boundary.parts[b]
        if isinstance(part, Path):
            part.unlink(missing_ok=True)
        self.nbytes -= boundary.sizes[b]
        boundary.parts[b], boundary.sizes[b] = None, 0
