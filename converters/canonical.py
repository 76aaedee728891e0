"""Write a canonical model directory (docs/format.md) atomically and tensor by tensor.

Every converter ends here: it describes its tensors as a plan of
`Planned(name, shape, dtype, load)` entries, where `load()` produces the array only when
the writer reaches it, so peak memory is about one tensor. Output goes to a temporary
directory beside DST and is renamed into place at the end; on any error the temporary
directory is removed and DST is untouched.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Callable

import numpy as np

from refimpl.errors import RefimplError
from refimpl.safetensors_io import DTYPES, write_safetensors

CONVERTER_VERSION = "0.1.0"
SHARD_BYTES = 4 * 1024**3


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


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def config_digest(cfg: dict) -> str:
    """sha256 of config.json's content except this digest itself (so `verify` covers the config too)."""
    body = {k: v for k, v in cfg.items() if k != "config_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def check_destination(dst: str, force: bool) -> None:
    """Refuse a non-empty DST unless --force (before any work is done)."""
    if os.path.exists(dst):
        if not os.path.isdir(dst):
            raise RefimplError(f"{dst}: exists and is not a directory")
        if os.listdir(dst) and not force:
            raise RefimplError(f"{dst}: output directory is not empty (use --force to replace it)")


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


def write_canonical(dst: str, config: dict, plan: list[Planned], tokenizer_json: str,
                    sources: list[str], source_format: str, force: bool = False,
                    shard_bytes: int = SHARD_BYTES) -> str:
    """Write config.json, model safetensors (sharded above `shard_bytes`) and tokenizer.json.

    `config` holds the architecture keys of docs/format.md; this adds `format`,
    `source` (each source file's name, size and sha256), `converter` and `files`.
    """
    check_destination(dst, force)
    names = [p.name for p in plan]
    if len(set(names)) != len(names):
        raise RefimplError("converter produced duplicate tensor names")
    dst = os.path.abspath(dst)
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.tmp-", dir=parent)
    try:
        shards = _shards(plan, shard_bytes)
        if len(shards) <= 1:
            files = ["model.safetensors"]
        else:
            files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        weight_map = {}
        for fname, shard in zip(files, shards or [[]]):
            write_safetensors(os.path.join(tmp, fname), [(p.name, p.shape, p.dtype) for p in shard],
                              ((p.name, _checked(p)) for p in shard), {"format": "np"})
            weight_map.update({p.name: fname for p in shard})
        if len(files) > 1:
            total = sum(p.nbytes for p in plan)
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
        with open(os.path.join(tmp, "tokenizer.json"), "w", encoding="utf-8") as f:
            f.write(tokenizer_json)
        out = dict(config)
        out["format"], out["format_version"] = "refimpl-canonical", 1
        out["source"] = {"format": source_format, "files": [
            {"name": os.path.basename(s), "bytes": os.path.getsize(s), "sha256": sha256_file(s)}
            for s in sources]}
        out["converter"] = {"name": "refimpl", "version": CONVERTER_VERSION}
        out["files"] = {f: sha256_file(os.path.join(tmp, f)) for f in sorted(os.listdir(tmp))}
        out["config_sha256"] = config_digest(out)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(out, f, indent=1)
        if os.path.exists(dst):
            old = dst + ".old-" + os.path.basename(tmp)
            os.rename(dst, old)
            os.rename(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst
