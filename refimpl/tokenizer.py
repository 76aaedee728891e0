"""Loading a model's tokenizer.json so that a hostile file can neither crash nor hang the process.

`tokenizers` (Rust) indexes a Precompiled normalizer's trie unchecked (a panic at encode)
and honours `padding: {"Fixed": N}` by allocating N tokens (an abort on a huge N). So
charsmaps are checked first (`check_precompiled_charsmap`), padding and truncation (never
wanted here) are switched off, and the result must encode and decode a probe text.
Exceptions and panics from `tokenizers` become one-line FormatErrors. The file itself is
read with a size cap and only if it is a regular file (refimpl.files).
"""
from __future__ import annotations

import json

import numpy as np

from .errors import FormatError, RefimplError
from .files import read_text

_FATAL = (KeyboardInterrupt, SystemExit, GeneratorExit)
# decoded and encoded once at load, so a tokenizer that fails on ordinary text fails there
_PROBE = ("Once upon a time, the capital of France is Paris. 12345 \t\n  "
          + "".join(map(chr, range(0x20, 0x250))) + " 日本語 中文 한국어 Привет שלום مرحبا ☃ 😀 \x00\x7f")


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0][:300] if s else type(e).__name__


def _precompiled_charsmaps(node):
    """Every `precompiled_charsmap` of a Precompiled normalizer in a tokenizer.json tree."""
    stack = [node]
    while stack:
        x = stack.pop()
        if isinstance(x, dict):
            if x.get("type") == "Precompiled" and "precompiled_charsmap" in x:
                yield x["precompiled_charsmap"]
            stack.extend(x.values())
        elif isinstance(x, list):
            stack.extend(x)


def load_tokenizer(path: str):
    """Load tokenizer.json; FormatError (never a panic, abort, hang or plain Exception) if it is broken."""
    text = read_text(path, "tokenizer", missing=f"{path}: missing (every converted model has a tokenizer.json)")
    return tokenizer_from_text(text, path)


def tokenizer_from_text(text: str, path: str):
    """A `tokenizers.Tokenizer` from tokenizer.json text, checked as the module docstring describes."""
    import base64
    import binascii
    from tokenizers import Tokenizer
    try:
        # parsed only when it may name a Precompiled normalizer (also if spelled with \u escapes)
        tree = json.loads(text) if "Precompiled" in text or "\\u" in text else None
    except (ValueError, RecursionError) as e:
        raise FormatError(f"{path}: not valid JSON ({_first_line(e)})") from None
    try:
        for cm in _precompiled_charsmaps(tree):
            if not isinstance(cm, str):
                raise FormatError(f"{path}: precompiled_charsmap is not a base64 string")
            try:
                raw = base64.b64decode(cm, validate=True)
            except (binascii.Error, ValueError):
                raise FormatError(f"{path}: precompiled_charsmap is not valid base64") from None
            check_precompiled_charsmap(raw, path)
        tok = Tokenizer.from_str(text)
        tok.no_padding()
        tok.no_truncation()
        ids = tok.encode(_PROBE, add_special_tokens=False).ids
        tok.decode(ids, skip_special_tokens=False)
    except RefimplError:
        raise
    except _FATAL:
        raise
    except BaseException as e:          # tokenizers: plain Exception, pyo3 PanicException (a BaseException)
        raise FormatError(f"{path}: cannot load tokenizer ({_first_line(e)})") from None
    return tok


def check_precompiled_charsmap(charsmap: bytes, what: str = "tokenizer") -> None:
    """Refuse a `precompiled_charsmap` that would make `tokenizers` panic while encoding.

    Layout: u32 trie size in bytes, the darts-clone double array (u32 units), then the
    NUL-separated replacement strings (UTF-8). tokenizers' reader (spm_precompiled) indexes
    the array without bounds checks, so every reachable node is walked here for all 255
    non-zero input bytes: every child slot must exist, and every leaf must point inside
    the strings at a character boundary.
    """
    if len(charsmap) < 4:
        raise FormatError(f"{what}: precompiled_charsmap is truncated")
    size = int.from_bytes(charsmap[:4], "little")
    n = size // 4
    if n == 0 or 4 + 4 * n > len(charsmap):
        raise FormatError(f"{what}: precompiled_charsmap trie of {size} bytes does not fit")
    arr = np.frombuffer(charsmap, dtype="<u4", count=n, offset=4).astype(np.int64)
    strings = np.frombuffer(charsmap, dtype=np.uint8, offset=4 + 4 * n)
    try:
        bytes(strings).decode("utf-8")
    except UnicodeDecodeError:
        raise FormatError(f"{what}: precompiled_charsmap replacement strings are not UTF-8") from None
    # positions that start a character: < 0x80 or >= 0xC0, plus the end of the strings
    boundary = np.append((strings < 0x80) | (strings >= 0xC0), True)

    def offset(u):
        return (u >> 10) << ((u & (1 << 9)) >> 6)

    labels = np.arange(1, 256, dtype=np.int64)
    frontier = np.unique(offset(arr[:1]))
    seen = np.zeros(n, dtype=bool)
    while frontier.size:
        if frontier.max() >= n:
            raise FormatError(f"{what}: precompiled_charsmap trie points outside itself")
        seen[frontier] = True
        children = frontier[:, None] ^ labels[None, :]
        if children.max() >= n:
            raise FormatError(f"{what}: precompiled_charsmap trie points outside itself")
        units = arr[children]
        hit = (units & 0x800000FF) == labels[None, :]
        nxt = children[hit] ^ offset(units[hit])
        if nxt.size and nxt.max() >= n:
            raise FormatError(f"{what}: precompiled_charsmap trie points outside itself")
        leaf = nxt[((units[hit] >> 8) & 1) == 1]
        values = arr[leaf] & 0x7FFFFFFF
        if values.size and (values.max() > strings.size or not boundary[values].all()):
            raise FormatError(f"{what}: precompiled_charsmap replacement index is out of range")
        nxt = np.unique(nxt)
        frontier = nxt[~seen[nxt]]
