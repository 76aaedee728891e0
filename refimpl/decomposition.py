"""Exact subvalue decomposition of layer outputs (paper Section 2.1, Eq. 5-10).

Attention output at query position t of layer i, split by source position j and head h:

    attn_i^{t.j,h} = alpha_h[t, j] * v_h[j] @ O_h            (Eq. 7-8, v includes b_V)
    ATTN_i[t]      = sum_{h, j} attn_i^{t.j,h} + b_O         (Eq. 5)

and further by head dimension e (an "attention neuron", the unit the authors' published
code scores; O_h[e] is row e of head h's output matrix):

    attn_i^{t.j,h,e} = alpha_h[t, j] * v_h[j, e] * O_h[e]    sum_e attn_i^{t.j,h,e} = attn_i^{t.j,h}

FFN output at position t of layer i, split by neuron k:

    ffn_i^k  = m_i^k * fc2_i^k = m[t, k] * W_out[k, :]        (Eq. 10)
    FFN_i[t] = sum_k ffn_i^k + b_out                          (Eq. 6)

These are computed on demand from a Trace (which keeps alpha, v and m), never stored
for every layer: an FFN layer's subvalues are [d_ff, d] per position.
"""
from __future__ import annotations

import numpy as np

from .errors import RefimplError


def _check(trace, i: int, t: int) -> int:
    if not 0 <= i < len(trace.layers):
        raise RefimplError(f"layer {i} out of range (model has {len(trace.layers)} layers)")
    T = len(trace.ids)
    if not -T <= t < T:
        raise RefimplError(f"position {t} out of range (prompt has {T} tokens)")
    return t % T


def attn_subvalues_by_head_position(trace, i: int, t: int) -> np.ndarray:
    """attn_i^{t.j,h} [H, t+1, d]: head h's output from source position j (Eq. 7-8)."""
    t = _check(trace, i, t)
    cfg, L = trace.model.cfg, trace.layers[i]
    group = np.arange(cfg.n_heads) // (cfg.n_heads // cfg.n_kv_heads)
    W_O = trace.model.weight(f"blocks.{i}.attn.W_O")                       # [H, dh, d]
    alpha = L.pattern[:, t, :t + 1]                                         # [H, t+1]
    weighted = alpha[:, :, None] * L.v[:t + 1, group].transpose(1, 0, 2)    # [H, t+1, dh]
    return np.einsum("hje,hed->hjd", weighted, W_O, optimize=True)          # [H, t+1, d]


def attn_subvalues_by_head_neuron_position(trace, i: int, t: int) -> np.ndarray:
    """attn_i^{t.j,h,e} [H, d_head, t+1, d]: alpha_h[t, j] * v_h[j, e] * O_h[e] for every head h,
    head dimension ("attention neuron") e and source position j; summed over e they are the
    head-and-position subvalues. Memory: H * d_head * (t+1) * d values."""
    t = _check(trace, i, t)
    cfg, L = trace.model.cfg, trace.layers[i]
    group = np.arange(cfg.n_heads) // (cfg.n_heads // cfg.n_kv_heads)
    W_O = trace.model.weight(f"blocks.{i}.attn.W_O")                       # [H, dh, d]
    weighted = L.pattern[:, t, :t + 1, None] * L.v[:t + 1, group].transpose(1, 0, 2)   # [H, t+1, dh]
    return np.einsum("hje,hed->hejd", weighted, W_O, optimize=True)         # [H, dh, t+1, d]


def attn_neuron_coefficients(trace, i: int, t: int) -> np.ndarray:
    """alpha_h[t, j] * v_h[j, e] [H, d_head, t+1]: the scalar that multiplies O_h[e] in each
    attention-neuron subvalue."""
    t = _check(trace, i, t)
    cfg, L = trace.model.cfg, trace.layers[i]
    group = np.arange(cfg.n_heads) // (cfg.n_heads // cfg.n_kv_heads)
    return (L.pattern[:, t, :t + 1, None] * L.v[:t + 1, group].transpose(1, 0, 2)).transpose(0, 2, 1)


def attn_neuron_subvalues(trace, i: int, t: int, heads, dims, positions) -> np.ndarray:
    """The attention-neuron subvalues of the given (head, dim, position) triples [n, d],
    without building the whole layer's [H, d_head, t+1, d]."""
    t = _check(trace, i, t)
    heads, dims, positions = (np.asarray(a, dtype=np.int64) for a in (heads, dims, positions))
    coef = attn_neuron_coefficients(trace, i, t)[heads, dims, positions]   # [n]
    rows = trace.model._take(f"blocks.{i}.attn.W_O", (heads, dims))        # [n, d] only these rows of W_O
    return coef[:, None] * rows                                             # [n, d]


def attn_subvalues_by_position(trace, i: int, t: int) -> np.ndarray:
    """attn_i^{t.j} [t+1, d]: the subvalue of source position j, heads summed (Eq. 7).
    Memoised per trace (a copy is returned): the top-K search, the vocabulary views and the
    activation trace ask for the same layers, and each call needs the layer's whole W_O."""
    t = _check(trace, i, t)
    memo = trace.__dict__.setdefault("_attn_by_position", {})
    if (i, t) not in memo:
        memo[(i, t)] = attn_subvalues_by_head_position(trace, i, t).sum(0)
    return memo[(i, t)].copy()


def attn_subvalues_by_head(trace, i: int, t: int) -> np.ndarray:
    """[H, d]: head h's whole output z_h[t] @ O_h (positions summed)."""
    t = _check(trace, i, t)
    W_O = trace.model.weight(f"blocks.{i}.attn.W_O")                       # [H, dh, d]
    return np.einsum("he,hed->hd", trace.layers[i].z[t], W_O, optimize=True)


def attn_bias_subvalue(trace, i: int) -> np.ndarray:
    """b_O [d] (zeros when the model has no attention output bias)."""
    d = trace.model.cfg.d_model
    return trace.model.weight_or_zeros(f"blocks.{i}.attn.b_O", (d,))


def ffn_subvalues(trace, i: int, t: int, neurons=None) -> np.ndarray:
    """ffn_i^k = m[t, k] * W_out[k] [F or len(neurons), d] (Eq. 10)."""
    t = _check(trace, i, t)
    m = trace.layers[i].m[t]                                                # [F]
    if neurons is None:
        return m[:, None] * trace.model.weight(f"blocks.{i}.mlp.W_out")    # [F, d]
    neurons = np.asarray(neurons)
    return m[neurons, None] * trace.model.rows(f"blocks.{i}.mlp.W_out", neurons)   # [n, d]


def ffn_bias_subvalue(trace, i: int) -> np.ndarray:
    """b_out [d] (zeros when the model has no FFN output bias)."""
    d = trace.model.cfg.d_model
    return trace.model.weight_or_zeros(f"blocks.{i}.mlp.b_out", (d,))


def embedding_parts(trace, t: int) -> dict[str, np.ndarray]:
    """Lin_0[t] split into its token part (scaled) and, where the family has one, position part."""
    t = t % len(trace.ids)
    parts = {"token": trace.embed_tok[t]}
    if trace.embed_pos is not None:
        parts["position"] = trace.embed_pos[t]
    return parts


def layer_vectors(trace, t: int, upto: int | None = None, include_attn_of_upto: bool = False):
    """The layer-level vectors that sum to a residual state at position t, in order
    (for Lres_i the paper's Eq. 21: Lres_i = Lin_0 + ATTN_0 + FFN_0 + ... + ATTN_i).

    [("emb.token", v), ("emb.position", v), ("attn.0", ATTN_0), ("ffn.0", FFN_0), ...]
    up to (excluding) layer `upto`; with `include_attn_of_upto`, ATTN_upto is appended,
    so the vectors sum to Lres_upto instead of Lin_upto.
    """
    t = t % len(trace.ids)
    n = len(trace.layers) if upto is None else upto
    out = [(f"emb.{k}", v) for k, v in embedding_parts(trace, t).items()]
    for j in range(n):
        out += [(f"attn.{j}", trace.layers[j].attn[t]), (f"ffn.{j}", trace.layers[j].ffn[t])]
    if include_attn_of_upto:
        out.append((f"attn.{n}", trace.layers[n].attn[t]))
    return out
