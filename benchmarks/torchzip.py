"""Write `torch.save`-format checkpoints one tensor at a time (bounded memory).

`torch.save(obj)` pickles `obj` with a persistent id per storage, then writes every
storage as an uncompressed, 64-byte aligned zip entry `data/<key>`. Here the same is done
with placeholders: `LazyTensor(shape, dtype, make)` pickles exactly as a contiguous torch
tensor would (`torch._utils._rebuild_tensor_v2(storage, 0, size, stride, False,
OrderedDict())`, storage id `('storage', torch.HalfStorage, key, 'cpu', numel)`), and its
data is produced by `make()` only when the writer reaches its record, so peak memory is
one tensor. The same LazyTensor object used twice (tied weights) is one storage, as in
torch. The records are written by torch's own zip writer (`torch._C.PyTorchFileWriter`),
so the container is byte-for-byte the layout torch.save produces.
"""
from __future__ import annotations

import collections
import io
import pickle
import sys

import numpy as np

STORAGE = {np.dtype(np.float16): "HalfStorage", np.dtype(np.float32): "FloatStorage",
           np.dtype(np.float64): "DoubleStorage", np.dtype(np.int64): "LongStorage"}


class _Storage:
    def __init__(self, key: str, dtype: np.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel


class LazyTensor:
    """A contiguous tensor whose values come from `make()` (a numpy array of `shape`, `dtype`)."""

    def __init__(self, shape, dtype, make):
        self.shape, self.dtype, self.make = tuple(int(s) for s in shape), np.dtype(dtype), make
        self.storage = None

    def __reduce__(self):
        import torch
        stride, acc = [], 1
        for s in reversed(self.shape):
            stride.append(acc)
            acc *= s
        return (torch._utils._rebuild_tensor_v2,
                (self.storage, 0, self.shape, tuple(reversed(stride)), False, collections.OrderedDict()))


def save(obj, path: str, progress=None) -> None:
    """torch.save(obj, path) for an object whose tensors are LazyTensors."""
    import torch
    storages: list[tuple[_Storage, LazyTensor]] = []
    seen: dict[int, _Storage] = {}

    def assign(x):
        if isinstance(x, LazyTensor):
            if id(x) not in seen:
                s = _Storage(str(len(seen)), x.dtype, int(np.prod(x.shape, dtype=np.int64)))
                seen[id(x)] = s
                storages.append((s, x))
            x.storage = seen[id(x)]
        elif isinstance(x, dict):
            for v in x.values():
                assign(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                assign(v)

    assign(obj)

    class Pickler(pickle.Pickler):
        def persistent_id(self, o):
            if isinstance(o, _Storage):
                return ("storage", getattr(torch, STORAGE[o.dtype]), o.key, "cpu", o.numel)
            return None

    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump(obj)
    w = torch._C.PyTorchFileWriter(path)
    data = buf.getvalue()
    w.write_record("data.pkl", data, len(data))
    w.write_record(".format_version", "1", 1)
    w.write_record(".storage_alignment", "64", 2)
    w.write_record("byteorder", sys.byteorder, len(sys.byteorder))
    for n, (s, t) in enumerate(storages):
        a = np.ascontiguousarray(t.make(), dtype=t.dtype)
        if a.shape != t.shape:
            raise ValueError(f"storage {s.key}: made shape {a.shape}, declared {t.shape}")
        w.write_record(f"data/{s.key}", torch.from_numpy(a.reshape(-1)).untyped_storage(), a.nbytes)
        del a
        if progress:
            progress(n + 1, len(storages))
    w.write_end_of_file()
