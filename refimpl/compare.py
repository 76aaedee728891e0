"""Token comparison along the residual stream (paper Section 4.3, Fig. 10-11).

bs-values of chosen tokens at every residual state Lin_0, Lres_0, Lout_0, Lres_1, ...
(bs(x) = A(x) + c, the readout of a state), and for two tokens a and b the change of
the difference bs_a - bs_b contributed by each layer: A(ATTN_i)[a] - A(ATTN_i)[b] and
A(FFN_i)[a] - A(FFN_i)[b] (additive under the frozen readout, so the changes sum to the
final difference minus the difference at Lin_0).
"""
from __future__ import annotations

import numpy as np

from .significance import as_readout


def residual_states(trace, t: int) -> list[tuple[str, np.ndarray]]:
    out = [("Lin_0", trace.Lin0[t])]
    for i, L in enumerate(trace.layers):
        out += [(f"Lres_{i}", L.lres[t]), (f"Lout_{i}", L.lout[t])]
    return out


def bs_trajectory(trace, token_ids, t: int = -1, readout="frozen") -> dict:
    """bs-values [n_states, n_tokens] of the tokens at every residual state (Fig. 10)."""
    R = as_readout(trace, t, readout)
    names, X = zip(*residual_states(trace, t))
    ids = [int(i) for i in token_ids]
    return {"states": list(names), "token_ids": ids, "bs": R.scores_at(np.array(X), ids)}   # [n_states, n_tokens]


def bs_difference_changes(trace, a: int, b: int, t: int = -1, readout="frozen") -> dict:
    """Per layer, how ATTN_i and FFN_i change bs_a - bs_b (Fig. 11). Only the columns a and b
    of the readout are computed (two vocabulary entries, not the whole vocabulary per layer)."""
    R = as_readout(trace, t, readout)
    V = np.array([v for L in trace.layers for v in (L.attn[t], L.ffn[t])])     # [2L, d]
    u = R.bs_at(V, [a, b]) if len(V) else np.zeros((0, 2))                       # [2L, 2]
    rows = [{"layer": i, "attn": float(u[2 * i, 0] - u[2 * i, 1]), "ffn": float(u[2 * i + 1, 0] - u[2 * i + 1, 1])}
            for i in range(len(trace.layers))]
    ends = R.scores_at(np.array([trace.Lin0[t], trace.final[t]]), [a, b])       # [2, 2]
    return {"a": int(a), "b": int(b), "start": float(ends[0, 0] - ends[0, 1]), "end": float(ends[1, 0] - ends[1, 1]),
            "layers": rows}
