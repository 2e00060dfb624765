"""Minimal, strict safetensors reading and writing on numpy (bf16 and float8 through ml_dtypes).

Our own reader so that every dtype of the V4 release (BF16, F8_E4M3, F8_E8M0, I8-packed FP4) loads, tensors are
read one at a time straight into their arrays, and a truncated or corrupt file is reported with its name and problem.
Writes are atomic: a temporary file renamed into place, so a crash never leaves a half-written file.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Iterable, Mapping

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
}
NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint file or tensor is missing, corrupt or does not fit the model; the message says which."""


class SafetensorsFile:
    """Lazy reader: parses the header, memory-maps the data, returns one tensor at a time."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{self.path}: truncated safetensors file ({size} bytes, no header)")
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > min(size - 8, _MAX_HEADER):
                raise CheckpointError(f"{self.path}: corrupt safetensors header length {header_len} "
                                      f"(file has {size} bytes)")
            try:
                header = json.loads(f.read(header_len))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{self.path}: corrupt safetensors header ({e})") from e
        self.metadata = header.pop("__metadata__", {}) or {}
        self.data_start = 8 + header_len
        self.entries: dict[str, dict] = header
        for name, info in header.items():
            begin, end = info["data_offsets"]
            if info["dtype"] not in DTYPES:
                raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {info['dtype']}")
            expected = int(np.prod(info["shape"], dtype=np.int64)) * DTYPES[info["dtype"]].itemsize
            if end - begin != expected or self.data_start + end > size:
                raise CheckpointError(f"{self.path}: tensor {name!r} is truncated or corrupt "
                                      f"(needs bytes {begin}..{end} of the data section, file has "
                                      f"{size - self.data_start})")

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def dtype_name(self, name: str) -> str:
        return self.entries[name]["dtype"]

    def get(self, name: str) -> np.ndarray:
        """One tensor, read straight into a fresh array (no memory map: mapped pages would count against the
        process's resident memory for as long as the file is open)."""
        info = self.entries[name]
        begin, end = info["data_offsets"]
        array = np.empty(info["shape"], DTYPES[info["dtype"]])
        with open(self.path, "rb") as f:
            f.seek(self.data_start + begin)
            if f.readinto(memoryview(array.reshape(-1).view(np.uint8))) != end - begin:
                raise CheckpointError(f"{self.path}: tensor {name!r} ends early (file truncated while reading)")
        return array

    def close(self) -> None:
        """Nothing stays open between reads; kept so readers can be used uniformly."""


class CheckpointReader:
    """All tensors of a checkpoint directory (one file, several, or sharded through an index json)."""

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        if path.is_file():
            files = [path]
        else:
            index = path / "model.safetensors.index.json"
            if index.exists():
                try:
                    weight_map = json.loads(index.read_text())["weight_map"]
                except (json.JSONDecodeError, KeyError) as e:
                    raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from e
                files = [path / f for f in sorted(set(weight_map.values()))]
                missing = [str(f) for f in files if not f.exists()]
                if missing:
                    raise CheckpointError(f"{index} names shard files that do not exist: {missing}")
            else:
                files = sorted(path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"no *.safetensors files found in {path}")
        self.files = [SafetensorsFile(f) for f in files]
        self.location: dict[str, SafetensorsFile] = {}
        for f in self.files:
            for name in f.keys():
                self.location[name] = f

    def keys(self) -> list[str]:
        return list(self.location)

    def __contains__(self, name: str) -> bool:
        return name in self.location

    def shape(self, name: str) -> tuple[int, ...]:
        return self.location[name].shape(name)

    def get(self, name: str) -> np.ndarray:
        if name not in self.location:
            raise CheckpointError(f"checkpoint is missing tensor {name!r}")
        return self.location[name].get(name)

    def close(self) -> None:
        for f in self.files:
            f.close()


def save_file(tensors: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]], path: str | os.PathLike,
              metadata: Mapping[str, str] | None = None) -> None:
    """Write tensors atomically (temporary file + rename)."""
    items = list(tensors.items() if isinstance(tensors, Mapping) else tensors)
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    arrays = []
    for name, array in items:
        array = np.ascontiguousarray(array)
        if array.dtype not in NAMES:
            raise CheckpointError(f"cannot write tensor {name!r} of dtype {array.dtype} to safetensors")
        header[name] = {"dtype": NAMES[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
        arrays.append(array)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for array in arrays:
            f.write(array.tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
