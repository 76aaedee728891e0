"""Meta's original LLaMA / Llama-2 release to the canonical format.

A model directory holds `params.json` (dim, n_layers, n_heads, optional n_kv_heads,
vocab_size (-1: from the tokenizer / embedding), multiple_of, ffn_dim_multiplier,
norm_eps, rope_theta) and model-parallel shards `consolidated.00.pth`, `.01.pth`, ...;
`tokenizer.model` sits in the directory or its parent (or is passed with --tokenizer).

Shards are joined as Meta's model-parallel layers split them:
wq, wk, wv, w1, w3 and output on dim 0 (ColumnParallelLinear); wo, w2 and
tok_embeddings on dim 1 (RowParallelLinear, ParallelEmbedding); norms are replicated;
rope.freqs is dropped. Each output tensor is concatenated from its own slices only,
so peak memory is about one tensor. q/k rows use interleaved RoPE pairs and are permuted
to the canonical half-split order. Storage precision (F16/BF16/F32) is kept bit for bit.
"""
from __future__ import annotations

import glob
import os
import re

import numpy as np

from refimpl.config import read_json_object
from refimpl.errors import FormatError, RefimplError

from .canonical import write_canonical
from .common import interleaved_to_half, linear_to_heads, out_to_heads
from .hf_common import check_tokenizer_fits, planned, torch_state_dict

FORMAT = "meta-llama"
SHARD_RE = re.compile(r"consolidated\.(\d+)\.pth$")

# Meta name (after "layers.{i}.") -> concatenation dim (None: replicated)
LAYER_TENSORS = {
    "attention.wq.weight": 0, "attention.wk.weight": 0, "attention.wv.weight": 0,
    "attention.wo.weight": 1, "feed_forward.w1.weight": 0, "feed_forward.w2.weight": 1,
    "feed_forward.w3.weight": 0, "attention_norm.weight": None, "ffn_norm.weight": None,
}
TOP_TENSORS = {"tok_embeddings.weight": 1, "norm.weight": None, "output.weight": 0}


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """FeedForward's hidden size exactly as Meta's llama/model.py computes it
    (`hidden_dim=4 * dim` passed in, then 2/3 of it, the optional multiplier, rounded up)."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def _model_dir(src: str) -> str:
    return src if os.path.isdir(src) else os.path.dirname(os.path.abspath(src))


def _shard_files(d: str) -> list[str]:
    files = [f for f in glob.glob(os.path.join(d, "consolidated.*.pth")) if SHARD_RE.search(os.path.basename(f))]
    return sorted(files, key=lambda f: int(SHARD_RE.search(os.path.basename(f)).group(1)))


def detect(src: str) -> bool:
    d = _model_dir(src)
    return os.path.isfile(os.path.join(d, "params.json")) and bool(_shard_files(d))


def read_params(d: str) -> dict:
    path = os.path.join(d, "params.json")
    p = read_json_object(path, f"{d}: no params.json (a Meta LLaMA model directory needs one)")

    def pos_int(key, default=None):
        v = p.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise FormatError(f"{path}: {key!r} must be a positive integer, got {v!r}")
        return v

    def number(key, default, positive=True):
        v = p.get(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (positive and v == 0):
            raise FormatError(f"{path}: {key!r} must be a positive number, got {v!r}")
        return float(v)

    out = dict(dim=pos_int("dim"), n_layers=pos_int("n_layers"), n_heads=pos_int("n_heads"),
               multiple_of=pos_int("multiple_of", 256), norm_eps=number("norm_eps", 1e-5),
               rope_theta=number("rope_theta", 10000.0))
    out["n_kv_heads"] = pos_int("n_kv_heads") if p.get("n_kv_heads") is not None else out["n_heads"]
    m = p.get("ffn_dim_multiplier")
    out["ffn_dim_multiplier"] = None if m is None else number("ffn_dim_multiplier", None)
    v = p.get("vocab_size", -1)
    if isinstance(v, bool) or not isinstance(v, int) or (v <= 0 and v != -1):
        raise FormatError(f"{path}: 'vocab_size' must be a positive integer or -1, got {v!r}")
    out["vocab_size"] = v
    out["max_seq_len"] = pos_int("max_seq_len") if p.get("max_seq_len") is not None else None
    if p.get("use_scaled_rope"):
        raise FormatError(f"{path}: use_scaled_rope (Llama 3.1 RoPE scaling) is not supported")
    if out["dim"] % out["n_heads"] or out["n_heads"] % out["n_kv_heads"] or (out["dim"] // out["n_heads"]) % 2:
        raise FormatError(f"{path}: dim {out['dim']}, n_heads {out['n_heads']}, n_kv_heads "
                          f"{out['n_kv_heads']} are inconsistent")
    return out


def _tokenizer_file(d: str, tokenizer: str | None) -> str:
    if tokenizer:
        return tokenizer
    for cand in (os.path.join(d, "tokenizer.model"), os.path.join(os.path.dirname(os.path.abspath(d)), "tokenizer.model")):
        if os.path.isfile(cand):
            return cand
    raise RefimplError(f"{d}: cannot find tokenizer.model (looked in the model directory and its parent); "
                       f"pass --tokenizer FILE")


class Shards:
    """Lazy tensors of every model-parallel shard; joins one tensor's slices on demand."""

    def __init__(self, files: list[str]):
        self.files = files
        self.parts = [torch_state_dict(f) for f in files]
        for f, part in zip(files, self.parts):
            extra = sorted(k for k in part if not self._known(k))
            if extra:
                raise FormatError(f"{os.path.basename(f)}: unexpected tensor {extra[0]!r}; not a LLaMA "
                                  f"checkpoint this converter knows")

    @staticmethod
    def _known(k: str) -> bool:
        if k in TOP_TENSORS or k == "rope.freqs":
            return True
        m = re.match(r"layers\.\d+\.(.+)$", k)
        return bool(m) and m.group(1) in LAYER_TENSORS

    def _slices(self, name: str) -> list:
        out = []
        for f, part in zip(self.files, self.parts):
            if name not in part:
                raise FormatError(f"{os.path.basename(f)}: tensor {name!r} is missing")
            out.append(part[name])
        return out

    def dtype(self, name: str) -> str:
        dts = {t.dtype for t in self._slices(name)}
        if len(dts) != 1:
            raise FormatError(f"tensor {name!r} has different dtypes across shards: {sorted(dts)}")
        dt = dts.pop()
        if dt not in ("F32", "F16", "BF16", "F64"):
            raise FormatError(f"tensor {name!r} has dtype {dt}; only float weights are supported")
        return dt

    def shape(self, name: str, dim: int | None) -> tuple:
        """The joined shape (checking the slices agree on every other dimension)."""
        shapes = [tuple(t.shape) for t in self._slices(name)]
        first = shapes[0]
        for s in shapes[1:]:
            if len(s) != len(first) or any(a != b for k, (a, b) in enumerate(zip(s, first)) if k != dim):
                raise FormatError(f"tensor {name!r}: shard shapes {shapes} cannot be joined on dim {dim}")
        if dim is None:
            return first
        return tuple(sum(s[k] for s in shapes) if k == dim else first[k] for k in range(len(first)))

    def raw(self, name: str, dim: int | None) -> np.ndarray:
        """The joined stored values (BF16 as uint16 bits); replicated tensors must agree."""
        sl = self._slices(name)
        if dim is None:
            a = np.asarray(sl[0].raw())
            for other in sl[1:]:
                if not np.array_equal(a.view(np.uint8), np.asarray(other.raw()).view(np.uint8)):
                    raise FormatError(f"tensor {name!r} should be replicated across shards but differs")
            return a
        if len(sl) == 1:
            return sl[0].raw()
        return np.concatenate([np.asarray(t.raw()) for t in sl], axis=dim)


def convert(src: str, dst: str, force: bool = False, tokenizer: str | None = None) -> str:
    from .tokenizers import llama_tokenizer_json
    d = _model_dir(src)
    p = read_params(d)
    files = _shard_files(d)
    if not files:
        raise FormatError(f"{d}: no consolidated.NN.pth shards")
    nums = [int(SHARD_RE.search(os.path.basename(f)).group(1)) for f in files]
    if nums != list(range(len(files))):
        raise FormatError(f"{d}: shards are not numbered 00..{len(files) - 1:02d} (found {nums})")
    sh = Shards(files)
    tok_path = _tokenizer_file(d, tokenizer)
    tok_json, specials = llama_tokenizer_json(tok_path)

    dim, L, H, Hk = p["dim"], p["n_layers"], p["n_heads"], p["n_kv_heads"]
    dh = dim // H
    V = sh.shape("tok_embeddings.weight", 1)[0]
    if p["vocab_size"] != -1 and p["vocab_size"] != V:
        raise FormatError(f"params.json: vocab_size {p['vocab_size']} but tok_embeddings has {V} rows")
    check_tokenizer_fits(tok_json, V, tok_path)
    F = ffn_hidden_dim(dim, p["multiple_of"], p["ffn_dim_multiplier"])
    got_F = sh.shape("layers.0.feed_forward.w1.weight", 0)[0]
    if got_F != F:
        raise FormatError(f"params.json: multiple_of {p['multiple_of']} and ffn_dim_multiplier "
                          f"{p['ffn_dim_multiplier']} give a hidden size of {F}, but w1 has {got_F} rows")
    # Meta's params.json has no context length: LLaMA-1 was trained with 2048, Llama-2 with 4096
    # (norm_eps 1e-5). RoPE itself works at any length; n_ctx only bounds prompt length.
    n_ctx = p["max_seq_len"] or (4096 if p["norm_eps"] == 1e-5 else 2048)
    bos = specials.get("bos")
    cfg = dict(family="llama", d_model=dim, n_layers=L, n_heads=H, n_kv_heads=Hk, d_head=dh, d_ff=F,
               d_vocab=V, n_ctx=n_ctx, norm="rmsnorm", norm_eps=p["norm_eps"], final_norm=True, act="silu",
               gated_ffn=True, positions="rope", rope_theta=p["rope_theta"], embed_scale=1.0,
               embedding="linear", unembedding="linear", tie_word_embeddings=False, attn_bias=False,
               mlp_bias=False, prepend_ids=[1 if bos is None else bos],
               special_tokens={k: v for k, v in specials.items() if v is not None and 0 <= v < V})

    plan = []

    def add(name: str, src_name: str, dim_: int | None, src_shape: tuple, shape: tuple, fn=lambda a: a):
        got = sh.shape(src_name, dim_)
        if got != tuple(src_shape):
            raise FormatError(f"tensor {src_name!r}: joined shape {list(got)}, expected {list(src_shape)}")
        plan.append(planned(name, shape, sh.dtype(src_name), lambda: fn(sh.raw(src_name, dim_))))

    add("embed.W_E", "tok_embeddings.weight", 1, (V, dim), (V, dim))
    for i in range(L):
        m, b = f"layers.{i}.", f"blocks.{i}."
        add(b + "ln1.w", m + "attention_norm.weight", None, (dim,), (dim,))
        add(b + "attn.W_Q", m + "attention.wq.weight", 0, (H * dh, dim), (H, dim, dh),
            lambda a: linear_to_heads(interleaved_to_half(a, H), H))
        add(b + "attn.W_K", m + "attention.wk.weight", 0, (Hk * dh, dim), (Hk, dim, dh),
            lambda a: linear_to_heads(interleaved_to_half(a, Hk), Hk))
        add(b + "attn.W_V", m + "attention.wv.weight", 0, (Hk * dh, dim), (Hk, dim, dh),
            lambda a: linear_to_heads(a, Hk))
        add(b + "attn.W_O", m + "attention.wo.weight", 1, (dim, H * dh), (H, dh, dim), lambda a: out_to_heads(a, H))
        add(b + "ln2.w", m + "ffn_norm.weight", None, (dim,), (dim,))
        add(b + "mlp.W_gate", m + "feed_forward.w1.weight", 0, (F, dim), (dim, F), lambda a: a.T)
        add(b + "mlp.W_in", m + "feed_forward.w3.weight", 0, (F, dim), (dim, F), lambda a: a.T)
        add(b + "mlp.W_out", m + "feed_forward.w2.weight", 1, (dim, F), (F, dim), lambda a: a.T)
    add("ln_final.w", "norm.weight", None, (dim,), (dim,))
    add("unembed.W_U", "output.weight", 0, (V, dim), (dim, V), lambda a: a.T)
    extra_layers = {int(k.split(".")[1]) for k in sh.parts[0] if k.startswith("layers.")} - set(range(L))
    if extra_layers:
        raise FormatError(f"{files[0]}: has layer {min(extra_layers)} but params.json says n_layers={L}")

    params_path = os.path.join(d, "params.json")
    return write_canonical(dst, cfg, plan, tok_json, sources=[params_path] + files + [tok_path],
                           source_format=FORMAT, force=force)


__all__ = ["convert", "detect", "ffn_hidden_dim", "read_params"]
