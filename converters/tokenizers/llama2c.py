"""llama2.c `tokenizer.bin` to tokenizer.json.

Format (llama2.c tokenizer.py `export`, read by run.c `build_tokenizer`), little-endian:

    int32 max_token_length
    vocab_size times:  float32 score, int32 length, `length` bytes of UTF-8 piece

The vocabulary size is not stored: it comes from the model header. The pieces are
SentencePiece pieces with "▁" written as " ", and BOS/EOS written as "\\n<s>\\n" and
"\\n</s>\\n"; both are mapped back here. run.c's conventions fix the special ids (unk 0,
BOS 1, EOS 2) and the byte-fallback pieces (byte b is id b + 3). The result is the same
SentencePiece-BPE tokenizer as `spm.spm_bpe_tokenizer` (dummy prefix, no whitespace
squeezing: run.c's `encode` does neither more nor less).
"""
from __future__ import annotations

import re
import struct

from refimpl.errors import FormatError
from refimpl.files import read_bytes

from .sentencepiece_model import BYTE, CONTROL, NORMAL, UNKNOWN
from .spm import SPACE, spm_bpe_tokenizer

_BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")
_SPECIAL_TEXT = {1: ("\n<s>\n", "<s>"), 2: ("\n</s>\n", "</s>")}
MAX_PIECE_BYTES = 1 << 16


def read_llama2c_tokenizer(path: str, vocab_size: int) -> tuple[list[str], list[float], int]:
    """Return (raw pieces as stored, scores, max_token_length)."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= 0:
        raise FormatError(f"{path}: vocabulary size must be a positive integer, got {vocab_size!r}")
    data = read_bytes(path, "tokenizer")
    if len(data) < 4:
        raise FormatError(f"{path}: truncated llama2.c tokenizer (no header)")
    (max_len,) = struct.unpack_from("<i", data, 0)
    if not 0 < max_len <= MAX_PIECE_BYTES:
        raise FormatError(f"{path}: implausible max_token_length {max_len}: not a llama2.c tokenizer.bin")
    pieces, scores, off = [], [], 4
    for i in range(vocab_size):
        if off + 8 > len(data):
            raise FormatError(f"{path}: truncated at token {i} of {vocab_size} (byte offset {off})")
        score, n = struct.unpack_from("<fi", data, off)
        off += 8
        if not 0 <= n <= max_len:
            raise FormatError(f"{path}: token {i} has length {n}, outside 0..max_token_length={max_len}")
        if off + n > len(data):
            raise FormatError(f"{path}: truncated in the bytes of token {i} of {vocab_size} (byte offset {off})")
        if score != score:
            raise FormatError(f"{path}: token {i} has a NaN score")
        try:
            pieces.append(data[off:off + n].decode("utf-8"))
        except UnicodeDecodeError:
            raise FormatError(f"{path}: token {i} is not valid UTF-8 (byte offset {off})") from None
        scores.append(score)
        off += n
    if off != len(data):
        raise FormatError(f"{path}: {len(data) - off} bytes left after {vocab_size} tokens "
                          f"(does the vocabulary size match the model?)")
    return pieces, scores, max_len


def llama2c_tokenizer_json(path: str, vocab_size: int) -> tuple[str, dict]:
    """Convert llama2.c's tokenizer.bin (vocab_size from the model header) to tokenizer.json text.

    Returns (json_str, specials) with specials = {"bos": 1, "eos": 2, "unk": 0, "pad": None}.
    """
    raw, scores, _ = read_llama2c_tokenizer(path, vocab_size)
    if vocab_size < 3:
        raise FormatError(f"{path}: a llama2.c vocabulary needs at least unk, BOS and EOS (got {vocab_size})")
    pieces, types = [], []
    for i, p in enumerate(raw):
        if i in _SPECIAL_TEXT:
            stored, piece = _SPECIAL_TEXT[i]
            if p not in (stored, piece):
                raise FormatError(f"{path}: token {i} is {p!r}, expected {stored!r} (run.c's fixed BOS/EOS ids)")
            pieces.append(piece)
            types.append(CONTROL)
        elif i == 0:
            pieces.append(p)
            types.append(UNKNOWN)
        elif _BYTE_PIECE.fullmatch(p):
            pieces.append(p)
            types.append(BYTE)
        else:
            pieces.append(p.replace(" ", SPACE))
            types.append(NORMAL)
    if not pieces[0]:
        raise FormatError(f"{path}: token 0 (unk) is empty")
    # run.c falls back to id (byte + 3) for characters outside the vocabulary
    byte_fallback = len(pieces) >= 259 and all(pieces[b + 3] == f"<0x{b:02X}>" for b in range(256))
    if not byte_fallback and any(t == BYTE for t in types):
        raise FormatError(f"{path}: byte pieces are not at ids 3..258 where run.c expects them")
    tok = spm_bpe_tokenizer(pieces, scores, types, unk_id=0, byte_fallback=byte_fallback,
                            add_dummy_prefix=True, remove_extra_whitespaces=False,
                            escape_whitespaces=True, what=str(path))
    return tok.to_str(), {"bos": 1, "eos": 2, "unk": 0, "pad": None}
