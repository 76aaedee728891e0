"""Sound bounds on the log-probability increase of FFN subvalues (docs/topk.md).

Write log p(w | x) = sum_j [ s_j(x)[w_j] - LSE(s_j(x)) ] over the readout's softmax
"parts" j (one part for a plain softmax; the head and the target's band for fairseq's
adaptive softmax), where s_j is linear in x under the frozen (or raw) readout. For a
vector v added to a base L, with p_j = softmax(s_j(L)) and u_j = s_j(v) (no offset):

    C(v) = sum_j [ u_j[w_j] - log E_{p_j} exp(u_j) ]
    upper:  log E_p e^u >= p.u                      (Jensen)   =>  C(v) <= g . v
    lower:  log E_p e^u <= p.u + (max u - min u)^2 / 8   (Hoeffding's lemma)

with g = sum_j N^T S_j^T (e_{w_j} - p_j), one d-vector per base (N: the frozen norm map,
S_j: the part's linear map). For an FFN subvalue v = m_k fc2_k the score range is
|m_k| * range(s_j(N1(fc2_k))) / scale, where N1 is the norm map at unit scale: the
per-neuron ranges depend on the prompt only through the frozen scale, so they are
computed once per model and cached.
"""
from __future__ import annotations

import numpy as np

from .errors import RefimplError
from .readout import Readout
from .safetensors_io import bf16_to_f32

RANGE_SAFETY = 1e-9          # ranges are inflated by this relative amount (rounding in their computation)


class Part:
    """One softmax of the readout: scores(y) [..., n] linear in y, target index, adjoint map."""

    def __init__(self, name, scores, adjoint, index):
        self.name, self.scores, self.adjoint, self.index = name, scores, adjoint, index


def parts(R: Readout, w: int) -> list[Part]:
    head, m = R.head, R.model
    if not head.adaptive:
        W = lambda: m.weight("unembed.W_U")                                # [d, V]
        return [Part("vocab", lambda y: y @ W(), lambda e: e @ W().T, w)]
    n0 = head.n0

    def head_scores(y):
        return np.concatenate([head._band_logits(y, 0), y @ m.weight("unembed.adaptive.head.W_cls")], -1)

    def head_adj(e):
        g = e[..., :n0] @ m.weight("unembed.adaptive.0.W_U").T                 # adjoints act on [..., n]
        if m.has("unembed.adaptive.0.W_proj"):
            g = g @ m.weight("unembed.adaptive.0.W_proj").T
        return g + e[..., n0:] @ m.weight("unembed.adaptive.head.W_cls").T

    if w < n0:
        return [Part("head", head_scores, head_adj, w)]
    c = next(c for c, (lo, hi) in enumerate(head.bands) if lo <= w < hi)
    band = Part(f"band{c}", lambda y: head._band_logits(y, c),
                lambda e: (e @ m.weight(f"unembed.adaptive.{c}.W_U").T) @ m.weight(f"unembed.adaptive.{c}.W_proj").T,
                w - head.bands[c][0])
    return [Part("head", head_scores, head_adj, n0 + c - 1), band]


def unit_norm(R: Readout, V: np.ndarray) -> np.ndarray:
    """N1(V): the frozen norm map at unit scale (gamma * centred V, gamma * V, or V for raw)."""
    if not R.has_norm:
        return V
    if R.centre:
        V = V - V.mean(-1, keepdims=True)
    return R.gamma * V


def scale(R: Readout) -> float:
    return float(R.scale[0]) if R.has_norm else 1.0


def g_vector(R: Readout, base: np.ndarray, w: int) -> np.ndarray:
    """g = sum_j N^T S_j^T (e_{w_j} - p_j) [d] (or [n, d] for bases [n, d]): C(v) <= g . v for every v."""
    if R.kind == "lens":
        raise RefimplError("bounds need a linear readout (frozen or raw), not lens")
    b2 = np.atleast_2d(np.asarray(base, R.model.dtype))                      # [n, d]
    g = np.zeros(b2.shape, R.model.dtype)
    # p of each softmax group at the bases: the readout's memoised log-softmax (parts and
    # target_groups split the softmax the same way, in the same order)
    for part, (lp, sel) in zip(parts(R, w), R._base_groups(b2, w)):
        e = -np.exp(lp)                                                      # -(p)  [n, n_part]
        e[..., sel] += 1.0                                                   # e_w - p
        g += part.adjoint(e)
    g = g.reshape(np.shape(base))
    if R.has_norm:                                                           # N^T = P D / scale
        g = R.gamma * g / scale(R)
        if R.centre:
            g = g - g.mean(-1, keepdims=True)
    return g


# --- per-neuron score ranges, stored by refimpl/cache.py ------------------------------------

def cache_dir(model) -> str:
    """Where the model's derived data is stored (refimpl/cache.py)."""
    from . import cache
    return cache.cache_dir(model)


def ranges_cost(model) -> float:
    """Multiply-adds of computing the per-neuron ranges (one exhaustive pass over all neurons)."""
    c = model.cfg
    return float(c.n_layers) * c.d_ff * c.d_model * c.d_vocab


def compute_ranges(R: Readout, chunk: int = 512, layers=None) -> dict[str, np.ndarray]:
    """{part name: [n_layers, d_ff]} range of the part scores of N1(fc2_k) for every neuron
    (only the rows of `layers` when given; the others stay zero)."""
    m, cfg = R.model, R.model.cfg
    names = ["vocab"] if not R.head.adaptive else ["head"] + [f"band{c}" for c in range(1, len(R.head.bands))]
    out = {n: np.zeros((cfg.n_layers, cfg.d_ff)) for n in names}
    for i in (range(cfg.n_layers) if layers is None else layers):
        W_out = m.weight(f"blocks.{i}.mlp.W_out")                           # [F, d]
        for s in range(0, cfg.d_ff, chunk):
            y = unit_norm(R, W_out[s:s + chunk])                             # [n, d]
            for n in names:
                w = 0 if n in ("vocab", "head") else R.head.bands[int(n[4:])][0]
                sc = parts(R, w)[-1].scores(y)                               # [n, n_part]
                out[n][i, s:s + chunk] = sc.max(-1) - sc.min(-1)
    return {n: r * (1 + RANGE_SAFETY) for n, r in out.items()}


def ranges_ready(R: Readout) -> bool:
    """Whether neuron_ranges(R) is already computed (in memory, or stored for exactly this model's
    files, e.g. by `refimpl prepare`)."""
    from . import cache
    kind = "raw" if not R.has_norm else "frozen"
    return kind in getattr(R.model, "_range_cache", {}) or cache.ranges_ready(R.model, kind)


def neuron_ranges(R: Readout) -> dict[str, np.ndarray]:
    """compute_ranges, loaded from / saved to the model's cache (refimpl/cache.py: bound to the
    model's exact files; a stale or damaged entry is recomputed, never used)."""
    import warnings
    from . import cache
    model = R.model
    cached = getattr(model, "_range_cache", {})
    kind = "raw" if not R.has_norm else "frozen"
    if kind in cached:
        return cached[kind]
    names = cache.range_parts(model, R.head)
    ranges, why = cache.load_ranges(model, kind, names)
    if ranges is None:
        if why:
            warnings.warn(f"{why}; recomputing", stacklevel=2)
        ranges = cache.build_ranges(model, kind, names, lambda i: compute_ranges(R, layers=[i]))
    cached[kind] = ranges
    model._range_cache = cached
    return ranges


def _matvec_rows(model, name: str, g: np.ndarray, block: int = 2048) -> np.ndarray:
    """W @ g for W = model weight `name` [F, d], widening `block` rows at a time into one
    reused buffer when the tensor is not cached (no full-size copy of a large layer)."""
    if name in model._cache or model.upcast_cache is not None or model._fits_cache():
        return model.weight(name) @ g
    st = model.tensors[name]
    raw, out = st.raw(), np.empty(st.shape[0], model.dtype)
    buf = np.empty((min(block, st.shape[0]), st.shape[1]), model.dtype)
    for a in range(0, st.shape[0], block):
        rows = raw[a:a + block]
        n = rows.shape[0]
        buf[:n] = rows if st.dtype != "BF16" else bf16_to_f32(rows)
        out[a:a + n] = buf[:n] @ g
    return out


def ffn_bounds(trace, i: int, w: int, t: int, R: Readout, ranges: dict | None = None):
    """(upper [F], lower [F] or None) on C of every FFN subvalue of layer i at position t."""
    m = trace.layers[i].m[t]                                                 # [F]
    memo, t = R.trace_memo(trace), t % trace.T
    key = ("ffn_upper", i, t, int(w))                                        # top-K and counts share it
    upper = memo.get(key)
    if upper is None:
        gkey = ("g", t, int(w))                                              # every layer's g in one product
        if gkey not in memo:
            memo[gkey] = g_vector(R, np.array([Lt.lres[t] for Lt in trace.layers]), w)   # [L, d]
        g = memo[gkey][i]
        upper = memo[key] = m * _matvec_rows(trace.model, f"blocks.{i}.mlp.W_out", g)   # [F]
    if ranges is None:
        return upper, None
    slack = sum((np.abs(m) * ranges[p.name][i] / scale(R)) ** 2 for p in parts(R, w)) / 8.0
    return upper, upper - slack
