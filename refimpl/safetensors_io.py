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
from .files import open_regular

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
CAST_THREADS = max(1, min(4, os.cpu_count() or 1))


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

    def take(self, index, dtype) -> np.ndarray:
        """A copy of the stored values at `index` (rows, columns, ...) in `dtype`, reading only
        those values (bf16 widened exactly)."""
        a = self.raw()[index]
        if self.dtype == "BF16":
            a = bf16_to_f32(a)
        return np.array(a, dtype=dtype)

    def cast_into(self, out: np.ndarray) -> np.ndarray:
        """Widen the stored values into `out` (same shape, float32/float64): exact, in row blocks
        on up to CAST_THREADS threads (NumPy's casts release the GIL), so a large fp16/bf16
        tensor converts at memory speed and `out` can be a reused buffer."""
        src = self.raw()
        rows = src.reshape(src.shape[0], -1) if src.ndim else src.reshape(1, 1)
        dst = out.reshape(rows.shape)
        step = max(1, -(-rows.shape[0] // CAST_THREADS))

        def part(a: int) -> None:
            block = rows[a:a + step]
            dst[a:a + step] = bf16_to_f32(block) if self.dtype == "BF16" else block
        starts = range(0, rows.shape[0], step)
        if self.nbytes < (8 << 20) or len(starts) == 1:
            for a in starts:
                part(a)
        else:
            list(_cast_pool().map(part, starts))
        return out


_CAST_POOL = None


def _cast_pool():
    """The threads of cast_into, started once per process (not per tensor)."""
    global _CAST_POOL
    if _CAST_POOL is None:
        from concurrent.futures import ThreadPoolExecutor
        _CAST_POOL = ThreadPoolExecutor(CAST_THREADS, thread_name_prefix="refimpl-cast")
    return _CAST_POOL


def _no_duplicates(pairs):
    d = {}
    for k, v in pairs:
        if k in d:
            raise FormatError(f"duplicate key {k!r}")
        d[k] = v
    return d


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def read_header(path: str) -> tuple[dict[str, StoredTensor], dict]:
    """Parse and validate a safetensors header; return ({name: StoredTensor}, metadata).

    Accepts only what the reference `safetensors` library accepts (no duplicate names, no
    overlapping tensors, no holes, no trailing bytes, string metadata), so two readers can
    never disagree about a file's contents; nothing is allocated from header values.
    """
    name = os.path.basename(path)
    try:
        with open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise FormatError(f"{name}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER:
                raise FormatError(f"{name}: safetensors header length {n} is absurd (limit {MAX_HEADER})")
            if 8 + n > size:
                raise FormatError(f"{name}: safetensors header length {n} exceeds the file size {size}")
            raw = f.read(n)
    except OSError as e:
        raise FormatError(f"{name}: cannot read ({e.strerror or e})") from None
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except FormatError as e:
        raise FormatError(f"{name}: safetensors header has a {e}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise FormatError(f"{name}: safetensors header is not valid JSON ({msg})") from None
    if not isinstance(header, dict):
        raise FormatError(f"{name}: safetensors header is not a JSON object")
    meta = header.pop("__metadata__", None)
    meta = {} if meta is None else meta
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise FormatError(f"{name}: safetensors __metadata__ is not an object of strings")
    data_start, data_len = 8 + n, size - 8 - n
    tensors, spans = {}, []
    for key, info in header.items():
        try:
            dtype, shape, (a, b) = info["dtype"], info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise FormatError(f"{name}: tensor {key!r} has a malformed header entry") from None
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise FormatError(f"{name}: tensor {key!r} has unsupported dtype {dtype!r}")
        if not isinstance(shape, list) or len(shape) > 32 or not all(_is_int(s) and s >= 0 for s in shape) \
                or not (_is_int(a) and _is_int(b) and 0 <= a <= b <= data_len):
            raise FormatError(f"{name}: tensor {key!r} has offsets or shape outside the file")
        count = nonzero = 1
        for s in shape:
            count *= s
            nonzero *= max(s, 1)
        if nonzero * DTYPES[dtype].itemsize >= 1 << 62:     # numpy refuses such shapes, even empty
            raise FormatError(f"{name}: tensor {key!r} has an absurd shape {shape}")
        if count * DTYPES[dtype].itemsize != b - a:
            raise FormatError(f"{name}: tensor {key!r} shape {list(shape)} does not match its "
                              f"{b - a} bytes")
        tensors[key] = StoredTensor(path, dtype, tuple(shape), data_start + a, b - a)
        spans.append((a, b, key))
    end = 0
    for a, b, key in sorted(spans):
        if a != end:
            raise FormatError(f"{name}: tensor {key!r} {'overlaps another' if a < end else 'leaves a gap before it'}")
        end = b
    if end != data_len:
        raise FormatError(f"{name}: {data_len - end} bytes after the last tensor (truncated header or trailing data)")
    return tensors, meta


def _st_dtype(a: np.ndarray, bf16: bool) -> str:
    if bf16:
        return "BF16"
    try:
        return NUMPY_TO_ST[a.dtype.newbyteorder("<") if a.dtype.byteorder == ">" else a.dtype]
    except KeyError:
        raise ValueError(f"cannot store dtype {a.dtype} in safetensors") from None


def write_safetensors(path, specs: list[tuple[str, tuple, str]],
                      tensors: Iterable[tuple[str, np.ndarray]], metadata: dict | None = None) -> None:
    """Stream tensors into `path` (a file name, or a binary file object with `write`).

    `specs` lists (name, shape, safetensors dtype) in writing order, so the header can be
    written first; `tensors` then yields (name, array) in the same order, one at a time.
    Arrays whose spec says BF16 must be raw uint16 bits.
    """
    if hasattr(path, "write"):
        return _write_safetensors(path, specs, tensors, metadata)
    with open(path, "wb") as f:
        _write_safetensors(f, specs, tensors, metadata)


def _write_safetensors(f, specs, tensors, metadata) -> None:
    header, offset = {}, 0
    for name, shape, dtype in specs:
        nbytes = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype].itemsize
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)                      # align data to 8 bytes
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
