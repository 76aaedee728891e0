"""The architecture description of a canonical model (docs/format.md, `config.json`).

One `Config` drives the single forward pass: the family only names where the weights
came from; the fields below (norm, activation, positions, embedding, unembedding)
select the small per-family pieces.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import MISSING, asdict, dataclass, field, fields

from .errors import FormatError
from .files import read_json

MAX_SIZE = (1 << 31) - 1             # largest size field (d_model, n_layers, d_vocab, n_ctx, ...)
MAX_EPS = 1.0                        # largest norm epsilon that is not a mistake
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

        need(isinstance(self.family, str), f"family must be a string, got {short(self.family)}")
        for k in ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_head", "d_ff", "d_vocab", "n_ctx"):
            v = getattr(self, k)
            need(is_int(v) and 0 < v <= MAX_SIZE, f"{k} must be a positive integer up to {MAX_SIZE}, got {short(v)}")
        need(isinstance(self.norm, str) and self.norm in NORMS, f"norm must be one of {NORMS}, got {short(self.norm)}")
        need(isinstance(self.act, str) and self.act in ACTS, f"act must be one of {ACTS}, got {short(self.act)}")
        need(isinstance(self.positions, str) and self.positions in POSITIONS,
             f"positions must be one of {POSITIONS}, got {short(self.positions)}")
        need(isinstance(self.embedding, str) and self.embedding in HEADS and isinstance(self.unembedding, str)
             and self.unembedding in HEADS, "embedding/unembedding must be linear or adaptive")
        need(self.n_heads % self.n_kv_heads == 0, "n_heads must be a multiple of n_kv_heads")
        need(is_num(self.norm_eps) and 0 <= self.norm_eps <= MAX_EPS,
             f"norm_eps must be a number in [0, {MAX_EPS}], got {short(self.norm_eps)}")
        need(is_num(self.rope_theta) and self.rope_theta > 0,
             f"rope_theta must be a positive finite number, got {short(self.rope_theta)}")
        need(is_num(self.embed_scale) and self.embed_scale != 0,
             f"embed_scale must be a finite non-zero number, got {short(self.embed_scale)}")
        need(self.padding_idx is None or (is_int(self.padding_idx) and 0 <= self.padding_idx < self.d_vocab),
             f"padding_idx must be null or a token id below d_vocab ({self.d_vocab}), got {short(self.padding_idx)}")
        need(self.positions != "sinusoidal" or self.d_model >= 4,
             f"sinusoidal positions need d_model >= 4 (fairseq's formula divides by d_model/2 - 1), "
             f"got {self.d_model}")
        for k in ("final_norm", "gated_ffn", "tie_word_embeddings", "attn_bias", "mlp_bias"):
            need(isinstance(getattr(self, k), bool), f"{k} must be true or false, got {short(getattr(self, k))}")
        need(isinstance(self.prepend_ids, list) and len(self.prepend_ids) <= 16
             and all(is_int(i) and 0 <= i < self.d_vocab for i in self.prepend_ids),
             f"prepend_ids must be a short list of token ids below d_vocab, got {short(self.prepend_ids)}")
        need(isinstance(self.special_tokens, dict) and all(
            isinstance(k, str) and (v is None or (is_int(v) and 0 <= v < self.d_vocab))
            for k, v in self.special_tokens.items()),
            f"special_tokens must map names to token ids below d_vocab, got {short(self.special_tokens)}")
        need(self.positions != "rope" or self.d_head % 2 == 0, "rope needs an even d_head")
        if "adaptive" in (self.embedding, self.unembedding):
            a = self.adaptive
            need(isinstance(a, dict) and "cutoffs" in a and "dims" in a, "adaptive needs cutoffs and dims")
            need(isinstance(a["cutoffs"], list) and len(a["cutoffs"]) <= 64, "adaptive needs at most 64 bands")
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


def resolve_name(cfg: Config, name: str) -> tuple[str, bool]:
    """Map a canonical tensor name to (stored name, transpose?) following the ties of docs/format.md."""
    if name == "unembed.W_U" and cfg.tie_word_embeddings:
        return "embed.W_E", True
    if name.startswith("unembed.adaptive.") and cfg.adaptive:
        parts = name.split(".")
        if len(parts) == 4 and parts[2] != "head":
            band, what = parts[2], parts[3]
            if what == "W_U" and cfg.adaptive.get("tie_weights"):
                return f"embed.adaptive.{band}.W_E", True
            if what == "W_proj" and band != "0" and cfg.adaptive.get("tie_proj"):
                return f"embed.adaptive.{band}.W_proj", True
    return name, False


def check_tensors(cfg: Config, shapes: dict, where: str) -> None:
    """The stored tensors {name: shape} are exactly what `cfg` describes (docs/format.md):
    every tensor the forward pass and the readout read is there with the implied shape (layer
    by layer, so an absurd n_layers fails at the first gap), and every stored tensor is one
    the config explains: a tensor it does not (a layer beyond n_layers, a bias the flags say
    is absent, an RMSNorm bias, a tied tensor stored twice) is an error, never ignored."""
    c = cfg
    H, Hk, d, dh, F, V = c.n_heads, c.n_kv_heads, c.d_model, c.d_head, c.d_ff, c.d_vocab
    ln = c.norm == "layernorm"
    explained: set[str] = set()

    def check(want: dict, optional: dict = {}, layer: int | None = None) -> None:
        for name, shape in {**optional, **want}.items():      # want wins over optional
            src, transpose = resolve_name(c, name)
            explained.add(src)
            if src not in shapes:
                if name not in want:
                    continue
                why = (" (config.json has gated_ffn=true)" if name.endswith("mlp.W_gate") else
                       " (config.json has attn_bias=true)" if ".attn.b_" in name else
                       " (config.json has mlp_bias=true)" if ".mlp.b_" in name else
                       f" (config.json has n_layers={c.n_layers})" if layer is not None and layer > 0 else "")
                raise FormatError(f"{where}: tensor {src!r} is missing{why}")
            got = tuple(shapes[src])[::-1] if transpose else tuple(shapes[src])
            if got != shape:
                raise FormatError(f"{where}: tensor {src!r} has shape {list(got)}, but config.json "
                                  f"implies {list(shape)}")

    want, opt = {}, {}
    if ln and c.final_norm:
        opt["ln_final.b"] = (d,)
    if c.embedding == "linear":
        want["embed.W_E"] = (V, d)
    if c.positions == "learned":
        want["pos_embed.W_pos"] = (c.n_ctx, d)
    if c.unembedding == "linear":
        want["unembed.W_U"] = (d, V)
        opt["unembed.b_U"] = (V,)
    if c.final_norm:
        want["ln_final.w"] = (d,)
    if "adaptive" in (c.embedding, c.unembedding):
        dims, bands = c.adaptive["dims"], c.bands
        for k, (lo, hi) in enumerate(bands):
            if c.embedding == "adaptive":
                want[f"embed.adaptive.{k}.W_E"] = (hi - lo, dims[k])
                want[f"embed.adaptive.{k}.W_proj"] = (dims[k], d)
            if c.unembedding == "adaptive":
                want[f"unembed.adaptive.{k}.W_U"] = (dims[k], hi - lo)
                proj = f"unembed.adaptive.{k}.W_proj"
                if dims[k] != d:
                    want[proj] = (d, dims[k])
                else:
                    opt[proj] = (d, dims[k])
        if c.unembedding == "adaptive":
            want["unembed.adaptive.head.W_cls"] = (d, len(bands) - 1)
    check(want, opt)
    for i in range(c.n_layers):
        p = f"blocks.{i}."
        want = {p + "ln1.w": (d,), p + "ln2.w": (d,), p + "attn.W_Q": (H, d, dh),
                p + "attn.W_K": (Hk, d, dh), p + "attn.W_V": (Hk, d, dh),
                p + "attn.W_O": (H, dh, d), p + "mlp.W_in": (d, F), p + "mlp.W_out": (F, d)}
        opt = {p + "ln1.b": (d,), p + "ln2.b": (d,)} if ln else {}
        if c.gated_ffn:
            want[p + "mlp.W_gate"] = (d, F)
        if c.attn_bias:
            want.update({p + "attn.b_Q": (H, dh), p + "attn.b_K": (Hk, dh), p + "attn.b_V": (Hk, dh),
                         p + "attn.b_O": (d,)})
        if c.mlp_bias:
            want.update({p + "mlp.b_in": (F,), p + "mlp.b_out": (d,)})
        check(want, opt, i)
    extra = sorted(set(shapes) - explained)
    if extra:
        m = re.match(r"blocks\.(\d+)\.", extra[0])
        why = (f"config.json has n_layers={c.n_layers}, but the weights hold layer {m.group(1)}"
               if m and int(m.group(1)) >= c.n_layers else "config.json does not explain it")
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise FormatError(f"{where}: tensor {short(extra[0])}{more} is not used by this model: {why}")


def short(v, n: int = 60) -> str:
    """repr of a value from a file, bounded in time and length (nested or huge values included)."""
    import reprlib
    r = reprlib.Repr()
    r.maxlevel, r.maxstring, r.maxother, r.maxlong = 3, n, n, n
    r.maxlist = r.maxtuple = r.maxdict = r.maxset = r.maxfrozenset = 6
    s = r.repr(v)
    return s if len(s) <= n else s[:n - 3] + "..."


def read_json_object(path: str, missing: str) -> dict:
    """A JSON object from a regular file of bounded size; one-line FormatError if missing
    (`missing` is the message), unreadable, not a regular file, too large, not JSON, or not
    an object. Shared by every reader of a JSON config."""
    d = read_json(path, missing)
    if not isinstance(d, dict):
        raise FormatError(f"{path}: not a JSON object")
    return d


def config_digest(cfg: dict) -> str:
    """sha256 of config.json's content except this digest itself (so `verify` covers the config too)."""
    body = {k: v for k, v in cfg.items() if k != "config_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def read_config(model_dir: str) -> Config:
    path = os.path.join(model_dir, "config.json")
    d = read_json_object(path, f"{model_dir}: not a converted model directory (no config.json); "
                               f"run `refimpl convert` first")
    if "format" not in d or "format_version" not in d:
        raise FormatError(f"{path}: not a refimpl canonical config (no {'format' if 'format' not in d else 'format_version'}"
                          f" field; `refimpl convert` writes format \"refimpl-canonical\", format_version 1)")
    if d.get("format") != "refimpl-canonical":
        raise FormatError(f"{path}: not a refimpl canonical config (format={short(d.get('format'))})")
    if d.get("format_version") != 1 or isinstance(d.get("format_version"), bool):
        raise FormatError(f"{path}: format_version {short(d.get('format_version'))} is not one this refimpl "
                          f"reads (1)")
    try:
        return Config.from_dict(d)
    except FormatError as e:            # name the file, not just "config.json"
        msg = str(e)
        raise FormatError(f"{path}: {msg[len('config.json: '):] if msg.startswith('config.json: ') else msg}") from None


def looks_canonical(path: str) -> bool:
    """Whether a config.json is (or may be) a refimpl one rather than, say, a Hugging Face config."""
    try:
        d = read_json(path)
    except (FormatError, OSError):
        return True                     # read_json_object reports what is wrong with it
    return not isinstance(d, dict) or "format" in d or "model_type" not in d
