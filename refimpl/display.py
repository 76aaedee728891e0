"""How tokens read in text output (tables, reports, reprs): never two tokens alike.

JSON output keeps a token's exact decoded string (and its raw piece); text output shows

- every space as `␣` (so GPT-2's ' Paris' reads `␣Paris`, distinct from `Paris`),
- SentencePiece's word-start marker `▁` as `␣` as well: decoding a single SentencePiece
  token drops that space, so without the piece `▁Paris` and `Paris` would look alike,
- control characters and other invisible characters escaped (`\\n`, `\\t`, `\\u0000`,
  `\\u00a0`, `\\u200b`), a literal backslash as `\\\\` and a literal `␣` as `\\u2423`,
- a SentencePiece byte piece as the piece (`<0x0A>`), and the bytes of a byte-level
  (GPT-2) piece that are not complete UTF-8 (they decode to U+FFFD) as `\\xe2`,
- the empty string as `""`.
"""
from __future__ import annotations

import re
import unicodedata

SPACE = "\u2423"          # ␣
SP_MARK = "\u2581"        # ▁ SentencePiece word start
_ESC = {"\n": "\\n", "\t": "\\t", "\r": "\\r", "\\": "\\\\", SPACE: "\\u2423"}


def _byte_level_table() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character standing for each byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = list(bs), 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_BYTE_LEVEL = _byte_level_table()
_BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


def _char(c: str) -> str:
    if c == " ":
        return SPACE
    if c in _ESC:
        return _ESC[c]
    if 0xDC80 <= ord(c) <= 0xDCFF:                                 # a byte that is not UTF-8 (surrogateescape)
        return f"\\x{ord(c) - 0xDC00:02x}"
    if unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs"):
        o = ord(c)
        return f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}"
    return c


def show(text: str, piece: str | None = None) -> str:
    """The display form of one token whose decoded string is `text` and raw piece `piece`."""
    if piece:
        if _BYTE_PIECE.match(piece):                              # SentencePiece byte fallback
            return piece
        if "\ufffd" in text and "\ufffd" not in piece and all(c in _BYTE_LEVEL for c in piece):
            text = bytes(_BYTE_LEVEL[c] for c in piece).decode("utf-8", "surrogateescape")   # GPT-2 bytes
        marks = len(piece) - len(piece.lstrip(SP_MARK))
        spaces = len(text) - len(text.lstrip(" "))
        if marks > spaces:                                        # the decoder stripped the word-start space
            text = " " * (marks - spaces) + text
    return "".join(_char(c) for c in text) if text else '""'


def piece(model, i: int) -> str | None:
    """Token i's raw vocabulary entry (None when the tokenizer has no entry for it)."""
    return model._tok("look up a token", lambda t: t.id_to_token(int(i)))


def token(model, i: int) -> str:
    """The display form of token id i of `model`."""
    return show(model.token_str(int(i)), piece(model, int(i)))


def tokens(model, ids) -> list[str]:
    return [token(model, i) for i in ids]
