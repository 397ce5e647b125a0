"""Safetensors files at the byte level: a strict header parser, zero-copy memory-mapped tensor views and a writer.

Why our own: the `safetensors` numpy backend cannot represent float8 (E4M3 / E8M0) arrays, and its errors do not
say which tensor of which file is broken. The format is small (https://github.com/huggingface/safetensors):

    [u64 little-endian N][N bytes of JSON header, space-padded][data buffer]
    header = {name: {"dtype": "BF16", "shape": [..], "data_offsets": [begin, end]}, "__metadata__": {str: str}}

Offsets are relative to the data buffer; tensors tile it exactly (no holes, no overlaps). We check all of that, and
that the file is long enough for every tensor, so a truncated or corrupt shard is reported with the first tensor it
breaks before anything reads garbage.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

# safetensors dtype string <-> numpy dtype. F8_E8M0 is stored as raw exponent bytes (ml_dtypes' float8_e8m0fnu has
# the same bit layout; we expose uint8 so callers can use it as 2**(byte - 127) without ml_dtypes' NaN=0xFF rule).
DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "U16": np.dtype(np.uint16),
    "I16": np.dtype(np.int16),
    "U32": np.dtype(np.uint32),
    "I32": np.dtype(np.int32),
    "U64": np.dtype(np.uint64),
    "I64": np.dtype(np.int64),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "F8_E8M0": np.dtype(np.uint8),
}
_NAME_OF = {v: k for k, v in DTYPES.items() if k != "F8_E8M0"}
_NAME_OF[np.dtype(ml_dtypes.float8_e8m0fnu)] = "F8_E8M0"

_MAX_HEADER = 100 * 1024 * 1024   # the reference implementation's limit


class SafetensorsError(ValueError):
    """A safetensors file is truncated or corrupt; the message names the file (and tensor)."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str                 # safetensors dtype string, e.g. "BF16", "F8_E4M3"
    shape: tuple[int, ...]
    begin: int                 # absolute byte offset of the data in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class Header:
    path: Path
    tensors: dict[str, TensorInfo]   # in file (data offset) order
    metadata: dict[str, str]
    data_start: int


def dtype_name(dt) -> str:
    dt = np.dtype(dt)
    try:
        return _NAME_OF[dt]
    except KeyError:
        raise SafetensorsError(f"dtype {dt} has no safetensors equivalent") from None


def read_header(path: str | os.PathLike) -> Header:
    """Parse and fully validate a safetensors header against the file's size."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SafetensorsError(f"{path}: truncated or empty file ({size} bytes): no safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise SafetensorsError(
                    f"{path}: corrupt or truncated safetensors file: header claims {n} bytes, file has {size}")
            raw = f.read(n)
    except OSError as e:
        raise SafetensorsError(f"{path}: cannot read ({e})") from e
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SafetensorsError(f"{path}: corrupt safetensors header (not valid JSON: {e})") from e
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_start = 8 + n
    data_len = size - data_start
    metadata = header.pop("__metadata__", None) or {}
    entries = []
    for name, e in header.items():
        try:
            dt, shape, (b, en) = e["dtype"], tuple(int(s) for s in e["shape"]), e["data_offsets"]
            b, en = int(b), int(en)
        except (KeyError, TypeError, ValueError) as err:
            raise SafetensorsError(f"{path}: tensor {name!r}: malformed header entry {e!r} ({err})") from None
        if dt not in DTYPES:
            raise SafetensorsError(f"{path}: tensor {name!r}: unsupported dtype {dt!r}")
        if any(s < 0 for s in shape) or b < 0 or en < b:
            raise SafetensorsError(f"{path}: tensor {name!r}: invalid shape {shape} or offsets [{b}, {en}]")
        want = int(np.prod(shape, dtype=np.int64)) * DTYPES[dt].itemsize
        if en - b != want:
            raise SafetensorsError(f"{path}: tensor {name!r}: {dt}{list(shape)} needs {want} bytes but its "
                                   f"data_offsets span {en - b}")
        entries.append(TensorInfo(name, dt, shape, data_start + b, data_start + en))
    entries.sort(key=lambda t: (t.begin, t.end))
    pos = data_start
    for t in entries:
        if t.begin != pos:
            what = "overlaps the previous tensor" if t.begin < pos else "leaves a hole before it"
            raise SafetensorsError(f"{path}: corrupt safetensors header: tensor {t.name!r} {what}")
        if t.end > size:
            raise SafetensorsError(f"{path}: truncated file: tensor {t.name!r} needs bytes up to {t.end - data_start}"
                                   f" of the data section, the file has {data_len}")
        pos = t.end
    if pos != size:
        raise SafetensorsError(f"{path}: corrupt safetensors file: {size - pos} trailing bytes after the last tensor")
    return Header(path, {t.name: t for t in entries}, dict(metadata), data_start)


class MappedFile:
    """One shard, memory-mapped read-only; `array(name)` is a zero-copy view (pages load on first touch)."""

    def __init__(self, header: Header):
        self.header = header
        self._mm = np.memmap(header.path, dtype=np.uint8, mode="r") if header.tensors else None

    def array(self, name: str) -> np.ndarray:
        t = self.header.tensors[name]
        if t.nbytes == 0:
            return np.zeros(t.shape, DTYPES[t.dtype])
        return self._mm[t.begin:t.end].view(DTYPES[t.dtype]).reshape(t.shape)


def _pad8(b: bytes) -> bytes:
    return b + b" " * (-len(b) % 8)


def write_file(path: str | os.PathLike, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> int:
    """Write `tensors` (name -> numpy array of a supported dtype) as one safetensors file; returns bytes written.

    Tensors are laid out in name order. The file is fsync'ed: callers rename it into place for atomicity.
    """
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    pos = 0
    names = sorted(tensors)
    arrays = []
    for name in names:
        a = np.asarray(tensors[name])
        if not a.flags.c_contiguous:       # (np.ascontiguousarray would turn a 0-d scalar into shape [1])
            a = a.copy(order="C")
        header[name] = {"dtype": dtype_name(a.dtype), "shape": list(a.shape), "data_offsets": [pos, pos + a.nbytes]}
        pos += a.nbytes
        arrays.append(a)
    hb = _pad8(json.dumps(header, separators=(",", ":")).encode("utf-8"))
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for a in arrays:
            f.write(memoryview(a.reshape(-1).view(np.uint8)))
        f.flush()
        os.fsync(f.fileno())
    return 8 + len(hb) + pos
