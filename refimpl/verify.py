"""`refimpl verify`: re-hash a converted model against the sha256 recorded in its config.json."""
from __future__ import annotations

import os

from .config import read_config
from .errors import FormatError


def verify(model_dir: str) -> list[str]:
    """Problems found, one line each (empty list: every recorded file matches)."""
    from converters.canonical import sha256_file
    cfg = read_config(model_dir)
    files = cfg.extra.get("files")
    if not isinstance(files, dict) or not files:
        raise FormatError(f"{model_dir}/config.json: records no file hashes to verify against")
    problems = []
    for name, digest in sorted(files.items()):
        path = os.path.join(model_dir, name)
        if os.path.basename(name) != name:
            problems.append(f"{name}: not a plain file name in the record")
        elif not os.path.isfile(path):
            problems.append(f"{name}: missing")
        elif sha256_file(path) != digest:
            problems.append(f"{name}: sha256 mismatch (modified or corrupted)")
    import json
    from converters.canonical import config_digest
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
        raw = json.load(f)
    if "config_sha256" not in raw:
        problems.append("config.json: no config_sha256 recorded (converted by an older refimpl); not checked")
    elif config_digest(raw) != raw["config_sha256"]:
        problems.append("config.json: content differs from what was recorded at conversion")
    recorded = set(files) | {"config.json"}
    for extra in sorted(set(os.listdir(model_dir)) - recorded):
        if extra.endswith((".safetensors", ".json")):
            problems.append(f"{extra}: present but not recorded at conversion")
    return problems
