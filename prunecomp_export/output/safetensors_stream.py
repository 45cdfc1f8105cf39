"""Write safetensors files one tensor at a time.

``safetensors.torch.save_file`` needs every tensor of a file in memory at once, and copies them to
bytes before writing: for a checkpoint's multi-GB shards that is several times the shard in RAM. The
format is simple (an 8-byte little-endian header length, a JSON header giving each tensor's dtype,
shape and byte range, space-padded to a multiple of 8, then the raw little-endian data), and every
output tensor's dtype and shape are known from the source headers before any data is read, so the
header is written first and each tensor streamed after it. Readers (safetensors, transformers, vLLM)
accept any data order; the header lists tensors in the order their data follows.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}  # fmt: skip
DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}


@dataclass(frozen=True)
class Entry:
    name: str
    dtype: str  # safetensors' name, e.g. "BF16"
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * torch.empty((), dtype=DTYPES[self.dtype]).element_size()


class SafetensorsWriter:
    """``with SafetensorsWriter(path, entries) as out: out.write(name, tensor)`` in ``entries`` order."""

    def __init__(self, path: Path, entries: list[Entry], metadata: dict[str, str] | None = None):
        self.path, self.entries = Path(path), list(entries)
        self._next = 0
        header: dict[str, dict] = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        for entry in self.entries:
            header[entry.name] = {
                "dtype": entry.dtype,
                "shape": list(entry.shape),
                "data_offsets": [offset, offset + entry.nbytes],
            }
            offset += entry.nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        self._file = open(self.path, "wb")  # noqa: SIM115 (closed in __exit__)
        self._file.write(struct.pack("<Q", len(encoded)))
        self._file.write(encoded)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        entry = self.entries[self._next]
        if name != entry.name or DTYPE_NAMES.get(tensor.dtype) != entry.dtype or tuple(tensor.shape) != entry.shape:
            raise ValueError(
                f"{self.path}: expected {entry.name} {entry.dtype} {list(entry.shape)}, got {name} "
                f"{DTYPE_NAMES.get(tensor.dtype)} {list(tensor.shape)}"
            )
        self.write_chunks(name, [tensor])

    def write_chunks(self, name: str, chunks) -> None:
        """One tensor given as consecutive pieces of its flattened data (a generator may make them)."""
        entry = self.entries[self._next]
        written = 0
        for chunk in chunks:
            if name != entry.name or DTYPE_NAMES.get(chunk.dtype) != entry.dtype:
                raise ValueError(f"{self.path}: expected {entry.name} {entry.dtype}, got {name} {chunk.dtype}")
            data = chunk.detach().contiguous().cpu().reshape(-1).view(torch.uint8)  # bf16 has no numpy dtype
            self._file.write(memoryview(data.numpy()))
            written += data.numel()
        if written != entry.nbytes:
            raise ValueError(f"{self.path}: {name} needs {entry.nbytes} bytes, got {written}")
        self._next += 1

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type, *_exc) -> None:
        self._file.close()
        if exc_type is None and self._next != len(self.entries):
            raise ValueError(f"{self.path}: {len(self.entries) - self._next} tensor(s) were never written")
