"""Tokenizer converters (converters/tokenizers) against real files and real implementations.

References used here:
- llama.cpp's tokenizer test vectors (tests/test-tokenizer-0.cpp conventions) for GPT-2
  and LLaMA SentencePiece;
- transformers' GPT2TokenizerFast built from the same vocab/merges files;
- the `sentencepiece` package itself (test-only dependency; tests skip without it);
- a line-by-line Python port of llama2.c's run.c `encode`/`decode`;
- fairseq's `Dictionary.add_from_file` semantics.
"""
from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from converters.tokenizers import (fairseq_dict_tokenizer_json, gpt2_tokenizer_json,
                                   llama2c_tokenizer_json, llama_tokenizer_json,
                                   parse_model_proto, sentencepiece_model_tokenizer_json,
                                   spm_bpe_tokenizer)
from converters.tokenizers.sentencepiece_model import BPE, BYTE, CONTROL, NORMAL, UNKNOWN, UNUSED
from refimpl.errors import FormatError

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures"
VECTORS = FIX / "tokenizer-vectors"
GPT2_VOCAB = FIX / "tokenizers" / "gpt2" / "encoder.json"
GPT2_MERGES = FIX / "tokenizers" / "gpt2" / "vocab.bpe"
LLAMA_MODEL = FIX / "tokenizers" / "llama" / "tokenizer.model"
TOK512 = FIX / "stories260K" / "tok512.bin"
GREEDY_TEXT = FIX / "stories260K" / "expected_greedy_200.txt"
WIKI103_DICT = FIX / "tokenizers" / "wiki103" / "dict.txt"

# REFIMPL_HYPOTHESIS_EXAMPLES=5000 for a long soak
N_EXAMPLES = int(os.environ.get("REFIMPL_HYPOTHESIS_EXAMPLES", "300"))
HYP = settings(deadline=None, max_examples=N_EXAMPLES, suppress_health_check=[HealthCheck.too_slow])


# -- converted tokenizers (once per module) ------------------------------------------
@pytest.fixture(scope="module")
def gpt2():
    s, specials = gpt2_tokenizer_json(str(GPT2_VOCAB), str(GPT2_MERGES))
    return Tokenizer.from_str(s), specials


@pytest.fixture(scope="module")
def llama():
    s, specials = llama_tokenizer_json(str(LLAMA_MODEL))
    return Tokenizer.from_str(s), specials


@pytest.fixture(scope="module")
def tok512():
    s, specials = llama2c_tokenizer_json(str(TOK512), 512)
    return Tokenizer.from_str(s), specials


@pytest.fixture(scope="module")
def wiki103():
    s, specials = fairseq_dict_tokenizer_json(str(WIKI103_DICT))
    return Tokenizer.from_str(s), specials


def enc(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False).ids


# -- text strategies -----------------------------------------------------------------
CHUNKS = [" ", "  ", "   ", "\n", "\n\n", "\t", "\r\n", "\r", "\x0b", "\x0c", "\x00", "\u00a0", "\u3000",
          "\u2009", "\u200a", "\u200b", "\u200d", "\u2581", "Hello", "hello", "world", "the", "The", "'s",
          "'t", "'re", "'ll", "I", "don't", ",", ".", "!", "?", "...", "-", "(", ")", "<", ">", "/", "s",
          "0x0A", "<0x41>", "3", "33", "333", "2024", "é", "e\u0301", "Ü", "ß", "ﬁ", "①", "中文", "日本語",
          "Привет", "Ελληνικά", "عربى", "नमस्ते", "កាន់", "😀", "🦙", "👨\u200d👩\u200d👧", "🌫️", "\U0001F600" * 3,
          "\U00010348", "\ufeff", "\ufffd", "\x7f", "\x85", "_", "▁▁", "w048", "7tuijk"]
text_chunks = st.lists(st.sampled_from(CHUNKS), max_size=25).map("".join)
any_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=60)
mixed_text = st.one_of(text_chunks, any_text,
                       st.lists(st.one_of(st.sampled_from(CHUNKS), any_text), max_size=6).map("".join))


# -- llama.cpp vectors ---------------------------------------------------------------
def read_vectors(name: str) -> list[tuple[str, list[int]]]:
    """test-tokenizer-0.cpp `read_tests`: texts are separated by "\\n__ggml_vocab_test__\\n"
    (the file ends with one, so no empty text follows it); the .out file has one line of
    space-separated ids per text, stripped (llama.cpp's generator writes a leading space)."""
    raw = (VECTORS / f"{name}.inp").read_bytes().decode("utf-8")
    sep = "\n__ggml_vocab_test__\n"
    texts, pos = [], 0
    while pos < len(raw):
        nxt = raw.find(sep, pos)
        if nxt < 0:
            texts.append(raw[pos:])
            break
        texts.append(raw[pos:nxt])
        pos = nxt + len(sep)
    out = (VECTORS / f"{name}.out").read_bytes().decode("utf-8")
    lines = out.split("\n")
    if out.endswith("\n"):   # std::getline: no line after the final newline
        lines.pop()
    assert len(texts) == len(lines), f"{name}: {len(texts)} inputs, {len(lines)} outputs"
    return [(t, [int(x) for x in line.strip().split(" ") if x]) for t, line in zip(texts, lines)]


def test_vector_files_parse():
    for name in ("gpt-2", "llama-spm"):
        cases = read_vectors(name)
        assert len(cases) == 46
        assert ("", []) in cases                       # the empty text has an empty id line
        assert any(t == "\n" for t, _ in cases) and any(t.endswith("\n") for t, _ in cases)


@pytest.mark.parametrize("case", range(46))
def test_gpt2_llama_cpp_vectors(gpt2, case):
    tok, _ = gpt2
    text, want = read_vectors("gpt-2")[case]
    assert enc(tok, text) == want, repr(text)
    # byte-level BPE is lossless: decoding gives back the text exactly
    assert tok.decode(want) == text


@pytest.mark.parametrize("case", range(46))
def test_llama_spm_llama_cpp_vectors(llama, case):
    tok, _ = llama
    text, want = read_vectors("llama-spm")[case]
    # the vectors have no BOS (test-tokenizer-0 tokenizes with add_special=false) and
    # our tokenizer adds none either: BOS comes from config.json's prepend_ids
    assert 1 not in want
    assert enc(tok, text) == want, repr(text)
    # Every non-empty text starts with the dummy-prefix "▁" (as its own piece or fused
    # into the first word); the decoder strips exactly that one leading space, so the
    # round trip is exact, including texts that start with spaces, tabs or newlines.
    assert tok.decode(want) == text


# -- GPT-2 -----------------------------------------------------------------------------
def test_gpt2_specials_and_json(gpt2):
    tok, specials = gpt2
    assert specials == {"bos": 50256, "eos": 50256, "unk": None, "pad": None}
    assert tok.get_vocab_size() == 50257
    assert tok.token_to_id("<|endoftext|>") == 50256
    assert enc(tok, "Hello<|endoftext|>") == [15496, 50256]
    assert tok.decode([15496, 50256]) == "Hello"                      # special skipped
    assert tok.decode([15496, 50256], skip_special_tokens=False) == "Hello<|endoftext|>"
    cfg = json.loads(tok.to_str())
    assert cfg["pre_tokenizer"]["type"] == "ByteLevel" and cfg["pre_tokenizer"]["add_prefix_space"] is False
    assert cfg["decoder"]["type"] == "ByteLevel"
    assert cfg["model"]["type"] == "BPE" and len(cfg["model"]["merges"]) == 50000


@pytest.fixture(scope="module")
def hf_gpt2():
    transformers = pytest.importorskip("transformers")
    cls = transformers.GPT2TokenizerFast
    try:     # transformers >= 5
        t = cls(vocab=str(GPT2_VOCAB), merges=str(GPT2_MERGES))
    except Exception:
        t = None
    if t is None or len(t) != 50257:   # transformers 4.x
        t = cls(vocab_file=str(GPT2_VOCAB), merges_file=str(GPT2_MERGES))
    assert len(t) == 50257
    return t


GPT2_FIXED = ["", " ", "Hello world", " Hello  world  ", "a\n\n\nb", "\t\t x", "I'm   here\n \n",
              "😀😀 👨\u200d👩\u200d👧", "e\u0301 café", "   leading", "trailing   ", "x" * 300,
              " " * 50 + "y", "<|endoftext|>", "a<|endoftext|>b", "3333333", "\r\n\r\n", "\x00\x01"]


@pytest.mark.parametrize("text", GPT2_FIXED)
def test_gpt2_matches_transformers_fixed(gpt2, hf_gpt2, text):
    tok, _ = gpt2
    ids = hf_gpt2.encode(text, add_special_tokens=False)
    assert enc(tok, text) == ids
    assert tok.decode(ids, skip_special_tokens=False) == hf_gpt2.decode(ids) == text


@HYP
@given(text=mixed_text)
def test_gpt2_matches_transformers_random(gpt2, hf_gpt2, text):
    tok, _ = gpt2
    ids = enc(tok, text)
    assert ids == hf_gpt2.encode(text, add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_gpt2_bad_files(tmp_path):
    merges = tmp_path / "merges.txt"
    merges.write_text("#version: 0.2\nh e\n", encoding="utf-8")
    vocab = tmp_path / "vocab.json"
    vocab.write_text(json.dumps({"h": 0, "e": 1, "he": 2, "<|endoftext|>": 3}), encoding="utf-8")
    s, specials = gpt2_tokenizer_json(str(vocab), str(merges))
    assert specials["eos"] == 3 and enc(Tokenizer.from_str(s), "he") == [2]
    bad = [("{not json", "h e\n"), ("[1, 2]", "h e\n"), ('{"h": "x"}', "h e\n"),
           ('{"h": 0, "e": 0}', "h e\n"), ('{"h": 0, "e": 1, "he": 2}', "h e x\n"),
           ('{"h": 0, "e": 1}', "h e\n"), ('{"h": 0, "e": 1, "he": 2}', "h\n")]
    for v, m in bad:
        vocab.write_text(v, encoding="utf-8")
        merges.write_text(m, encoding="utf-8")
        with pytest.raises(FormatError) as e:
            gpt2_tokenizer_json(str(vocab), str(merges))
        assert "\n" not in str(e.value)
    vocab.write_bytes(b'{"\xff": 0}')
    with pytest.raises(FormatError):
        gpt2_tokenizer_json(str(vocab), str(merges))


# -- LLaMA SentencePiece -----------------------------------------------------------------
def test_llama_model_fields(llama):
    tok, specials = llama
    assert specials == {"bos": 1, "eos": 2, "unk": 0, "pad": None}
    assert tok.get_vocab_size() == 32000
    assert [tok.id_to_token(i) for i in (0, 1, 2, 3, 258, 29871)] == ["<unk>", "<s>", "</s>", "<0x00>", "<0xFF>", "▁"]
    cfg = json.loads(tok.to_str())
    assert cfg["model"]["byte_fallback"] is True and cfg["model"]["unk_token"] == "<unk>"
    assert cfg["pre_tokenizer"] is None and cfg["post_processor"] is None
    assert {t["content"] for t in cfg["added_tokens"] if t["special"]} == {"<unk>", "<s>", "</s>"}
    assert tok.decode([1, 15043, 2]) == "Hello"
    assert tok.decode([1, 15043, 2], skip_special_tokens=False) == "<s> Hello</s>"


def test_parser_agrees_with_protobuf():
    pb2 = pytest.importorskip("sentencepiece.sentencepiece_model_pb2")
    data = LLAMA_MODEL.read_bytes()
    ref = pb2.ModelProto()
    ref.ParseFromString(data)
    m = parse_model_proto(data)
    assert m.pieces == [p.piece for p in ref.pieces]
    assert m.scores == [p.score for p in ref.pieces]
    assert m.types == [p.type for p in ref.pieces]
    ts, rts = m.trainer_spec, ref.trainer_spec
    for f in ("model_type", "vocab_size", "byte_fallback", "unk_id", "bos_id", "eos_id", "pad_id",
              "unk_piece", "bos_piece", "eos_piece", "pad_piece"):
        assert getattr(ts, f) == getattr(rts, f), f
    for f in ("name", "precompiled_charsmap", "add_dummy_prefix", "remove_extra_whitespaces", "escape_whitespaces"):
        assert getattr(m.normalizer_spec, f) == getattr(ref.normalizer_spec, f), f


@pytest.fixture(scope="module")
def sp_llama():
    spm = pytest.importorskip("sentencepiece")
    return spm.SentencePieceProcessor(model_file=str(LLAMA_MODEL))


LLAMA_FIXED = ["", " ", "  ", "\n", " \n \t\t\n", "Hello world", " " * 40 + "x", "x" + " " * 17 + "y" + " " * 33,
               "▁Hello", "▁▁", "a\u2581b", "🦙🦙", "\U0010FFFF", "\x00", "3333 444", "Cửa Việt", "ﬁ①ｆ",
               "e\u0301", "\r\n", "\u3000\u00a0"]


@pytest.mark.parametrize("text", LLAMA_FIXED)
def test_llama_matches_sentencepiece_fixed(llama, sp_llama, text):
    tok, _ = llama
    ids = sp_llama.encode(text)
    assert enc(tok, text) == ids
    # lossless except that a literal "▁" in the text comes back as a space (in SentencePiece too)
    assert tok.decode(ids) == sp_llama.decode(ids) == text.replace("\u2581", " ")


@HYP
@given(text=mixed_text)
def test_llama_matches_sentencepiece_random(llama, sp_llama, text):
    tok, _ = llama
    # SentencePiece never maps text to control pieces; this tokenizer (like transformers')
    # reads a literal "<s>" as BOS: see test_llama_control_text
    assume(not any(s in text for s in ("<s>", "</s>", "<unk>")))
    ids = enc(tok, text)
    assert ids == sp_llama.encode(text)
    assert tok.decode(ids) == sp_llama.decode(ids) == text.replace("\u2581", " ")


def test_llama_control_text(llama, sp_llama):
    tok, _ = llama
    # transformers' (legacy Llama) behaviour: "<s>" is BOS, and the text after it gets its
    # own dummy prefix ("▁b" = 289)
    assert enc(tok, "a<s>b") == [263, 1, 289]
    assert sp_llama.encode("a<s>b") == [263, 29966, 29879, 29958, 29890]   # SentencePiece: literal text


# synthetic SentencePiece models exercise the spec options LLaMA does not use
SPM_OPTIONS = {
    "nmt_nfkc": dict(byte_fallback=True),
    "identity": dict(byte_fallback=True, normalization_rule_name="identity"),
    "keep_spaces": dict(byte_fallback=True, remove_extra_whitespaces=False),
    "no_byte_fallback": dict(byte_fallback=False, vocab_size=100),
    "no_dummy_prefix": dict(byte_fallback=True, add_dummy_prefix=False),
    "user_defined": dict(byte_fallback=True, user_defined_symbols=["cat", "<sep>"]),
}
SPM_CHUNKS = [" ", "  ", "\t", "\n", "\u3000", "\xa0", "the", "cat", "<sep>", "hat", "a", "b", "c", "e", "Über",
              "naïve", "café", "ｆｕｌｌ", "①", "ﬁ", "12", "3", "😀", ",", ".", "x"]


@pytest.fixture(scope="module")
def spm_models(tmp_path_factory):
    spm = pytest.importorskip("sentencepiece")
    import io
    rng = random.Random(0)
    words = "the cat sat on a mat with hats and bats Über naïve café ｆｕｌｌ ① ﬁ 12345 67".split()
    corpus = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 12))) for _ in range(3000)]
    out = {}
    for name, opts in SPM_OPTIONS.items():
        opts = dict(opts)
        buf = io.BytesIO()
        spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=buf, model_type="bpe",
                                       vocab_size=opts.pop("vocab_size", 300), hard_vocab_limit=False,
                                       minloglevel=2, **opts)
        path = tmp_path_factory.mktemp("spm") / f"{name}.model"
        path.write_bytes(buf.getvalue())
        s, _ = llama_tokenizer_json(str(path))
        out[name] = (Tokenizer.from_str(s), spm.SentencePieceProcessor(model_file=str(path)))
        out[name + ".path"] = path
    # a unigram model is refused, clearly
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=buf, model_type="unigram",
                                   vocab_size=40, hard_vocab_limit=False, minloglevel=2)
    path = tmp_path_factory.mktemp("spm") / "unigram.model"
    path.write_bytes(buf.getvalue())
    out["unigram"] = path
    return out


def test_spm_unigram_refused(spm_models):
    with pytest.raises(FormatError, match="unigram"):
        llama_tokenizer_json(str(spm_models["unigram"]))


@pytest.mark.parametrize("name", sorted(SPM_OPTIONS))
@settings(deadline=None, max_examples=N_EXAMPLES // 2, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.lists(st.sampled_from(SPM_CHUNKS), max_size=20).map("".join))
def test_spm_options_match_sentencepiece(spm_models, name, text):
    tok, sp = spm_models[name]
    assert enc(tok, text) == sp.encode(text)


def test_corrupt_precompiled_charsmap(spm_models):
    """tokenizers indexes the charsmap trie unchecked and panics at encode time on a bad
    one; the converter must refuse such a charsmap up front."""
    m = parse_model_proto(spm_models["nmt_nfkc.path"].read_bytes())
    charsmap = m.normalizer_spec.precompiled_charsmap
    assert len(charsmap) > 1000
    probe = "".join(chr(c) for c in range(1, 0x3100)) + "ｆｕｌｌ①ﬁ\uff21\u3000" + "".join(map(chr, range(0xF900, 0x10000)))
    rng = random.Random(5)
    refused = 0
    for i in range(40):
        d = bytearray(charsmap)
        for _ in range(rng.randint(1, 4)):
            d[rng.randrange(len(d))] = rng.randrange(256)
        if i % 4 == 0:
            d = d[:rng.randrange(len(d))]
        try:
            tok = spm_bpe_tokenizer(m.pieces, m.scores, m.types, precompiled_charsmap=bytes(d))
        except FormatError as e:
            assert "\n" not in str(e)
            refused += 1
            continue
        tok.encode(probe)               # a PanicException here would fail the test
    assert refused > 0


# -- llama2.c tokenizer.bin ------------------------------------------------------------------
class RunC:
    """Python port of llama2.c run.c: build_tokenizer, encode (bos=eos=0) and decode."""

    def __init__(self, path, vocab_size):
        data = Path(path).read_bytes()
        off = 4
        self.vocab, self.scores = [], []
        for _ in range(vocab_size):
            score, n = struct.unpack_from("<fi", data, off)
            off += 8
            self.vocab.append(data[off:off + n])
            self.scores.append(score)
            off += n
        self.lookup = {}
        for i, v in enumerate(self.vocab):        # bsearch over a sorted copy: any match
            self.lookup.setdefault(v, i)

    def encode(self, text: str) -> list[int]:
        b = text.encode("utf-8")
        tokens = []
        if b:                                      # add_dummy_prefix, only if text != ""
            tokens.append(self.lookup[b" "])
        buf = b""
        for k, c in enumerate(b):
            if c & 0xC0 != 0x80:
                buf = b""
            buf += bytes([c])
            if k + 1 < len(b) and b[k + 1] & 0xC0 == 0x80 and len(buf) < 4:
                continue
            i = self.lookup.get(buf, -1)
            if i != -1:
                tokens.append(i)
            else:
                tokens.extend(x + 3 for x in buf)   # byte fallback: <0x00> is id 3
            buf = b""
        while True:                                # merge the best-scoring adjacent pair
            best_score, best_id, best_idx = -1e10, -1, -1
            for k in range(len(tokens) - 1):
                i = self.lookup.get(self.vocab[tokens[k]] + self.vocab[tokens[k + 1]], -1)
                if i != -1 and self.scores[i] > best_score:
                    best_score, best_id, best_idx = self.scores[i], i, k
            if best_idx == -1:
                break
            tokens[best_idx:best_idx + 2] = [best_id]
        return tokens

    def decode(self, ids: list[int]) -> bytes:
        out, prev = b"", 1                          # as generated after BOS
        for t in ids:
            piece = self.vocab[t]
            if prev == 1 and piece.startswith(b" "):
                piece = piece[1:]
            if len(piece) == 6 and piece.startswith(b"<0x") and piece.endswith(b">"):
                piece = bytes([int(piece[3:5], 16)])
            out += piece
            prev = t
        return out


@pytest.fixture(scope="module")
def runc():
    return RunC(TOK512, 512)


def test_tok512_fields(tok512):
    tok, specials = tok512
    assert specials == {"bos": 1, "eos": 2, "unk": 0, "pad": None}
    assert tok.get_vocab_size() == 512
    # stored as "\n<s>\n", "\n</s>\n" and " t" by llama2.c's export; mapped back to SentencePiece pieces
    assert [tok.id_to_token(i) for i in (0, 1, 2, 3, 13, 258, 259, 410)] == \
        ["<unk>", "<s>", "</s>", "<0x00>", "<0x0A>", "<0xFF>", "▁t", "▁"]
    assert json.loads(tok.to_str())["model"]["byte_fallback"] is True


def greedy_lines():
    text = GREEDY_TEXT.read_text(encoding="utf-8")
    return [text] + text.split("\n") + text.split(". ")


def test_tok512_matches_runc_on_story(tok512, runc):
    tok, _ = tok512
    for text in greedy_lines():
        ids = enc(tok, text)
        assert ids == runc.encode(text), repr(text)
        assert tok.decode(ids) == text
        assert runc.decode(ids).decode("utf-8") == text


@HYP
@given(text=mixed_text)
def test_tok512_matches_runc_random(tok512, runc, text):
    tok, _ = tok512
    # see test_tok512_literal_space_symbol for "▁"
    assume(not any(s in text for s in ("<s>", "</s>", "<unk>", "\u2581")))
    ids = enc(tok, text)
    assert ids == runc.encode(text)
    assert tok.decode(ids) == text
    assert runc.decode(ids) == text.encode("utf-8")


def test_tok512_literal_space_symbol(tok512, runc):
    """The one known difference from run.c: U+2581 "▁" in the input text.

    The tokenizer is SentencePiece's (pieces mapped back from " " to "▁"), and SentencePiece
    reads a literal "▁" as a space; run.c looks the character up among pieces stored with
    " " instead and so falls back to its three UTF-8 bytes."""
    tok, _ = tok512
    assert enc(tok, "a\u2581b") == enc(tok, "a b") == runc.encode("a b")
    assert runc.encode("a\u2581b") == [runc.lookup[b" a"], 3 + 0xE2, 3 + 0x96, 3 + 0x81, runc.lookup[b"b"]]


def test_tok512_wrong_vocab_size():
    for n in (511, 513, 0, -512):
        with pytest.raises(FormatError):
            llama2c_tokenizer_json(str(TOK512), n)


def test_tok512_corruption(tmp_path):
    data = TOK512.read_bytes()
    p = tmp_path / "tok.bin"
    for cut in list(range(0, 64)) + list(range(64, len(data), 7)) + [len(data) - 1, len(data) + 1]:
        p.write_bytes(data[:cut] if cut <= len(data) else data + b"\0")
        with pytest.raises(FormatError) as e:
            llama2c_tokenizer_json(str(p), 512)
        assert "\n" not in str(e.value)
    rng = random.Random(7)
    for n in (0, 3, 4, 100, 6227):
        p.write_bytes(rng.randbytes(n))
        with pytest.raises(FormatError):
            llama2c_tokenizer_json(str(p), 512)
    # bad pieces: invalid UTF-8, a huge length, a NaN score, a duplicate piece
    def token_offset(i):
        off = 4
        for _ in range(i):
            off += 8 + struct.unpack_from("<i", data, off + 4)[0]
        return off
    o = token_offset(300)
    for patch in ((o + 8, b"\xff"), (o + 4, struct.pack("<i", 1 << 30)), (o, struct.pack("<f", float("nan"))),
                  (0, struct.pack("<i", -1))):
        d = bytearray(data)
        d[patch[0]:patch[0] + len(patch[1])] = patch[1]
        p.write_bytes(bytes(d))
        with pytest.raises(FormatError):
            llama2c_tokenizer_json(str(p), 512)
    # piece 260 "he" -> " t" duplicates piece 259
    o = token_offset(260)
    d = bytearray(data)
    d[o + 8:o + 10] = b" t"
    p.write_bytes(bytes(d))
    with pytest.raises(FormatError, match="twice"):
        llama2c_tokenizer_json(str(p), 512)


@settings(deadline=None, max_examples=N_EXAMPLES, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=300), flips=st.lists(st.tuples(st.integers(0, 6226), st.integers(0, 255)), max_size=8))
def test_tok512_random_bytes_only_formaterror(tmp_path, data, flips):
    p = tmp_path / "r.bin"
    for blob in (data, _flip(TOK512.read_bytes(), flips)):
        p.write_bytes(blob)
        try:
            llama2c_tokenizer_json(str(p), 512)
        except FormatError as e:
            assert "\n" not in str(e)


def _flip(data: bytes, flips) -> bytes:
    d = bytearray(data)
    for pos, val in flips:
        if pos < len(d):
            d[pos] = val
    return bytes(d)


# -- SentencePiece protobuf reader: synthetic models and corruption ---------------------------
def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, wire: int, payload: bytes) -> bytes:
    key = _varint(number << 3 | wire)
    if wire == 2:
        return key + _varint(len(payload)) + payload
    return key + payload


def _piece(text: str, score: float, ptype: int | None = None, extra: bytes = b"") -> bytes:
    body = _field(1, 2, text.encode("utf-8")) + _field(2, 5, struct.pack("<f", score)) + extra
    if ptype is not None:
        body += _field(3, 0, _varint(ptype))
    return _field(1, 2, body)


def synthetic_model(unknown_fields: bool = True, byte_fallback: bool = True) -> bytes:
    """A tiny LLaMA-like BPE ModelProto, with unknown fields of every wire type."""
    junk = (_field(99, 0, _varint(2**63)) + _field(98, 1, b"\1" * 8) + _field(97, 5, b"\2" * 4)
            + _field(96, 2, b"\x08\x01ignored") + _field(95, 3, _field(1, 0, b"\x05") + _field(2, 2, b"xy"))
            + _varint(95 << 3 | 4)) if unknown_fields else b""
    pieces = [_piece("<unk>", 0.0, UNKNOWN), _piece("<s>", 0.0, CONTROL, extra=junk), _piece("</s>", 0.0, CONTROL)]
    pieces += [_piece(f"<0x{b:02X}>", 0.0, BYTE) for b in range(256 if byte_fallback else 0)]
    normal = ["▁", "a", "b", "c", "▁a", "ab", "▁ab", "bc", "▁abc", "<pad>"]
    pieces += [_piece(p, -float(i)) for i, p in enumerate(normal[:-1])]       # type omitted: NORMAL
    pieces += [_piece(normal[-1], 0.0, UNUSED)]
    trainer = (_field(3, 0, _varint(BPE)) + junk + _field(4, 0, _varint(len(pieces))) + _field(35, 0, _varint(byte_fallback))
               + _field(40, 0, b"\x00") + _field(41, 0, b"\x01") + _field(42, 0, b"\x02")
               + _field(43, 0, _varint(-1)) + _field(45, 2, b"<unk>"))
    normalizer = (_field(1, 2, b"identity") + _field(3, 0, b"\x01") + junk + _field(4, 0, b"\x00")
                  + _field(5, 0, b"\x01"))
    return b"".join(pieces[:5]) + junk + b"".join(pieces[5:]) + _field(2, 2, trainer) + _field(3, 2, normalizer)


def test_synthetic_model_parses_and_tokenizes(tmp_path):
    data = synthetic_model()
    m = parse_model_proto(data)
    assert len(m.pieces) == 3 + 256 + 10
    assert m.types[:4] == [UNKNOWN, CONTROL, CONTROL, BYTE] and m.types[-2:] == [NORMAL, UNUSED]
    assert m.scores[-2] == -8.0 and m.scores[-3] == -7.0
    ts, ns = m.trainer_spec, m.normalizer_spec
    assert (ts.model_type, ts.byte_fallback, ts.unk_id, ts.bos_id, ts.eos_id, ts.pad_id) == (BPE, True, 0, 1, 2, -1)
    assert (ns.name, ns.add_dummy_prefix, ns.remove_extra_whitespaces, ns.escape_whitespaces) == \
        ("identity", True, False, True)
    p = tmp_path / "tokenizer.model"
    p.write_bytes(data)
    s, specials = llama_tokenizer_json(str(p))
    assert specials == {"bos": 1, "eos": 2, "unk": 0, "pad": None}
    tok = Tokenizer.from_str(s)
    v = {t: i for i, t in enumerate(m.pieces)}
    assert enc(tok, "abc") == [v["▁abc"]]
    assert enc(tok, "abc ab\nd") == [v["▁abc"], v["▁ab"], 3 + 10, 3 + ord("d")]
    assert tok.decode(enc(tok, "abc ab\nd")) == "abc ab\nd"


def test_synthetic_model_agrees_with_protobuf():
    pb2 = pytest.importorskip("sentencepiece.sentencepiece_model_pb2")
    m = parse_model_proto(synthetic_model())
    for data in (synthetic_model(unknown_fields=False), synthetic_model()):
        ref = pb2.ModelProto()
        ref.ParseFromString(data)       # protobuf skips our unknown fields too
        assert [x.piece for x in ref.pieces] == m.pieces and [x.type for x in ref.pieces] == m.types
        assert ref.trainer_spec.pad_id == -1 and ref.trainer_spec.byte_fallback


def test_synthetic_model_every_truncation():
    data = synthetic_model(byte_fallback=False)
    assert _convert_bytes(data)[1]["bos"] == 1
    for cut in range(len(data)):
        with pytest.raises(FormatError) as e:
            _convert_bytes(data[:cut])
        assert "\n" not in str(e.value)


def _convert_bytes(data: bytes):
    """llama_tokenizer_json on in-memory bytes."""
    return sentencepiece_model_tokenizer_json(parse_model_proto(data))


def test_protobuf_malformed_inputs():
    good = synthetic_model()
    cases = {
        "varint longer than 10 bytes": b"\x08" + b"\xff" * 11,
        "wire type 6": _varint(1 << 3 | 6),
        "wire type 7": _varint(1 << 3 | 7),
        "field number 0": b"\x00\x00",
        "stray end-group": _varint(5 << 3 | 4),
        "mismatched end-group": _varint(5 << 3 | 3) + _varint(6 << 3 | 4),
        "unterminated group": _varint(5 << 3 | 3) + _field(1, 0, b"\x01"),
        "deep groups": _varint(5 << 3 | 3) * 1000,
        "piece with wrong wire type": _field(1, 0, b"\x01"),
        "piece text not UTF-8": _field(1, 2, _field(1, 2, b"\xff\xfe")),
        "piece without text": _field(1, 2, _field(2, 5, b"\0\0\0\0")),
        "piece type 9": _field(1, 2, _field(1, 2, b"x") + _field(3, 0, b"\x09")),
        "score as varint": _field(1, 2, _field(1, 2, b"x") + _field(2, 0, b"\x01")),
        "length past end": _field(1, 2, b"abc")[:-1],
        "huge length": b"\x0a" + _varint(1 << 62),
        "no pieces": _field(2, 2, b""),
        "empty file": b"",
        "zip file": b"PK\x03\x04" + bytes(100),
        "duplicate piece": good + _piece("▁a", 0.0),
        "trainer_spec field as varint": good + _field(2, 0, b"\x01"),
    }
    for name, blob in cases.items():
        with pytest.raises(FormatError) as e:
            _convert_bytes(blob)
        assert "\n" not in str(e.value), name


def test_llama_model_truncations_and_flips(tmp_path):
    data = LLAMA_MODEL.read_bytes()
    # field boundaries: pieces end at 499437, trainer_spec at 499703, normalizer_spec at the end
    cuts = [0, 1, 2, 3, 10, 11, 100, 499436, 499437, 499438, 499702, 499703, 499704, len(data) - 1]
    cuts += random.Random(3).sample(range(len(data)), 12)
    for cut in cuts:
        with pytest.raises(FormatError) as e:
            _convert_bytes(data[:cut])
        assert "\n" not in str(e.value)
    # flipping bytes either still yields a model (e.g. a changed piece text) or a FormatError
    rng = random.Random(11)
    outcomes = set()
    for _ in range(6):
        d = bytearray(data)
        for _ in range(3):
            d[rng.randrange(len(d))] = rng.randrange(256)
        try:
            _convert_bytes(bytes(d))
            outcomes.add("ok")
        except FormatError as e:
            assert "\n" not in str(e)
            outcomes.add("error")
    assert outcomes


@settings(deadline=None, max_examples=N_EXAMPLES)
@given(data=st.one_of(st.binary(max_size=400),
                      st.lists(st.tuples(st.integers(0, 5000), st.integers(0, 255)), max_size=6)
                      .map(lambda flips: _flip(synthetic_model(), flips)),
                      st.integers(0, 5000).map(lambda n: synthetic_model()[:n])))
def test_protobuf_random_bytes_only_formaterror(data):
    try:
        m = parse_model_proto(data)
    except FormatError as e:
        assert "\n" not in str(e)
        return
    try:
        spm_bpe_tokenizer(m.pieces, m.scores, m.types, unk_id=max(0, min(m.trainer_spec.unk_id, len(m.pieces) - 1)),
                          byte_fallback=m.trainer_spec.byte_fallback)
    except FormatError:
        pass


# -- fairseq dict.txt ------------------------------------------------------------------------
def test_wiki103_dict(wiki103):
    tok, specials = wiki103
    assert specials == {"bos": 0, "eos": 2, "unk": 3, "pad": 1}
    assert tok.get_vocab_size() == 267_744
    lines = WIKI103_DICT.read_text(encoding="utf-8").splitlines()
    assert [tok.id_to_token(i) for i in range(6)] == ["<s>", "<pad>", "</s>", "<unk>", "the", ","]
    assert tok.id_to_token(267_743) == lines[-1].rsplit(" ", 1)[0]
    assert enc(tok, "the , .") == [4, 5, 6]
    assert enc(tok, "qqzzyxqq the") == [3, 4]
    assert enc(tok, "  the\t\n,\u3000.\x1c of  ") == [4, 5, 6, 7]          # str.split() whitespace
    assert enc(tok, "</s> <unk> a</s>b") == [2, 3, 3]
    assert tok.decode([4, 5, 3, 2]) == "the , <unk> </s>"
    assert enc(tok, "") == [] and tok.decode([]) == ""


@pytest.fixture(scope="module")
def wiki103_index():
    index = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for i, line in enumerate(WIKI103_DICT.read_text(encoding="utf-8").splitlines()):
        index[line.rsplit(" ", 1)[0]] = 4 + i
    return index


@HYP
@given(words=st.lists(st.one_of(st.sampled_from(["the", "of", "Valkyria", "@-@", "<unk>", "</s>", "zzqqz"]), any_text),
                      max_size=12),
       seps=st.lists(st.sampled_from([" ", "  ", "\t", "\n", "\u3000", "\x1c", "\x85", "\u2028"]), min_size=13, max_size=13))
def test_wiki103_matches_fairseq_split(wiki103, wiki103_index, words, seps):
    tok, _ = wiki103
    text = "".join(s + w for s, w in zip(seps, words))
    want = [wiki103_index.get(w, 3) for w in text.split()]       # fairseq tokenize_line + index
    ids = enc(tok, text)
    assert ids == want
    assert tok.decode(ids) == " ".join(tok.id_to_token(i) for i in want)


def _dict_file(tmp_path, text: str):
    p = tmp_path / "dict.txt"
    p.write_bytes(text.encode("utf-8"))
    return str(p)


def test_fairseq_dict_semantics(tmp_path):
    s, _ = fairseq_dict_tokenizer_json(_dict_file(tmp_path, "a 5\nb c 3\r\nd 1 #fairseq:overwrite\n"))
    tok = Tokenizer.from_str(s)
    assert tok.get_vocab() == {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "a": 4, "b c": 5, "d": 6}
    assert enc(tok, "a b c d") == [4, 3, 3, 6]            # "b c" is a word no split can produce
    # overwrite: the word moves to a new id at the end; fairseq keeps the old slot
    s, _ = fairseq_dict_tokenizer_json(_dict_file(tmp_path, "a 5\nb 3\na 7 #fairseq:overwrite\n"))
    tok = Tokenizer.from_str(s)
    assert tok.get_vocab_size() == 7 and enc(tok, "a b") == [6, 5]
    assert tok.id_to_token(4) == "<fairseq:orphan:4>"
    s, _ = fairseq_dict_tokenizer_json(_dict_file(tmp_path, "</s> 1 #fairseq:overwrite\n"))
    assert enc(Tokenizer.from_str(s), "</s>") == [4]
    s, _ = fairseq_dict_tokenizer_json(_dict_file(tmp_path, ""))
    assert Tokenizer.from_str(s).get_vocab_size() == 4


@pytest.mark.parametrize("text,lineno", [
    ("a 1\nb\n", 2),                       # no count
    ("a 1\n\nb 2\n", 2),                   # empty line
    ("a 1\nb x\n", 2),                     # count not an integer
    ("a 1\nb\t2\n", 2),                    # only a space separates the count
    ("a 1\nb 2\na 3\n", 3),                # duplicate without the overwrite flag
    ("<unk> 3\n", 1),                      # duplicates a special
    ("x #fairseq:overwrite\n", 1),         # flag without a count
    ("x 1.5\n", 1),
])
def test_fairseq_dict_malformed(tmp_path, text, lineno):
    with pytest.raises(FormatError) as e:
        fairseq_dict_tokenizer_json(_dict_file(tmp_path, text))
    assert f":{lineno}:" in str(e.value) and "\n" not in str(e.value)


def test_fairseq_dict_not_utf8(tmp_path):
    p = tmp_path / "dict.txt"
    p.write_bytes(b"a 1\n\xff 2\n")
    with pytest.raises(FormatError):
        fairseq_dict_tokenizer_json(str(p))


# -- no sentencepiece / protobuf at run time -------------------------------------------------------
def test_converters_need_no_sentencepiece_or_protobuf():
    script = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "sentencepiece" or name.startswith("google.protobuf") or name == "google":
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        from converters.tokenizers import *
        llama_tokenizer_json({str(LLAMA_MODEL)!r})
        llama2c_tokenizer_json({str(TOK512)!r}, 512)
        gpt2_tokenizer_json({str(GPT2_VOCAB)!r}, {str(GPT2_MERGES)!r})
        fairseq_dict_tokenizer_json({str(WIKI103_DICT)!r})
        bad = [m for m in sys.modules if m.startswith(("sentencepiece", "google", "transformers", "torch"))]
        assert not bad, bad
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
