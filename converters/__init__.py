"""Weight converters: checkpoints on disk -> the canonical model directory (docs/format.md).

Each source format is one module with `detect(src) -> bool` and
`convert(src, dst, force=False, tokenizer=None) -> str`. Nothing here imports torch:
torch pickles are read by `converters.torch_pickle`, which never executes them.
"""
from __future__ import annotations

import importlib
import os

from refimpl.errors import RefimplError
from refimpl.files import is_regular

# format name -> module; detection tries them in this order
FORMATS = {
    "llama2c": "converters.llama2c",
    "hf-gpt2": "converters.hf_gpt2",
    "hf-llama": "converters.hf_llama",
    "meta-llama": "converters.meta_llama",
    "fairseq": "converters.fairseq_lm",
}


def _module(fmt: str):
    try:
        return importlib.import_module(FORMATS[fmt])
    except KeyError:
        raise RefimplError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}") from None


def available_formats() -> list[str]:
    out = []
    for fmt, mod in FORMATS.items():
        try:
            importlib.import_module(mod)
            out.append(fmt)
        except ImportError:
            pass
    return out


def detect_format(src: str) -> str:
    if not os.path.exists(src):
        raise RefimplError(f"{src}: no such file or directory")
    if not (os.path.isdir(src) or is_regular(src)):
        raise RefimplError(f"{src}: not a regular file or a directory; refused")
    for fmt in available_formats():
        if _module(fmt).detect(src):
            return fmt
    raise RefimplError(f"{src}: cannot tell the checkpoint format (known: {', '.join(FORMATS)}); "
                       f"use --format")


def convert(src: str, dst: str, fmt: str | None = None, force: bool = False, tokenizer: str | None = None) -> str:
    """Convert `src` into a canonical model directory at `dst`; returns dst.

    DST is checked before any work (refimpl.writer.check_destination: never a source, never
    arbitrary content) and written atomically at the end. Progress goes to
    `refimpl.progress.current()` (silent unless the caller installed a reporter)."""
    from refimpl import progress
    from refimpl.writer import check_destination
    if not os.path.exists(src):
        raise RefimplError(f"{src}: no such file or directory")
    if tokenizer is not None and not is_regular(tokenizer):
        raise RefimplError(f"{tokenizer}: tokenizer file not found (or not a regular file)")
    check_destination(dst, force, [src, tokenizer])
    fmt = fmt or detect_format(src)
    progress.current().stage(f"reading {os.path.basename(os.path.abspath(src))} ({fmt})")
    return _module(fmt).convert(src, dst, force=force, tokenizer=tokenizer)
