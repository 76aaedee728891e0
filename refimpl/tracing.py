"""Activation tracing: which earlier vector activates an FFN neuron (paper Section 4.2, Fig. 8-9).

Level 1: the pre-activation h^k of neuron k in layer i at position t splits exactly
into (u @ K^k) / sigma for every layer-level vector u that sums to Lres_i[t]
(Eq. 21: embedding parts, ATTN_j and FFN_j for j < i, ATTN_i) plus the remainder
-mu lambda^k / sigma + B^k (subkeys.py, Eq. 23).

Level 2: any one of those vectors splits into its own subvalues (attention by source
position, head, or both, plus b_O; FFN neurons plus b_out), and so does its
contribution: (subvalue @ K^k) / sigma, exactly summing to the vector's contribution.
This is how "the neuron is activated by the attention subvalue on the 'capital'
position" is found.
"""
from __future__ import annotations

import numpy as np

from .decomposition import _check
from .errors import RefimplError
from .subkeys import norm_stats_at, preactivation_contributions, subkey


def default_which(model) -> list[str]:
    """Subkeys to trace: the gate and up projections for SwiGLU, else the one W_in."""
    return ["gate", "in"] if model.cfg.gated_ffn else ["in"]


def trace_activation(trace, i: int, k: int, t: int = -1, which: str = "in") -> dict:
    """Level 1: contributions of each layer-level vector to neuron k's pre-activation."""
    t = _check(trace, i, t)
    contrib = preactivation_contributions(trace, i, t, k, which)
    pre = trace.layers[i].pre[t, k] if which == "in" else trace.layers[i].gate_pre[t, k]
    return {"layer": i, "neuron": int(k), "position": t, "which": which,
            "pre_activation": float(pre), "coefficient": float(trace.layers[i].m[t, k]),
            "contributions": [{"source": name, "value": v} for name, v in contrib]}


def source_subvalues(trace, source: str, t: int, by: str = "position") -> tuple[list[str], np.ndarray]:
    """(labels, subvalues [n, d]) of a layer-level vector named like "attn.3", "ffn.2", "emb.token"."""
    kind, _, idx = source.partition(".")
    if kind == "emb":
        parts = trace.embedding_parts(t)
        if idx not in parts:
            raise RefimplError(f"no embedding part {idx!r} (have {sorted(parts)})")
        return [source], parts[idx][None]
    try:
        j = int(idx)
    except ValueError:
        raise RefimplError(f"bad source {source!r}: expected attn.J, ffn.J or emb.token/position") from None
    if kind == "attn":
        sv = trace.attn_subvalues(j, t, by)
        toks = trace.tokens
        if by == "position":
            labels = [f"attn.{j}.pos{p}:{toks[p]!r}" for p in range(sv.shape[0])]
        elif by == "head":
            labels = [f"attn.{j}.head{h}" for h in range(sv.shape[0])]
        elif by == "head_position":
            labels = [f"attn.{j}.head{h}.pos{p}:{toks[p]!r}" for h in range(sv.shape[0]) for p in range(sv.shape[1])]
            sv = sv.reshape(-1, sv.shape[-1])
        else:                                                               # head_neuron_position
            labels = [f"attn.{j}.head{h}.dim{e}.pos{p}:{toks[p]!r}" for h in range(sv.shape[0])
                      for e in range(sv.shape[1]) for p in range(sv.shape[2])]
            sv = sv.reshape(-1, sv.shape[-1])
        return labels + [f"attn.{j}.bias"], np.vstack([sv, trace.attn_bias_subvalue(j)[None]])
    if kind == "ffn":
        sv = trace.ffn_subvalues(j, t)
        labels = [f"ffn.{j}.n{n}" for n in range(sv.shape[0])] + [f"ffn.{j}.bias"]
        return labels, np.vstack([sv, trace.ffn_bias_subvalue(j)[None]])
    raise RefimplError(f"bad source {source!r}: expected attn.J, ffn.J or emb.token/position")


def source_subvalue_rows(trace, source: str, t: int, rows, by: str = "position") -> np.ndarray:
    """Rows `rows` of source_subvalues(trace, source, t, by)[1] [n, d], for an FFN source
    without building all of its d_ff subvalues (m^k fc2^k of the rows asked for, and b_out)."""
    rows = np.asarray(rows, dtype=np.int64)
    kind, _, idx = source.partition(".")
    if kind != "ffn":
        return source_subvalues(trace, source, t, by)[1][rows]
    j, F = int(idx), trace.model.cfg.d_ff
    out = np.empty((len(rows), trace.model.cfg.d_model), trace.model.dtype)
    neu = rows < F
    if neu.any():
        out[neu] = trace.ffn_subvalues(j, t, rows[neu])                    # [n, d]
    if (~neu).any():
        out[~neu] = trace.ffn_bias_subvalue(j)
    return out


def trace_source(trace, i: int, k: int, source: str, t: int = -1, which: str = "in",
                 by: str = "position") -> dict:
    """Level 2: contributions of the subvalues of `source` to neuron k's pre-activation."""
    t = _check(trace, i, t)
    kind, _, idx = source.partition(".")
    if kind == "ffn":                 # (m^k fc2^k) @ K for every k, without the [d_ff, d] subvalues
        labels = [f"ffn.{int(idx)}.n{n}" for n in range(trace.model.cfg.d_ff)] + [f"ffn.{int(idx)}.bias"]
    else:
        labels, sv = source_subvalues(trace, source, t, by)
    if kind != "emb" and not (int(idx) < i or (kind == "attn" and int(idx) == i)):
        raise RefimplError(f"{source} comes after layer {i}'s FFN input; it cannot activate it")
    sk = subkey(trace.model, i, k, which)
    _, sigma = norm_stats_at(trace, i, t)
    if kind == "ffn":
        j = int(idx)
        m = trace.layers[j].m[t % trace.T]                                  # [F]
        vals = np.append(m * trace.model.matvec(f"blocks.{j}.mlp.W_out", sk.K),
                         trace.ffn_bias_subvalue(j) @ sk.K) / sigma         # [F + 1]
    else:
        vals = sv @ sk.K / sigma                                            # [n]
    return {"layer": i, "neuron": int(k), "source": source, "which": which, "by": by,
            "total": float(vals.sum()), "labels": labels, "values": vals}
