"""fairseq `dict.txt` to a word-level tokenizer.json.

Semantics of fairseq's `Dictionary()` + `add_from_file` (fairseq/data/dictionary.py):

- ids 0..3 are `<s>`, `<pad>`, `</s>`, `<unk>`; dict lines follow from id 4 in file order
  (no re-sorting, and no `madeupwordNNNN` padding: that only happens in `finalize`).
- a line is `line.rstrip().rsplit(" ", 1)` = word, count, where the count must parse as
  int; a trailing ` #fairseq:overwrite` flag is split off first. The word is everything
  before the last space (it may itself contain spaces; such words are unreachable).
- a word already present (including the four specials) is an error unless the line has
  the overwrite flag; then the word gets a NEW id at the end and the old id is orphaned
  (fairseq still decodes it to the word; here it becomes `<fairseq:orphan:ID>` so ids
  stay dense and the vocabulary size equals fairseq's `len(dict)`).
- encoding (`tokenize_line`) splits on runs of Python whitespace (`str.split()`), unknown
  words give `<unk>` (3). Here: a Split pre-tokenizer on exactly Python's whitespace set
  and a WordLevel model. The specials are plain vocabulary words, as in fairseq: the word
  `</s>` encodes to 2, but `a</s>b` is one unknown word.
- decoding joins words with single spaces (nothing is skipped).
"""
from __future__ import annotations

import functools
import io
import sys

from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
from tokenizers.models import WordLevel

from refimpl.errors import FormatError
from refimpl.files import read_text

FAIRSEQ_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
OVERWRITE = "#fairseq:overwrite"


@functools.lru_cache(maxsize=1)
def _ws_class() -> str:
    """The characters Python's str.split() splits on (str.isspace), as a regex class
    (computed on first use: scanning all of Unicode takes ~0.5 s)."""
    chars = (chr(c) for c in range(sys.maxunicode + 1) if chr(c).isspace())
    return "[" + "".join(f"\\x{{{ord(c):X}}}" for c in chars) + "]+"


def read_fairseq_dict(path: str) -> list[str]:
    """Symbols of `Dictionary.load(path)` in id order (specials first); orphans are None."""
    lines = io.StringIO(read_text(path, "tokenizer"), newline=None).readlines()   # as open(path, "r") reads it
    symbols: list = list(FAIRSEQ_SPECIALS)
    index = {w: i for i, w in enumerate(symbols)}
    for lineno, raw in enumerate(lines, 1):
        line = raw.rstrip()
        parts = line.rsplit(" ", 1)
        if len(parts) != 2:
            raise FormatError(f"{path}:{lineno}: expected '<token> <count> [flags]', got {raw.rstrip()[:60]!r}")
        word, field = parts
        overwrite = field == OVERWRITE
        if overwrite:
            parts = word.rsplit(" ", 1)
            if len(parts) != 2:
                raise FormatError(f"{path}:{lineno}: expected '<token> <count> [flags]', got {raw.rstrip()[:60]!r}")
            word, field = parts
        try:
            int(field)
        except ValueError:
            raise FormatError(f"{path}:{lineno}: count {field[:30]!r} is not an integer") from None
        if word in index:
            if not overwrite:
                raise FormatError(f"{path}:{lineno}: duplicate word {word[:60]!r} (first at id {index[word]}); "
                                  f"fairseq requires the '{OVERWRITE}' flag")
            symbols[index[word]] = None
        index[word] = len(symbols)
        symbols.append(word)
    return symbols


def fairseq_dict_tokenizer_json(path: str) -> tuple[str, dict]:
    """Convert a fairseq dict.txt to tokenizer.json text.

    Returns (json_str, specials) = (..., {"bos": 0, "pad": 1, "eos": 2, "unk": 3}).
    """
    symbols = read_fairseq_dict(path)
    vocab = {}
    for i, w in enumerate(symbols):
        vocab[f"<fairseq:orphan:{i}>" if w is None else w] = i
    if len(vocab) != len(symbols):  # an orphan placeholder collided with a real word
        raise FormatError(f"{path}: cannot represent an overwritten entry (placeholder name is taken)")
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(_ws_class()), behavior="removed")
    # join with single spaces: prefix every word with " ", concatenate, drop the first space
    tok.decoder = decoders.Sequence([decoders.Replace(Regex(r"\A"), " "), decoders.Fuse(),
                                     decoders.Strip(content=" ", left=1, right=0)])
    return tok.to_str(), {"bos": 0, "eos": 2, "unk": 3, "pad": 1}
