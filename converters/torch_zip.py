"""The zip container of torch >= 1.6 checkpoints (`torch.save` default).

Layout (torch/serialization.py `_save`, caffe2/serialize/inline_container.cc): every entry
sits under one top folder whose name varies (`archive/`, or the file's stem). `data.pkl` is
the pickle; each tensor storage is the raw little- or big-endian entry `data/<key>` (order
given by `byteorder`, default little); `version` (or `.data/version`) holds the format
version. All entries are stored uncompressed and 64-byte aligned, so a storage is
memory-mapped at the data offset found from its local file header.
"""
from __future__ import annotations

import os
import re
import struct
import zipfile

from refimpl.config import short
from refimpl.errors import FormatError
from refimpl.files import open_regular

from .torch_objects import Storage
from .torch_unpickler import MAX_PICKLE_BYTES, storage_dtype, unpickle

MIN_VERSION, MAX_VERSION = 1, 10   # kMinSupportedFileFormatVersion .. kMaxSupportedFileFormatVersion


class _Archive:
    def __init__(self, path: str, label: str):
        self.path, self.label = path, label
        self.f = open_regular(path)
        self.size = os.fstat(self.f.fileno()).st_size
        try:
            self.zf = zipfile.ZipFile(self.f)
            infos = self.zf.infolist()
            endrec = zipfile._EndRecData(self.f)
        except Exception as e:  # zipfile raises many types on corrupt input
            self.f.close()
            raise FormatError(f"{label}: not a readable zip archive, truncated or corrupted ({e})") from None
        self.infos = {i.filename: i for i in infos}
        # zipfile is lenient where torch's reader (miniz) is not: hold the directory to miniz's rules
        bad = (not infos or len(self.infos) != len(infos) or endrec is None
               or endrec[zipfile._ECD_ENTRIES_TOTAL] != len(infos)
               or endrec[zipfile._ECD_ENTRIES_THIS_DISK] != len(infos)
               or endrec[zipfile._ECD_DISK_NUMBER] != 0 or endrec[zipfile._ECD_DISK_START] != 0
               or self.zf.start_dir != endrec[zipfile._ECD_OFFSET])
        try:
            bad = bad or not self._tail_ok(endrec, len(infos))
        except (struct.error, OSError):
            bad = True
        for i in infos:
            if bad:
                break
            bad = (i.volume != 0 or i.flag_bits & 0x2061 or i.header_offset + 30 + i.compress_size > self.size
                   or (i.compress_type == zipfile.ZIP_STORED and i.compress_size != i.file_size))
        if bad:
            self.close()
            raise FormatError(f"{label}: zip central directory is empty, inconsistent or corrupted")

    def _tail_ok(self, endrec, n: int) -> bool:
        """The zip64 locator and every central directory record fit where they claim (as miniz checks)."""
        loc = endrec[zipfile._ECD_LOCATION]
        if endrec[zipfile._ECD_SIGNATURE] == zipfile.stringEndArchive64:
            self.f.seek(loc - zipfile.sizeEndCentDir64Locator)
            _sig, _disk, rel, disks = struct.unpack(zipfile.structEndArchive64Locator,
                                                    self.f.read(zipfile.sizeEndCentDir64Locator))
            if rel != loc - zipfile.sizeEndCentDir64Locator - zipfile.sizeEndCentDir64 or disks != 1:
                return False
            self.f.seek(rel + 4)
            if struct.unpack("<Q", self.f.read(8))[0] != zipfile.sizeEndCentDir64 - 12:
                return False
        self.f.seek(endrec[zipfile._ECD_OFFSET])
        cd = self.f.read(endrec[zipfile._ECD_SIZE])
        pos = 0
        for _ in range(n):
            if len(cd) - pos < 46 or cd[pos:pos + 4] != zipfile.stringCentralDir:
                return False
            n_name, n_extra, n_comment = struct.unpack("<HHH", cd[pos + 28:pos + 34])
            pos += 46 + n_name + n_extra + n_comment
            if pos > len(cd):
                return False
        return True

    def check_entries(self, prefix: str):
        """torch reads and checks every entry: so must we, or we would accept what it rejects."""
        for name, info in self.infos.items():
            raw = name.encode("utf-8" if info.flag_bits & 0x800 else "cp437")
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                raise FormatError(f"{self.label}: zip entry name {name!r} is not UTF-8") from None
            if info.external_attr & 0x10 or name.endswith("/"):
                raise FormatError(f"{self.label}: zip entry '{name}' is a directory")
            if not name.startswith(prefix + "/"):
                raise FormatError(f"{self.label}: zip entry '{name}' is outside the archive folder '{prefix}/'")
            self.data_offset(name)

    def close(self):
        self.f.close()

    def data_offset(self, name: str):
        """(offset, size) of a stored entry's bytes, after checking its local header."""
        info = self.infos.get(name)
        if info is None:
            raise FormatError(f"{self.label}: zip archive has no entry '{name}'")
        if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
            raise FormatError(f"{self.label}: zip entry '{name}' is compressed; torch checkpoints "
                              "store entries uncompressed (re-save it with torch.save)")
        if info.flag_bits & 1:
            raise FormatError(f"{self.label}: zip entry '{name}' is encrypted")
        self.f.seek(info.header_offset)
        head = self.f.read(30)
        if len(head) != 30 or head[:4] != b"PK\x03\x04":
            raise FormatError(f"{self.label}: zip entry '{name}' has no local header (truncated file?)")
        flags, method = struct.unpack("<HH", head[6:10])
        n_name, n_extra = struct.unpack("<HH", head[26:30])
        raw_name = self.f.read(n_name)
        local_name = raw_name.decode("utf-8" if flags & 0x800 else "cp437", "replace")
        if method != zipfile.ZIP_STORED or local_name != info.orig_filename:
            raise FormatError(f"{self.label}: zip entry '{name}' has a mismatched local header")
        start = info.header_offset + 30 + n_name + n_extra
        if start + info.file_size > self.size:
            raise FormatError(f"{self.label}: zip entry '{name}' extends past the end of the file "
                              f"(byte {start + info.file_size} of {self.size}); truncated file?")
        return start, info.file_size

    def read(self, name: str, limit: int = MAX_PICKLE_BYTES) -> bytes:
        start, size = self.data_offset(name)
        if size > limit:
            raise FormatError(f"{self.label}: zip entry '{name}' is implausibly large ({size} bytes)")
        try:
            return self.zf.read(name)     # checks the CRC
        except Exception as e:
            raise FormatError(f"{self.label}: cannot read zip entry '{name}' ({e})") from None


def _prefix(label: str, names: list[str]) -> str:
    """The archive's top folder: the one holding data.pkl (torch uses the first entry's)."""
    first = names[0].split("/", 1)[0]
    tops = [n[: -len("/data.pkl")] for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    if "constants.pkl" in {n.rsplit("/", 1)[-1] for n in names}:
        raise FormatError(f"{label}: a TorchScript archive (torch.jit.save), not a torch.save checkpoint")
    if first in tops:
        return first
    if len(tops) == 1:
        return tops[0]
    raise FormatError(f"{label}: zip archive has {'no' if not tops else 'several'} '<folder>/data.pkl' entries; "
                      "not a torch.save checkpoint")


def load_zip(path: str, label: str):
    arc = _Archive(path, label)
    try:
        names = list(arc.infos)
        prefix = _prefix(label, names)
        arc.check_entries(prefix)
        vname = next((f"{prefix}/{n}" for n in (".data/version", "version") if f"{prefix}/{n}" in arc.infos), None)
        if vname is None:
            raise FormatError(f"{label}: zip archive has no version record; not a torch.save checkpoint")
        m = re.match(rb"\s*(\d{1,6})", arc.read(vname, 64))
        if not m or not MIN_VERSION <= int(m.group(1)) <= MAX_VERSION:
            raise FormatError(f"{label}: unsupported torch archive version record")
        if f"{prefix}/.data/serialization_id" in arc.infos:
            try:
                arc.read(f"{prefix}/.data/serialization_id", 4096).decode("utf-8")
            except UnicodeDecodeError:
                raise FormatError(f"{label}: malformed serialization_id record") from None
        if f"{prefix}/.storage_alignment" in arc.infos:
            try:
                int(arc.read(f"{prefix}/.storage_alignment", 64))
            except ValueError:
                raise FormatError(f"{label}: malformed .storage_alignment record") from None
        byteorder = "little"
        if f"{prefix}/byteorder" in arc.infos:
            byteorder = arc.read(f"{prefix}/byteorder", 64).decode("ascii", "replace")
            if byteorder not in ("little", "big"):
                raise FormatError(f"{label}: unknown byte order {byteorder!r}")
        storages: dict[str, Storage] = {}

        def load_storage(pid):
            if len(pid) != 4:
                raise FormatError(f"{label}: storage reference has {len(pid)} fields, expected 4")
            storage_type, key, _location, numel = pid
            if type(key) is not str or type(numel) is not int or numel < 0:
                raise FormatError(f"{label}: malformed storage reference {short(pid, 80)}")
            dtype, npdtype = storage_dtype(label, storage_type, byteorder)
            if key in storages:
                s = storages[key]
                if s.npdtype != npdtype or s.numel != numel:
                    raise FormatError(f"{label}: storage {key!r} is referenced with two different types or sizes")
                return s
            start, size = arc.data_offset(f"{prefix}/data/{key}")
            if size != numel * npdtype.itemsize:
                raise FormatError(f"{label}: storage record {key!r} holds {size} bytes, but the checkpoint "
                                  f"declares {numel} x {dtype} ({numel * npdtype.itemsize} bytes)")
            storages[key] = Storage(path, key, dtype, npdtype, numel, offset=start)
            return storages[key]

        return unpickle(arc.read(f"{prefix}/data.pkl"), label, load_storage)
    finally:
        arc.close()
