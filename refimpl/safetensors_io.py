"""Safetensors, read by memory map and written tensor by tensor.

The file format (https://huggingface.co/docs/safetensors): an 8-byte little-endian
header length N, N bytes of JSON `{name: {"dtype", "shape", "data_offsets": [a, b]}}`
(plus an optional `__metadata__` of strings), then the raw little-endian data; offsets
are relative to the end of the header.

Reading maps the data with `np.memmap`, so nothing is copied until a tensor is used.
Writing takes an iterator of tensors and streams them, so a converter's peak memory is
one tensor. Both validate every header field against the file size first.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Iterable, Iterator

import numpy as np

from .errors import FormatError

# safetensors dtype -> numpy storage dtype. BF16 is kept as raw uint16 bits.
DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
NUMPY_TO_ST = {np.dtype("<f8"): "F64", np.dtype("<f4"): "F32", np.dtype("<f2"): "F16",
               np.dtype("<i8"): "I64", np.dtype("<i4"): "I32", np.dtype("<i2"): "I16",
               np.dtype("i1"): "I8", np.dtype("u1"): "U8", np.dtype("?"): "BOOL"}
MAX_HEADER = 100 * 1024 * 1024


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """Widen raw bfloat16 bits (uint16) to float32 exactly: they are its top 16 bits."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


class StoredTensor:
    """A tensor in a file: its stored dtype name, shape and a lazy memory map."""

    __slots__ = ("path", "dtype", "shape", "offset", "nbytes")

    def __init__(self, path: str, dtype: str, shape: tuple, offset: int, nbytes: int):
        self.path, self.dtype, self.shape, self.offset, self.nbytes = path, dtype, shape, offset, nbytes

    def raw(self) -> np.ndarray:
        """The stored values as a read-only memory map (bf16 as uint16 bits)."""
        if self.nbytes == 0:
            return np.zeros(self.shape, DTYPES[self.dtype])
        return np.memmap(self.path, dtype=DTYPES[self.dtype], mode="r",
                         offset=self.offset, shape=self.shape)

    def numpy(self, dtype=None) -> np.ndarray:
        """The values as floating point: bf16 widened exactly, then cast to `dtype` if given."""
        a = self.raw()
        if self.dtype == "BF16":
            a = bf16_to_f32(a)
        return a if dtype is None else np.asarray(a, dtype=dtype)


def read_header(path: str) -> tuple[dict[str, StoredTensor], dict]:
    """Parse and validate a safetensors header; return ({name: StoredTensor}, metadata)."""
    name = os.path.basename(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise FormatError(f"{name}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise FormatError(f"{name}: safetensors header length {n} exceeds the file size {size}")
            raw = f.read(n)
    except OSError as e:
        raise FormatError(f"{name}: cannot read ({e.strerror})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{name}: safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise FormatError(f"{name}: safetensors header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise FormatError(f"{name}: safetensors __metadata__ is not an object")
    data_start, data_len = 8 + n, size - 8 - n
    tensors = {}
    for key, info in header.items():
        try:
            dtype, shape, (a, b) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise FormatError(f"{name}: tensor {key!r} has a malformed header entry") from None
        if dtype not in DTYPES:
            raise FormatError(f"{name}: tensor {key!r} has unsupported dtype {dtype!r}")
        if not all(isinstance(s, int) and s >= 0 for s in shape) or not (
                isinstance(a, int) and isinstance(b, int) and 0 <= a <= b <= data_len):
            raise FormatError(f"{name}: tensor {key!r} has offsets or shape outside the file")
        count = 1
        for s in shape:
            count *= s
        if count * DTYPES[dtype].itemsize != b - a:
            raise FormatError(f"{name}: tensor {key!r} shape {list(shape)} does not match its "
                              f"{b - a} bytes")
        tensors[key] = StoredTensor(path, dtype, shape, data_start + a, b - a)
    return tensors, meta


def _st_dtype(a: np.ndarray, bf16: bool) -> str:
    if bf16:
        return "BF16"
    try:
        return NUMPY_TO_ST[a.dtype.newbyteorder("<") if a.dtype.byteorder == ">" else a.dtype]
    except KeyError:
        raise ValueError(f"cannot store dtype {a.dtype} in safetensors") from None


def write_safetensors(path: str, specs: list[tuple[str, tuple, str]],
                      tensors: Iterable[tuple[str, np.ndarray]], metadata: dict | None = None) -> None:
    """Stream tensors into `path`.

    `specs` lists (name, shape, safetensors dtype) in writing order, so the header can be
    written first; `tensors` then yields (name, array) in the same order, one at a time.
    Arrays whose spec says BF16 must be raw uint16 bits.
    """
    header, offset = {}, 0
    for name, shape, dtype in specs:
        nbytes = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype].itemsize
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)                      # align data to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for (name, shape, dtype), (tname, arr) in zip(specs, tensors, strict=True):
            if tname != name or tuple(arr.shape) != tuple(shape):
                raise ValueError(f"tensor {tname} {arr.shape} does not match its spec {name} {shape}")
            arr = np.ascontiguousarray(arr, dtype=DTYPES[dtype])
            f.write(memoryview(arr.reshape(-1)).cast("B") if arr.size else b"")


def spec_of(name: str, arr: np.ndarray, bf16: bool = False) -> tuple[str, tuple, str]:
    """The (name, shape, dtype) spec of an array for `write_safetensors`."""
    return name, tuple(arr.shape), _st_dtype(arr, bf16)


def iter_pairs(names: list[str], get) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (name, get(name)) lazily: the writer pulls one tensor at a time."""
    for n in names:
        yield n, get(n)
