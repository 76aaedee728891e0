"""Deterministic random models in the canonical format, for tests and benchmarks.

`random_config(family, ...)` gives a Config for one of the three families with any
sizes; `write_random_model(dst, cfg, seed, dtype)` writes random weights (tensor by
tensor, so even 13B-shaped models stream) and a word-level tokenizer whose tokens are
`t0, t1, ...`. Layer-norm gains and all biases are random too, so that every term of
every identity matters.
"""
from __future__ import annotations

import json
import math

import numpy as np

from .config import Config


def random_config(family: str, n_layers=2, d_model=16, n_heads=4, n_kv_heads=None, d_ff=32,
                  d_vocab=50, n_ctx=64, cutoffs=None, d_head=None, **over) -> Config:
    """A Config for `family` in {"gpt2", "llama", "fairseq_lm"} with the family's quirks."""
    d_head = d_head or d_model // n_heads
    base = dict(family=family, d_model=d_model, n_layers=n_layers, n_heads=n_heads, d_head=d_head,
                d_ff=d_ff, d_vocab=d_vocab, n_ctx=n_ctx)
    if family == "gpt2":
        base.update(norm="layernorm", norm_eps=1e-5, act="gelu_new", positions="learned",
                    tie_word_embeddings=True, attn_bias=True, mlp_bias=True, prepend_ids=[])
    elif family == "llama":
        base.update(norm="rmsnorm", norm_eps=1e-5, act="silu", gated_ffn=True, positions="rope",
                    n_kv_heads=n_kv_heads or n_heads, rope_theta=10000.0, prepend_ids=[1],
                    special_tokens={"unk": 0, "bos": 1, "eos": 2})
    elif family == "fairseq_lm":
        cut = list(cutoffs or [d_vocab // 4, d_vocab // 2]) + [d_vocab]
        dims = [d_model // 4 ** c for c in range(len(cut))]
        base.update(norm="layernorm", norm_eps=1e-5, act="relu", positions="sinusoidal", padding_idx=1,
                    embed_scale=math.sqrt(d_model), embedding="adaptive", unembedding="adaptive",
                    final_norm=False, attn_bias=True, mlp_bias=True, prepend_ids=[2],
                    adaptive={"cutoffs": cut, "dims": dims, "tie_weights": True, "tie_proj": True},
                    special_tokens={"bos": 0, "pad": 1, "eos": 2, "unk": 3})
    else:
        raise ValueError(f"unknown family {family!r}")
    base.update(over)
    return Config(**base)


def tensor_shapes(cfg: Config) -> dict[str, tuple]:
    """Every stored tensor of a canonical model with this config, in writing order."""
    d, H, Hk, dh, F, V = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_head, cfg.d_ff, cfg.d_vocab
    s: dict[str, tuple] = {}
    if cfg.embedding == "linear":
        s["embed.W_E"] = (V, d)
    else:
        for c, (lo, hi) in enumerate(cfg.bands):
            s[f"embed.adaptive.{c}.W_E"] = (hi - lo, cfg.adaptive["dims"][c])
            s[f"embed.adaptive.{c}.W_proj"] = (cfg.adaptive["dims"][c], d)
    if cfg.positions == "learned":
        s["pos_embed.W_pos"] = (cfg.n_ctx, d)
    ln = cfg.norm == "layernorm"
    for i in range(cfg.n_layers):
        p = f"blocks.{i}."
        s[p + "ln1.w"] = (d,)
        if ln:
            s[p + "ln1.b"] = (d,)
        s.update({p + "attn.W_Q": (H, d, dh), p + "attn.W_K": (Hk, d, dh), p + "attn.W_V": (Hk, d, dh),
                  p + "attn.W_O": (H, dh, d)})
        if cfg.attn_bias:
            s.update({p + "attn.b_Q": (H, dh), p + "attn.b_K": (Hk, dh), p + "attn.b_V": (Hk, dh),
                      p + "attn.b_O": (d,)})
        s[p + "ln2.w"] = (d,)
        if ln:
            s[p + "ln2.b"] = (d,)
        s[p + "mlp.W_in"] = (d, F)
        if cfg.gated_ffn:
            s[p + "mlp.W_gate"] = (d, F)
        s[p + "mlp.W_out"] = (F, d)
        if cfg.mlp_bias:
            s.update({p + "mlp.b_in": (F,), p + "mlp.b_out": (d,)})
    if cfg.final_norm:
        s["ln_final.w"] = (d,)
        if ln:
            s["ln_final.b"] = (d,)
    if cfg.unembedding == "linear" and not cfg.tie_word_embeddings:
        s["unembed.W_U"] = (d, V)
    if cfg.unembedding == "adaptive":
        a = cfg.adaptive
        s["unembed.adaptive.head.W_cls"] = (d, len(a["cutoffs"]) - 1)
        for c, (lo, hi) in enumerate(cfg.bands):
            if (c == 0 and a["dims"][0] != d) or (c > 0 and not a.get("tie_proj")):
                s[f"unembed.adaptive.{c}.W_proj"] = (d, a["dims"][c])
            if not a.get("tie_weights"):
                s[f"unembed.adaptive.{c}.W_U"] = (a["dims"][c], hi - lo)
    return s


def _init(name: str, shape: tuple, rng: np.random.Generator, cfg: Config) -> np.ndarray:
    if name.endswith((".ln1.w", ".ln2.w")) or name == "ln_final.w":
        return 1.0 + 0.2 * rng.standard_normal(shape)
    if ".b_" in name or name.endswith(".b"):
        return 0.1 * rng.standard_normal(shape)
    fan_in = shape[-2] if len(shape) >= 2 else shape[0]
    if name.startswith("embed") or name.startswith("pos_embed"):
        fan_in = cfg.d_model if cfg.embed_scale == 1.0 else cfg.d_model ** 2
    return rng.standard_normal(shape) / math.sqrt(fan_in)


def word_tokenizer_json(vocab: list[str], unk: str | None = None) -> str:
    """A whitespace word-level tokenizer.json over `vocab` (id = position)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token=unk or vocab[0]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return tok.to_str()


def write_random_model(dst: str, cfg: Config, seed: int = 0, dtype: str = "F32", force: bool = True,
                       tokenizer_json: str | None = None) -> str:
    """Write a random canonical model for `cfg` to `dst` (streams one tensor at a time)."""
    from .writer import Planned, write_canonical
    np_dtype = {"F32": np.float32, "F64": np.float64, "F16": np.float16}
    shapes = tensor_shapes(cfg)

    def loader(idx: int, name: str, shape: tuple):
        def load():
            rng = np.random.default_rng([seed, idx])
            return _init(name, shape, rng, cfg).astype(np_dtype[dtype])
        return load

    plan = [Planned(n, sh, dtype, loader(k, n, sh)) for k, (n, sh) in enumerate(shapes.items())]
    if tokenizer_json is None:
        tokenizer_json = word_tokenizer_json([f"t{i}" for i in range(cfg.d_vocab)])
    conf = cfg.to_dict()
    return write_canonical(dst, conf, plan, tokenizer_json, sources=[], source_format="synthetic",
                           force=force)


def dumps_config(cfg: Config) -> str:
    return json.dumps(cfg.to_dict())
