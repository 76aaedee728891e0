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
    scores = R.scores(np.array(X))                                          # [n_states, V]
    ids = [int(i) for i in token_ids]
    return {"states": list(names), "token_ids": ids, "bs": scores[:, ids]}


def bs_difference_changes(trace, a: int, b: int, t: int = -1, readout="frozen") -> dict:
    """Per layer, how ATTN_i and FFN_i change bs_a - bs_b (Fig. 11)."""
    R = as_readout(trace, t, readout)
    rows = []
    for i, L in enumerate(trace.layers):
        u = R.bs(np.array([L.attn[t], L.ffn[t]]))                            # [2, V]
        rows.append({"layer": i, "attn": float(u[0, a] - u[0, b]), "ffn": float(u[1, a] - u[1, b])})
    start = R.scores(trace.Lin0[t])
    end = R.scores(trace.final[t])
    return {"a": int(a), "b": int(b), "start": float(start[a] - start[b]), "end": float(end[a] - end[b]),
            "layers": rows}
