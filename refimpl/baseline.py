"""The baseline of Appendix E (Table 4): ranking FFN subvalues by coefficient x norm.

Geva et al. (2022) score FFN subvalue k by m^k * ||fc2^k|| (how strongly the value
vector is written into the residual stream). The paper compares the top subvalues under
that score with those under the log-probability increase and reports the target's rank
among each subvalue's bs-values.
"""
from __future__ import annotations

import numpy as np

from .readout import rank_of
from .significance import as_readout, ffn_subvalue_significance


def geva_scores(trace, i: int, t: int = -1) -> np.ndarray:
    """m^k * ||fc2^k||_2 for every neuron of layer i [F]."""
    W_out = trace.model.weight(f"blocks.{i}.mlp.W_out")                    # [F, d]
    return trace.layers[i].m[t] * np.linalg.norm(W_out, axis=1)


def compare_rankings(trace, w: int, t: int = -1, k: int = 10, readout="frozen", layers=None) -> dict:
    """Top-k FFN subvalues over the given layers (default all) by Geva's score and by
    log-probability increase, each with its score under the other metric and the
    target's rank in its vocabulary view."""
    R = as_readout(trace, t, readout)
    layers = range(len(trace.layers)) if layers is None else layers
    rows = []
    for i in layers:
        c, _ = ffn_subvalue_significance(trace, i, w, t, readout=R)
        g = geva_scores(trace, i, t)
        rows += [(i, n, float(c[n]), float(g[n])) for n in range(len(c))]
    arr = np.array([(r[2], r[3]) for r in rows])

    def table(col: int):
        order = np.lexsort((np.arange(len(rows)), -arr[:, col]))[:k]
        out = []
        for j in order:
            i, n, c, g = rows[j]
            bs = R.bs(trace.ffn_subvalues(i, t, [n])[0])
            out.append({"layer": i, "neuron": n, "log_prob_increase": c, "coef_x_norm": g,
                        "target_rank": rank_of(bs, w)})
        return out
    return {"by_log_prob_increase": table(0), "by_coef_x_norm": table(1)}
