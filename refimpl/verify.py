"""`refimpl verify`: re-hash a converted model against the sha256 recorded in its config.json,
and check its derived data (cache/, and the user cache of a read-only model) the same way."""
from __future__ import annotations

import os
import re
import warnings

from .config import config_digest, read_config
from .errors import FormatError, RefimplError
from .files import is_regular, printable, read_json, sha256_file

HEX64 = re.compile(r"[0-9a-f]{64}$")


def verify(model_dir: str, notes: list | None = None) -> list[str]:
    """Problems found, one line each (empty list: every recorded file matches). Lines that are
    not problems (e.g. an interrupted `prepare` left an incomplete cache entry) go to `notes`."""
    from .model import check_converted
    cfg = read_config(check_converted(model_dir))
    files = cfg.extra.get("files")
    if not isinstance(files, dict) or not files:
        raise FormatError(f"{model_dir}/config.json: records no file hashes to verify against")
    problems, hashes = [], {}
    for name, digest in sorted(files.items()):
        shown = printable(name)
        path = os.path.join(model_dir, name)
        if os.path.basename(name) != name or name in ("", ".", ".."):
            problems.append(f"{shown}: not a plain file name in the record")
        elif not isinstance(digest, str) or not HEX64.match(digest):
            problems.append(f"{shown}: the recorded hash is not a sha256 ({printable(repr(digest))[:80]})")
        elif not os.path.lexists(path):
            problems.append(f"{shown}: missing")
        elif not is_regular(path):
            problems.append(f"{shown}: not a regular file")
        else:
            hashes[name] = sha256_file(path)
            if hashes[name] != digest:
                problems.append(f"{shown}: sha256 mismatch (modified or corrupted)")
    raw = read_json(os.path.join(model_dir, "config.json"))
    if "config_sha256" not in raw:
        problems.append("config.json: no config_sha256 recorded (converted by an older refimpl); not checked")
    elif config_digest(raw) != raw["config_sha256"]:
        problems.append("config.json: content differs from what was recorded at conversion")
    recorded = set(files) | {"config.json"}
    for extra in sorted(set(os.listdir(model_dir)) - recorded):
        if extra.endswith((".safetensors", ".json")):
            problems.append(f"{printable(extra)}: present but not recorded at conversion")
    hashes["config.json"] = sha256_file(os.path.join(model_dir, "config.json"))
    problems += _check_cache(model_dir, hashes, notes)
    return problems


def _check_cache(model_dir: str, hashes: dict, notes) -> list[str]:
    from . import cache
    from .model import load
    folders = [os.path.join(model_dir, "cache"), cache.user_cache_dir(model_dir)]
    if not any(os.path.isdir(f) for f in folders):
        return []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = load(model_dir)
    except RefimplError as e:
        return [f"cache/: not checked: the model does not load ({e})"]
    from .bounds import prepare_constants

    def constants_of(dtype):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return prepare_constants(load(model_dir, dtype=dtype))
    return cache.check(model, hashes, notes, constants_of)
