"""The baseline of Appendix E (Table 4): ranking FFN subvalues by coefficient x norm.

Geva et al. (2022) score FFN subvalue k by how strongly its value vector fc2^k is written
into the residual stream: the coefficient's magnitude times the vector's norm,
|m^k| * ||fc2^k||. That is the score of the paper's Table 4 (e.g. a subvalue with
coefficient -4.86 and norm 7.25 is listed with 35.30). The paper compares the top
subvalues under that score with those under the log-probability increase and reports the
target's rank among each subvalue's bs-values. `signed=True` ranks by m^k * ||fc2^k||
instead (negative coefficients last), as an explicit option.
"""
from __future__ import annotations

import numpy as np

from .readout import rank_of
from .significance import as_readout, ffn_subvalue_significance


def fc2_norms(trace, i: int) -> np.ndarray:
    """||fc2^k||_2 for every neuron of layer i [F]."""
    return np.linalg.norm(trace.model.weight(f"blocks.{i}.mlp.W_out"), axis=1)   # W_out [F, d]


def geva_scores(trace, i: int, t: int = -1, signed: bool = False) -> np.ndarray:
    """|m^k| * ||fc2^k||_2 (Table 4) for every neuron of layer i [F]; m^k * ||fc2^k||_2 if `signed`."""
    m = trace.layers[i].m[t]                                                # [F]
    return (m if signed else np.abs(m)) * fc2_norms(trace, i)


def compare_rankings(trace, w: int, t: int = -1, k: int = 10, readout="frozen", layers=None,
                     signed: bool = False) -> dict:
    """Top-k FFN subvalues over the given layers (default all) by Geva's score (|m| x norm, or
    m x norm with `signed`) and by log-probability increase, each with its coefficient, fc2
    norm, Geva score ("coef_x_norm"), log-probability increase and the target's rank in its
    vocabulary view."""
    R = as_readout(trace, t, readout)
    layers = range(len(trace.layers)) if layers is None else layers
    rows = []
    for i in layers:
        c, _ = ffn_subvalue_significance(trace, i, w, t, readout=R)
        g, norm, m = geva_scores(trace, i, t, signed), fc2_norms(trace, i), trace.layers[i].m[t]
        rows += [(i, n, float(c[n]), float(g[n]), float(m[n]), float(norm[n])) for n in range(len(c))]
    arr = np.array([(r[2], r[3]) for r in rows])

    def table(col: int):
        order = np.lexsort((np.arange(len(rows)), -arr[:, col]))[:k]
        out = []
        for j in order:
            i, n, c, g, m, norm = rows[j]
            bs = R.bs(trace.ffn_subvalues(i, t, [n])[0])
            out.append({"layer": i, "neuron": n, "log_prob_increase": c, "coef_x_norm": g, "coefficient": m,
                        "fc2_norm": norm, "target_rank": rank_of(bs, w)})
        return out
    return {"score": "m * ||fc2||" if signed else "|m| * ||fc2||",
            "by_log_prob_increase": table(0), "by_coef_x_norm": table(1)}
