"""How tokens read in text output (tables, reports, reprs): never two tokens alike.

JSON output keeps a token's exact decoded string (and its raw piece); text output shows

- every space as `␣` (so GPT-2's ' Paris' reads `␣Paris`, distinct from `Paris`),
- SentencePiece's word-start marker `▁` as `␣` as well: decoding a single SentencePiece
  token drops that space, so without the piece `▁Paris` and `Paris` would look alike,
- control characters and other invisible characters escaped (`\\n`, `\\t`, `\\x00`,
  `\\u200b`), a literal backslash as `\\\\` and a literal `␣` as `\\u2423`,
- an incomplete UTF-8 byte sequence (decodes to U+FFFD) as its raw piece (e.g. `<0xE2>`),
- the empty string as `""`.
"""
from __future__ import annotations

import unicodedata

SPACE = "\u2423"          # ␣
SP_MARK = "\u2581"        # ▁ SentencePiece word start
_ESC = {"\n": "\\n", "\t": "\\t", "\r": "\\r", "\\": "\\\\", SPACE: "\\u2423"}


def _char(c: str) -> str:
    if c == " ":
        return SPACE
    if c in _ESC:
        return _ESC[c]
    if unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs"):
        o = ord(c)
        return f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}"
    return c


def show(text: str, piece: str | None = None) -> str:
    """The display form of one token whose decoded string is `text` and raw piece `piece`."""
    if piece:
        if "\ufffd" in text and "\ufffd" not in piece:
            return "".join(_char(c) for c in piece)              # a byte piece: <0xE2>, GPT-2 byte symbols
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
