"""FFN subkeys and the exact linearisation of the pre-FFN norm (paper Section 3.3, Eq. 23).

With x = Lres_i[t], mu and sigma its mean and standard deviation sqrt(var + eps) (the
paper's "V" is sigma), gamma/beta the pre-FFN norm and W_in[:, k], b_in[k] neuron k:

    K^k      = gamma * W_in[:, k]                     the subkey
    lambda^k = sum(K^k)
    B^k      = beta @ W_in[:, k] + b_in[k]
    h^k      = (x @ K^k) / sigma - mu * lambda^k / sigma + B^k      exactly  (Eq. 23)

RMSNorm: h^k = (x @ K^k) / s, s = sqrt(mean(x^2) + eps) (mu = 0, no beta, no bias).
SwiGLU has two subkeys per neuron: `which="gate"` (W_gate) and `which="in"` (the up
projection W_in).

Because x = Lres_i = Lin_0 + ATTN_0 + FFN_0 + ... + ATTN_i (Eq. 21), h^k splits exactly into
(u @ K^k) / sigma per earlier vector u plus the remainder -mu lambda^k / sigma + B^k
(Section 4.2: which earlier layer or subvalue activates this neuron).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import nn
from .decomposition import _check, layer_vectors
from .errors import RefimplError


@dataclass
class Subkey:
    K: np.ndarray       # [d] or [d, n] gamma * W[:, k]
    lam: np.ndarray     # [] or [n]     sum(K)
    B: np.ndarray       # [] or [n]     beta @ W[:, k] + b[k]


def subkey(model, i: int, k=None, which: str = "in") -> Subkey:
    """Subkey(s) K = gamma * W[:, k] of neuron(s) k of layer i (all neurons if k is None)."""
    if which not in ("in", "gate"):
        raise RefimplError(f"which must be 'in' or 'gate', got {which!r}")
    if which == "gate" and not model.cfg.gated_ffn:
        raise RefimplError("this model's FFN has no gate (not SwiGLU)")
    if not 0 <= i < model.cfg.n_layers:
        raise RefimplError(f"layer {i} out of range (model has {model.cfg.n_layers} layers)")
    if k is not None and not np.all((0 <= np.asarray(k)) & (np.asarray(k) < model.cfg.d_ff)):
        raise RefimplError(f"neuron {k} out of range (FFN width {model.cfg.d_ff})")
    p = f"blocks.{i}."
    name = p + ("mlp.W_in" if which == "in" else "mlp.W_gate")
    W = model.weight(name) if k is None else model.columns(name, k)       # [d, F] or [d] / [d, n]
    gamma = model.weight(p + "ln2.w")                                       # [d]
    K = gamma[:, None] * W if W.ndim == 2 else gamma * W
    B = np.zeros(K.shape[1:], model.dtype)
    if model.cfg.norm == "layernorm" and model.has(p + "ln2.b"):
        B = B + model.weight(p + "ln2.b") @ W
    if which == "in" and model.has(p + "mlp.b_in"):
        b = model.weight(p + "mlp.b_in")
        B = B + (b if k is None else b[k])
    return Subkey(K=K, lam=K.sum(0), B=B)


def norm_stats_at(trace, i: int, t: int) -> tuple[float, float]:
    """(mu, sigma) of x = Lres_i[t] for the pre-FFN norm (mu = 0, sigma = s for RMSNorm)."""
    cfg = trace.model.cfg
    mu, sigma = nn.norm_stats(cfg.norm, trace.layers[i].lres[t], cfg.norm_eps)
    return float(mu[0]), float(sigma[0])


def preactivation(trace, i: int, t: int, k=None, which: str = "in") -> dict:
    """The terms of Eq. 23 for neuron(s) k at position t: x@K, mu, sigma, lambda, B and
    h = x@K/sigma - mu*lambda/sigma + B (equal to the forward pass's pre-activation)."""
    t = _check(trace, i, t)
    sk = subkey(trace.model, i, k, which)
    x = trace.layers[i].lres[t]                                             # [d]
    mu, sigma = norm_stats_at(trace, i, t)
    xK = x @ sk.K
    h = xK / sigma - mu * sk.lam / sigma + sk.B
    return {"xK": xK, "mu": mu, "sigma": sigma, "lambda": sk.lam, "B": sk.B, "h": h}


def preactivation_contributions(trace, i: int, t: int, k: int, which: str = "in") -> list[tuple[str, float]]:
    """Contributions to neuron k's pre-activation at (layer i, position t) of every
    layer-level vector before it (embedding parts, ATTN_j, FFN_j for j < i, ATTN_i):
    (u @ K) / sigma each, plus ("remainder", -mu*lambda/sigma + B). They sum to h exactly."""
    t = _check(trace, i, t)
    sk = subkey(trace.model, i, k, which)
    mu, sigma = norm_stats_at(trace, i, t)
    out = [(name, float(u @ sk.K / sigma)) for name, u in layer_vectors(trace, t, upto=i, include_attn_of_upto=True)]
    out.append(("remainder", float(-mu * sk.lam / sigma + sk.B)))
    return out
