"""The one forward pass, residual stream explicit (paper Section 2.1, Eq. 2-10).

    Lin_0  = token embedding (+ position embedding)          Eq. 2  (Lin_i = Lout_{i-1})
    Lres_i = Lin_i  + ATTN_i                                  Eq. 3
    Lout_i = Lres_i + FFN_i                                   Eq. 4
    ATTN_i = sum_h sum_j alpha_h[t, j] v_h[j] O_h + b_O       Eq. 5, 7, 8
    FFN_i  = sum_k m_i^k fc2_i^k + b_out                      Eq. 6, 9, 10

All three families (GPT-2, Llama, fairseq Baevski-Auli) run through `forward`; what
differs between them is picked from the config by the small functions
`embed_tokens`, `embed_positions`, `norm`, `attention` (RoPE or not) and `ffn`
(plain or gated), like llama2.c keeps one `forward` over one weights struct.
"""
from __future__ import annotations

import numpy as np

from . import nn
from .blas import one_blas_thread
from .errors import RefimplError
from .model import Model
from .readout import final_log_probs
from .trace import LayerTrace, Trace


# --- family pieces --------------------------------------------------------------------

def embed_tokens(model: Model, ids: np.ndarray) -> np.ndarray:
    """Token part of Lin_0 [T, d]: W_E[ids] (adaptive input: per band W_E_c[id] @ W_proj_c), times embed_scale."""
    cfg = model.cfg
    if cfg.embedding == "linear":
        x = np.asarray(model.stored("embed.W_E")[ids], model.dtype)           # [T, d] only the rows used
    else:
        x = np.zeros((len(ids), cfg.d_model), model.dtype)                   # [T, d]
        for c, (lo, hi) in enumerate(cfg.bands):
            sel = (ids >= lo) & (ids < hi)
            if sel.any():
                e = model.stored(f"embed.adaptive.{c}.W_E")[ids[sel] - lo].astype(model.dtype)   # [n, d_c]
                x[sel] = e @ model.weight(f"embed.adaptive.{c}.W_proj")                          # [n, d]
    return x * cfg.embed_scale if cfg.embed_scale != 1.0 else x


def embed_positions(model: Model, ids: np.ndarray) -> np.ndarray | None:
    """Position part of Lin_0 [T, d] (learned or fairseq sinusoidal); None for RoPE."""
    cfg, T = model.cfg, len(ids)
    if cfg.positions == "learned":
        return model.weight("pos_embed.W_pos")[:T]                            # [T, d]
    if cfg.positions == "sinusoidal":
        pad = cfg.padding_idx if cfg.padding_idx is not None else -1
        pos = nn.fairseq_positions(ids, pad) if cfg.padding_idx is not None else np.arange(T)
        return nn.sinusoidal_rows(pos, cfg.d_model, cfg.padding_idx).astype(model.dtype)   # [T, d] only the rows used
    return None


def norm(model: Model, x: np.ndarray, w: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    """The family's pre-norm (LayerNorm or RMSNorm) with the block's weights."""
    return nn.NORMS[model.cfg.norm](x, w, 0.0 if b is None else b, model.cfg.norm_eps)


def attention(model: Model, W: dict, x: np.ndarray):
    """Causal multi-head attention on normalised input x [T, d] (Eq. 5, 7, 8).

    Returns q, k (before RoPE), v [T, H_kv, dh] (bias included), pattern alpha
    [H, T_query, T_key] and z [T, H, dh] = sum_j alpha[h, t, j] v_{g(h)}[j].
    """
    cfg = model.cfg
    T, H, Hk, dh = x.shape[0], cfg.n_heads, cfg.n_kv_heads, cfg.d_head
    q = np.matmul(x, W["attn.W_Q"]).transpose(1, 0, 2)                    # [T, H, dh]   x W_Q^h per head
    k = np.matmul(x, W["attn.W_K"]).transpose(1, 0, 2)                    # [T, H_kv, dh]
    v = np.matmul(x, W["attn.W_V"]).transpose(1, 0, 2)                    # [T, H_kv, dh]
    if "attn.b_Q" in W:
        q, k, v = q + W["attn.b_Q"], k + W["attn.b_K"], v + W["attn.b_V"]
    qr, kr = q, k
    if cfg.positions == "rope":
        cos, sin = nn.rope_cos_sin(np.arange(T), dh, cfg.rope_theta, x.dtype)  # [T, dh]
        qr, kr = nn.apply_rope(q, cos, sin), nn.apply_rope(k, cos, sin)
    group = np.arange(H) // (H // Hk)                                       # head h reads kv group h // (H/H_kv)
    root = np.asarray(np.sqrt(dh), x.dtype)                                 # keeps float32 runs float32
    scores = np.einsum("the,she->hts", qr, kr[:, group], optimize=True) / root    # [H, T, T]
    scores = np.where(np.tril(np.ones((T, T), bool)), scores, -np.inf)
    pattern = nn.softmax(scores, axis=-1)                                   # [H, T, T] alpha_h[t, j]
    z = np.einsum("hts,she->the", pattern, v[:, group], optimize=True)      # [T, H, dh]
    return q, k, v, pattern, z


def ffn(model: Model, W: dict, x: np.ndarray):
    """FFN coefficients on normalised input x [T, d] (Eq. 9).

    Returns (pre, gate_pre, m): pre = x W_in + b_in [T, F]; for SwiGLU also
    gate_pre = x W_gate [T, F] and m = silu(gate_pre) * pre; else m = act(pre).
    """
    act = nn.ACTS[model.cfg.act]
    pre = x @ W["mlp.W_in"]                                                 # [T, F]
    if "mlp.b_in" in W:
        pre = pre + W["mlp.b_in"]
    if model.cfg.gated_ffn:
        gate_pre = x @ W["mlp.W_gate"]                                      # [T, F]
        return pre, gate_pre, act(gate_pre) * pre
    return pre, None, act(pre)


# --- the loop -------------------------------------------------------------------------

def check_ids(model: Model, ids) -> np.ndarray:
    """Token ids as a non-empty 1-D int64 array inside the vocabulary and the context (else one error)."""
    cfg = model.cfg
    if not isinstance(ids, np.ndarray):          # Python ints: range-checked before any int64 conversion
        ids = list(ids)
        bad = next((i for i in ids if not (isinstance(i, (int, np.integer)) and 0 <= i < cfg.d_vocab)), None)
        if bad is not None:
            raise RefimplError(f"token id {bad} out of range (vocabulary has {cfg.d_vocab} tokens)")
    ids = np.asarray(ids, dtype=np.int64)
    if ids.ndim != 1 or len(ids) == 0:
        raise RefimplError("need a non-empty 1-D sequence of token ids")
    if ids.min() < 0 or ids.max() >= cfg.d_vocab:
        raise RefimplError(f"token id {int(ids.max() if ids.max() >= cfg.d_vocab else ids.min())} "
                           f"out of range (vocabulary has {cfg.d_vocab} tokens)")
    if len(ids) > cfg.n_ctx:
        raise RefimplError(f"prompt has {len(ids)} tokens, longer than the model's context of {cfg.n_ctx}")
    return ids


def layer(model: Model, W: dict, lin: np.ndarray) -> LayerTrace:
    """One block on Lin_i [T, d] with its weights W (`Model.block(i)`): Eq. 3-10. The body of
    the loop of `forward` and of `forward_many`, so both give the same numbers bit for bit."""
    d = model.cfg.d_model
    q, k, v, pattern, z = attention(model, W, norm(model, lin, W["ln1.w"], W.get("ln1.b")))
    attn = z.reshape(len(lin), -1) @ W["attn.W_O"].reshape(-1, d)          # [T, d] Eq. 5/7: sum_h z_h O_h
    if "attn.b_O" in W:
        attn = attn + W["attn.b_O"]                                         # the attention bias subvalue
    lres = lin + attn                                                       # Eq. 3
    pre, gate_pre, m = ffn(model, W, norm(model, lres, W["ln2.w"], W.get("ln2.b")))
    out = m @ W["mlp.W_out"]                                                # [T, d] Eq. 6/10: sum_k m^k fc2^k
    if "mlp.b_out" in W:
        out = out + W["mlp.b_out"]
    lout = lres + out                                                       # Eq. 4
    return LayerTrace(lin=lin, attn=attn, lres=lres, ffn=out, lout=lout, q=q, k=k, v=v,
                      pattern=pattern, z=z, pre=pre, gate_pre=gate_pre, m=m)


def forward(model: Model, ids) -> Trace:
    """Run the model on token ids and keep every residual-stream vector."""
    return forward_many(model, [ids])[0]


def forward_many(model: Model, prompts: list) -> list[Trace]:
    """`forward` on several token-id sequences at once, layer by layer: each block's weights are
    fetched (read and widened, for a model that streams) once for all the prompts, and every
    prompt runs through `layer` on its own, so each Trace is the one `forward` gives alone.
    With one BLAS thread: a few rows per product gain nothing from threads, and the results do
    not depend on the machine's thread count (refimpl/blas.py)."""
    with one_blas_thread():
        return _forward_many(model, prompts)


def _forward_many(model: Model, prompts: list) -> list[Trace]:
    cfg = model.cfg
    ids = [check_ids(model, p) for p in prompts]
    tok = [embed_tokens(model, i) for i in ids]                             # [T, d] each
    pos = [embed_positions(model, i) for i in ids]                          # [T, d] or None each
    xs = [t if p is None else t + p for t, p in zip(tok, pos)]              # Eq. 2: Lin_0
    layers: list[list[LayerTrace]] = [[] for _ in ids]
    for i in range(cfg.n_layers):
        W = model.block(i)
        for n, x in enumerate(xs):
            layers[n].append(layer(model, W, x))                            # Lin_{i+1} = Lout_i
            xs[n] = layers[n][-1].lout
    out = []
    for n, x in enumerate(xs):
        log_probs, logits = final_log_probs(model, x)
        if not np.isfinite(log_probs).all():
            _report_non_finite(model, tok[n], pos[n], layers[n])
        out.append(Trace(model=model, ids=ids[n], embed_tok=tok[n], embed_pos=pos[n], layers=layers[n],
                         log_probs=log_probs, logits=logits))
    return out


def _report_non_finite(model: Model, tok, pos, layers) -> None:
    """Name the weight (or layer) that made the output NaN/Inf: one clear error, not NaN tables."""
    def bad(name):
        return model.has(name) and not np.isfinite(model.stored(name)).all()
    if not np.isfinite(tok).all() or (pos is not None and not np.isfinite(pos).all()):
        names = [n for n in ("embed.W_E", "pos_embed.W_pos") if bad(n)] or ["the embedding"]
        raise RefimplError(f"{model.path}: non-finite values (NaN/Inf) in {names[0]}; run `refimpl verify`")
    for i, L in enumerate(layers):
        if not np.isfinite(L.lout).all():
            names = [f"blocks.{i}.{n}" for n in sorted(model.block(i)) if bad(f"blocks.{i}.{n}")]
            where = f"tensor {names[0]}" if names else f"layer {i}'s activations (overflow)"
            raise RefimplError(f"{model.path}: non-finite values (NaN/Inf) in {where}; run `refimpl verify`")
    names = [n for n in ("ln_final.w", "ln_final.b", "unembed.W_U", "unembed.b_U") if bad(n)]
    raise RefimplError(f"{model.path}: non-finite values (NaN/Inf) in "
                       f"{'tensor ' + names[0] if names else 'the output'}; run `refimpl verify`")


def run_ids(model: Model, prompt_or_ids, prepend_bos: bool | None = None) -> list[int]:
    """The token ids `run` feeds the model: text tokenized with the start ids `prepend_bos` asks
    for (None: the family's convention, see Model.start_ids); a list of ints verbatim."""
    if isinstance(prompt_or_ids, str):
        return model.encode(prompt_or_ids, prepend_bos)
    if prepend_bos is not None:
        raise RefimplError("prepend_bos applies to a text prompt; token ids are used verbatim")
    return [int(i) for i in prompt_or_ids]


def run(model: Model, prompt_or_ids, prepend_bos: bool | None = None) -> Trace:
    """`refimpl.run`: text is tokenized with the start ids `prepend_bos` asks for (None: the
    family's convention, see Model.start_ids); a list of ints is used verbatim."""
    return forward(model, run_ids(model, prompt_or_ids, prepend_bos))
