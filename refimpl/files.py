"""Reading other people's files and writing our own, safely (docs/safety.md).

Reading: `open_regular` opens a path without blocking and refuses anything that is not a
regular file (a FIFO would hang `open`, `/dev/zero` would be read until memory runs out);
`read_bytes` / `read_text` / `read_json` then read at most a size cap that fits the kind
of file (`CAPS`), so nothing is allocated in proportion to what a file claims or holds.

Hashing: `sha256_file` (the hashes recorded in config.json's `files` and checked by
`refimpl verify`).

Writing: `write_new_file` writes a new file atomically (a temporary file in the same
folder, then a hard link or rename that never replaces anything unless asked), never
through a symbolic link, with the permissions the umask gives; `rename_noreplace` is the
atomic no-clobber rename used to publish a converted model; `printable` makes a string
that came from a file safe to print on a terminal (no escape sequences, one line).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import stat
import threading

from .errors import FormatError, Interrupted, RefimplError

# Largest file of each kind that is read into memory (anything larger is refused unread).
CAPS = {
    "json": 64 << 20,          # config.json, params.json, shard indexes, cache manifests
    "tokenizer": 1 << 30,      # tokenizer.json, vocab.json, merges.txt, dict.txt, tokenizer.model, tok512.bin
    "header": 1 << 20,         # fixed-size binary headers (llama2.c, torch magic)
}


# --------------------------------------------------------------------------- reading


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path, missing: str | None = None):
    """Open `path` for reading as a binary file object, refusing anything but a regular file.

    The open never blocks (O_NONBLOCK, so a FIFO cannot hang it) and the check is on the
    opened descriptor (fstat), so the file cannot be swapped between check and read.
    FileNotFoundError becomes FormatError(`missing`) when `missing` is given.
    """
    path = os.fspath(path)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        if missing is not None:
            raise FormatError(missing) from None
        raise FormatError(f"{path}: cannot read (no such file)") from None
    except OSError as e:
        raise FormatError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FormatError(f"{path}: is {_kind(st.st_mode)}, not a regular file; refused")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def check_regular(path) -> os.stat_result:
    """stat of `path` (following symlinks) if it is a regular file, else FormatError."""
    path = os.fspath(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FormatError(f"{path}: cannot read (no such file)") from None
    except OSError as e:
        raise FormatError(f"{path}: cannot read ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        raise FormatError(f"{path}: is {_kind(st.st_mode)}, not a regular file; refused")
    return st


def is_regular(path) -> bool:
    """Whether `path` is an existing regular file (no FormatError)."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def read_bytes(path, kind: str = "json", missing: str | None = None) -> bytes:
    """The whole content of a regular file, refused unread when larger than CAPS[kind]."""
    cap = CAPS[kind]
    with open_regular(path, missing) as f:
        size = os.fstat(f.fileno()).st_size
        if size > cap:
            raise FormatError(f"{os.fspath(path)}: {size} bytes is too large for a {kind} file "
                              f"(limit {cap}); refused")
        try:
            data = f.read(cap + 1)
        except OSError as e:
            raise FormatError(f"{os.fspath(path)}: cannot read ({e.strerror or e})") from None
    if len(data) > cap:              # grew while being read
        raise FormatError(f"{os.fspath(path)}: larger than the limit of {cap} bytes for a {kind} file; refused")
    return data


def read_text(path, kind: str = "json", missing: str | None = None) -> str:
    """`read_bytes` decoded as UTF-8 (FormatError if it is not)."""
    data = read_bytes(path, kind, missing)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FormatError(f"{os.fspath(path)}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def parse_json(text: str, where: str):
    """json.loads with one-line FormatErrors; duplicate keys are an error (two readers could
    otherwise disagree about which value counts)."""
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as e:
        msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise FormatError(f"{where}: not valid JSON ({msg})") from None


def read_json(path, missing: str | None = None, kind: str = "json"):
    """A JSON document from a regular file of at most CAPS[kind] bytes."""
    return parse_json(read_text(path, kind, missing), os.fspath(path))


# --------------------------------------------------------------------------- hashing


def sha256_file(path, chunk: int = 1 << 22, progress=None) -> str:
    """sha256 of a regular file's content (progress: optional callback(bytes read))."""
    h = hashlib.sha256()
    with open_regular(path) as f:
        while block := f.read(chunk):
            h.update(block)
            if progress is not None:
                progress(len(block))
    return h.hexdigest()


# --------------------------------------------------------------------------- terminal-safe text


def printable(s) -> str:
    """`s` with control characters (ANSI escapes, newlines, carriage returns, ...) escaped, so a
    name taken from a file prints as one inert line."""
    s = str(s)
    if s.isprintable():
        return s
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in s)


# --------------------------------------------------------------------------- writing

_UMASK_LOCK = threading.Lock()


def umask() -> int:
    """The process umask (read from /proc where possible; else set and restored under a lock)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        old = os.umask(0o022)
        os.umask(old)
    return old


def chmod_default(path, directory: bool = False) -> None:
    """Give a file (0666) or folder (0777) made by mkstemp/mkdtemp the permissions the umask
    gives ordinary files, instead of their private 0600/0700."""
    os.chmod(path, (0o777 if directory else 0o666) & ~umask())


_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100
_libc = None


def _renameat2(src: str, dst: str, flags: int) -> bool:
    """renameat2(2) through libc; False when the system does not offer it (caller falls back)."""
    global _libc
    import ctypes                               # imported here: only writers rename (start-up time)
    if _libc is None:
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        except (OSError, AttributeError):
            _libc = False
    if not _libc:
        return False
    r = _libc.renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags)
    if r == 0:
        return True
    e = ctypes.get_errno()
    if e in (errno.ENOSYS, errno.EINVAL, getattr(errno, "ENOTSUP", errno.EINVAL), getattr(errno, "EOPNOTSUPP", errno.EINVAL)):
        return False
    raise OSError(e, os.strerror(e), dst)


def rename_noreplace(src: str, dst: str) -> None:
    """Rename src to dst atomically, failing with FileExistsError if dst exists (anything,
    even a dangling symlink or an empty folder). Falls back, where renameat2 is missing, to
    claiming dst with mkdir (folders) or link (files) first."""
    if _renameat2(src, dst, _RENAME_NOREPLACE):
        return
    if os.path.isdir(src) and not os.path.islink(src):
        os.mkdir(dst)                 # FileExistsError if anything is there; else dst is ours and empty
        os.rename(src, dst)           # replaces our empty folder, or ENOTEMPTY if someone wrote into it
    else:
        os.link(src, dst)             # FileExistsError if anything is there
        os.unlink(src)


def exchange(a: str, b: str) -> bool:
    """Swap two paths atomically (renameat2 RENAME_EXCHANGE); False if the system cannot."""
    return _renameat2(a, b, _RENAME_EXCHANGE)


def write_new_file(path, write, force: bool = False, what: str = "output file") -> str:
    """Write a file atomically: `write(f)` fills a temporary file in the same folder, which
    then takes the name `path`.

    Without `force` an existing `path` (file, folder, symlink, even dangling) is refused,
    before writing and again at the final step (a hard link, which cannot replace); with
    `force` the final rename replaces the name itself, so a symbolic link at `path` is
    replaced, never written through. A folder at `path` is always refused. Permissions are
    the umask's. Returns `path`.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path)) or "."
    if not os.path.isdir(folder):
        raise RefimplError(f"{path}: the folder {folder} does not exist")
    if os.path.isdir(path) and not os.path.islink(path):
        raise RefimplError(f"{path}: is a directory; refused")
    if os.path.lexists(path) and not force:
        raise RefimplError(f"{path}: already exists (use --force to replace it)")
    import tempfile                             # imported here: only writers need it (start-up time)
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    except OSError as e:
        raise RefimplError(f"{path}: cannot write in {folder} ({e.strerror or e})") from None
    try:
        try:
            os.fchmod(fd, 0o666 & ~umask())
            with os.fdopen(fd, "wb") as f:
                fd = None
                write(f)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise RefimplError(f"{path}: cannot write ({e.strerror or e})") from None
        if force:
            if os.path.isdir(path) and not os.path.islink(path):
                raise RefimplError(f"{path}: is a directory; refused")
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise RefimplError(f"{path}: appeared while it was being written; left untouched") from None
            except OSError:          # no hard links on this file system
                try:
                    rename_noreplace(tmp, path)
                except FileExistsError:
                    raise RefimplError(f"{path}: appeared while it was being written; left untouched") from None
    finally:
        if fd is not None:
            os.close(fd)
        if os.path.lexists(tmp):
            os.unlink(tmp)
    return path


# --------------------------------------------------------------------------- signals while writing

_SIGNALS = ("SIGTERM", "SIGHUP")


@contextlib.contextmanager
def interruptible():
    """Inside the block SIGTERM and SIGHUP raise `Interrupted` (SIGINT raises KeyboardInterrupt
    as usual), so that a writer's cleanup runs instead of the process dying with its
    temporary files on disk. Only in the main thread (where Python delivers signals)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    import signal

    def handler(signum, frame):
        raise Interrupted(signum)
    old = {}
    for name in _SIGNALS:
        sig = getattr(signal, name, None)
        if sig is not None:
            old[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


@contextlib.contextmanager
def quiet_signals():
    """Ignore SIGINT, SIGTERM and SIGHUP during a cleanup, so a second Ctrl-C cannot cut it short."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    import signal
    old = {}
    for name in ("SIGINT",) + _SIGNALS:
        sig = getattr(signal, name, None)
        if sig is not None:
            old[sig] = signal.signal(sig, signal.SIG_IGN)
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
