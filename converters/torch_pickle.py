"""Read PyTorch checkpoints (.bin/.pt/.pth) without torch and without running their code.

`load_torch_file` is a small dispatcher: it looks at the first bytes and hands the file to
one of the two container readers, `converters/torch_zip.py` (torch >= 1.6 zip archives)
or `converters/torch_legacy.py` (the older magic-number stream). Both unpickle with the
allow-list unpickler of `converters/torch_unpickler.py`, which never imports or calls
anything a file names; the objects a pickle becomes (`LazyTensor`, `Inert`, `to_plain`)
are in `converters/torch_objects.py` and are re-exported here.

Tensor data stays on disk and is memory-mapped only when `LazyTensor.raw()` / `.numpy()`
is called; every tensor's offset, shape and strides are checked against its storage, and
every storage against the bytes present, before anything is mapped or allocated. Only
regular files are read (a FIFO or device is refused before it is opened for reading).
"""
from __future__ import annotations

import os

from refimpl.errors import FormatError
from refimpl.files import open_regular

from .torch_legacy import load_legacy
from .torch_objects import Inert, LazyTensor, Storage, to_plain
from .torch_unpickler import MAX_PICKLE_BYTES, scan_pickle, storage_dtype, unpickle
from .torch_zip import load_zip

__all__ = ["load_torch_file", "LazyTensor", "Inert", "to_plain", "Storage", "scan_pickle", "unpickle",
           "storage_dtype", "MAX_PICKLE_BYTES"]


def load_torch_file(path):
    """Load a PyTorch checkpoint (zip or legacy format) as plain data with LazyTensor leaves."""
    path = os.fspath(path)
    label = os.path.basename(path)
    try:
        with open_regular(path) as f:
            head = f.read(512)
    except FormatError as e:
        raise FormatError(f"{label}: {str(e)[len(path) + 2:] if str(e).startswith(path + ': ') else e}") from None
    except OSError as e:
        raise FormatError(f"{label}: cannot read ({e.strerror})") from None
    if not head:
        raise FormatError(f"{label}: empty file, not a PyTorch checkpoint")
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return load_zip(path, label)
    if len(head) >= 262 and head[257:262] == b"ustar":
        raise FormatError(f"{label}: PyTorch tar checkpoint (torch < 0.4) is not supported")
    return load_legacy(path, label)
