"""Read a SentencePiece `tokenizer.model` (a serialized `ModelProto`) without protobuf.

Only the fields a tokenizer conversion needs are decoded; every other field is skipped
by its wire type, so newer SentencePiece versions with extra fields still load. Any
truncated, corrupt or hostile input raises `FormatError` with a one-line message.

Schema (sentencepiece_model.proto, proto2):

    ModelProto      1 pieces (repeated SentencePiece)  2 trainer_spec  3 normalizer_spec
    SentencePiece   1 piece: string  2 score: float  3 type: enum (default NORMAL)
    TrainerSpec     3 model_type (UNIGRAM=1 default, BPE=2, WORD=3, CHAR=4)
                    35 byte_fallback  40 unk_id  41 bos_id  42 eos_id  43 pad_id
                    45 unk_piece  46 bos_piece  47 eos_piece  48 pad_piece
    NormalizerSpec  1 name  2 precompiled_charsmap  3 add_dummy_prefix (default true)
                    4 remove_extra_whitespaces (default true)  5 escape_whitespaces (default true)
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

from refimpl.errors import FormatError
from refimpl.files import read_bytes

# SentencePiece.Type
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
PIECE_TYPES = (NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE)
# TrainerSpec.ModelType
UNIGRAM, BPE, WORD, CHAR = 1, 2, 3, 4
MODEL_TYPE_NAMES = {UNIGRAM: "unigram", BPE: "bpe", WORD: "word", CHAR: "char"}

_VARINT, _I64, _LEN, _SGROUP, _EGROUP, _I32 = 0, 1, 2, 3, 4, 5
_MAX_DEPTH = 64


@dataclass
class TrainerSpec:
    model_type: int = UNIGRAM
    vocab_size: int = 8000
    byte_fallback: bool = False
    unk_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    pad_id: int = -1
    unk_piece: str = "<unk>"
    bos_piece: str = "<s>"
    eos_piece: str = "</s>"
    pad_piece: str = "<pad>"


@dataclass
class NormalizerSpec:
    name: str = ""
    precompiled_charsmap: bytes = b""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True


@dataclass
class SentencePieceModel:
    pieces: list = field(default_factory=list)     # str
    scores: list = field(default_factory=list)     # float
    types: list = field(default_factory=list)      # int (NORMAL ... BYTE)
    trainer_spec: TrainerSpec = field(default_factory=TrainerSpec)
    normalizer_spec: NormalizerSpec = field(default_factory=NormalizerSpec)
    has_trainer_spec: bool = False       # SentencePiece always writes both specs; a file
    has_normalizer_spec: bool = False    # without them is truncated or not a trained model


class _Reader:
    """Wire-format cursor over buf[pos:end]; every error is a FormatError naming `what`."""

    def __init__(self, buf: memoryview, pos: int, end: int, what: str):
        self.buf, self.pos, self.end, self.what = buf, pos, end, what

    def fail(self, msg: str):
        raise FormatError(f"{self.what}: {msg} (byte offset {self.pos})")

    def at_end(self) -> bool:
        return self.pos >= self.end

    def varint(self) -> int:
        pos = self.pos
        if pos < self.end and self.buf[pos] < 0x80:     # fast path: one byte
            self.pos = pos + 1
            return self.buf[pos]
        result = shift = 0
        for _ in range(10):
            if self.pos >= self.end:
                self.fail("truncated varint")
            b = self.buf[self.pos]
            self.pos += 1
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                return result & 0xFFFFFFFFFFFFFFFF
            shift += 7
        self.fail("varint longer than 10 bytes")

    def tag(self) -> tuple[int, int]:
        key = self.varint()
        number, wire = key >> 3, key & 7
        if number == 0 or number > 0x1FFFFFFF:
            self.fail(f"invalid field number {number}")
        if wire > 5:
            self.fail(f"invalid wire type {wire} for field {number}")
        return number, wire

    def take(self, n: int) -> int:
        """Advance over n bytes, returning their start."""
        if n > self.end - self.pos:
            self.fail(f"truncated field ({n} bytes needed, {self.end - self.pos} left)")
        start = self.pos
        self.pos += n
        return start

    def length_delimited(self) -> tuple[int, int]:
        n = self.varint()
        start = self.take(n)
        return start, start + n

    def skip(self, number: int, wire: int, depth: int = 0) -> None:
        if wire == _VARINT:
            self.varint()
        elif wire == _I64:
            self.take(8)
        elif wire == _LEN:
            self.length_delimited()
        elif wire == _I32:
            self.take(4)
        elif wire == _SGROUP:
            if depth >= _MAX_DEPTH:
                self.fail("groups nested too deeply")
            while True:
                if self.at_end():
                    self.fail(f"unterminated group (field {number})")
                n2, w2 = self.tag()
                if w2 == _EGROUP:
                    if n2 != number:
                        self.fail(f"group {number} closed by end-group {n2}")
                    return
                self.skip(n2, w2, depth + 1)
        else:  # stray end-group
            self.fail(f"unexpected end-group tag (field {number})")

    # typed readers for a field whose tag has just been read -------------------
    def expect(self, number: int, wire: int, want: int) -> None:
        if wire != want:
            self.fail(f"field {number} has wire type {wire}, expected {want}")

    def string(self, number: int, wire: int) -> str:
        self.expect(number, wire, _LEN)
        start, end = self.length_delimited()
        try:
            return bytes(self.buf[start:end]).decode("utf-8")
        except UnicodeDecodeError:
            self.pos = start
            self.fail(f"field {number} is not valid UTF-8")

    def raw_bytes(self, number: int, wire: int) -> bytes:
        self.expect(number, wire, _LEN)
        start, end = self.length_delimited()
        return bytes(self.buf[start:end])

    def int32(self, number: int, wire: int) -> int:
        self.expect(number, wire, _VARINT)
        v = self.varint() & 0xFFFFFFFF     # proto int32: low 32 bits, two's complement
        return v - (1 << 32) if v >= 1 << 31 else v

    def boolean(self, number: int, wire: int) -> bool:
        self.expect(number, wire, _VARINT)
        return self.varint() != 0

    def float32(self, number: int, wire: int) -> float:
        self.expect(number, wire, _I32)
        start = self.take(4)
        return struct.unpack_from("<f", self.buf, start)[0]

    def sub(self, number: int, wire: int, what: str) -> "_Reader":
        self.expect(number, wire, _LEN)
        start, end = self.length_delimited()
        return _Reader(self.buf, start, end, what)


def _read_piece(r: _Reader, index: int) -> tuple[str, float, int]:
    piece, score, ptype = None, 0.0, NORMAL
    while not r.at_end():
        number, wire = r.tag()
        if number == 1:
            piece = r.string(number, wire)
        elif number == 2:
            score = r.float32(number, wire)
        elif number == 3:
            ptype = r.int32(number, wire)
        else:
            r.skip(number, wire)
    if piece is None:
        r.fail(f"piece {index} has no text")
    if ptype not in PIECE_TYPES:
        r.fail(f"piece {index} ({piece!r}) has unknown type {ptype}")
    return piece, score, ptype


def _read_trainer_spec(r: _Reader, spec: TrainerSpec) -> None:
    ints = {3: "model_type", 4: "vocab_size", 40: "unk_id", 41: "bos_id", 42: "eos_id", 43: "pad_id"}
    strs = {45: "unk_piece", 46: "bos_piece", 47: "eos_piece", 48: "pad_piece"}
    while not r.at_end():
        number, wire = r.tag()
        if number in ints:
            setattr(spec, ints[number], r.int32(number, wire))
        elif number in strs:
            setattr(spec, strs[number], r.string(number, wire))
        elif number == 35:
            spec.byte_fallback = r.boolean(number, wire)
        else:
            r.skip(number, wire)


def _read_normalizer_spec(r: _Reader, spec: NormalizerSpec) -> None:
    while not r.at_end():
        number, wire = r.tag()
        if number == 1:
            spec.name = r.string(number, wire)
        elif number == 2:
            spec.precompiled_charsmap = r.raw_bytes(number, wire)
        elif number == 3:
            spec.add_dummy_prefix = r.boolean(number, wire)
        elif number == 4:
            spec.remove_extra_whitespaces = r.boolean(number, wire)
        elif number == 5:
            spec.escape_whitespaces = r.boolean(number, wire)
        else:
            r.skip(number, wire)


def parse_model_proto(data: bytes, what: str = "tokenizer.model") -> SentencePieceModel:
    """Decode a serialized SentencePiece ModelProto (see the module docstring)."""
    buf = memoryview(bytes(data))
    r = _Reader(buf, 0, len(buf), what)
    m = SentencePieceModel()
    # proto2 merge semantics: a repeated singular message field merges; last scalar wins
    while not r.at_end():
        number, wire = r.tag()
        if number == 1:
            piece, score, ptype = _read_piece(r.sub(number, wire, what), len(m.pieces))
            m.pieces.append(piece)
            m.scores.append(score)
            m.types.append(ptype)
        elif number == 2:
            _read_trainer_spec(r.sub(number, wire, what), m.trainer_spec)
            m.has_trainer_spec = True
        elif number == 3:
            _read_normalizer_spec(r.sub(number, wire, what), m.normalizer_spec)
            m.has_normalizer_spec = True
        else:
            r.skip(number, wire)
    if not m.pieces:
        raise FormatError(f"{what}: not a SentencePiece model (no pieces)")
    return m


def read_sentencepiece_model(path: str) -> SentencePieceModel:
    """Read and decode `tokenizer.model` at `path`."""
    data = read_bytes(path, "tokenizer")
    return parse_model_proto(data, what=str(path))
