"""A safetensors checkpoint read one tensor at a time, never whole.

The source of every streamed computation and of the tensor surgery that writes the pruned
checkpoint: a directory with ``model.safetensors`` or shards listed in
``model.safetensors.index.json``. Opening reads and checks the headers only; a tensor is read when
asked for, with plain file reads into a tensor of its own. (safetensors' ``safe_open`` maps the
whole shard: every page a read touches then counts in this process's RSS for as long as any tensor
from that map lives, which for a 70B shard is gigabytes.)

The headers are checked as untrusted input: a header length, dtype, shape or byte range that does
not fit the file is a one-line ``ModelError`` naming the file, not a crash.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from prunecomp_export.errors import ModelError
from prunecomp_export.output.safetensors_stream import DTYPES

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
#: a header larger than this is not a checkpoint's (70B models' headers are well under 1 MB)
MAX_HEADER_BYTES = 100 * 2**20


@dataclass(frozen=True)
class TensorInfo:
    shard: Path
    dtype: str  # safetensors' name, e.g. "BF16"
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the shard file
    end: int


def read_header(path: Path) -> dict[str, TensorInfo]:
    """The tensors of one safetensors file, each checked against the file's size."""
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise ModelError(f"{path}: not a safetensors file (shorter than its header length)")
            (length,) = struct.unpack("<Q", prefix)
            if length > min(MAX_HEADER_BYTES, size - 8):
                raise ModelError(f"{path}: not a safetensors file (header length {length} does not fit the file)")
            raw = handle.read(length)
    except OSError as exc:
        raise ModelError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ModelError(f"{path}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise ModelError(f"{path}: not a safetensors file (its header is not a mapping)")
    header.pop("__metadata__", None)
    base = 8 + length
    tensors = {}
    for key, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            valid = dtype in DTYPES and all(isinstance(n, int) and n >= 0 for n in (*shape, begin, end))
        except (KeyError, TypeError, ValueError):
            valid = False
        if not valid:
            raise ModelError(f"{path}: tensor {key!r} has a malformed header entry")
        nbytes = math.prod(shape) * torch.empty((), dtype=DTYPES[dtype]).element_size()
        if end - begin != nbytes or base + end > size:
            raise ModelError(
                f"{path}: tensor {key!r} ({dtype} {list(shape)}) does not fit its byte range: truncated or corrupt"
            )
        tensors[key] = TensorInfo(path, dtype, shape, base + begin, base + end)
    return tensors


class SafetensorsCheckpoint:
    def __init__(self, directory: Path):
        self.directory = Path(directory)
        index = self.directory / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                shards = {key: self._inside(str(name)) for key, name in weight_map.items()}
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise ModelError(f"{index}: not a safetensors index ({type(exc).__name__})") from None
        elif (self.directory / SINGLE).is_file():
            shards = None
        else:
            raise ModelError(f"{self.directory} has neither {SINGLE} nor {INDEX}")
        files = list(dict.fromkeys(shards.values())) if shards is not None else [self.directory / SINGLE]
        self.info: dict[str, TensorInfo] = {}
        for shard in files:
            if not shard.is_file():
                raise ModelError(f"{shard} is listed in {INDEX} but missing")
            found = read_header(shard)
            if shards is not None:
                listed = {key for key, path in shards.items() if path == shard}
                if missing := sorted(listed - set(found)):
                    raise ModelError(f"{shard}: tensor {missing[0]!r} is listed in {INDEX} but not in the file")
                found = {key: found[key] for key in found if key in listed}
            self.info.update(found)
        self.shards: list[Path] = files

    def _inside(self, name: str) -> Path:
        path = (self.directory / name).resolve()
        if path.parent != self.directory.resolve():
            raise ModelError(f"{self.directory / INDEX}: shard {name!r} is outside the checkpoint directory")
        return path

    def keys(self) -> list[str]:
        return list(self.info)

    def __iter__(self):
        return iter(self.info)

    def __contains__(self, key: str) -> bool:
        return key in self.info

    def headers(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """Every tensor's safetensors dtype name and shape, in file order, from the headers alone."""
        return {key: (info.dtype, info.shape) for key, info in self.info.items()}

    def tensor(self, key: str, device: str | torch.device = "cpu") -> torch.Tensor:
        """One tensor, read from its byte range into memory of its own, then moved to ``device``."""
        info = self.info.get(key)
        if info is None:
            raise ModelError(f"{self.directory}: tensor {key!r} is missing from the checkpoint")
        out = torch.empty(info.shape, dtype=DTYPES[info.dtype])
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy()) if out.numel() else memoryview(b"")
        try:
            with info.shard.open("rb", buffering=0) as handle:
                done = 0
                while done < len(view):
                    read = os.preadv(handle.fileno(), [view[done:]], info.start + done)
                    if read == 0:
                        raise ModelError(f"{info.shard}: tensor {key!r} is cut short: the file is truncated")
                    done += read
        except OSError as exc:
            raise ModelError(f"{info.shard}: cannot read tensor {key!r} ({exc.strerror or exc})") from None
        return out.to(device)

    def tensors(self, keys: list[str], device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        return {key: self.tensor(key, device) for key in keys}
