"""Write a canonical model directory (docs/format.md) atomically, tensor by tensor, and
without ever destroying what refimpl did not create.

Every converter ends here: it describes its tensors as a plan of
`Planned(name, shape, dtype, load)` entries, where `load()` produces the array only when
the writer reaches it, so peak memory is about one tensor.

What the writer guarantees (docs/safety.md):
- DST must not be, contain or lie inside any source (after resolving symbolic links), and
  must not itself be a symbolic link.
- DST is absent, an empty folder, or, with `force`, a folder that is itself a refimpl
  canonical model holding nothing but what refimpl writes (never arbitrary content).
- One conversion per DST at a time: an flock on `.<name>.lock` beside DST; a second
  conversion gets a clear error.
- Output goes to `.<name>.tmp-XXXX` beside DST (marked by a `.refimpl-partial` file). Any
  error, Ctrl-C, SIGTERM or SIGHUP removes it; one left by a killed run (kill -9) is
  recognised under the lock and removed by the next conversion into the same DST.
- The final move is atomic and never replaces anything unexpected: an absent DST is
  claimed with a no-replace rename, an empty folder with a rename that fails if anything
  was written into it meanwhile, and a model being replaced (`force`) is re-checked and
  swapped atomically (renameat2 RENAME_EXCHANGE where available). The replaced model is
  then removed file by file, only names refimpl writes; anything else is left in place.
- Files and folders get the permissions the umask gives (not mkdtemp's private 0700).
"""
from __future__ import annotations

import errno
import json
import os
import re
import secrets
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np

from . import progress as _progress
from .config import Config, check_tensors, config_digest
from .errors import FormatError, RefimplError
from .files import (chmod_default, exchange, interruptible, quiet_signals, read_json, rename_noreplace,
                    sha256_file)
from .safetensors_io import DTYPES, write_safetensors

CONVERTER_VERSION = "0.1.0"
SHARD_BYTES = 4 * 1024**3
MARKER = ".refimpl-partial"
MODEL_FILE_RE = re.compile(r"(config\.json|tokenizer\.json|model\.safetensors|model\.safetensors\.index\.json"
                           r"|model-\d{5}-of-\d{5}\.safetensors)$")


@dataclass
class Planned:
    """One output tensor: canonical name, shape, safetensors dtype and a thunk for its data."""
    name: str
    shape: tuple
    dtype: str                       # "F32", "F16", "BF16" (raw uint16 bits) or "F64"
    load: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * DTYPES[self.dtype].itemsize


# --------------------------------------------------------------------------- what DST may be


def _real(p: str) -> str:
    return os.path.realpath(os.path.abspath(p))


def _inside(a: str, b: str) -> bool:
    """Whether real path a is b or lies below b."""
    return a == b or a.startswith(b.rstrip(os.sep) + os.sep)


def check_sources(dst: str, sources: list[str]) -> None:
    """Refuse a DST that is, contains or lies inside a source (symbolic links resolved)."""
    d = _real(dst)
    for s in sources:
        if s is None:
            continue
        r = _real(s)
        if d == r:
            raise RefimplError(f"{dst}: is the source {s}; choose another output folder")
        if _inside(r, d):
            raise RefimplError(f"{dst}: contains the source {s}; choose an output folder outside it")
        if os.path.isdir(r) and _inside(d, r):
            raise RefimplError(f"{dst}: lies inside the source folder {s}; choose an output folder outside it")


def _cache_names_ok(folder: str) -> bool:
    from .cache import is_cache_name
    try:
        with os.scandir(folder) as it:
            return all(is_cache_name(e.name) and e.is_file(follow_symlinks=False) for e in it)
    except OSError:
        return False


def unknown_entries(folder: str) -> list[str]:
    """Entries of `folder` that refimpl does not write into a model folder (cache/ included)."""
    out = []
    with os.scandir(folder) as it:
        for e in it:
            if e.name == "cache" and e.is_dir(follow_symlinks=False):
                if not _cache_names_ok(e.path):
                    out.append("cache/")
            elif e.name == MARKER or (MODEL_FILE_RE.match(e.name) and e.is_file(follow_symlinks=False)):
                continue
            else:
                out.append(e.name)
    return sorted(out)


def is_canonical_model(folder: str) -> bool:
    try:
        return read_json(os.path.join(folder, "config.json")).get("format") == "refimpl-canonical"
    except (RefimplError, OSError, AttributeError):
        return False


def check_destination(dst: str, force: bool, sources: list[str] = ()) -> None:
    """Refuse a DST that is unsafe to write (before any work is done)."""
    check_sources(dst, list(sources))
    if os.path.islink(dst):
        raise RefimplError(f"{dst}: is a symbolic link; give the folder it points to, or another path")
    if not os.path.lexists(dst):
        return
    if not os.path.isdir(dst):
        raise RefimplError(f"{dst}: exists and is not a directory")
    try:
        entries = os.listdir(dst)
    except OSError as e:
        raise RefimplError(f"{dst}: cannot read ({e.strerror or e})") from None
    if not entries:
        return
    if not force:
        raise RefimplError(f"{dst}: output directory is not empty (use --force to replace a converted model)")
    if not is_canonical_model(dst):
        raise RefimplError(f"{dst}: not a refimpl model folder (no refimpl config.json); --force only replaces "
                           f"a converted model, never other content")
    extra = unknown_entries(dst)
    if extra:
        raise RefimplError(f"{dst}: holds {len(extra)} entr{'y' if len(extra) == 1 else 'ies'} refimpl did not "
                           f"write ({', '.join(extra[:3])}{', ...' if len(extra) > 3 else ''}); --force only "
                           f"replaces a converted model: move them away first")


# --------------------------------------------------------------------------- the lock and stale leftovers


class DestinationLock:
    """An exclusive flock on `.<name>.lock` beside DST (released, and the file removed, on exit)."""

    def __init__(self, dst: str):
        self.dst = dst
        parent, name = os.path.split(os.path.abspath(dst))
        self.path = os.path.join(parent, f".{name}.lock")
        self.fd = None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:          # pragma: no cover - no flock on this platform: no locking
            return self
        for _ in range(100):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0),
                             0o666)
            except OSError as e:
                raise RefimplError(f"{self.dst}: cannot create the lock file {self.path} ({e.strerror or e})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise RefimplError(f"{self.dst}: another conversion into this folder is running (lock {self.path}); "
                                   f"wait for it to finish or choose another output folder") from None
            try:                     # the file we locked must still be the one at the path (not unlinked by a releaser)
                st, now = os.fstat(fd), os.stat(self.path, follow_symlinks=False)
                same = (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino)
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                return self
            os.close(fd)
        raise RefimplError(f"{self.dst}: cannot take the lock {self.path} (it keeps changing)")

    def __exit__(self, *exc):
        if self.fd is not None:
            try:
                os.unlink(self.path)     # while holding the lock: a waiter re-checks the inode
            except OSError:
                pass
            os.close(self.fd)
            self.fd = None
        return False


def _remove_known(folder: str) -> bool:
    """Remove the files refimpl writes into a model folder, then the folder; True if it is gone.
    Anything else is left in place (and so is the folder)."""
    from .cache import is_cache_name
    try:
        with os.scandir(folder) as it:
            entries = list(it)
    except OSError:
        return False
    for e in entries:
        try:
            if e.name == "cache" and e.is_dir(follow_symlinks=False):
                with os.scandir(e.path) as it2:
                    for c in it2:
                        if is_cache_name(c.name) and c.is_file(follow_symlinks=False):
                            os.unlink(c.path)
                os.rmdir(e.path)
            elif (e.name == MARKER or MODEL_FILE_RE.match(e.name)) and e.is_file(follow_symlinks=False):
                os.unlink(e.path)
        except OSError:
            pass
    try:
        os.rmdir(folder)
        return True
    except OSError:
        return False


def clean_stale(dst: str) -> None:
    """Under the lock: remove temporary folders left by killed conversions into DST, and the
    remains of an interrupted replacement (or put the old model back if DST is missing)."""
    parent, name = os.path.split(os.path.abspath(dst))
    try:
        entries = os.listdir(parent)
    except OSError:
        return
    ours = re.compile(rf"\.{re.escape(name)}\.(tmp|old)-[0-9a-f]{{8}}$")     # exactly the names this writer makes
    for e in sorted(entries):
        p = os.path.join(parent, e)
        if not ours.match(e) or os.path.islink(p) or not os.path.isdir(p):
            continue
        try:
            extra = unknown_entries(p)
        except OSError:
            continue
        if extra:
            continue                 # not only ours: leave it
        if e.startswith(f".{name}.old-") and not os.path.lexists(dst) and is_canonical_model(p) \
                and not os.path.exists(os.path.join(p, MARKER)):
            os.rename(p, dst)        # an interrupted replacement: the previous model comes back
            warnings.warn(f"{dst}: restored the previous model (a replacement was interrupted)", stacklevel=2)
        elif os.path.exists(os.path.join(p, MARKER)) or e.startswith(f".{name}.old-") or is_canonical_model(p):
            _remove_known(p)


# --------------------------------------------------------------------------- writing


def check_plan(config: dict, plan: list[Planned], where: str) -> None:
    """Validate the configuration being written exactly as loading will (finite, in range,
    consistent with the tensors: refimpl.config), so a conversion never writes an unusable model."""
    try:
        cfg = Config.from_dict(dict(config))
        check_tensors(cfg, {p.name: tuple(p.shape) for p in plan}, "the converted model")
    except FormatError as e:
        msg = str(e)
        msg = msg[len("config.json: "):] if msg.startswith("config.json: ") else msg
        raise FormatError(f"{where}: conversion refused: {msg}") from None


def _checked(p: Planned) -> np.ndarray:
    a = p.load()
    if tuple(a.shape) != tuple(p.shape):
        raise RefimplError(f"tensor {p.name}: shape {list(a.shape)} differs from the expected {list(p.shape)}")
    if p.dtype != "BF16" and a.dtype.kind == "f" and not np.isfinite(a).all():
        raise RefimplError(f"tensor {p.name}: contains NaN or Inf values")
    if p.dtype == "BF16":
        exp = (np.asarray(a, dtype=np.uint16) >> 7) & 0xFF
        if (exp == 0xFF).any():
            raise RefimplError(f"tensor {p.name}: contains NaN or Inf values")
    return a


def _shards(plan: list[Planned], shard_bytes: int) -> list[list[Planned]]:
    shards, cur, size = [], [], 0
    for p in plan:
        if cur and size + p.nbytes > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(p)
        size += p.nbytes
    return shards + [cur] if cur else shards


def _write_json(path: str, obj, indent=1) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent)


def _fill(tmp: str, dst: str, config: dict, plan: list[Planned], tokenizer_json: str, sources: list[str],
          source_format: str, shard_bytes: int, prog) -> None:
    current = "the output folder"
    try:
        shards = _shards(plan, shard_bytes)
        if len(shards) <= 1:
            files = ["model.safetensors"]
        else:
            files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        total = sum(p.nbytes for p in plan)
        prog.stage(f"writing {len(plan)} tensors ({total / 1e9:.2f} GB)", total=total, unit="B")

        def tensors(shard):
            for p in shard:
                a = _checked(p)
                yield p.name, a
                prog.update(p.nbytes)
        weight_map = {}
        for fname, shard in zip(files, shards or [[]]):
            current = fname
            write_safetensors(os.path.join(tmp, fname), [(p.name, p.shape, p.dtype) for p in shard],
                              tensors(shard), {"format": "np"})
            weight_map.update({p.name: fname for p in shard})
        if len(files) > 1:
            current = "model.safetensors.index.json"
            _write_json(os.path.join(tmp, current), {"metadata": {"total_size": total}, "weight_map": weight_map})
        current = "tokenizer.json"
        with open(os.path.join(tmp, current), "w", encoding="utf-8") as f:
            f.write(tokenizer_json)
        src_bytes = sum(os.path.getsize(s) for s in sources)
        out_names = sorted(n for n in os.listdir(tmp) if n != MARKER)
        out_bytes = sum(os.path.getsize(os.path.join(tmp, n)) for n in out_names)
        prog.stage(f"hashing {len(sources)} source and {len(out_names)} output files "
                   f"({(src_bytes + out_bytes) / 1e9:.2f} GB)", total=src_bytes + out_bytes, unit="B")
        out = dict(config)
        out["format"], out["format_version"] = "refimpl-canonical", 1
        out["source"] = {"format": source_format, "files": [
            {"name": os.path.basename(s), "bytes": os.path.getsize(s), "sha256": sha256_file(s, progress=prog.update)}
            for s in sources]}
        out["converter"] = {"name": "refimpl", "version": CONVERTER_VERSION}
        out["files"] = {f: sha256_file(os.path.join(tmp, f), progress=prog.update) for f in out_names}
        out["config_sha256"] = config_digest(out)
        current = "config.json"
        _write_json(os.path.join(tmp, current), out)
    except OSError as e:
        if getattr(e, "filename", None) and not str(e.filename).startswith(tmp):
            raise RefimplError(f"{e.filename}: cannot read ({e.strerror or e})") from None
        raise RefimplError(f"{dst}: cannot write {current} ({e.strerror or e})") from None


def _publish(tmp: str, dst: str, force: bool) -> str | None:
    """Move the finished folder to DST atomically; returns the path of a replaced model to remove."""
    os.unlink(os.path.join(tmp, MARKER))
    appeared = RefimplError(f"{dst}: something was created there during the conversion; it was left untouched "
                            f"and nothing was written")
    if not os.path.lexists(dst):
        try:
            rename_noreplace(tmp, dst)
        except (FileExistsError, IsADirectoryError, NotADirectoryError):
            raise appeared from None
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise appeared from None
            raise
        return None
    if os.path.islink(dst) or not os.path.isdir(dst):
        raise appeared
    if not os.listdir(dst):
        try:
            os.rename(tmp, dst)       # onto an empty folder: fails if anything was written into it meanwhile
        except OSError as e:
            if e.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR):
                raise appeared from None
            raise
        return None
    if not force:
        raise appeared
    check_destination(dst, True)      # still a refimpl model and nothing else
    parent, name = os.path.split(dst)
    old = os.path.join(parent, f".{name}.old-{secrets.token_hex(4)}")
    if exchange(tmp, dst):            # atomic swap: DST is never missing
        os.rename(tmp, old)
    else:
        os.rename(dst, old)
        try:
            rename_noreplace(tmp, dst)
        except OSError:
            os.rename(old, dst)
            raise appeared from None
    return old


def write_canonical(dst: str, config: dict, plan: list[Planned], tokenizer_json: str,
                    sources: list[str], source_format: str, force: bool = False,
                    shard_bytes: int = SHARD_BYTES, inputs: list[str] = ()) -> str:
    """Write config.json, model safetensors (sharded above `shard_bytes`) and tokenizer.json.

    `config` holds the architecture keys of docs/format.md; this adds `format`,
    `source` (each source file's name, size and sha256), `converter` and `files`.
    `sources` (and `inputs`, e.g. a source folder) must not overlap DST. Progress goes to
    `refimpl.progress.current()`.
    """
    prog = _progress.current()
    names = [p.name for p in plan]
    if len(set(names)) != len(names):
        raise RefimplError("converter produced duplicate tensor names")
    check_plan(config, plan, (list(inputs) + list(sources) + [dst])[0])
    dst = os.path.abspath(dst)
    check_destination(dst, force, list(sources) + list(inputs))
    parent = os.path.dirname(dst)
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise RefimplError(f"{dst}: cannot create its parent folder ({e.strerror or e})") from None
    with DestinationLock(dst):
        clean_stale(dst)
        check_destination(dst, force, list(sources) + list(inputs))
        tmp = None
        try:
            with interruptible():
                try:
                    tmp = os.path.join(parent, f".{os.path.basename(dst)}.tmp-{secrets.token_hex(4)}")
                    os.mkdir(tmp)
                    chmod_default(tmp, directory=True)
                    with open(os.path.join(tmp, MARKER), "w") as f:
                        f.write(f"refimpl conversion into {dst}, pid {os.getpid()}\n")
                except OSError as e:
                    raise RefimplError(f"{dst}: cannot create the output folder in {parent} "
                                       f"({e.strerror or e})") from None
                _fill(tmp, dst, config, plan, tokenizer_json, list(sources), source_format, shard_bytes, prog)
                prog.stage("moving the model into place")
                old = _publish(tmp, dst, force)
                tmp = None
        except BaseException:
            if tmp is not None:
                with quiet_signals():
                    _remove_known(tmp)
            raise
        if old is not None and not _remove_known(old):
            warnings.warn(f"{dst}: the replaced model's folder {old} holds files refimpl did not write; "
                          f"it was left in place", stacklevel=2)
    return dst
