"""SentencePiece BPE (LLaMA-style) as a Hugging Face `tokenizers` tokenizer.

The recipe is transformers' `LlamaConverter` (legacy mode) with merges generated the way
`SpmConverter.build_tokenizer_from_spm_proto` does it:

- model: BPE over the piece vocabulary (id = piece index); a merge (left, right) exists
  for every NORMAL piece that splits into two NORMAL pieces, ranked by the merged piece's
  score (highest first, ties by piece id); `byte_fallback` maps characters outside the
  vocabulary to the `<0xXX>` byte pieces; unknown piece = the model's unk piece.
- normalizer: [Precompiled charsmap] [strip / squeeze spaces when remove_extra_whitespaces]
  Prepend("▁") (the dummy prefix) and Replace(" ", "▁") (whitespace escaping). No
  pre-tokenizer: SentencePiece does not split on whitespace at encoding time.
- decoder: Replace("▁", " "), ByteFallback, Fuse, Strip one leading space (the dummy prefix).
- CONTROL and UNKNOWN pieces are special added tokens (skipped by
  `decode(skip_special_tokens=True)`; note that SentencePiece itself never produces them
  from text, while this tokenizer, like transformers', maps the literal text `<s>` to BOS).
- USER_DEFINED pieces, which SentencePiece matches whole in the normalized text and never
  merges, are isolated by a Split pre-tokenizer and the BPE model ignores merges for a
  segment that is itself a piece (transformers' `build_tokenizer_from_spm_proto`).

No post-processor: BOS is not added by the tokenizer (refimpl prepends `prepend_ids`).
"""
from __future__ import annotations

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

from refimpl.errors import FormatError
from refimpl.tokenizer import check_precompiled_charsmap  # noqa: F401  (re-exported: it belongs to the format)

from .sentencepiece_model import (BPE as SPM_BPE, BYTE, CONTROL, MODEL_TYPE_NAMES, NORMAL,
                                  UNKNOWN, USER_DEFINED, SentencePieceModel,
                                  read_sentencepiece_model)

SPACE = "\u2581"   # "▁", SentencePiece's escaped whitespace


def spm_merges(pieces, scores, types) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece BPE vocabulary (see the module docstring)."""
    normal = {p: i for i, (p, t) in enumerate(zip(pieces, types)) if t == NORMAL}
    ranked = []
    for piece, i in normal.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in normal and right in normal:
                ranked.append((-scores[i], i, k, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def spm_bpe_tokenizer(pieces, scores, types, *, unk_id: int = 0, byte_fallback: bool = True,
                      add_dummy_prefix: bool = True, remove_extra_whitespaces: bool = False,
                      escape_whitespaces: bool = True, precompiled_charsmap: bytes = b"",
                      what: str = "tokenizer") -> Tokenizer:
    """Build a `tokenizers.Tokenizer` that encodes like SentencePiece BPE.

    pieces/scores/types are parallel sequences indexed by token id; types use
    SentencePiece's enum (1 NORMAL, 2 UNKNOWN, 3 CONTROL, 4 USER_DEFINED, 5 UNUSED, 6 BYTE).
    """
    pieces, scores, types = list(pieces), [float(s) for s in scores], [int(t) for t in types]
    if not (len(pieces) == len(scores) == len(types)) or not pieces:
        raise FormatError(f"{what}: pieces, scores and types differ in length or are empty")
    vocab = {}
    for i, s in enumerate(scores):
        if s != s:
            raise FormatError(f"{what}: piece {i} has a NaN score")
    for i, p in enumerate(pieces):
        if not isinstance(p, str) or not p:
            raise FormatError(f"{what}: piece {i} is empty")
        if p in vocab:
            raise FormatError(f"{what}: piece {p!r} occurs twice (ids {vocab[p]} and {i})")
        vocab[p] = i
    if not 0 <= unk_id < len(pieces):
        raise FormatError(f"{what}: unk id {unk_id} is outside the vocabulary of {len(pieces)}")

    user_defined = [p for p, t in zip(pieces, types) if t == USER_DEFINED]
    extra = {"ignore_merges": True} if user_defined else {}
    try:
        model = BPE(vocab=vocab, merges=spm_merges(pieces, scores, types), unk_token=pieces[unk_id],
                    fuse_unk=True, byte_fallback=bool(byte_fallback), dropout=None, **extra)
    except Exception as e:  # tokenizers raises plain Exception
        raise FormatError(f"{what}: cannot build the BPE model ({e})") from None
    tok = Tokenizer(model)

    norms = []
    if precompiled_charsmap:
        check_precompiled_charsmap(bytes(precompiled_charsmap), what)
        try:
            norms.append(normalizers.Precompiled(precompiled_charsmap))
        except Exception as e:
            raise FormatError(f"{what}: bad precompiled_charsmap ({e})") from None
    if remove_extra_whitespaces:
        # SentencePiece only squeezes U+0020; newlines and tabs are left alone
        norms += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if add_dummy_prefix:
        norms.append(normalizers.Prepend(SPACE if escape_whitespaces else " "))
    if escape_whitespaces:
        norms.append(normalizers.Replace(" ", SPACE))
    if norms:
        tok.normalizer = normalizers.Sequence(norms)

    if user_defined:
        # longest first, each character as \x{...} so no piece can be read as regex syntax
        alts = ["".join(f"\\x{{{ord(c):X}}}" for c in p) for p in sorted(user_defined, key=len, reverse=True)]
        tok.pre_tokenizer = pre_tokenizers.Split(Regex("|".join(alts)), behavior="isolated")

    decs = [decoders.Replace(SPACE, " ")]
    if byte_fallback:
        decs.append(decoders.ByteFallback())
    decs.append(decoders.Fuse())
    if add_dummy_prefix:
        decs.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(decs)

    special = [AddedToken(p, special=True, normalized=False)
               for p, t in zip(pieces, types) if t in (CONTROL, UNKNOWN)]
    if special:
        tok.add_special_tokens(special)
    return tok


def _id_or_none(i: int, n: int):
    return int(i) if 0 <= i < n else None


def llama_tokenizer_json(path: str) -> tuple[str, dict]:
    """Convert a SentencePiece BPE `tokenizer.model` (LLaMA, Llama-2, ...) to tokenizer.json text.

    Returns (json_str, specials) with specials = {"bos", "eos", "unk", "pad"} ids (None if absent).
    """
    return sentencepiece_model_tokenizer_json(read_sentencepiece_model(path), what=str(path))


def sentencepiece_model_tokenizer_json(m: SentencePieceModel, what: str = "tokenizer.model") -> tuple[str, dict]:
    """`llama_tokenizer_json` for an already parsed model (`parse_model_proto`)."""
    path = what
    ts, ns = m.trainer_spec, m.normalizer_spec
    for present, name in ((m.has_trainer_spec, "trainer_spec"), (m.has_normalizer_spec, "normalizer_spec")):
        if not present:
            raise FormatError(f"{path}: SentencePiece model has no {name} (truncated file?)")
    if ts.model_type != SPM_BPE:
        name = MODEL_TYPE_NAMES.get(ts.model_type, str(ts.model_type))
        raise FormatError(f"{path}: SentencePiece model type is {name}, only BPE is supported")
    n = len(m.pieces)
    if not 0 <= ts.unk_id < n:
        raise FormatError(f"{path}: unk_id {ts.unk_id} is outside the vocabulary of {n}")
    if ts.byte_fallback:
        byte_pieces = {p for p, t in zip(m.pieces, m.types) if t == BYTE}
        missing = [b for b in range(256) if f"<0x{b:02X}>" not in byte_pieces]
        if missing:
            raise FormatError(f"{path}: byte_fallback is set but byte piece <0x{missing[0]:02X}> is missing")
    tok = spm_bpe_tokenizer(m.pieces, m.scores, m.types, unk_id=ts.unk_id,
                            byte_fallback=ts.byte_fallback,
                            add_dummy_prefix=ns.add_dummy_prefix,
                            remove_extra_whitespaces=ns.remove_extra_whitespaces,
                            escape_whitespaces=ns.escape_whitespaces,
                            precompiled_charsmap=ns.precompiled_charsmap, what=str(path))
    specials = {"bos": _id_or_none(ts.bos_id, n), "eos": _id_or_none(ts.eos_id, n),
                "unk": _id_or_none(ts.unk_id, n), "pad": _id_or_none(ts.pad_id, n)}
    return tok.to_str(), specials
