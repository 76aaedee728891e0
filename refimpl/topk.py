"""Exact top-K FFN (and attention) subvalues over all layers without scoring every subvalue (docs/topk.md).

Branch and bound on the upper bound of bounds.py: visit neurons in decreasing upper
bound, score them exactly, and stop as soon as the next upper bound is below the K-th
best exact score found so far: no unvisited neuron can enter the top-K. The per-layer
counts (helpful C > tau, unhelpful C < -tau, negligible) are decided by certified brackets
(bounds.ffn_brackets: lower > tau helpful, upper < -tau unhelpful, inside [-tau, tau]
negligible; m = 0: exactly zero) and only the undecided subvalues are scored, plus what the
exact top-10 shares need. `exhaustive=True` scores every subvalue by brute force (chunked)
and is the reference the fast path is tested against.
"""
from __future__ import annotations

import numpy as np

from . import bounds
from . import decomposition as dec
from .errors import RefimplError
from .significance import (NEGLIGIBLE, activated, as_readout, attn_position_significance_all_layers, counts_row,
                           ffn_subvalue_significance)

DECIDE_MARGIN = 1e-9      # bounds decide a sign only when they clear zero by this much (absolute)


def _sort_key(c: np.ndarray, layer: np.ndarray, neuron: np.ndarray) -> np.ndarray:
    return np.lexsort((neuron, layer, -c))


def _score_across_layers(trace, layers: np.ndarray, neurons: np.ndarray, w: int, t: int, R):
    """Exact (C, P) of FFN subvalues from several layers, scored in one stacked product,
    each over its own base Lres_i."""
    uniq, which = np.unique(layers, return_inverse=True)
    V = np.empty((len(layers), trace.model.cfg.d_model), trace.model.dtype)   # [n, d]
    for j, i in enumerate(uniq):
        sel = np.flatnonzero(which == j)
        V[sel] = trace.ffn_subvalues(int(i), t, neurons[sel])
    bases = np.array([trace.layers[int(i)].lres[t] for i in uniq])            # [m, d]
    return R.increase(bases, which, V, w)


def _branch_and_bound(upper: np.ndarray, layer: np.ndarray, index: np.ndarray, k: int, score, batch: int):
    """Exact top-k of (layer, index) items by score, visiting them in decreasing `upper`
    (an upper bound on each score) and stopping once the next bound cannot reach the k-th
    best exact score. `score(layers, indices) -> (C, P)`. Returns (layer, index, C, P, scored)."""
    visit = np.lexsort((index, layer, -upper))
    got = []                                                                # [(layer, index, C, P)] per batch
    kth, pos, n = -np.inf, 0, 0
    while pos < len(visit):
        if n >= k and upper[visit[pos]] + DECIDE_MARGIN < kth:
            break
        sel = visit[pos:pos + batch]
        pos += len(sel)
        got.append((layer[sel], index[sel], *score(layer[sel], index[sel])))
        n += len(sel)
        cc = np.concatenate([g[2] for g in got])
        if len(cc) >= k:
            kth = np.partition(cc, len(cc) - k)[len(cc) - k]
    lay, idx, c, p = (np.concatenate([g[j] for g in got]) for j in range(4))
    order = _sort_key(c, lay, idx)[:k]
    return lay[order], idx[order], c[order], p[order], len(c)


def top_ffn_subvalues(trace, w: int, t: int = -1, k: int = 10, readout="frozen", exhaustive: bool = False,
                      batch: int = 64) -> dict:
    """The k FFN subvalues with the largest log-probability increase over all layers.

    Returns {"layer", "neuron", "log_prob_increase", "prob_increase"} arrays (best first)
    and "scored": how many subvalues were scored exactly."""
    R = as_readout(trace, t, readout)
    L = len(trace.layers)
    if exhaustive or R.kind == "lens":
        rows = [(i, *ffn_subvalue_significance(trace, i, w, t, readout=R)) for i in range(L)]
        layer = np.concatenate([np.full(len(c), i) for i, c, _ in rows])
        neuron = np.concatenate([np.arange(len(c)) for _, c, _ in rows])
        c = np.concatenate([c for _, c, _ in rows])
        p = np.concatenate([p for _, _, p in rows])
        order = _sort_key(c, layer, neuron)[:k]
        return {"layer": layer[order], "neuron": neuron[order], "log_prob_increase": c[order],
                "prob_increase": p[order], "scored": len(c)}
    ups = [bounds.ffn_upper(trace, i, w, t, R) for i in range(L)]
    layer = np.concatenate([np.full(len(u), i) for i, u in enumerate(ups)])
    neuron = np.concatenate([np.arange(len(u)) for u in ups])
    lay, neu, c, p, scored = _branch_and_bound(
        np.concatenate(ups), layer, neuron, k, lambda li, ni: _score_across_layers(trace, li, ni, w, t, R), batch)
    return {"layer": lay, "neuron": neu, "log_prob_increase": c, "prob_increase": p, "scored": scored}


def _lin_g(trace, R, t: int, w: int, bases: np.ndarray) -> np.ndarray:
    """g_i for every layer's base Lin_i[t] [L, d] (bounds.g_vector), memoised per trace: the
    attention top-K by position and by neuron share it."""
    memo, key = R.trace_memo(trace), ("g_lin", t % trace.T, int(w))
    if key not in memo:
        memo[key] = bounds.g_vector(R, bases, w)
    return memo[key]


def top_attn_subvalues(trace, w: int, t: int = -1, k: int = 10, readout="frozen", exhaustive: bool = False,
                       batch: int = 32) -> dict:
    """The k attention subvalues by source position (heads summed, Eq. 7) with the largest
    log-probability increase over their bases Lin_i, over all layers: the same branch and
    bound with the upper bound g_i . v (g_i from Lin_i). Returns {"layer", "position",
    "log_prob_increase", "prob_increase", "scored"}."""
    R = as_readout(trace, t, readout)
    L = len(trace.layers)
    if exhaustive or R.kind == "lens":
        c, p = (a.ravel() for a in attn_position_significance_all_layers(trace, w, t, R))   # [L * (t+1)]
        layer, pos = np.divmod(np.arange(len(c)), len(c) // L)
        order = _sort_key(c, layer, pos)[:k]
        return {"layer": layer[order], "position": pos[order], "log_prob_increase": c[order],
                "prob_increase": p[order], "scored": len(c)}
    sv = np.array([trace.attn_subvalues(i, t, "position") for i in range(L)])   # [L, t+1, d]
    n = sv.shape[1]
    layer, pos = np.repeat(np.arange(L), n), np.tile(np.arange(n), L)
    bases = np.array([Lt.lin[t] for Lt in trace.layers])                       # [L, d]

    def score(li, pi):
        return R.increase(bases, li, sv[li, pi], w)
    g = _lin_g(trace, R, t, w, bases)                                           # [L, d]
    upper = np.einsum("lnd,ld->ln", sv, g).ravel()                              # [L * (t+1)]
    lay, ps, c, p, scored = _branch_and_bound(upper, layer, pos, k, score, batch)
    return {"layer": lay, "position": ps, "log_prob_increase": c, "prob_increase": p, "scored": scored}


def top_attn_neurons(trace, w: int, t: int = -1, k: int = 10, readout="frozen", exhaustive: bool = False,
                     batch: int = 32, chunk: int = 128) -> dict:
    """The k attention-neuron subvalues alpha_h[t, j] v_h[j, e] O_h[e] (head h, head dimension e,
    source position j; decomposition.py) with the largest log-probability increase over their
    bases Lin_i, over all layers. The same branch and bound as for FFN subvalues: the Jensen
    bound C(v) <= g_i . v is, for these vectors, (alpha_h[t, j] v_h[j, e]) * (O_h[e] . g_i), so
    every bound costs one product W_O g_i per layer and only the visited neurons are built and
    scored. `exhaustive` scores every neuron, reading each row of W_O out once for all source
    positions (the bs-values of c * O_h[e] are c * A(O_h[e])). Returns {"layer", "head", "dim",
    "position", "log_prob_increase", "prob_increase", "scored"} (best first; ties: lower layer,
    head, dim, position first)."""
    R = as_readout(trace, t, readout)
    t = t % trace.T
    cfg, L, n_pos = trace.model.cfg, len(trace.layers), t + 1
    per_layer = cfg.n_heads * cfg.d_head * n_pos                                # (h, e, j) flattened
    bases = np.array([Lt.lin[t] for Lt in trace.layers])                        # [L, d]
    if exhaustive or R.kind == "lens":
        cs, ps = [], []
        for i in range(L):
            if R.kind == "lens":                # not linear: every neuron's vector is read out on its own
                sv = trace.attn_subvalues(i, t, "head_neuron_position").reshape(per_layer, -1)   # [H*dh*(t+1), d]
                c, p = R.increase(bases[i:i + 1], np.zeros(per_layer, dtype=np.int64), sv, w)
            else:                               # bs-values of coef * O_h[e] = coef * A(O_h[e]): A once per row of W_O
                O = trace.model.weight(f"blocks.{i}.attn.W_O").reshape(cfg.n_heads * cfg.d_head, -1)   # [H*dh, d]
                coef = dec.attn_neuron_coefficients(trace, i, t).reshape(len(O), n_pos)           # [H*dh, t+1]
                c, p = np.empty((len(O), n_pos)), np.empty((len(O), n_pos))
                for s in range(0, len(O), chunk):
                    c[s:s + chunk], p[s:s + chunk] = R.increase_of_multiples(bases[i], O[s:s + chunk],
                                                                             coef[s:s + chunk], w)
                c, p = c.ravel(), p.ravel()                                     # (h*dh + e)*(t+1) + j
            cs.append(c)
            ps.append(p)
        c, p = np.concatenate(cs), np.concatenate(ps)
        layer, idx = np.divmod(np.arange(len(c)), per_layer)
        order = _sort_key(c, layer, idx)[:k]
        lay, idx, c, p, scored = layer[order], idx[order], c[order], p[order], len(c)
    else:
        g = _lin_g(trace, R, t, w, bases)                                       # [L, d]
        coef = np.array([dec.attn_neuron_coefficients(trace, i, t) for i in range(L)])   # [L, H, dh, t+1]
        og = np.array([trace.model.weight(f"blocks.{i}.attn.W_O") @ g[i] for i in range(L)])   # [L, H, dh]
        upper = (coef * og[..., None]).reshape(L * per_layer)
        layer, idx = np.divmod(np.arange(L * per_layer), per_layer)

        def score(li, ni):
            h, rest = np.divmod(ni, cfg.d_head * n_pos)
            e, j = np.divmod(rest, n_pos)
            V = np.empty((len(ni), cfg.d_model), trace.model.dtype)             # [n, d]
            for i in np.unique(li):
                sel = np.flatnonzero(li == i)
                V[sel] = dec.attn_neuron_subvalues(trace, int(i), t, h[sel], e[sel], j[sel])
            return R.increase(bases, li, V, w)
        lay, idx, c, p, scored = _branch_and_bound(upper, layer, idx, k, score, batch)
    h, rest = np.divmod(idx, cfg.d_head * n_pos)
    e, j = np.divmod(rest, n_pos)
    return {"layer": lay, "head": h, "dim": e, "position": j, "log_prob_increase": c, "prob_increase": p,
            "scored": int(scored)}


SHARES = ("exact", "bound")


def check_negligible(tau) -> float:
    """The negligible threshold tau: a finite number >= 0 (nats)."""
    try:
        x = float(tau)
    except (TypeError, ValueError):
        raise RefimplError(f"negligible threshold must be a number >= 0, got {tau!r}") from None
    if not np.isfinite(x) or x < 0:
        raise RefimplError(f"negligible threshold must be a finite number >= 0, got {tau!r}")
    return x


def _pin_rel(dtype) -> float:
    """Relative error allowed on a layer's summed helpful (unhelpful) C from subvalues valued at
    their bracket's midpoint instead of scored: 16 eps of the working dtype (the exact sum's own
    rounding is of that order)."""
    return 16 * float(np.finfo(dtype).eps)


def _unscored_ok(lo: np.ndarray, up: np.ndarray, sure: np.ndarray, tau: float, rel: float) -> np.ndarray:
    """Among the subvalues `sure` to be helpful (C in [lo, up], lo > tau), those whose exact C
    is not needed for the exact top-10 share: they cannot be in the top 10 (up below the 10th
    largest lower bound) and their bracket widths sum to at most rel * (a lower bound on the
    helpful total), so the midpoint values them to that precision."""
    idx = np.flatnonzero(sure)
    out = np.zeros(len(lo), bool)
    if len(idx) <= 10:
        return out
    kth_lo = np.partition(lo[idx], len(idx) - 10)[len(idx) - 10]
    cand = idx[up[idx] < kth_lo]
    width = up[cand] - lo[cand]
    order = np.argsort(width, kind="stable")
    budget = rel * float(np.maximum(lo[idx], tau).sum())
    ok = np.cumsum(width[order]) <= budget
    out[cand[order[ok]]] = True
    return out


def ffn_counts(trace, w: int, t: int = -1, readout="frozen", exhaustive: bool = False,
               negligible: float = NEGLIGIBLE, share: str = "exact") -> list[dict]:
    """Per layer (Fig. 6-7): activated, helpful (C > tau), unhelpful (C < -tau) and negligible
    (|C| <= tau) FFN subvalue counts, exact, and the top-10 shares of the helpful and of the
    unhelpful subvalues' summed increase.

    Every subvalue's C is bracketed by bounds.ffn_brackets (one d_ff x d product per layer, no
    vocabulary-sized work); only subvalues the brackets leave undecided are scored exactly, so
    the counts equal `exhaustive`'s. share="exact" also scores what the exact shares need
    (every helpful / unhelpful subvalue whose bracket is not already narrower than the sums'
    rounding: on a model with dense activations, most of them); share="bound" scores nothing
    more and reports each share as a certified [lo, hi] (labelled `"share": "bound"`)."""
    R = as_readout(trace, t, readout)
    tau = check_negligible(negligible)
    if share not in SHARES:
        raise RefimplError(f"share must be one of {', '.join(SHARES)}, got {share!r}")
    L, F = len(trace.layers), trace.model.cfg.d_ff
    if exhaustive or R.kind == "lens":                  # every subvalue scored (memoised per layer)
        out = []
        for i in range(L):
            c = ffn_subvalue_significance(trace, i, w, t, readout=R)[0]
            cls = bounds.class_values(trace, i, w, t, R, np.arange(F), c, tau)
            out.append({**counts_row(i, activated(trace, i, t), cls, cls, tau), "scored": F})
        return out
    rel = _pin_rel(trace.model.dtype)
    per = []
    for i in range(L):
        # share="exact" scores (nearly) every helpful / unhelpful subvalue anyway: the cheaper
        # Popoviciu bracket suffices; "bound" brackets tightly (the Gram matrix, once per model)
        lo, up, _ = bounds.ffn_brackets(trace, i, w, t, R, spectral=share == "bound")
        hel, unh = lo > tau, up < -tau
        und = ~(hel | unh | ((lo >= -tau) & (up <= tau)))
        need = und.copy()
        if share == "exact":
            need |= hel & ~_unscored_ok(lo, up, hel, tau, rel)
            need |= unh & ~_unscored_ok(-up, -lo, unh, tau, rel)
        per.append((lo, up, hel, unh, np.flatnonzero(need & ~und), np.flatnonzero(und)))
    # subvalues scored for the shares only (their class is decided): in the working dtype, stacked
    # across layers 2048 at a time; the undecided ones: their class is the exact C's, so they are
    # scored in float64 directly (bounds.increase64; the same as the working dtype in float64)
    sl = np.concatenate([np.full(len(n), i) for i, (*_, n, _u) in enumerate(per)]).astype(np.int64)
    sn = np.concatenate([n for *_, n, _u in per]).astype(np.int64)
    c_all = np.zeros(len(sn))
    for s in range(0, len(sn), 2048):
        c_all[s:s + 2048] = _score_across_layers(trace, sl[s:s + 2048], sn[s:s + 2048], w, t, R)[0]
    ul = np.concatenate([np.full(len(u_), i) for i, (*_, u_) in enumerate(per)]).astype(np.int64)
    c_und_all = bounds.increase64_layers(trace, ul, np.concatenate([u_ for *_, u_ in per]).astype(np.int64),
                                         w, t, R)                             # one pass over W_U for all layers
    out = []
    for i, (lo, up, hel, unh, share_only, und) in enumerate(per):
        need = np.concatenate([share_only, und])
        c_und = c_und_all[ul == i]
        cls_scored = np.concatenate([np.asarray(c_all[sl == i], np.float64), c_und])
        cls = np.where(hel, np.inf, np.where(unh, -np.inf, 0.0))              # decided by the brackets
        cls[und] = c_und                                                      # decided by the exact C
        val = (lo + up) / 2                                                   # unscored: bracket midpoint
        val[need] = cls_scored
        row = counts_row(i, activated(trace, i, t), cls, val, tau)
        if share == "bound":
            lo_s, up_s = np.maximum(lo, tau), up.copy()
            lo_s[need], up_s[need] = cls_scored, cls_scored
            h, u_ = cls > tau, cls < -tau
            row["top10_share"] = _share_bracket(lo_s[h], up_s[h])
            lo_u, up_u = np.maximum(-up, tau), -lo
            lo_u[need], up_u[need] = -cls_scored, -cls_scored
            row["top10_share_unhelpful"] = _share_bracket(lo_u[u_], up_u[u_])
            row["share"] = "bound"
        out.append({**row, "scored": int(len(need))})
    return out


def _share_bracket(lo: np.ndarray, up: np.ndarray) -> list[float]:
    """[min, max] of (sum of the 10 largest x) / (sum of x) over x in the box [lo, up] (lo > 0)."""
    if len(lo) == 0:
        return [0.0, 0.0]
    if len(lo) <= 10:
        return [1.0, 1.0]
    # the share grows with the top values and shrinks with the rest: extremes at box corners
    hi_top = np.sort(up)[::-1][:10].sum()
    rest_lo = lo.sum() - np.sort(lo)[::-1][:10].sum()
    lo_top = np.sort(lo)[::-1][:10].sum()
    rest_up = up.sum() - np.sort(up)[::-1][:10].sum()
    return [float(min(1.0, lo_top / max(lo_top + rest_up, 1e-300))),
            float(min(1.0, hi_top / max(hi_top + rest_lo, 1e-300)))]
