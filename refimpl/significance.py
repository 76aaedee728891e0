"""Significance of layers and subvalues for a target token (paper Section 3.2, 4.1; Eq. 19).

    C(v) = log p(w | L + v) - log p(w | L)          the log-probability increase
    P(v) =     p(w | L + v) -     p(w | L)          the probability increase

Bases: an attention layer or attention subvalue of layer i is
scored on top of L = Lin_i, an FFN layer or FFN subvalue on top of L = Lres_i. All
probabilities are read out with the chosen readout at the analysed position t
(default: frozen final norm, see readout.py).
"""
from __future__ import annotations

import numpy as np

from . import nn
from .readout import Readout
from .errors import RefimplError

CHUNK = 256


def as_readout(trace, t: int, readout) -> Readout:
    return readout if isinstance(readout, Readout) else trace.readout(t, readout)


def increases(R: Readout, base: np.ndarray, V: np.ndarray, w: int, chunk: int = CHUNK):
    """(C, P) [n] of vectors V [n, d] added to base [d] (Eq. 19), in chunks of `chunk` vectors."""
    V = np.atleast_2d(V)
    return R.increase(base[None], np.zeros(len(V), dtype=np.int64), V, w, chunk)


def state_log_probs(R: Readout, X: np.ndarray, w: int, chunk: int = CHUNK) -> np.ndarray:
    """log p(w | x) [n] for residual states X [n, d], in chunks (one large product per chunk)."""
    return np.concatenate([R.log_prob(X[s:s + chunk], w) for s in range(0, len(X), chunk)]) \
        if len(X) else np.zeros(0)


def layer_significance(trace, w: int, t: int = -1, readout="frozen") -> list[dict]:
    """Per layer: C and P of ATTN_i (base Lin_i) and FFN_i (base Lres_i) (Section 4.1.1, Fig. 5).

    Lres_i = Lin_i + ATTN_i and Lout_i = Lres_i + FFN_i are the forward pass's own sums, so
    scoring the 2L+1 states once gives every layer's increase (and they telescope exactly)."""
    R = as_readout(trace, t, readout)
    L = len(trace.layers)
    X = np.array([trace.Lin0[t]] + [s[t] for Lt in trace.layers for s in (Lt.lres, Lt.lout)])   # [2L+1, d]
    if R.kind == "lens":                             # lp[2i] = Lin_i, lp[2i+1] = Lres_i, lp[2i+2] = Lout_i
        lp = state_log_probs(R, X, w)
    else:                                            # memoised per state: these are the subvalues' bases
        lp = sum(g[:, sel] for g, sel in R._base_groups(X, w))
    p = np.exp(lp)
    return [{"layer": i,
             "attn": {"log_prob_increase": float(lp[2 * i + 1] - lp[2 * i]), "prob_increase": float(p[2 * i + 1] - p[2 * i])},
             "ffn": {"log_prob_increase": float(lp[2 * i + 2] - lp[2 * i + 1]), "prob_increase": float(p[2 * i + 2] - p[2 * i + 1])}}
            for i in range(L)]


def attn_position_significance_all_layers(trace, w: int, t: int = -1, readout="frozen"):
    """C and P [L, t+1] of every attention subvalue by source position (heads summed) of every
    layer, scored in one batch (what `locate` ranks)."""
    R = as_readout(trace, t, readout)
    L = len(trace.layers)
    sv = np.array([trace.attn_subvalues(i, t, "position") for i in range(L)])   # [L, t+1, d]
    bases = np.array([Lt.lin[t] for Lt in trace.layers])                     # [L, d]
    n = sv.shape[1]
    c, p = R.increase(bases, np.repeat(np.arange(L), n), sv.reshape(L * n, -1), w)
    return c.reshape(L, n), p.reshape(L, n)


def attn_subvalue_significance(trace, i: int, w: int, t: int = -1, by: str = "position", readout="frozen"):
    """C and P of every attention subvalue of layer i at position t over base Lin_i.

    by="position": [t+1] (heads summed); "head": [H]; "head_position": [H, t+1];
    "head_neuron_position": [H, d_head, t+1] (attention neurons).
    Returns dict(log_prob_increase, prob_increase, bias=(C, P) of b_O)."""
    R = as_readout(trace, t, readout)
    sv = trace.attn_subvalues(i, t, by)
    shape = sv.shape[:-1]
    base = trace.layers[i].lin[t]
    c, p = increases(R, base, sv.reshape(-1, sv.shape[-1]), w)
    cb, pb = increases(R, base, trace.attn_bias_subvalue(i)[None], w)
    return {"log_prob_increase": c.reshape(shape), "prob_increase": p.reshape(shape),
            "bias": (float(cb[0]), float(pb[0]))}


def ffn_subvalue_significance(trace, i: int, w: int, t: int = -1, neurons=None, readout="frozen",
                              chunk: int = CHUNK):
    """(C, P) of FFN subvalues m^k fc2^k of layer i at position t over base Lres_i (Eq. 10, 19).

    All neurons by default, computed chunk by chunk (memory: chunk x V)."""
    R = as_readout(trace, t, readout)
    memo, key = R.trace_memo(trace), ("ffn_all", i, t % trace.T, int(w))   # a whole layer is scored once
    if neurons is None and key in memo:
        return memo[key]
    base = trace.layers[i].lres[t]
    idx = np.arange(trace.model.cfg.d_ff) if neurons is None else np.asarray(neurons, dtype=np.int64)
    cs, ps = [], []
    for s in range(0, len(idx), chunk):
        c, p = increases(R, base, trace.ffn_subvalues(i, t, idx[s:s + chunk]), w, chunk)
        cs.append(c)
        ps.append(p)
    out = (np.concatenate(cs), np.concatenate(ps)) if cs else (np.zeros(0), np.zeros(0))
    if neurons is None:
        memo[key] = out
    return out


NEGLIGIBLE = 1e-6           # tau (nats): |C| <= tau counts as negligible (docs/design-choices.md)


def activated(trace, i: int, t: int) -> np.ndarray:
    """Which FFN neurons of layer i are activated at position t [F] (Fig. 6): m > 0 for ReLU
    and GELU (act(x) > 0 exactly when x > 0), the gate's silu > 0 (gate pre-activation > 0)
    for SwiGLU, where m = silu(gate) * up takes either sign with the "up" projection."""
    L = trace.layers[i]
    return L.gate_pre[t] > 0 if L.gate_pre is not None else L.m[t] > 0


def top_share(x: np.ndarray, k: int = 10) -> float:
    """sum of the k largest of x / sum of x (x > 0; 0.0 for an empty x): Fig. 7."""
    if len(x) == 0:
        return 0.0
    x = np.sort(np.asarray(x, dtype=np.float64))[::-1]
    return float(x[:k].sum() / x.sum())


def counts_row(i: int, act: np.ndarray, c_class: np.ndarray, c_value: np.ndarray, tau: float) -> dict:
    """One row of Fig. 6-7 from every neuron's C: helpful C > tau, unhelpful C < -tau, negligible
    |C| <= tau (c_class: the values that decide the class, bounds.class_values); the top-10
    shares of the helpful (of the unhelpful) subvalues' summed increase, from c_value (the
    same values, or values within their rounding)."""
    hel, unh = c_class > tau, c_class < -tau
    return {"layer": int(i), "activated": int(act.sum()), "helpful": int(hel.sum()), "unhelpful": int(unh.sum()),
            "negligible": int(len(c_class) - hel.sum() - unh.sum()), "threshold": float(tau),
            "top10_share": top_share(c_value[hel]), "top10_share_unhelpful": top_share(-c_value[unh]),
            "share": "exact"}


def ffn_layer_summary(trace, i: int, w: int, t: int = -1, readout="frozen", scores=None,
                      negligible: float = NEGLIGIBLE) -> dict:
    """Fig. 6-7 for one FFN layer from every subvalue's exact score: activated, helpful (C > tau),
    unhelpful (C < -tau), negligible (|C| <= tau) counts and the top-10 shares (exact)."""
    from .bounds import class_values
    R = as_readout(trace, t, readout)
    c = ffn_subvalue_significance(trace, i, w, t, readout=R)[0] if scores is None else scores
    cls = class_values(trace, i, w, t, R, np.arange(len(c)), c, negligible)
    return counts_row(i, activated(trace, i, t), cls, cls, negligible)


def additivity(trace, i: int, w: int, t: int = -1, kind: str = "ffn", k_max: int | None = None,
               readout="frozen") -> dict:
    """Section 3.2 / Fig. 3: for the helpful subvalues of a layer sorted by C (largest first),
    C(v1 + ... + vk) against C(v1) + ... + C(vk), for log-probability and probability."""
    R = as_readout(trace, t, readout)
    if kind == "ffn":
        base, sv = trace.layers[i].lres[t], trace.ffn_subvalues(i, t)
    elif kind == "attn":
        base, sv = trace.layers[i].lin[t], trace.attn_subvalues(i, t, "position")
    else:
        raise RefimplError(f"kind must be 'ffn' or 'attn', got {kind!r}")
    c, p = increases(R, base, sv, w)
    order = np.argsort(-c, kind="stable")
    order = order[c[order] > 0][:k_max]
    cum = np.cumsum(sv[order], axis=0)                                      # [k, d] v1 + ... + vk
    c_sum, p_sum = increases(R, base, cum, w)
    return {"indices": order, "sum_of_log_prob_increases": np.cumsum(c[order]),
            "log_prob_increase_of_sum": c_sum, "sum_of_prob_increases": np.cumsum(p[order]),
            "prob_increase_of_sum": p_sum}


def f_curves(R: Readout, base: np.ndarray, w: int, ls: np.ndarray) -> dict:
    """Fig. 2: how p(w) and log p(w) change when w's bs-value alone is raised by l.

    With z = bs(base), F_logp(l) = log p_{z + l e_w}(w) - log p_z(w) and F_p likewise:
    log-probability increase is close to linear and monotone in l, probability increase
    is sigmoid-shaped (the paper's argument for scoring by log-probability)."""
    lps = R.log_probs(np.asarray(base))                                     # [V]
    lp0 = float(lps[w])
    # log(1 - p(w)) from the other tokens' log-probabilities, not from p(w): log1p(-p) loses
    # all its digits when p(w) is close to 1
    z_w, others = lp0, float(nn.logsumexp(np.delete(lps, w))) if len(lps) > 1 else -np.inf
    ls = np.asarray(ls, dtype=np.float64)
    new = (z_w + ls) - np.logaddexp(z_w + ls, others)                       # log p after adding l to w's logit
    return {"l": ls, "log_prob_increase": new - lp0, "prob_increase": np.exp(new) - np.exp(lp0)}
