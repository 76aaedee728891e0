"""The allow-list unpickler behind `converters.torch_pickle` (PyTorch checkpoints without
torch and without running their code).

A checkpoint is a Python pickle, and unpickling normally calls whatever the pickle names.
Here the unpickler's `find_class` resolves names against an explicit allow-list: torch's
tensor-rebuild functions become `LazyTensor` builders, storage classes and dtypes become
plain descriptors, a few containers and numpy scalar/array rebuilders get safe stand-ins,
and configuration objects (argparse.Namespace, omegaconf, fairseq dataclasses, typing)
become `Inert` records that only hold data. Every other global is refused with a
`FormatError` before it is imported. Each pickle is first scanned opcode by opcode so that
length fields and memo indices cannot make the unpickler allocate more than the file holds.

Imports flow one way: `torch_pickle` (the dispatcher) -> `torch_zip` / `torch_legacy` (the
two container formats) -> this module (scanner, unpickler, storage dtypes) ->
`torch_objects` (what a pickle becomes: `LazyTensor`, `Inert`, `to_plain`, stand-ins).
"""
from __future__ import annotations

import _compat_pickle
import io
import pickle
import pickletools
import warnings
from collections import OrderedDict

import numpy as np

from refimpl.config import short
from refimpl.errors import FormatError

from .torch_objects import (MAX_NDIM, DTypeStub, Frozen, Inert, LazyTensor, PickledArray, StorageType,
                            TorchDType, make_tensor)

__all__ = ["scan_pickle", "unpickle", "storage_dtype", "check_data", "SafeUnpickler", "MAX_PICKLE_BYTES",
           "STORAGE_DTYPES", "TORCH_DTYPES"]


# torch storage class name -> (safetensors dtype name, little-endian numpy storage dtype).
STORAGE_DTYPES = {
    "FloatStorage": ("F32", "<f4"), "HalfStorage": ("F16", "<f2"), "BFloat16Storage": ("BF16", "<u2"),
    "DoubleStorage": ("F64", "<f8"), "LongStorage": ("I64", "<i8"), "IntStorage": ("I32", "<i4"),
    "ShortStorage": ("I16", "<i2"), "CharStorage": ("I8", "i1"), "ByteStorage": ("U8", "u1"),
    "BoolStorage": ("BOOL", "?"), "UntypedStorage": ("U8", "u1"),
}
# torch dtype attribute name -> storage class name of that dtype.
TORCH_DTYPES = {
    "float32": "FloatStorage", "float": "FloatStorage", "float16": "HalfStorage", "half": "HalfStorage",
    "bfloat16": "BFloat16Storage", "float64": "DoubleStorage", "double": "DoubleStorage",
    "int64": "LongStorage", "long": "LongStorage", "int32": "IntStorage", "int": "IntStorage",
    "int16": "ShortStorage", "short": "ShortStorage", "int8": "CharStorage", "uint8": "ByteStorage",
    "bool": "BoolStorage",
}
INERT_NAMES = {"argparse.Namespace", "pathlib.Path", "pathlib.PosixPath", "pathlib.WindowsPath",
               "pathlib.PurePath", "pathlib.PurePosixPath", "pathlib.PureWindowsPath"}
INERT_PREFIXES = ("omegaconf.", "fairseq.", "typing.")
MAX_PICKLE_BYTES = 1 << 30
MAX_TEXT_ARG = 1 << 24            # longest newline-terminated opcode argument (protocol-0 text)
_BUILTIN_TYPES = {"dict": dict, "list": list, "tuple": tuple, "set": set, "frozenset": frozenset,
                  "int": int, "float": float, "str": str, "bool": bool, "complex": complex}


# --------------------------------------------------------------------------- allow-listed callables


class _Call(Frozen):
    """An allow-listed function as find_class hands it out: callable, but not an attribute target."""

    __slots__ = ("fn",)

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


_NDARRAY = StorageType("numpy.ndarray")   # stands for numpy.ndarray as the first argument of _reconstruct


def _np_dtype(obj, align=False, copy=False):
    if not isinstance(obj, str) or len(obj) > 4:
        raise TypeError(f"unsupported numpy dtype {obj!r}")
    dt = np.dtype(obj)
    if dt.kind not in "biufc" or dt.fields is not None or dt.subdtype is not None:
        raise TypeError(f"unsupported numpy dtype {obj!r}")
    return DTypeStub(dt)


def _np_scalar(dtype, data=None):
    if isinstance(data, str):
        data = data.encode("latin-1")
    if not isinstance(dtype, DTypeStub) or not isinstance(data, bytes) or len(data) != dtype.dtype.itemsize:
        raise TypeError("unsupported numpy scalar")
    return np.frombuffer(data, dtype.dtype)[0]


def _np_reconstruct(subtype, shape, typecode):
    if subtype is not _NDARRAY:
        raise TypeError("numpy _reconstruct of something other than ndarray")
    return np.ndarray.__new__(PickledArray, (0,), np.int8)


def _codecs_encode(obj, encoding="utf-8", errors="strict"):
    if type(obj) is not str or encoding not in ("latin1", "latin-1"):
        raise TypeError("_codecs.encode is only allowed for latin1 text")
    return obj.encode("latin-1")


def _empty_bytes(*args):
    if args:
        raise TypeError("bytes(...) with arguments is not allowed")
    return b""


def _plain_defaultdict(*args):
    return {}


def _torch_size(dims=()):
    if not isinstance(dims, (tuple, list)) or len(dims) > MAX_NDIM or not all(type(d) is int for d in dims):
        raise TypeError("torch.Size of something other than integers")
    return tuple(dims)


def _torch_device(kind, index=None):
    if not isinstance(kind, str) or not (index is None or type(index) is int):
        raise TypeError("torch.device of something other than a name and index")
    return kind if index is None else f"{kind}:{index}"


# --------------------------------------------------------------------------- the unpickler


class _Window:
    """File-like view of [start, end) of a buffer for pickletools; readline is bounded."""

    def __init__(self, buf, start, end):
        self.buf, self.pos, self.end = buf, start, end

    def read(self, n=-1):
        stop = self.end if n < 0 else min(self.end, self.pos + n)
        data = bytes(self.buf[self.pos:stop])
        self.pos = stop
        return data

    def readline(self):
        i = self.buf.find(b"\n", self.pos, min(self.end, self.pos + MAX_TEXT_ARG))
        return self.read(min(self.end - self.pos, MAX_TEXT_ARG) if i < 0 else i + 1 - self.pos)

    def tell(self):
        return self.pos


def scan_pickle(label: str, buf, start: int = 0, end: int | None = None) -> int:
    """Walk one pickle's opcodes without executing it; return the offset just past its STOP.

    This bounds every length field by the bytes present and every memo index by the opcode
    count, so the real unpickler can neither allocate huge buffers nor a huge memo.
    """
    end = len(buf) if end is None else end
    end = min(end, start + MAX_PICKLE_BYTES)
    win = _Window(buf, start, end)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")     # pickletools warns on odd escapes in protocol-0 strings
            for count, (op, arg, pos) in enumerate(pickletools.genops(win)):
                if op.name in ("PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET"):
                    if type(arg) is not int or not 0 <= arg <= count:
                        raise ValueError(f"memo index {arg} out of range")
                elif op.name in ("EXT1", "EXT2", "EXT4", "PERSID", "NEXT_BUFFER", "READONLY_BUFFER"):
                    raise ValueError(f"unsupported opcode {op.name}")
    except (ValueError, OverflowError, UnicodeError, MemoryError) as e:
        raise FormatError(f"{label}: corrupted or truncated pickle at byte {win.pos} ({e})") from None
    return win.pos


class SafeUnpickler(pickle.Unpickler):
    """Unpickler whose globals come only from the allow-list; storages via `storage_loader`."""

    def __init__(self, data: bytes, label: str, storage_loader=None):
        super().__init__(io.BytesIO(data), encoding="utf-8")
        self.label, self.storage_loader = label, storage_loader
        self._inert: dict[str, type] = {}
        calls = {
            "collections.defaultdict": _plain_defaultdict, "builtins.bytes": _empty_bytes,
            "_codecs.encode": _codecs_encode,
            "torch._utils._rebuild_tensor": self._rebuild_tensor,
            "torch._utils._rebuild_tensor_v2": self._rebuild_tensor_v2,
            "torch._utils._rebuild_parameter": self._rebuild_parameter,
            "torch._utils._rebuild_parameter_with_state": self._rebuild_parameter,
            "torch.Size": _torch_size, "torch.device": _torch_device, "numpy.dtype": _np_dtype,
            "numpy._core.multiarray.scalar": _np_scalar, "numpy._core.multiarray._reconstruct": _np_reconstruct,
        }
        self.allowed = {k: _Call(v) for k, v in calls.items()}
        self.allowed.update({"collections.OrderedDict": OrderedDict, "numpy.ndarray": _NDARRAY})
        self.allowed.update({f"builtins.{k}": v for k, v in _BUILTIN_TYPES.items()})
        self.allowed.update({f"torch.{k}": TorchDType(k) for k in TORCH_DTYPES})

    def find_class(self, module, name):
        if type(module) is not str or type(name) is not str:
            self.refuse(f"{module}.{name}")
        # name what plain pickle would import: Python 2 names are mapped as its fix_imports does
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        module = {"numpy.core.multiarray": "numpy._core.multiarray"}.get(module, module)
        key = full = f"{module}.{name}"
        if key in self.allowed:
            return self.allowed[key]
        if module in ("torch", "torch.cuda", "torch.storage") and name.endswith("Storage"):
            if name in STORAGE_DTYPES:
                return StorageType(name)
            raise FormatError(f"{self.label}: unsupported tensor storage type '{full}'")
        if key in INERT_NAMES or key.startswith(INERT_PREFIXES):
            if key not in self._inert:
                self._inert[key] = type(name, (Inert,), {"__slots__": (), "_type_name": key})
            return self._inert[key]
        self.refuse(full)

    def refuse(self, full):
        raise FormatError(f"{self.label}: refused to load: checkpoint references forbidden global '{full}'")

    def persistent_load(self, pid):
        if self.storage_loader is None:
            raise FormatError(f"{self.label}: unexpected tensor storage reference in a metadata pickle")
        if not isinstance(pid, tuple) or not pid or pid[0] not in ("storage", b"storage"):
            raise FormatError(f"{self.label}: unsupported persistent id {short(pid, 80)} "
                              "(only tensor storages are supported; whole-module pickles are not)")
        return self.storage_loader(pid[1:])

    def _rebuild_tensor(self, storage, storage_offset, size, stride):
        return make_tensor(self.label, storage, storage_offset, size, stride)

    def _rebuild_tensor_v2(self, storage, storage_offset, size, stride, requires_grad,
                           backward_hooks, metadata=None):
        if type(requires_grad) is not bool:
            raise FormatError(f"{self.label}: tensor requires_grad is {type(requires_grad).__name__}, not bool")
        if metadata and (not isinstance(metadata, dict) or any(metadata.get(k) for k in ("neg", "conj"))):
            raise FormatError(f"{self.label}: unsupported tensor metadata {short(metadata, 80)}")
        return make_tensor(self.label, storage, storage_offset, size, stride)

    def _rebuild_parameter(self, data, requires_grad, backward_hooks, state=None):
        if not isinstance(data, LazyTensor) or type(requires_grad) is not bool:
            raise FormatError(f"{self.label}: malformed parameter of {type(data).__name__}")
        return data


def storage_dtype(label: str, storage_type, byteorder: str = "little"):
    """(safetensors name, numpy dtype) of a pickled storage type."""
    if isinstance(storage_type, TorchDType):
        storage_type = StorageType(TORCH_DTYPES[storage_type.name])
    if not isinstance(storage_type, StorageType):
        raise FormatError(f"{label}: storage reference has invalid type {type(storage_type).__name__}")
    name, np_name = STORAGE_DTYPES[storage_type.name]
    npdtype = np.dtype(np_name)
    if byteorder == "big" and npdtype.itemsize > 1:
        npdtype = npdtype.newbyteorder(">")
    return name, npdtype


_DATA_LEAVES = (type(None), bool, int, float, complex, str, bytes, LazyTensor, TorchDType, np.generic, PickledArray,
                DTypeStub)
_DATA_TYPES = tuple(_BUILTIN_TYPES.values()) + (OrderedDict,)


def check_data(label: str, obj) -> None:
    """Refuse a result that holds loader internals (a rebuild function, a bare storage...).

    Only a corrupted pickle leaves them in the output, e.g. one whose REDUCE became TUPLE2.
    """
    stack, seen = [obj], set()
    while stack:
        x = stack.pop()
        if id(x) in seen or isinstance(x, _DATA_LEAVES):
            continue
        seen.add(id(x))
        if isinstance(x, dict):
            stack.extend(x.keys())
            stack.extend(x.values())
        elif isinstance(x, (list, tuple, set, frozenset)):
            stack.extend(x)
        elif isinstance(x, Inert):
            stack.extend((x._args, x._kwargs, x._attrs, x._state))
        elif not (isinstance(x, type) and (issubclass(x, Inert) or x in _DATA_TYPES)):
            raise FormatError(f"{label}: corrupted checkpoint pickle (it leaves a bare "
                              f"{type(x).__name__} where data belongs)")


def unpickle(data: bytes, label: str, storage_loader=None):
    """Scan then unpickle one complete pickle with the allow-list; any failure is a FormatError."""
    scan_pickle(label, data)
    try:
        result = SafeUnpickler(data, label, storage_loader).load()
    except FormatError:
        raise
    except Exception as e:  # anything else a hostile or corrupt pickle provokes
        raise FormatError(f"{label}: corrupted checkpoint pickle ({type(e).__name__}: {e})"[:400]) from None
    check_data(label, result)
    return result
