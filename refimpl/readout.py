"""Projecting vectors into vocabulary space (paper Section 2.2; docs/design-choices.md).

The paper writes p(w | x) = softmax(E x). Real models put a final norm before E; the
default readout freezes that norm's scale at the analysed position's final residual
x_f, which keeps every projection linear:

    frozen LayerNorm:  A(v) = W_U^T (gamma * (v - mean v) / sigma_f)      c = W_U^T beta + b_U
    frozen RMSNorm:    A(v) = W_U^T (gamma * v / s_f)                      c = 0
    bs(x) = A(x) + c   for a residual state x;   bs-values of a subvalue v = A(v)

so bs-values of a sum are the sum of the bs-values (the paper's addition of bs-values),
bs(Lout_{L-1}[t]) are exactly the model's logits and the layer scores telescope.
`frozen-nobias` is the convention of the authors' published notebooks: the same frozen
map A, but the final LayerNorm's bias beta is dropped from the offset (c = b_U), so the
readout of the final residual is not the model's distribution (docs/design-choices.md);
it differs from `frozen` only where the final norm has a bias (LayerNorm with beta).
`raw` is E x with no norm (the paper's equations literally); `lens` applies the final
norm with each vector's own statistics (the logit lens; not additive).

With fairseq's adaptive softmax (no final norm) the "E" is the head and tail maps of
docs/format.md; bs-values are the flattened two-level logits and log-probabilities the
two-level log-softmax.
"""
from __future__ import annotations

import os
import weakref

import numpy as np

from . import nn
from .errors import RefimplError

READOUTS = ("frozen", "frozen-nobias", "raw", "lens")


class Head:
    """The unembedding E of a model: maps a (normalised) vector y [..., d] to flat scores [..., V]."""

    def __init__(self, model):
        self.model, cfg = model, model.cfg
        self.adaptive = cfg.unembedding == "adaptive"
        if self.adaptive:
            self.bands = cfg.bands
            self.n0 = self.bands[0][1]

    def _band_logits(self, y: np.ndarray, c: int) -> np.ndarray:
        """z_c = y W_proj_c W_U_c [..., n_c] (W_proj_0 may be absent: identity)."""
        m = self.model
        proj = f"unembed.adaptive.{c}.W_proj"
        if m.has(proj):
            y = y @ m.weight(proj)                                          # [..., d_c]
        return y @ m.weight(f"unembed.adaptive.{c}.W_U")                    # [..., n_c]

    def bias(self) -> np.ndarray | float:
        m = self.model
        return m.weight("unembed.b_U") if not self.adaptive and m.has("unembed.b_U") else 0.0

    def scores(self, y: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Linear part: (flat scores [..., V], cluster logits [..., n_bands-1] or None). No bias."""
        m = self.model
        if not self.adaptive:
            return y @ m.weight("unembed.W_U"), None                        # [..., V]
        cls = y @ m.weight("unembed.adaptive.head.W_cls")                   # [..., n_bands-1]
        parts = [self._band_logits(y, 0)]
        for c in range(1, len(self.bands)):
            parts.append(cls[..., c - 1:c] + self._band_logits(y, c))       # z_cls[c-1] + z_c
        return np.concatenate(parts, axis=-1), cls

    def scores_at(self, y: np.ndarray, ids) -> np.ndarray:
        """The columns `ids` of `scores(y)[0]` [..., len(ids)], reading only those columns of
        the unembedding (and, adaptive, the projections of the bands they fall in)."""
        m, ids = self.model, np.asarray(ids, dtype=np.int64)
        if not self.adaptive:
            return y @ m.columns("unembed.W_U", ids)                        # [..., n]
        out = np.empty(y.shape[:-1] + (len(ids),), np.result_type(y, m.dtype))
        for c, (lo, hi) in enumerate(self.bands):
            sel = np.flatnonzero((ids >= lo) & (ids < hi))
            if not len(sel):
                continue
            proj = f"unembed.adaptive.{c}.W_proj"
            yc = y @ m.weight(proj) if m.has(proj) else y                   # [..., d_c]
            z = yc @ m.columns(f"unembed.adaptive.{c}.W_U", ids[sel] - lo)  # [..., n_sel]
            if c > 0:
                z = y @ m.columns("unembed.adaptive.head.W_cls", [c - 1]) + z   # z_cls[c-1] + z_c
            out[..., sel] = z
        return out

    def bias_at(self, ids) -> np.ndarray | float:
        b = self.bias()
        return b[np.asarray(ids, dtype=np.int64)] if isinstance(b, np.ndarray) else b

    def log_probs(self, flat: np.ndarray, cls: np.ndarray | None) -> np.ndarray:
        """Normalised log-probabilities [..., V] from flat scores (+ cluster logits if adaptive)."""
        if not self.adaptive:
            return nn.log_softmax(flat)
        head = nn.log_softmax(np.concatenate([flat[..., :self.n0], cls], axis=-1))   # [..., n0 + n_bands-1]
        out = [head[..., :self.n0]]
        for c, (lo, hi) in enumerate(self.bands[1:], start=1):
            out.append(nn.log_softmax(flat[..., lo:hi]) + head[..., self.n0 + c - 1:self.n0 + c])
        return np.concatenate(out, axis=-1)

    def target_groups(self, y: np.ndarray, w: int, bias: bool = True) -> list[tuple[np.ndarray, int]]:
        """The softmax groups that log p(w | y) is made of, as (logits [..., n_g], index of w's term):

            plain softmax:     log p(w) = z_w - logsumexp(z)                        one group
            adaptive, band 0:  log p(w) = h_w - logsumexp(h)     h = [z_0, z_cls]   one group
            adaptive, band c:  log p(w) = (h_{cls c} - lse(h)) + (z_c,w - lse(z_c))  two groups

        computing only what target w needs (one band for adaptive). `bias` adds b_U (plain)."""
        m = self.model
        if not self.adaptive:
            z = y @ m.weight("unembed.W_U")                                 # [..., V]
            return [(z + self.bias() if bias else z, w)]
        cls = y @ m.weight("unembed.adaptive.head.W_cls")                   # [..., n_bands-1]
        head = np.concatenate([self._band_logits(y, 0), cls], axis=-1)      # [..., n0 + n_bands-1]
        if w < self.n0:
            return [(head, w)]
        c = next(c for c, (lo, hi) in enumerate(self.bands) if lo <= w < hi)
        return [(head, self.n0 + c - 1), (self._band_logits(y, c), w - self.bands[c][0])]

    def log_prob_of(self, y: np.ndarray, w: int) -> np.ndarray:
        """log p(w | y) [...]: the sum over target_groups of z_sel - logsumexp(z)."""
        return sum(z[..., sel] - nn.logsumexp(z) for z, sel in self.target_groups(y, w))


def log_softmax_shift(lp: np.ndarray, u: np.ndarray, sel: int) -> np.ndarray:
    """log softmax(z + u)[sel] - log softmax(z)[sel] [n] for lp = log softmax(z) [n_g] and shifts u [n, n_g].

        = u_sel - log sum_j p_j e^{u_j} = u_sel - log1p(sum_j p_j expm1(u_j))

    The log1p/expm1 form keeps the relative precision of u: a subvalue with tiny bs-values
    gets a tiny, correctly signed increase instead of rounding noise of log p's size
    (~1e-16), so counts of helpful/unhelpful subvalues do not depend on the BLAS kernel.
    Rows where that form loses precision use logsumexp(lp + u) instead: a very large shift
    (expm1 would overflow) or a sum below 1/2 (log1p of a number near -1)."""
    p = np.exp(np.asarray(lp, np.float64))                                 # [n_g]
    out = np.empty(len(u), dtype=np.float64)
    use_lse = u.max(axis=-1) > 0.5 * np.log(np.finfo(u.dtype).max)        # [n] expm1 would overflow
    small = np.flatnonzero(~use_lse)
    if len(small):
        # the vocabulary-long sums in float64 whatever the dtype: their rounding (V eps in float32)
        # would otherwise exceed the products' (docs/topk.md, rounding margins)
        x = np.asarray(np.expm1(u[small]), np.float64) @ p                  # sum_j p_j expm1(u_j) = S - 1
        ok = x > -0.5       # S < 1/2: log1p would cancel (S - 1 with sum p = 1 +- eps); logsumexp is exact there
        out[small[ok]] = u[small[ok], sel] - np.log1p(x[ok])
        use_lse[small[~ok]] = True
    if use_lse.any():
        out[use_lse] = u[use_lse, sel] - nn.logsumexp(np.asarray(lp, np.float64) + u[use_lse])
    return out.astype(u.dtype)


def final_log_probs(model, X: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """The model's own output at residual states X [T, d]: (log-probs [T, V], logits or None)."""
    cfg = model.cfg
    y = X
    if cfg.final_norm:
        y = nn.NORMS[cfg.norm](X, model.weight("ln_final.w"),
                               model.weight("ln_final.b") if model.has("ln_final.b") else 0.0, cfg.norm_eps)
    head = Head(model)
    flat, cls = head.scores(y)
    if head.adaptive:
        return head.log_probs(flat, cls), None
    logits = flat + head.bias()
    return nn.log_softmax(logits), logits


class Readout:
    """Vocabulary readout at one analysed position (kind: frozen, frozen-nobias, raw or lens).

    `bs(v)`        bs-values A(v) of vectors v [..., d] (the linear part)
    `offset`       c, added for residual states: bs(x) = A(x) + c
    `log_probs(X)` log p(. | X) for residual states X [..., d]
    `log_prob(X, w)`, `prob(X, w)` for one target
    """

    def __init__(self, model, x_final: np.ndarray, kind: str = "frozen"):
        if kind not in READOUTS:
            raise RefimplError(f"readout must be one of {', '.join(READOUTS)}, got {kind!r}")
        self.model, self.kind, cfg = model, kind, model.cfg
        self.head = Head(model)
        self.has_norm = cfg.final_norm and kind != "raw"
        if self.has_norm:
            self.gamma = model.weight("ln_final.w")
            self.beta = model.weight("ln_final.b") if model.has("ln_final.b") else None
            mu, self.scale = nn.norm_stats(cfg.norm, np.asarray(x_final, model.dtype), cfg.norm_eps)  # sigma_f or s_f
        self.centre = self.has_norm and cfg.norm == "layernorm"
        self._offset = None
        self._memo: dict = {}
        self._trace_ref, self._trace_memo = None, {}

    def __repr__(self) -> str:
        norm = f"{self.model.cfg.norm} frozen at the analysed state" if self.kind == "frozen" and self.has_norm \
            else self.model.cfg.norm if self.has_norm else "no final norm"
        head = "adaptive softmax" if self.head.adaptive else "linear unembedding"
        return (f"Readout({self.kind!r}, {norm}, {head}, d_vocab={self.model.cfg.d_vocab}, "
                f"model={os.path.basename(os.path.normpath(self.model.path))!r})")

    # -- the linear map A and the offset c --------------------------------------------
    def normalise(self, V: np.ndarray) -> np.ndarray:
        """The final-norm step applied to vectors (frozen: fixed scale; lens: own statistics)."""
        if not self.has_norm:
            return V
        if self.kind == "lens":
            return nn.NORMS[self.model.cfg.norm](V, self.gamma, 0.0 if self.beta is None else self.beta,
                                                 self.model.cfg.norm_eps)
        if self.centre:
            V = V - V.mean(-1, keepdims=True)
        return self.gamma * (V / self.scale)

    def bs(self, V: np.ndarray) -> np.ndarray:
        """bs-values [..., V] of vectors [..., d]: A(v) (frozen/raw); the logit lens of v for `lens`."""
        flat, _ = self.head.scores(self.normalise(np.asarray(V, self.model.dtype)))
        return flat + self.head.bias() if self.kind == "lens" else flat

    def bs_at(self, V: np.ndarray, ids) -> np.ndarray:
        """Columns `ids` of `bs(V)` [..., len(ids)], without the product over the whole vocabulary."""
        flat = self.head.scores_at(self.normalise(np.asarray(V, self.model.dtype)), ids)
        return flat + self.head.bias_at(ids) if self.kind == "lens" else flat

    def scores_at(self, X: np.ndarray, ids) -> np.ndarray:
        """Columns `ids` of `scores(X)` [..., len(ids)] (bs(x) = A(x) + c of residual states)."""
        if self.kind == "lens":
            return self.bs_at(X, ids)
        return self.head.scores_at(self.state_input(X), ids) + self.head.bias_at(ids)

    def state_input(self, X: np.ndarray) -> np.ndarray:
        """What the head reads for residual states X [..., d]: the normalised state plus the
        final norm's bias beta (frozen LayerNorm; not for frozen-nobias, which drops beta),
        i.e. everything of bs(x) but E and b_U."""
        y = self.normalise(np.asarray(X, self.model.dtype))
        if self.kind == "frozen" and self.centre and self.beta is not None:
            y = y + self.beta
        return y

    def _state(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(flat, cls) scores of residual states including the offset c."""
        flat, cls = self.head.scores(self.state_input(X))
        return flat + self.head.bias(), cls

    @property
    def offset(self) -> np.ndarray:
        """c = W_U^T beta + b_U (frozen LayerNorm), b_U (raw, frozen-nobias), zeros otherwise."""
        if self._offset is None:
            zero = np.zeros(self.model.cfg.d_model, self.model.dtype)
            self._offset = self._state(zero)[0] if self.kind != "lens" else np.zeros(self.model.cfg.d_vocab)
        return self._offset

    def scores(self, X: np.ndarray) -> np.ndarray:
        """bs(x) = A(x) + c of residual states [..., d] (for `lens`: the logit lens)."""
        return self._state(X)[0]

    def log_probs(self, X: np.ndarray) -> np.ndarray:
        """log p(. | X) [..., V] for residual states X [..., d]."""
        return self.head.log_probs(*self._state(X))

    def log_prob(self, X: np.ndarray, w: int) -> np.ndarray:
        """log p(w | X) [...] for residual states X [..., d] (single states are memoised:
        the same base is scored by many analyses)."""
        X = np.asarray(X, self.model.dtype)
        key = (int(w), X.tobytes()) if X.ndim == 1 else None
        if key is not None and key in self._memo:
            return self._memo[key]
        groups = self._memo.get(("groups", int(w), key[1])) if key is not None and self.kind != "lens" else None
        if groups is not None:          # the state's log-softmax is memoised already (_base_groups)
            return sum(lp[sel] for lp, sel in groups)
        out = self.head.log_prob_of(self.state_input(X), int(w))
        if key is not None:
            self._memo[key] = out
        return out

    def prob(self, X: np.ndarray, w: int) -> np.ndarray:
        return np.exp(self.log_prob(X, w))

    def trace_memo(self, trace) -> dict:
        """A memo for results that depend on one trace (bounds, whole-layer scores). A Readout
        can be reused with another trace (raw and lens do not depend on it), so the memo is
        tied to the trace object itself and starts empty for a different one."""
        if self._trace_ref is None or self._trace_ref() is not trace:
            self._trace_ref, self._trace_memo = weakref.ref(trace), {}
        return self._trace_memo

    def _base_groups(self, bases: np.ndarray, w: int) -> list[tuple[np.ndarray, int]]:
        """Log-softmax of each target group at residual states `bases` [m, d], memoised per
        state (the same Lin_i / Lres_i are scored by the top-K search, the counts and the report)."""
        keys = [("groups", int(w), b.tobytes()) for b in bases]
        todo = [j for j, k in enumerate(keys) if k not in self._memo]
        if todo:
            groups = [(nn.log_softmax(z), sel)                                  # [len(todo), n_g]
                      for z, sel in self.head.target_groups(self.state_input(bases[todo]), w)]
            for r, j in enumerate(todo):
                self._memo[keys[j]] = [(lp[r], sel) for lp, sel in groups]
        rows = [self._memo[k] for k in keys]
        return [(np.stack([row[g][0] for row in rows]), sel) for g, (_, sel) in enumerate(rows[0])]

    def increase(self, bases: np.ndarray, which: np.ndarray, V: np.ndarray, w: int,
                 chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """(C, P) [n] of vectors V [n, d] each added to its base bases[which[j]] (Eq. 19):

            C(v) = log p(w | L + v) - log p(w | L),    P(v) = p(w | L + v) - p(w | L)

        With a linear readout (frozen, raw) the logits of L + v are bs(L) + A(v), so C is
        computed from the bs-values u = A(v) alone (log_softmax_shift): exact to the precision
        of u, and exactly 0 for v = 0. `lens` is not linear: it scores L + v and L."""
        bases = np.atleast_2d(np.asarray(bases, self.model.dtype))
        which = np.asarray(which, dtype=np.int64)
        V = np.asarray(V, self.model.dtype)
        C = np.zeros(len(V))
        if self.kind == "lens":
            lp_base = np.array([float(self.log_prob(b, w)) for b in bases])     # [m]
            for s in range(0, len(V), chunk):
                X = bases[which[s:s + chunk]] + V[s:s + chunk]              # [c, d]
                C[s:s + chunk] = self.log_prob(X, w) - lp_base[which[s:s + chunk]]
            C[np.all(bases[which] + V == bases[which], axis=-1)] = 0.0           # state unchanged: exactly 0
        else:
            groups0 = self._base_groups(bases, w)                               # [(lp [m, n_g], sel)]
            lp_base = sum(lp[:, sel] for lp, sel in groups0)                    # [m] log p(w | base)
            for s in range(0, len(V), chunk):
                groups = self.head.target_groups(self.normalise(V[s:s + chunk]), w, bias=False)  # u [c, n_g]
                wh = which[s:s + chunk]
                for b in np.unique(wh):
                    rows = np.flatnonzero(wh == b)
                    C[s + rows] = sum(log_softmax_shift(lp0[b], u[rows], sel)
                                      for (lp0, sel), (u, _) in zip(groups0, groups))
        p_base = np.exp(lp_base[which])
        return C, p_base * np.expm1(C)


    def increase_of_multiples(self, base: np.ndarray, V: np.ndarray, coefs: np.ndarray, w: int):
        """(C, P) [n, m] of the vectors coefs[r, j] * V[r] added to base [d] (Eq. 19). With a
        linear readout the bs-values of c * v are c * A(v), so A is applied to the n rows of V
        once instead of to n * m vectors (the attention neurons of all source positions share
        their O_h[e]). Not for `lens`."""
        if self.kind == "lens":
            raise RefimplError("increase_of_multiples needs a linear readout, not lens")
        base = np.asarray(base, self.model.dtype)[None]                     # [1, d]
        groups0 = self._base_groups(base, w)                                # [(lp [1, n_g], sel)]
        lp_base = float(sum(lp[0, sel] for lp, sel in groups0))
        ug = self.head.target_groups(self.normalise(np.asarray(V, self.model.dtype)), w, bias=False)  # u [n, n_g]
        C = np.empty(coefs.shape)
        for j in range(coefs.shape[1]):
            c = np.asarray(coefs[:, j:j + 1], self.model.dtype)              # [n, 1]
            C[:, j] = sum(log_softmax_shift(lp0[0], c * u, sel) for (lp0, sel), (u, _) in zip(groups0, ug))
        return C, np.exp(lp_base) * np.expm1(C)


def rank_of(scores: np.ndarray, w: int) -> int:
    """0-based rank of token w when scores are sorted largest first (ties: lower id first)."""
    s = scores[w]
    return int((scores > s).sum() + (scores[:w] == s).sum())


def top_ids(scores: np.ndarray, k: int, largest: bool = True) -> np.ndarray:
    """Ids of the k largest (or smallest) scores, in order (ties: lower id first)."""
    n = scores.shape[-1]
    k = min(k, n)
    key = -scores if largest else scores
    cand = np.flatnonzero(key <= np.partition(key, k - 1)[k - 1]) if k < n else np.arange(n)
    return cand[np.lexsort((cand, key[cand]))][:k]
