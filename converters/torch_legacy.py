"""The pre-1.6 PyTorch checkpoint stream (`torch.save(..., _use_new_zipfile_serialization=False)`).

Layout (torch/serialization.py `_legacy_save` / `_legacy_load`): five pickles back to back:
the magic number 0x1950a86a20f9469cfc6c, the protocol version 1001, a sys_info dict, the
object itself, whose tensors refer to storages by persistent id
`('storage', storage_type, key, location, numel, view_metadata)`, and the sorted list of
storage keys. Then, for each key in that order, an 8-byte little-endian element count
followed by the raw little-endian data. Old GPT-2 and fairseq checkpoints use this format.
"""
from __future__ import annotations

import mmap

from refimpl.config import short
from refimpl.errors import FormatError
from refimpl.files import open_regular

from .torch_objects import Storage
from .torch_unpickler import scan_pickle, storage_dtype, unpickle

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001


def load_legacy(path: str, label: str):
    try:
        with open_regular(path) as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except FormatError as e:
        raise FormatError(f"{label}: {e}") from None
    except (OSError, ValueError) as e:
        raise FormatError(f"{label}: cannot map file ({e})") from None
    try:
        return _load(mm, path, label)
    finally:
        mm.close()


def _load(mm, path: str, label: str):
    size = len(mm)
    pos = 0

    def next_pickle(storage_loader=None):
        nonlocal pos
        end = scan_pickle(label, mm, pos)
        obj = unpickle(mm[pos:end], label, storage_loader)
        pos = end
        return obj

    try:
        magic = next_pickle()
    except FormatError:
        magic = None
    if type(magic) is not int or magic != MAGIC_NUMBER:
        raise FormatError(f"{label}: not a PyTorch checkpoint (neither a zip archive nor the legacy "
                          "format's magic number)")
    if next_pickle() != PROTOCOL_VERSION:
        raise FormatError(f"{label}: unsupported legacy checkpoint protocol version")
    if not isinstance(next_pickle(), dict):
        raise FormatError(f"{label}: legacy checkpoint has a malformed sys_info record")

    roots: dict = {}

    def load_storage(pid):
        if len(pid) != 5:
            raise FormatError(f"{label}: storage reference has {len(pid)} fields, expected 5")
        storage_type, key, _location, numel, view = pid
        if type(key) not in (str, int) or type(numel) is not int or numel < 0:
            raise FormatError(f"{label}: malformed storage reference {short(pid, 80)}")
        dtype, npdtype = storage_dtype(label, storage_type)
        if numel * npdtype.itemsize > size:
            raise FormatError(f"{label}: storage {key!r} of {numel} x {dtype} is larger than the file ({size} bytes)")
        root = roots.get(key)
        if root is None:
            root = roots[key] = Storage(path, key, dtype, npdtype, numel)
        elif root.npdtype != npdtype or root.numel != numel:
            raise FormatError(f"{label}: storage {key!r} is referenced with two different types or sizes")
        if view is None:
            return root
        if not (isinstance(view, tuple) and len(view) == 3 and all(type(v) is int and v >= 0 for v in view[1:])):
            raise FormatError(f"{label}: malformed storage view {short(view, 80)}")
        _view_key, start, numel_view = view
        if start + numel_view > root.numel:
            raise FormatError(f"{label}: storage view [{start}, {start + numel_view}) exceeds storage {key!r} "
                              f"of {root.numel} elements")
        return Storage(path, key, dtype, npdtype, numel_view, base=root, start=start)

    result = next_pickle(load_storage)
    keys = next_pickle()
    if not isinstance(keys, list) or not all(type(k) in (str, int) for k in keys) \
            or len(set(keys)) != len(keys) or not set(keys) <= set(roots):
        raise FormatError(f"{label}: legacy checkpoint's storage key list does not match its tensors")
    missing = set(roots) - set(keys)
    if missing:
        raise FormatError(f"{label}: missing storage record for key {sorted(map(str, missing))[0]!r}")
    for key in keys:
        root = roots[key]
        if pos + 8 > size:
            raise FormatError(f"{label}: truncated before storage {key!r} (byte {pos} of {size})")
        count = int.from_bytes(mm[pos:pos + 8], "little", signed=True)
        if count != root.numel:
            raise FormatError(f"{label}: storage {key!r} holds {count} elements, but the checkpoint "
                              f"declares {root.numel}")
        root.offset = pos + 8
        pos = root.offset + count * root.npdtype.itemsize
        if pos > size:
            raise FormatError(f"{label}: storage {key!r} extends past the end of the file "
                              f"(byte {pos} of {size}); truncated file?")
    return result
