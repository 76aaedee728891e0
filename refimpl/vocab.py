"""The vocabulary view of a vector (paper Section 2.2, 3.1, 4.1.3; Tables 1-3).

A vector's *bs-values* are its projection A(v) into vocabulary space (readout.py).
Its top tokens are those with the largest bs-values, its bottom tokens the smallest,
and the rank of a token its 0-based position in the largest-first order.
"""
from __future__ import annotations

import numpy as np

from .readout import Readout, rank_of, top_ids


def token_list(model, scores: np.ndarray, ids) -> list[dict]:
    return [{"id": int(i), "token": model.token_str(int(i)), "bs": float(scores[i])} for i in ids]


def vocab_view(model, R: Readout, v: np.ndarray, w: int | None = None, k: int = 10) -> dict:
    """Top-k and bottom-k tokens of vector v by bs-value, and the rank of target w."""
    scores = R.bs(v)                                                        # [V]
    out = {"top": token_list(model, scores, top_ids(scores, k)),
           "bottom": token_list(model, scores, top_ids(scores, k, largest=False))}
    if w is not None:
        out["target_rank"] = rank_of(scores, int(w))
        out["target_bs"] = float(scores[int(w)])
    return out


def ffn_subvalue_view(trace, i: int, neuron: int, t: int, w: int | None, R: Readout, k: int = 10) -> dict:
    """Vocabulary view of FFN subvalue m^k fc2^k, plus the target's rank in the bare fc2^k
    (the coefficient's sign flips the order: Appendix E's "Paris ranks 31,983 in fc2")."""
    model = trace.model
    out = vocab_view(model, R, trace.ffn_subvalues(i, t, [neuron])[0], w, k)
    out["coefficient"] = float(trace.layers[i].m[t % trace.T, neuron])
    if w is not None:
        fc2 = model.rows(f"blocks.{i}.mlp.W_out", neuron)                   # [d]
        out["target_rank_in_fc2"] = rank_of(R.bs(fc2), int(w))
    return out
