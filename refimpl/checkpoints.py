"""Unconverted checkpoints where a converted model is expected.

Given a Hugging Face, Meta, fairseq or llama2.c checkpoint as `--model` (or to
`refimpl.load`), refimpl says what it is and the exact `refimpl convert` command, or, with
`--convert` (`refimpl.load(path, convert=True)`), converts it once into the user cache and
uses that. The cached conversion is keyed by the source files' paths, sizes and
modification times: a changed checkpoint is converted again, never silently replaced
by an older conversion.

Detection reuses the converters' own `detect` (imported only on this path, after the
path has turned out not to be a converted model).
"""
from __future__ import annotations

import hashlib
import json
import os
import shlex
import sys

from .errors import FormatError, RefimplError

WHAT = {"hf-gpt2": "a Hugging Face GPT-2 checkpoint", "hf-llama": "a Hugging Face Llama checkpoint",
        "meta-llama": "a Meta LLaMA checkpoint (params.json + consolidated.*.pth)",
        "fairseq": "a fairseq language-model checkpoint", "llama2c": "a llama2.c checkpoint"}


def is_converted(path: str) -> bool:
    """A directory whose config.json is a refimpl canonical config (docs/format.md)."""
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(cfg, dict) and (cfg.get("format") == "refimpl-canonical" or
                                      ("format" not in cfg and "family" in cfg and "d_model" in cfg))


def detect(path: str) -> str | None:
    """The source format of an unconverted checkpoint at `path` (None if none is recognised)."""
    if not os.path.exists(path) or is_converted(path):
        return None
    import converters
    try:
        fmt = converters.detect_format(path)
    except RefimplError:
        return None
    return fmt if _confirmed(path, fmt) else None


def _confirmed(path: str, fmt: str) -> bool:
    """Positive evidence for the format (the converters' detection also claims broken inputs,
    so that conversion can say what is wrong with them; a damaged converted model is not one)."""
    if fmt.startswith("hf-"):
        try:
            with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
                return json.load(f).get("model_type") == fmt[3:]
        except (OSError, ValueError, AttributeError, RecursionError):
            return False
    if fmt == "llama2c":
        from converters import llama2c
        try:
            llama2c._read_header(llama2c._model_file(path))
            return True
        except (RefimplError, OSError):
            return False
    return True


def _needs_tokenizer(path: str, fmt: str) -> bool:
    if fmt != "llama2c":
        return False
    from converters import llama2c
    try:
        llama2c._tokenizer_file(llama2c._model_file(path), None)
        return False
    except (RefimplError, OSError):
        return True


def convert_command(path: str, fmt: str) -> str:
    name = os.path.splitext(os.path.basename(os.path.normpath(path)))[0] or "model"
    cmd = f"refimpl convert {shlex.quote(path)} {shlex.quote(os.path.join('models', name))}"
    return cmd + (" --tokenizer TOKENIZER.bin" if _needs_tokenizer(path, fmt) else "")


def unconverted_message(path: str) -> str | None:
    """One line saying what `path` is and how to convert it, or None if it is no known checkpoint."""
    fmt = detect(path)
    if fmt is None:
        cfg = os.path.join(path, "config.json")
        try:
            with open(cfg, encoding="utf-8") as f:
                mt = json.load(f).get("model_type")
        except (OSError, ValueError, AttributeError, RecursionError):
            mt = None
        if isinstance(mt, str):
            return (f"{path}: a Hugging Face {mt!r} checkpoint, not a converted model; refimpl converts GPT-2 "
                    f"and Llama checkpoints (refimpl convert --help)")
        return None
    return (f"{path}: {WHAT.get(fmt, fmt)}, not a converted model; convert it once with "
            f"`{convert_command(path, fmt)}` and pass that directory, or add --convert to convert it into "
            f"the cache ({cache_root()})")


# --- conversion into the cache ----------------------------------------------------------------

def cache_root() -> str:
    """Where --convert puts converted models: $REFIMPL_CACHE/converted, else
    $XDG_CACHE_HOME/refimpl/converted (~/.cache/refimpl/converted)."""
    root = os.environ.get("REFIMPL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "refimpl")
    return os.path.join(root, "converted")


def _source_files(path: str) -> list[str]:
    if os.path.isfile(path):            # a checkpoint file reads its neighbours (dict.txt, tokenizer.bin)
        d = os.path.dirname(os.path.abspath(path))
        return [os.path.join(d, f) for f in sorted(os.listdir(d)) if os.path.isfile(os.path.join(d, f))]
    out = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        out += [os.path.join(root, f) for f in sorted(files)]
    return out


def source_key(path: str) -> str:
    """sha256 over the source's files: absolute path, size and modification time of each."""
    h = hashlib.sha256()
    for f in _source_files(path):
        st = os.stat(f)
        h.update(f"{os.path.abspath(f)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def converted_copy(path: str, tokenizer: str | None = None) -> str:
    """The converted model directory for checkpoint `path` in the cache (converted now if needed)."""
    fmt = detect(path)
    if fmt is None:
        raise FormatError(unconverted_message(path) or f"{path}: not a converted model directory and not a "
                          f"checkpoint refimpl can convert")
    name = os.path.splitext(os.path.basename(os.path.normpath(path)))[0] or "model"
    dst = os.path.join(cache_root(), f"{name}-{fmt}-{source_key(path)[:16]}")
    if is_converted(dst):
        print(f"using {dst} (converted from {path} earlier)", file=sys.stderr)
        return dst
    import converters
    os.makedirs(cache_root(), exist_ok=True)
    print(f"converting {path} ({WHAT.get(fmt, fmt)}) into {dst}; later runs reuse it", file=sys.stderr)
    return converters.convert(path, dst, fmt=fmt, force=os.path.isdir(dst), tokenizer=tokenizer)
