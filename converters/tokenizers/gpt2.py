"""OpenAI GPT-2 byte-level BPE (`encoder.json` + `vocab.bpe`, a.k.a. vocab.json + merges.txt).

Same recipe as transformers' `GPT2Converter`: BPE with no unknown token, ByteLevel
pre-tokenizer (GPT-2's regex, add_prefix_space=False), ByteLevel decoder and a ByteLevel
post-processor with trim_offsets=False (offsets only). `<|endoftext|>` is a special added
token; it is GPT-2's BOS and EOS. No BOS is added when encoding.
"""
from __future__ import annotations

import io
import json

from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

from refimpl.errors import FormatError
from refimpl.files import read_text

ENDOFTEXT = "<|endoftext|>"


def read_gpt2_vocab(path: str) -> dict[str, int]:
    text = read_text(path, "tokenizer")
    try:
        vocab = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise FormatError(f"{path}: not a JSON vocabulary ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if not isinstance(vocab, dict) or not vocab:
        raise FormatError(f"{path}: expected a non-empty JSON object mapping tokens to ids")
    seen = {}
    for token, i in vocab.items():
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < 1 << 31:
            raise FormatError(f"{path}: token {token!r} has id {i!r}, expected a non-negative integer")
        if i in seen:
            raise FormatError(f"{path}: id {i} is used by both {seen[i]!r} and {token!r}")
        seen[i] = token
    return vocab


def read_gpt2_merges(path: str) -> list[tuple[str, str]]:
    """`vocab.bpe`: an optional `#version: ...` first line, then `left right` per line."""
    lines = io.StringIO(read_text(path, "tokenizer"), newline=None).read().split("\n")   # as open(path, "r")
    merges = []
    for lineno, line in enumerate(lines, 1):
        line = line.rstrip("\r")
        if (lineno == 1 and line.startswith("#version")) or not line:
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise FormatError(f"{path}:{lineno}: expected 'left right', got {line[:60]!r}")
        merges.append((parts[0], parts[1]))
    return merges


def gpt2_tokenizer_json(vocab_path: str, merges_path: str) -> tuple[str, dict]:
    """Convert GPT-2's encoder.json/vocab.json and vocab.bpe/merges.txt to tokenizer.json text.

    Returns (json_str, specials): bos = eos = id of `<|endoftext|>` (50256), unk = pad = None
    (byte-level BPE has no unknown token).
    """
    vocab = read_gpt2_vocab(vocab_path)
    merges = read_gpt2_merges(merges_path)
    for a, b in merges:
        for piece in (a, b, a + b):
            if piece not in vocab:
                raise FormatError(f"{merges_path}: merge {a!r} {b!r} uses {piece!r}, which is not in {vocab_path}")
    try:
        model = BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                    end_of_word_suffix="", fuse_unk=False)
    except Exception as e:  # tokenizers raises plain Exception
        raise FormatError(f"{vocab_path}: cannot build the BPE model ({e})") from None
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    eot = vocab.get(ENDOFTEXT)
    if eot is not None:
        tok.add_special_tokens([AddedToken(ENDOFTEXT, special=True, normalized=False)])
    return tok.to_str(), {"bos": eot, "eos": eot, "unk": None, "pad": None}
