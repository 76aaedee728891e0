"""The architecture description of a canonical model (docs/format.md, `config.json`).

One `Config` drives the single forward pass: the family only names where the weights
came from; the fields below (norm, activation, positions, embedding, unembedding)
select the small per-family pieces.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import MISSING, asdict, dataclass, field, fields

from .errors import FormatError

NORMS = ("layernorm", "rmsnorm")
ACTS = ("gelu_new", "gelu", "relu", "silu")
POSITIONS = ("learned", "rope", "sinusoidal")
HEADS = ("linear", "adaptive")


@dataclass
class Config:
    family: str
    d_model: int
    n_layers: int
    n_heads: int
    d_head: int
    d_ff: int
    d_vocab: int
    n_ctx: int
    norm: str
    norm_eps: float
    act: str
    positions: str
    n_kv_heads: int = 0                 # 0 -> n_heads
    final_norm: bool = True
    gated_ffn: bool = False
    rope_theta: float = 10000.0
    padding_idx: int | None = None       # fairseq: positions start at padding_idx + 1
    embed_scale: float = 1.0
    embedding: str = "linear"
    unembedding: str = "linear"
    tie_word_embeddings: bool = False
    adaptive: dict | None = None         # cutoffs, dims, tie_weights, tie_proj
    attn_bias: bool = False
    mlp_bias: bool = False
    prepend_ids: list = field(default_factory=list)
    special_tokens: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)   # source, converter, files, ...

    def __post_init__(self):
        if not self.n_kv_heads:
            self.n_kv_heads = self.n_heads
        self.validate()

    def validate(self) -> None:
        def need(ok: bool, what: str):
            if not ok:
                raise FormatError(f"config.json: {what}")

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        need(isinstance(self.family, str), f"family must be a string, got {self.family!r}")
        for k in ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_head", "d_ff", "d_vocab", "n_ctx"):
            v = getattr(self, k)
            need(is_int(v) and v > 0, f"{k} must be a positive integer, got {v!r}")
        need(self.norm in NORMS, f"norm must be one of {NORMS}, got {self.norm!r}")
        need(self.act in ACTS, f"act must be one of {ACTS}, got {self.act!r}")
        need(self.positions in POSITIONS, f"positions must be one of {POSITIONS}, got {self.positions!r}")
        need(self.embedding in HEADS and self.unembedding in HEADS, "embedding/unembedding must be linear or adaptive")
        need(self.n_heads % self.n_kv_heads == 0, "n_heads must be a multiple of n_kv_heads")
        need(is_num(self.norm_eps) and self.norm_eps >= 0, "norm_eps must be a non-negative number")
        need(is_num(self.rope_theta) and self.rope_theta > 0, f"rope_theta must be a positive number, got {self.rope_theta!r}")
        need(is_num(self.embed_scale), f"embed_scale must be a number, got {self.embed_scale!r}")
        need(self.padding_idx is None or (is_int(self.padding_idx) and 0 <= self.padding_idx < 1 << 31),
             f"padding_idx must be null or a non-negative integer, got {self.padding_idx!r}")
        for k in ("final_norm", "gated_ffn", "tie_word_embeddings", "attn_bias", "mlp_bias"):
            need(isinstance(getattr(self, k), bool), f"{k} must be true or false, got {getattr(self, k)!r}")
        need(isinstance(self.prepend_ids, list) and all(is_int(i) and 0 <= i < self.d_vocab for i in self.prepend_ids),
             f"prepend_ids must be a list of token ids below d_vocab, got {self.prepend_ids!r}")
        need(isinstance(self.special_tokens, dict), "special_tokens must be an object")
        need(self.positions != "rope" or self.d_head % 2 == 0, "rope needs an even d_head")
        if "adaptive" in (self.embedding, self.unembedding):
            a = self.adaptive
            need(isinstance(a, dict) and "cutoffs" in a and "dims" in a, "adaptive needs cutoffs and dims")
            cut, dims = a["cutoffs"], a["dims"]
            need(isinstance(cut, list) and isinstance(dims, list) and len(cut) == len(dims) >= 1
                 and all(is_int(c) for c in cut) and all(is_int(x) and x > 0 for x in dims)
                 and all(x < y for x, y in zip(cut, cut[1:])) and cut[-1] == self.d_vocab and cut[0] > 0,
                 "adaptive cutoffs must increase and end at d_vocab, one positive dim per band")
            for k in ("tie_weights", "tie_proj"):
                need(isinstance(a.get(k, False), bool), f"adaptive {k} must be true or false")

    @property
    def bands(self) -> list[tuple[int, int]]:
        """Adaptive bands as [lo, hi) id ranges."""
        cut = self.adaptive["cutoffs"]
        return [(0 if c == 0 else cut[c - 1], cut[c]) for c in range(len(cut))]

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        if not isinstance(d, dict):
            raise FormatError("config.json: not a JSON object")
        names = {f.name for f in fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        missing = [f.name for f in fields(cls) if f.name in names and f.name not in known
                   and f.default is MISSING and f.default_factory is MISSING]
        if missing:
            raise FormatError(f"config.json: missing field{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
        cfg = cls(**known)
        cfg.extra = {k: v for k, v in d.items() if k not in names}
        return cfg

    def to_dict(self) -> dict:
        d = asdict(self)
        extra = d.pop("extra")
        d.update(extra)
        return d


def read_json_object(path: str, missing: str) -> dict:
    """A JSON object from a file; one-line FormatError if missing (`missing` is the message),
    unreadable, not JSON, or not an object. Shared by every reader of a JSON config."""
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except FileNotFoundError:
        raise FormatError(missing) from None
    except OSError as e:
        raise FormatError(f"{path}: cannot read ({e.strerror or e})") from None
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise FormatError(f"{path}: not valid JSON ({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})") from None
    if not isinstance(d, dict):
        raise FormatError(f"{path}: not a JSON object")
    return d


def read_config(model_dir: str) -> Config:
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path) or not _looks_canonical(path):
        from .checkpoints import unconverted_message          # a checkpoint: say what it is, how to convert
        msg = unconverted_message(model_dir)
        if msg:
            raise FormatError(msg)
    d = read_json_object(path, f"{model_dir}: not a converted model directory (no config.json); "
                               f"run `refimpl convert` first")
    if d.get("format") not in (None, "refimpl-canonical"):
        raise FormatError(f"{path}: not a refimpl canonical config (format={d.get('format')!r})")
    try:
        return Config.from_dict(d)
    except FormatError as e:            # name the file, not just "config.json"
        msg = str(e)
        raise FormatError(f"{path}: {msg[len('config.json: '):] if msg.startswith('config.json: ') else msg}") from None


def _looks_canonical(path: str) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, ValueError, RecursionError):
        return True                     # read_json_object reports what is wrong with it
    return not isinstance(d, dict) or "format" in d or "model_type" not in d
