"""The objects a torch checkpoint unpickles into: data only, nothing that runs code.

`Storage` locates a flat run of elements in the file; `LazyTensor` is a tensor (dtype,
shape, strides into a Storage) whose bytes are memory-mapped only when `raw()` / `numpy()`
is called, and `make_tensor` checks a tensor's placement in its storage before one is
built. `Inert` stands for a configuration object the checkpoint names (argparse.Namespace,
omegaconf, fairseq dataclasses, typing, pathlib): it records constructor arguments and
state but is never constructed, and `to_plain` turns such records into plain dicts, lists
and values. `TorchDType` / `StorageType` describe torch dtypes and storage classes, and
`DTypeStub` / `PickledArray` stand in for numpy dtypes and arrays; none of them accepts
arbitrary pickle state.

Which pickled names map to these objects is decided by the allow-list unpickler in
`converters/torch_unpickler.py`.
"""
from __future__ import annotations

import math
import os
import pathlib

import numpy as np

from refimpl.config import short
from refimpl.errors import FormatError
from refimpl.safetensors_io import bf16_to_f32

MAX_NDIM = 64
MAX_EXPANDED_BYTES = 1 << 30      # a stride-0 view may materialise to more than its storage, up to this


# --------------------------------------------------------------------------- storages, tensors


class Storage:
    """A flat run of elements in a file: `numel` elements of one dtype at byte `offset`.

    A view storage (legacy format only) has `base` set and starts `start` elements into it.
    `offset` is None until the container has located the data (legacy: after the pickle).
    """

    __slots__ = ("path", "key", "dtype", "npdtype", "numel", "offset", "base", "start")

    def __init__(self, path, key, dtype, npdtype, numel, offset=None, base=None, start=0):
        self.path, self.key, self.dtype, self.npdtype = path, key, dtype, npdtype
        self.numel, self.offset, self.base, self.start = numel, offset, base, start

    def __setstate__(self, state):
        raise TypeError("a storage cannot be given state")

    def map(self, first: int, count: int) -> np.ndarray:
        """Elements [first, first + count) of this storage as a read-only memory map."""
        root, first = self, first
        while root.base is not None:
            root, first = root.base, first + root.start
        label = os.path.basename(root.path)
        if root.offset is None:
            raise FormatError(f"{label}: missing storage record for key {root.key!r}")
        start = root.offset + first * root.npdtype.itemsize
        end = start + count * root.npdtype.itemsize
        try:
            size = os.path.getsize(root.path)
        except OSError as e:
            raise FormatError(f"{label}: cannot read ({e.strerror})") from None
        if end > size:
            raise FormatError(f"{label}: storage {root.key!r} extends past the end of the file "
                              f"(byte {end} of {size}); was the file truncated after loading?")
        return np.memmap(root.path, dtype=root.npdtype, mode="r", offset=start, shape=(count,))


class LazyTensor:
    """A tensor stored in a checkpoint: dtype name, shape and strides into a Storage; no data read yet."""

    __slots__ = ("_storage", "_offset", "shape", "_stride", "dtype")

    def __init__(self, storage: Storage, offset: int, shape: tuple, stride: tuple):
        self._storage, self._offset, self.shape, self._stride = storage, offset, shape, stride
        self.dtype = storage.dtype

    def __setstate__(self, state):
        raise TypeError("a tensor cannot be given state")

    @property
    def stride(self) -> tuple:
        return self._stride

    @property
    def storage_offset(self) -> int:
        return self._offset

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self._storage.npdtype.itemsize

    def _contiguous(self) -> bool:
        expect = 1
        for n, s in zip(reversed(self.shape), reversed(self._stride)):
            if n != 1 and s != expect:
                return False
            expect *= n
        return True

    def raw(self) -> np.ndarray:
        """The stored bits (BF16 as uint16): a read-only memory map when contiguous, else a copy."""
        npdtype = self._storage.npdtype
        little = npdtype.newbyteorder("<") if npdtype.byteorder == ">" else npdtype
        if self.numel == 0:
            return np.zeros(self.shape, little)
        if self._contiguous():
            a = self._storage.map(self._offset, self.numel).reshape(self.shape)
        else:
            extent = sum((n - 1) * s for n, s in zip(self.shape, self._stride)) + 1
            base = self._storage.map(self._offset, extent)
            item = npdtype.itemsize
            a = np.lib.stride_tricks.as_strided(base, self.shape, [s * item for s in self._stride],
                                                writeable=False)
            a = np.ascontiguousarray(a)
        return a.astype(little) if little is not npdtype else a

    def numpy(self) -> np.ndarray:
        """A copy of the values; BF16 widened exactly to float32, BOOL normalised to 0/1."""
        a = self.raw()
        if self.dtype == "BF16":
            return bf16_to_f32(a)
        if self.dtype == "BOOL":
            return a.view(np.uint8) != 0
        return np.array(a)

    def __array__(self, dtype=None, copy=None):
        a = self.numpy()
        return a if dtype is None else a.astype(dtype)

    def __repr__(self):
        return f"LazyTensor(dtype={self.dtype}, shape={self.shape})"


def make_tensor(label: str, storage, offset, size, stride) -> LazyTensor:
    """Validate a tensor's placement in its storage before anything is mapped or allocated."""
    if not isinstance(storage, Storage):
        raise FormatError(f"{label}: tensor built from {type(storage).__name__}, not a storage")
    size, stride = _int_tuple(label, "size", size), _int_tuple(label, "stride", stride)
    if type(offset) is not int or offset < 0:
        raise FormatError(f"{label}: tensor has invalid storage offset {short(offset, 40)}")
    if len(size) != len(stride) or len(size) > MAX_NDIM:
        raise FormatError(f"{label}: tensor has {len(size)} sizes and {len(stride)} strides")
    numel = math.prod(size)
    extent = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1 if numel else offset
    if extent > storage.numel:
        raise FormatError(f"{label}: tensor of shape {short(size, 80)} (offset {offset}, stride {short(stride, 80)}) "
                          f"reaches element {extent} of a storage of {storage.numel} elements")
    if numel > storage.numel and numel * storage.npdtype.itemsize > MAX_EXPANDED_BYTES:
        raise FormatError(f"{label}: broadcast tensor of shape {short(size, 80)} would need "
                          f"{numel * storage.npdtype.itemsize} bytes")
    return LazyTensor(storage, offset, size, stride)


def _int_tuple(label, what, value) -> tuple:
    if not isinstance(value, (tuple, list)) or not all(type(v) is int and v >= 0 for v in value):
        raise FormatError(f"{label}: tensor {what} {short(value, 80)} is not a tuple of non-negative integers")
    return tuple(value)


# --------------------------------------------------------------------------- inert stand-ins


class Inert:
    """An object the checkpoint describes but that is never constructed: just its data.

    `obj.name`, `obj["name"]` and `obj.get("name")` look up its attributes (for an omegaconf
    DictConfig, its content, with nodes unwrapped to their values); `to_dict()` is `to_plain`.
    The pickled class name is `obj._type_name`, constructor arguments `obj._args`.
    """

    __slots__ = ("_args", "_kwargs", "_attrs", "_state")
    _type_name = "Inert"

    def __new__(cls, *args, **kwargs):
        self = object.__new__(cls)
        self._args, self._kwargs, self._attrs, self._state = args, kwargs, {}, None
        return self

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2 and all(s is None or isinstance(s, dict) for s in state):
            for part in state:
                self._attrs.update(part or {})
        elif isinstance(state, dict):
            self._attrs.update(state)
        else:
            self._state = state

    def __setitem__(self, key, value):
        self._attrs[key] = value

    def _lookup(self, key):
        if key in self._attrs:
            return self._attrs[key]
        content = self._attrs.get("_content")
        if isinstance(content, (dict, list)):
            v = content[key]
            return v._attrs["_val"] if isinstance(v, Inert) and "_val" in v._attrs else v
        raise KeyError(key)

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            return self._lookup(name)
        except (KeyError, IndexError, TypeError):
            raise AttributeError(f"{self._type_name} has no attribute {name!r}") from None

    def __getitem__(self, key):
        return self._lookup(key)

    def __contains__(self, key):
        try:
            self._lookup(key)
            return True
        except (KeyError, IndexError, TypeError):
            return False

    def get(self, key, default=None):
        try:
            return self._lookup(key)
        except (KeyError, IndexError, TypeError):
            return default

    def to_dict(self):
        return to_plain(self)

    def __repr__(self):
        keys = ", ".join(map(str, self._attrs)) or ", ".join(map(repr, self._args))
        return f"<Inert {self._type_name}: {keys}>"


MAX_PLAIN_DEPTH = 200             # nesting of a checkpoint's configuration objects
MAX_PLAIN_NODES = 1 << 20         # distinct containers in it


def to_plain(x):
    """Recursively replace Inert objects (Namespace, DictConfig, ListConfig, enums, paths) by plain data.

    Linear in the pickle: a shared object is converted once (memoised by identity) and the
    result is shared too, so `x = [x, x]` forty levels deep costs forty steps, not 2^40.
    Depth and the number of distinct containers are capped; a cycle is refused."""
    try:
        return _plain(x, {}, set(), 0)
    except RecursionError:
        raise FormatError("checkpoint object is nested too deeply to convert to plain data") from None


def _plain(x, memo: dict, active: set, depth: int):
    if isinstance(x, type) and issubclass(x, Inert):
        return x._type_name
    if isinstance(x, PickledArray):
        return np.asarray(x).view(np.ndarray)
    if isinstance(x, DTypeStub):
        return x.dtype
    if not isinstance(x, (Inert, dict, list, tuple, set, frozenset)):
        return x
    key = id(x)
    if key in memo:
        return memo[key][1]
    if key in active:
        raise FormatError("checkpoint object graph is cyclic; cannot convert it to plain data")
    if depth > MAX_PLAIN_DEPTH:
        raise FormatError(f"checkpoint object is nested too deeply (more than {MAX_PLAIN_DEPTH} levels); refused")
    if len(memo) >= MAX_PLAIN_NODES:
        raise FormatError(f"checkpoint object has more than {MAX_PLAIN_NODES} containers; refused")
    active.add(key)
    try:
        out = _plain_one(x, memo, active, depth + 1)
    finally:
        active.discard(key)
    memo[key] = (x, out)              # x kept alive so its id cannot be reused during the walk
    return out


def _plain_one(x, memo, active, depth):
    def rec(v):
        return _plain(v, memo, active, depth)
    if isinstance(x, dict):
        return {k: rec(v) for k, v in x.items()}
    if isinstance(x, list):
        return [rec(v) for v in x]
    if isinstance(x, (tuple, set, frozenset)):
        return type(x)(rec(v) for v in x)
    attrs, args = x._attrs, x._args
    if x._type_name.startswith("pathlib.") and all(isinstance(a, str) for a in args):
        pure = pathlib.PureWindowsPath if "Windows" in x._type_name else pathlib.PurePosixPath
        return str(pure(*args))
    if "_content" in attrs:             # omegaconf DictConfig / ListConfig
        return rec(attrs["_content"])
    if "_val" in attrs:                 # omegaconf value node
        return rec(attrs["_val"])
    if attrs:                           # Namespace, dataclass-like objects
        return {k: rec(v) for k, v in attrs.items() if k != "_parent"}
    if x._state is not None:
        return rec(x._state)
    if len(args) == 1:                  # enum member: its value
        return rec(args[0])
    return [rec(a) for a in args] if args else x._type_name


# --------------------------------------------------------------------------- descriptors, numpy stand-ins


class Frozen:
    """Base of the loader's own descriptors: a pickle's BUILD cannot give them state."""

    __slots__ = ()

    def __setstate__(self, state):
        raise TypeError(f"{type(self).__name__} cannot be given state")


class TorchDType(Frozen):
    """A torch dtype named in a pickle (e.g. a config's torch_dtype); `name` like 'float32'."""

    __slots__ = ("name",)

    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return f"torch.{self.name}"


class StorageType(Frozen):
    """A torch storage class named in a pickle, e.g. torch.FloatStorage."""

    __slots__ = ("name",)

    def __init__(self, name):
        self.name = name


class DTypeStub:
    """numpy.dtype(name, align, copy) from a pickle; its BUILD state may only set the byte order."""

    def __init__(self, dtype: np.dtype):
        self.dtype = dtype

    def __setstate__(self, state):
        if not (isinstance(state, tuple) and len(state) in (8, 9) and state[0] in (3, 4)
                and state[1] in ("<", ">", "|", "=") and state[2:5] == (None, None, None)):
            raise TypeError("unsupported numpy dtype state")
        if state[1] in "<>":
            self.dtype = self.dtype.newbyteorder(state[1])


class PickledArray(np.ndarray):
    """An ndarray rebuilt from numpy's pickle; only plain numeric data is accepted."""

    def __setstate__(self, state):
        if not (isinstance(state, tuple) and len(state) == 5 and isinstance(state[2], DTypeStub)):
            raise TypeError("unsupported numpy array state")
        _, shape, dt, fortran, data = state
        dtype = dt.dtype
        if isinstance(data, str):
            data = data.encode("latin-1")
        if (not isinstance(shape, tuple) or len(shape) > 32
                or not all(type(n) is int and n >= 0 for n in shape) or not isinstance(data, bytes)
                or len(data) != math.prod(shape) * dtype.itemsize):
            raise TypeError("numpy array state does not match its data")
        np.ndarray.__setstate__(self, (1, shape, dtype, bool(fortran), data))

