"""Derived data of a model, stored so that it can never give a stale answer.

`refimpl prepare` stores two kinds of derived data: an exact copy of the weights in the
compute dtype (`weights-<dtype>`, one safetensors part per layer plus one for the rest)
and the per-model constants of the counts' certified brackets (`constants-<dtype>`: a few
floats in one JSON file, `<entry>.values`; refimpl/bounds.py). Each entry is its payload files plus a manifest `<entry>.json` that binds it to the
exact bytes it came from:

    {"refimpl_cache": 1, "kind": ..., "entry": ..., "params": {...}, "complete": true,
     "sources":  [{"name", "bytes", "mtime_ns", "ctime_ns", "inode", "sha256"}, ...],
     "payloads": [{"name", "bytes", "mtime_ns", "ctime_ns", "inode", "sha256"}, ...]}

`sources` are the model's config.json and weight files, hashed when the entry was built;
`payloads` are the entry's own files. On every use (`lookup`) both are stat'ed and must
match size, mtime_ns, ctime_ns and inode (small payloads are also re-hashed): a model
edited after `prepare` (say, an ablation of every mlp.W_out) or a doctored cache file
makes the entry stale, and a stale entry is never used: the weights are then upcast from
the model itself (with a warning that `refimpl prepare` rebuilds the copy) and the
constants are recomputed. `refimpl verify` re-hashes every payload and source and compares the weight
copy with the model tensor by tensor (`check`).

Entries live in cache/ beside the model, or, for a read-only or packaged model, in the user
cache (`$XDG_CACHE_HOME/refimpl/<key>/`, default ~/.cache). Writes are atomic (temporary
file, then rename) and honour the umask. An interrupted `prepare` leaves an incomplete
manifest; the next one resumes from the parts it lists (checked the same way). Entries of
older versions (`ranges-<readout>-<dtype>`: per-neuron score ranges, no longer used) are
still recognised (verified, never read, never removed).
"""
from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil

import numpy as np

from .errors import FormatError, RefimplError
from .files import chmod_default, parse_json, read_bytes, read_text, sha256_file

VERSION = 1
PACKAGE_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")   # read-only models shipped inside
NAME_RE = re.compile(r"(weights-(float32|float64)(-L\d{4}|-rest)?\.(safetensors|json)"
                     r"|constants-(float32|float64)\.(values|json)"
                     r"|ranges-(frozen|raw)-(float32|float64)\.(npz|json)"
                     r"|\.[^/]+\.tmp)$")
SMALL_PAYLOAD = 64 << 20        # entries up to this size in all are re-hashed on every use
STAT_KEYS = ("bytes", "mtime_ns", "ctime_ns", "inode")


def is_cache_name(name: str) -> bool:
    """Whether a file name in cache/ is one refimpl writes (an entry, a manifest, a temporary file)."""
    return bool(NAME_RE.match(name))


# --------------------------------------------------------------------------- where


def cache_dir(model) -> str:
    """cache/ beside the model, unless the model is package data or its folder is read-only:
    then $XDG_CACHE_HOME/refimpl/<key> (default ~/.cache/refimpl/<key>), one folder per model."""
    path = os.path.abspath(model.path)
    inside_package = path.startswith(PACKAGE_DATA + os.sep)
    if os.access(path, os.W_OK) and not inside_package:
        return os.path.join(path, "cache")
    return user_cache_dir(path)


def user_cache_dir(model_path: str) -> str:
    key = hashlib.sha256(os.path.realpath(model_path).encode()).hexdigest()[:16]
    root = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(root, "refimpl", key)


def model_sources(model) -> list[str]:
    """The files derived data depends on: config.json and every weight file."""
    files = {os.path.abspath(t.path) for t in model.tensors.values()}
    return [os.path.join(os.path.abspath(model.path), "config.json")] + sorted(files)


# --------------------------------------------------------------------------- identity


def identity(path: str) -> dict:
    st = os.stat(path)
    return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "inode": st.st_ino}


def _same(rec: dict, path: str) -> bool:
    try:
        now = identity(path)
    except OSError:
        return False
    return all(rec.get(k) == now[k] for k in STAT_KEYS)


def _rel(model_path: str, path: str) -> str:
    """A source's name in the manifest: relative to the model folder."""
    return os.path.relpath(path, os.path.abspath(model_path))


def hash_sources(model, progress=None) -> list[dict]:
    """Identity and sha256 of every source, each stat'ed before hashing (see `sources_unchanged`).
    A file hashed before by this process with the same identity (size, times, inode) is not
    hashed again (prepare binds two entries to the same files)."""
    out, seen = [], model.__dict__.setdefault("_source_hashes", {})
    for p in model_sources(model):
        rec = {"name": _rel(model.path, p), **identity(p)}
        old = seen.get(p)
        if old is not None and all(old[k] == rec[k] for k in STAT_KEYS):
            rec["sha256"] = old["sha256"]
            if progress is not None:
                progress(rec["bytes"])
        else:
            rec["sha256"] = sha256_file(p, progress=progress)
            seen[p] = rec
        out.append(rec)
    return out


def sources_unchanged(model, recs: list[dict]) -> bool:
    """Whether the model's sources still are the files `recs` describes (none added or removed)."""
    paths = model_sources(model)
    if not isinstance(recs, list) or len(recs) != len(paths):
        return False
    by_name = {r.get("name"): r for r in recs if isinstance(r, dict)}
    return all(_rel(model.path, p) in by_name and _same(by_name[_rel(model.path, p)], p) for p in paths)


# --------------------------------------------------------------------------- manifests


def _manifest_path(folder: str, entry: str) -> str:
    return os.path.join(folder, f"{entry}.json")


def read_manifest(folder: str, entry: str) -> dict | None:
    """The manifest of `entry` if present and well-formed, else None."""
    path = _manifest_path(folder, entry)
    if not os.path.lexists(path):
        return None
    try:
        m = parse_json(read_text(path, "json"), path)
    except FormatError:
        return None
    ok = (isinstance(m, dict) and m.get("refimpl_cache") == VERSION and m.get("entry") == entry
          and isinstance(m.get("sources"), list) and isinstance(m.get("payloads"), list)
          and isinstance(m.get("complete"), bool) and isinstance(m.get("params"), dict)
          and all(isinstance(r, dict) and isinstance(r.get("name"), str) and isinstance(r.get("sha256"), str)
                  and all(isinstance(r.get(k), int) and not isinstance(r.get(k), bool) for k in STAT_KEYS)
                  for r in m["sources"] + m["payloads"])
          and all(os.path.basename(r["name"]) == r["name"] and is_cache_name(r["name"]) for r in m["payloads"]))
    return m if ok else None


def _atomic_write(folder: str, name: str, write) -> dict:
    """Write `folder/name` atomically (temporary file + rename; umask permissions); its record."""
    real_folder(folder)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{name}.{secrets.token_hex(4)}.tmp")
    try:
        h = hashlib.sha256()
        with open(tmp, "xb") as f:
            chmod_default(tmp)

            class _Hashing:                       # hash while writing: no second read of a large part
                def write(self, b):
                    h.update(b)
                    return f.write(b)
            write(_Hashing())
            f.flush()
            os.fsync(f.fileno())
        path = os.path.join(folder, name)
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise
    return {"name": name, **identity(path), "sha256": h.hexdigest()}


def write_manifest(folder: str, entry: str, kind: str, params: dict, sources: list[dict], payloads: list[dict],
                   complete: bool) -> None:
    import json
    m = {"refimpl_cache": VERSION, "kind": kind, "entry": entry, "params": params, "complete": complete,
         "sources": sources, "payloads": payloads}
    text = json.dumps(m, indent=1).encode()
    _atomic_write(folder, f"{entry}.json", lambda f: f.write(text))


def payloads_unchanged(folder: str, recs: list[dict], rehash_small: bool = True) -> bool:
    """Every payload still has its recorded size, times and inode; an entry of at most
    SMALL_PAYLOAD bytes in all is re-hashed too (cheap; larger ones rely on the stat identity)."""
    rehash = rehash_small and sum(r["bytes"] for r in recs) <= SMALL_PAYLOAD
    for r in recs:
        p = os.path.join(folder, r["name"])
        if not _same(r, p):
            return False
        if rehash:
            try:
                if hashlib.sha256(read_bytes(p, "tokenizer")).hexdigest() != r["sha256"]:
                    return False
            except FormatError:
                return False
    return True


def lookup(model, entry: str, params: dict) -> tuple[dict | None, str | None]:
    """(manifest, None) if `entry` is complete and bound to the model's current files, else
    (None, why not): None when there is no entry at all."""
    folder = cache_dir(model)
    if not os.path.lexists(_manifest_path(folder, entry)):
        return None, None
    m = read_manifest(folder, entry)
    where = os.path.join(folder, entry)
    if m is None:
        return None, f"{where}: damaged cache manifest; not used"
    if not m["complete"]:
        return None, f"{where}: incomplete (an interrupted `refimpl prepare`); not used"
    if m["params"] != params:
        return None, f"{where}: built for other settings; not used"
    if not sources_unchanged(model, m["sources"]):
        return None, (f"{where}: stale: the model's files changed since it was built (size, time or inode); "
                      f"not used")
    if not payloads_unchanged(folder, m["payloads"]):
        return None, f"{where}: its files were changed after it was written; not used"
    return m, None


def free_bytes(folder: str) -> int:
    probe = folder
    while not os.path.isdir(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    return shutil.disk_usage(probe).free


def check_space(folder: str, need: int, prog) -> None:
    """Say how much will be written, and refuse before writing when the disk cannot hold it."""
    real_folder(folder)
    free = free_bytes(folder)
    prog.note(f"will write {need / 1e9:.2f} GB to {folder} ({free / 1e9:.1f} GB free)")
    if need > free - (64 << 20):
        raise RefimplError(f"{folder}: needs {need / 1e9:.2f} GB but only {free / 1e9:.2f} GB are free; "
                           f"nothing was written")


def real_folder(folder: str) -> None:
    """A cache folder that is a symbolic link is refused: derived data is written and removed
    only in a real folder, never through a link to somewhere else (whose files it could replace)."""
    if os.path.islink(folder):
        raise RefimplError(f"{folder}: is a symbolic link (to {os.readlink(folder)}); refimpl writes and removes "
                           f"derived data only in a real folder: remove the link (nothing was changed)")


def remove_entry(folder: str, entry: str, keep: set = frozenset()) -> None:
    """Remove an entry's manifest and payload files (names it lists or that follow its pattern)."""
    real_folder(folder)
    prefix = entry + "."
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        if name in keep or not is_cache_name(name):
            continue
        if name == f"{entry}.json" or name.startswith(entry + "-") or name.startswith(prefix):
            try:
                os.unlink(os.path.join(folder, name))
            except OSError:
                pass


# --------------------------------------------------------------------------- the weight copy


def weights_entry(model) -> str:
    return f"weights-{model.dtype.name}"


def _part_names(model) -> list[tuple[str, list[str]]]:
    """(payload name, tensor names) of every part: one per layer, one for the rest."""
    entry = weights_entry(model)
    parts = []
    for i in range(model.cfg.n_layers):
        p = f"blocks.{i}."
        parts.append((f"{entry}-L{i:04d}.safetensors", sorted(n for n in model.tensors if n.startswith(p))))
    rest = sorted(n for n in model.tensors if not n.startswith("blocks."))
    parts.append((f"{entry}-rest.safetensors", rest))
    return parts


def _weights_params(model) -> dict:
    return {"dtype": model.dtype.name}


def open_weights(model):
    """{name: StoredTensor} of a fresh prepared weight copy, or None (with a warning if it exists
    but is stale or damaged: the weights are then upcast from the model itself)."""
    import warnings
    from .safetensors_io import NUMPY_TO_ST, read_header
    m, why = lookup(model, weights_entry(model), _weights_params(model))
    if m is None:
        if why:
            warnings.warn(f"{why}; run `refimpl prepare` to rebuild it", stacklevel=3)
        return None
    folder, st = cache_dir(model), NUMPY_TO_ST[model.dtype]
    tensors = {}
    try:
        for r in m["payloads"]:
            t, _ = read_header(os.path.join(folder, r["name"]))
            for k, v in t.items():
                if k in tensors:
                    raise FormatError(f"{r['name']}: tensor {k!r} is in two parts")
                tensors[k] = v
    except FormatError as e:
        warnings.warn(f"{os.path.join(folder, weights_entry(model))}: damaged ({e}); not used; run "
                      f"`refimpl prepare` to rebuild it", stacklevel=3)
        return None
    ok = set(tensors) == set(model.tensors) and all(
        tuple(tensors[n].shape) == tuple(t.shape) and tensors[n].dtype == st for n, t in model.tensors.items())
    if not ok:
        warnings.warn(f"{os.path.join(folder, weights_entry(model))}: does not match the model's tensors; not "
                      f"used; run `refimpl prepare` to rebuild it", stacklevel=3)
        return None
    bad = spot_check(model, tensors)
    if bad is not None:
        warnings.warn(f"{os.path.join(folder, weights_entry(model))}: {bad} differs from the model's own value "
                      f"(a spot check); not used; run `refimpl prepare` to rebuild it", stacklevel=3)
        return None
    return tensors


def spot_check(model, copy: dict, per_tensor: int = 8) -> str | None:
    """Compare the weight copy with the model at `per_tensor` positions of every tensor, drawn
    afresh on every use (so a copy doctored together with its record cannot know where it is
    looked at): the copy must hold the stored value widened exactly. Returns the first
    tensor[index] that differs, or None. Milliseconds: a few pages of each file."""
    from .safetensors_io import bf16_to_f32
    rng = np.random.default_rng(int.from_bytes(os.urandom(8), "little"))
    for name, st in model.tensors.items():
        n = int(np.prod(st.shape, dtype=np.int64))
        if n == 0:
            continue
        idx = rng.integers(0, n, size=min(per_tensor, n))
        stored = np.asarray(st.raw()).reshape(-1)[idx]
        want = (bf16_to_f32(stored) if st.dtype == "BF16" else stored).astype(model.dtype)
        got = np.asarray(copy[name].raw()).reshape(-1)[idx]
        diff = ~((got == want) | (np.isnan(got) & np.isnan(want)))
        if diff.any():
            return f"{name}[flat {int(idx[np.argmax(diff)])}]"
    return None


def weights_bytes(model) -> int:
    return sum(int(np.prod(t.shape, dtype=np.int64)) for t in model.tensors.values()) * model.dtype.itemsize


def write_weights(model, prog) -> str:
    """Write (or finish) the prepared weight copy, one part per layer; each finished part is
    recorded in the manifest at once, so an interrupted run resumes where it stopped."""
    from .safetensors_io import NUMPY_TO_ST, write_safetensors
    folder, entry, params = cache_dir(model), weights_entry(model), _weights_params(model)
    st = NUMPY_TO_ST[model.dtype]
    parts = _part_names(model)
    old = read_manifest(folder, entry)
    prog.stage("hashing the model's files", total=sum(os.path.getsize(p) for p in model_sources(model)), unit="B")
    sources = hash_sources(model, progress=prog.update)
    done: list[dict] = []
    if old is not None and not old["complete"] and old["params"] == params and _same_hashes(old["sources"], sources) \
            and payloads_unchanged(folder, old["payloads"], rehash_small=False):
        names = {p for p, _ in parts}
        done = [r for r in old["payloads"] if r["name"] in names]
        if done:
            prog.note(f"resuming: {len(done)} of {len(parts)} parts of the weight copy are already written")
    else:
        remove_entry(folder, entry)
    have = {r["name"] for r in done}
    todo = [(p, names) for p, names in parts if p not in have]
    per = {p: sum(int(np.prod(model.tensors[n].shape, dtype=np.int64)) for n in names) * model.dtype.itemsize
           for p, names in todo}
    check_space(folder, sum(per.values()), prog)
    prog.stage(f"writing the weights in {model.dtype.name} ({len(todo)} parts)", total=sum(per.values()), unit="B")
    for p, names in todo:
        specs = [(n, model.tensors[n].shape, st) for n in names]

        def write(f, names=names, specs=specs):
            write_safetensors(f, specs, ((n, np.asarray(model.tensors[n].numpy(), model.dtype)) for n in names),
                              {"entry": entry})
        done.append(_atomic_write(folder, p, write))
        write_manifest(folder, entry, "weights", params, sources, done, complete=False)
        prog.update(per[p])
    if not sources_unchanged(model, sources):
        remove_entry(folder, entry)
        raise RefimplError(f"{model.path}: the model's files changed while `prepare` was reading them; "
                           f"nothing was kept; run it again")
    order = {p: k for k, (p, _) in enumerate(parts)}
    write_manifest(folder, entry, "weights", params, sources, sorted(done, key=lambda r: order[r["name"]]),
                   complete=True)
    return os.path.join(folder, entry)


def _same_hashes(a: list[dict], b: list[dict]) -> bool:
    return [(r.get("name"), r.get("sha256")) for r in a] == [(r["name"], r["sha256"]) for r in b]


# --------------------------------------------------------------------------- bracket constants


def constants_entry(model) -> str:
    return f"constants-{model.dtype.name}"


def _constants_params(model, dtype: str | None = None) -> dict:
    """What the constants' last bits depend on: the dtype, the shapes, and numpy's BLAS and the
    CPU kernel it runs (lambda comes from float32 products and an eigensolver), so an entry made
    on another machine or before an upgrade is not used (the counts' brackets would differ in
    their last bits from those of a run without it)."""
    from .blas import identity
    return {"dtype": dtype or model.dtype.name, "d_model": model.cfg.d_model, "d_vocab": model.cfg.d_vocab,
            "numerics": identity()}


def _finite(x, positive: bool) -> bool:
    return isinstance(x, float) and bool(np.isfinite(x)) and (x > 0 if positive else x >= 0)


def _valid_constants(v) -> bool:
    """{"readout": {part: [B^2 > 0, W >= 0]}, "lambda": {"part|norm" or "part|raw": lambda > 0}},
    finite floats."""
    return (isinstance(v, dict) and set(v) == {"readout", "lambda"}
            and isinstance(v["readout"], dict) and isinstance(v["lambda"], dict)
            and all(isinstance(k, str) and isinstance(x, list) and len(x) == 2 and _finite(x[0], True)
                    and _finite(x[1], False) for k, x in v["readout"].items())
            and all(isinstance(k, str) and _finite(x, True) for k, x in v["lambda"].items()))


def _read_constants(path: str) -> dict | None:
    """A constants payload if it is one (_valid_constants), else None."""
    try:
        v = parse_json(read_text(path, "json"), path)
    except FormatError:
        return None
    return v if _valid_constants(v) else None


def load_constants(model) -> tuple[dict | None, str | None]:
    """The stored per-model bracket constants if fresh (bound to the model's exact files and
    re-hashed on every use), or (None, why not): None when there is no entry at all."""
    m, why = lookup(model, constants_entry(model), _constants_params(model))
    if m is None:
        return None, why
    where = os.path.join(cache_dir(model), constants_entry(model))
    if len(m["payloads"]) != 1:
        return None, f"{where}: damaged cache manifest; not used"
    v = _read_constants(os.path.join(cache_dir(model), m["payloads"][0]["name"]))
    if v is None:
        return None, f"{where}: damaged; not used"
    return v, None


def save_constants(model, values: dict, prog=None) -> str:
    """Store the bracket constants (a few floats: refimpl/bounds.py) bound to the model's files,
    hashed now; nothing is stored if the files change meanwhile. Returns the entry's folder."""
    import json
    from . import progress as _progress
    if not _valid_constants(values):
        raise ValueError("not a set of bracket constants")
    prog = prog or _progress.current()
    folder, entry = cache_dir(model), constants_entry(model)
    prog.stage("hashing the model's files", total=sum(os.path.getsize(p) for p in model_sources(model)), unit="B")
    sources = hash_sources(model, progress=prog.update)
    text = json.dumps(values, indent=1, sort_keys=True).encode()        # floats round-trip exactly
    rec = _atomic_write(folder, f"{entry}.values", lambda f: f.write(text))
    if sources_unchanged(model, sources):
        write_manifest(folder, entry, "constants", _constants_params(model), sources, [rec], complete=True)
    else:
        remove_entry(folder, entry)
    return folder


# --------------------------------------------------------------------------- verify


def check(model, source_hashes: dict | None = None, notes: list | None = None, constants_of=None) -> list[str]:
    """Problems with the model's stored derived data, one line each (for `refimpl verify`):
    payloads whose content differs from their manifest, entries whose sources changed, a weight
    copy whose values are not the model's, stored constants that differ from constants_of(dtype
    name) (their recomputation, when given), and files in cache/ that belong to no entry."""
    problems = []
    folders = [os.path.join(os.path.abspath(model.path), "cache"), user_cache_dir(model.path)]
    for folder in folders:
        if not os.path.isdir(folder):
            continue
        shown = os.path.relpath(folder, os.path.abspath(model.path)) if folder.startswith(
            os.path.abspath(model.path)) else folder
        names = sorted(os.listdir(folder))
        claimed = set()
        for name in names:
            if not name.endswith(".json") or not is_cache_name(name):
                continue
            entry = name[:-5]
            claimed.add(name)
            m = read_manifest(folder, entry)
            if m is None:
                problems.append(f"{shown}/{name}: damaged cache manifest")
                continue
            claimed.update(r["name"] for r in m["payloads"])
            problems += _check_entry(model, folder, shown, entry, m, source_hashes or {}, notes, constants_of)
        for name in names:
            if name not in claimed:
                problems.append(f"{shown}/{name}: not part of any cache entry")
    return problems


def _check_entry(model, folder, shown, entry, m, source_hashes, notes, constants_of=None) -> list[str]:
    from .files import printable
    out = []
    for r in m["payloads"]:
        p = os.path.join(folder, r["name"])
        if not os.path.isfile(p):
            out.append(f"{shown}/{printable(r['name'])}: missing")
        elif sha256_file(p) != r["sha256"]:
            out.append(f"{shown}/{printable(r['name'])}: content differs from what was recorded when it was "
                       f"written (modified or corrupted)")
    if out:
        return out
    if not m["complete"]:
        if notes is not None:
            notes.append(f"{shown}/{entry}: incomplete (an interrupted `refimpl prepare`); not used")
        return out
    paths = {_rel(model.path, p): p for p in model_sources(model)}
    for r in m["sources"]:
        p = paths.get(r["name"])
        cur = source_hashes.get(r["name"]) if p is not None else None
        if p is not None and cur is None:
            cur = sha256_file(p)
        if p is None or cur != r["sha256"]:
            out.append(f"{shown}/{entry}: stale: built from a different {printable(r['name'])}; it is not used "
                       f"(run `refimpl prepare` to rebuild it)")
            return out
    if len(m["sources"]) != len(paths):
        return out + [f"{shown}/{entry}: stale: built from other model files; it is not used"]
    if m["kind"] == "weights" and m["params"].get("dtype") in ("float32", "float64"):
        out += _compare_weights(model, folder, shown, entry, m, np.dtype(m["params"]["dtype"]))
    if m["kind"] == "constants" and constants_of is not None and m["params"].get("dtype") in ("float32", "float64") \
            and len(m["payloads"]) == 1:
        name = printable(m["payloads"][0]["name"])
        if m["params"] != _constants_params(model, m["params"]["dtype"]):
            if notes is not None:
                notes.append(f"{shown}/{entry}: made with other numerics or settings ({m['params'].get('numerics')}); "
                             f"not used here")
            return out
        stored = _read_constants(os.path.join(folder, m["payloads"][0]["name"]))
        if stored is None:
            out.append(f"{shown}/{name}: not a set of bracket constants (damaged); it is not used: run "
                       f"`refimpl prepare` to rebuild it")
        elif stored != constants_of(m["params"]["dtype"]):
            out.append(f"{shown}/{name}: differs from the constants of the model's weights (recomputed here); "
                       f"run `refimpl prepare` to rebuild it")
    return out


def _compare_weights(model, folder, shown, entry, m, dtype) -> list[str]:
    """Every tensor of the copy must be the exact widening of the model's tensor."""
    from .safetensors_io import read_header
    seen = set()
    for r in m["payloads"]:
        try:
            tensors, _ = read_header(os.path.join(folder, r["name"]))
        except FormatError as e:
            return [f"{shown}/{r['name']}: {e}"]
        for n, t in tensors.items():
            seen.add(n)
            if n not in model.tensors or tuple(model.tensors[n].shape) != tuple(t.shape):
                return [f"{shown}/{r['name']}: holds tensor {n!r}, which the model does not have in that shape"]
            a = model.tensors[n].numpy()
            b = t.raw()
            rows = max(1, (16 << 20) // max(1, a[:1].nbytes)) if a.ndim else 1
            for s in range(0, a.shape[0] if a.ndim else 1, rows):
                x = np.asarray(a[s:s + rows] if a.ndim else a, dtype)
                y = np.asarray(b[s:s + rows] if b.ndim else b)
                if x.dtype != y.dtype or not np.array_equal(x.view(np.uint8), y.view(np.uint8)):
                    return [f"{shown}/{r['name']}: tensor {n!r} differs from the model's weights "
                            f"(modified after it was written)"]
    if seen != set(model.tensors):
        return [f"{shown}/{entry}: does not hold every tensor of the model"]
    return []
