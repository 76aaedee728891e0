"""Sound bounds on the log-probability increase of FFN subvalues (docs/topk.md).

Write log p(w | x) = sum_j [ s_j(x)[w_j] - LSE(s_j(x)) ] over the readout's softmax
"parts" j (one part for a plain softmax; the head and the target's band for fairseq's
adaptive softmax), where s_j is linear in x under the frozen (or raw) readout. For a
vector v added to a base L, with p_j = softmax(s_j(L)) and u_j = s_j(v) (no offset):

    C(v) = sum_j [ u_j[w_j] - log E_{p_j} exp(u_j) ]
    upper:  log E_p e^u >= p.u                      (Jensen)   =>  C(v) <= g . v

with g = sum_j N^T S_j^T (e_{w_j} - p_j), one d-vector per base (N: the frozen norm map,
S_j: the part's linear map): the top-K searches visit subvalues in decreasing g . v.

The counts of Fig. 6-7 use brackets that need no per-neuron precomputation
(ffn_brackets, below): g . v - R <= C <= g . v with R bounded by Popoviciu's inequality
(one constant per model) or, tighter, by the largest softmax probability times the
readout's Gram matrix's largest eigenvalue (once per model), every bracket widened by the
rounding of its evaluation (docs/topk.md). The per-model constants are computed beside the
forward pass (ModelConstants) or read from what `refimpl prepare` stored (refimpl/cache.py:
bound to the model's exact files).
"""
from __future__ import annotations

import numpy as np

from .blas import one_blas_thread
from .errors import RefimplError
from .readout import Readout

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


def ffn_upper(trace, i: int, w: int, t: int, R: Readout) -> np.ndarray:
    """Upper bound g . v [F] on C of every FFN subvalue of layer i at position t (Jensen)."""
    m = trace.layers[i].m[t]                                                 # [F]
    memo, t = R.trace_memo(trace), t % trace.T
    key = ("ffn_upper", i, t, int(w))                                        # top-K and counts share it
    upper = memo.get(key)
    if upper is None:
        gkey = ("g", t, int(w))                                              # every layer's g in one product
        if gkey not in memo:
            memo[gkey] = g_vector(R, np.array([Lt.lres[t] for Lt in trace.layers]), w)   # [L, d]
        g = memo[gkey][i]
        upper = memo[key] = m * trace.model.matvec(f"blocks.{i}.mlp.W_out", g)   # [F]
    return upper


# --- certified brackets without any per-neuron precomputation (counts, Fig. 6-7) -----------
#
# For a linear readout and v added to a base L (u = s(v), p = softmax at L, per part):
#
#     C(v) = g . v - R,   R = log E_p e^u - p.u = int_0^1 (1 - s) Var_{q_s}(u) ds >= 0
#
# with q_s = softmax(log p + s u). Popoviciu: a variance of values in an interval of width r
# is at most r^2 / 4, and the scores' range is r <= 2 max_j |b_j . y| <= 2 B ||y|| with b_j the
# part's score map columns centred on their mean (softmax ignores a common shift) and y the
# part's input (the frozen-normalised v). So 0 <= R <= B^2 ||y||^2 / 2: one constant B per
# model and part, one ||y|| per neuron (||y|| <= |m_k| ||fc2_k|| max|gamma| / scale).

def column_blocks64(W: np.ndarray, n: int = 8192, dtype=None):
    """Yield (first column, W[:, s:s + n] in float64) of a 2-d array, widened exactly into one
    reused buffer in W's memory order (no fresh 64 MB array per block: their page faults cost
    as much as the widening). `dtype`: round to it first (the compute dtype of a wider store).
    Each block is valid until the next one."""
    if W.dtype == np.float64 and (dtype is None or np.dtype(dtype) == np.float64):
        for s in range(0, W.shape[1], n):
            yield s, W[:, s:s + n]                                           # already float64: views
        return
    order = "F" if W.flags.f_contiguous and not W.flags.c_contiguous else "C"
    buf = np.empty((W.shape[0], min(n, W.shape[1])), np.float64, order=order)   # [d, n]
    for s in range(0, W.shape[1], n):
        src = W[:, s:s + n]
        if dtype is not None and np.dtype(dtype).itemsize < src.dtype.itemsize:
            src = np.asarray(src, dtype)                                     # rounded as the weights are
        b = buf[:, :src.shape[1]]
        np.copyto(b, src)                                                    # exact widening
        yield s, b


def _part_matrix_columns(R: Readout, part: Part):
    """Yield blocks [n, d] (float64) of the part's score map, one row per softmax entry (a column
    of the map). The plain unembedding is read from its stored values (rounded to the compute
    dtype, as Model.weight has them, then widened exactly), never through the weight cache, so
    ModelConstants can compute them beside the forward pass."""
    m, d = R.model, R.model.cfg.d_model
    if part.name == "vocab":
        for _, b in column_blocks64(m.stored("unembed.W_U"), 4096, m.dtype):   # [d, n] as the weights are
            yield b.T                                                        # [n, d]
        return
    eye = np.eye(d, dtype=m.dtype)                                           # scores of unit vectors
    yield np.concatenate([np.asarray(part.scores(eye[s:s + 256]), np.float64) for s in range(0, d, 256)], 0).T


def _column_moments(R: Readout, part: Part) -> tuple[np.ndarray, float, float]:
    """One pass over the part's score-map columns a_j (float64, as the weights are): their mean
    [d], the largest |a_j|^2 and sum_j |a_j|^2."""
    total, n, W2, fro = 0.0, 0, 0.0, 0.0
    for b in _part_matrix_columns(R, part):                                  # [n_b, d]
        total = total + b.sum(0)
        n += b.shape[0]
        n2 = np.einsum("ij,ij->i", b, b)                                     # [n_b] squared norms
        W2, fro = max(W2, float(n2.max())), fro + float(n2.sum())
    return total / n, W2, fro


def readout_constants(R: Readout, w: int) -> list[tuple[float, float]]:
    """Per part of target w: (B^2, W) with B = max centred column norm of the part's score map
    (the slack) and W = max uncentred column norm (rounding margins), in float64, inflated
    for their own rounding (d eps of a sum of d squares). Any centre c gives a valid B (the
    scores' range is that of (a_j - c) . y); c is the columns' mean. Memoised on the model."""
    memo = R.model.__dict__.setdefault("_readout_constants", {})
    out = []
    for part in parts(R, w):
        key = (part.name,)
        if key not in memo:
            mu, W2, _ = _column_moments(R, part)                             # [d] mean column
            B2 = 0.0
            for b in _part_matrix_columns(R, part):
                c = b - mu                                                   # [n_b, d]
                B2 = max(B2, float(np.einsum("ij,ij->i", c, c).max()))
            memo[key] = (B2 * (1 + 1e-12) + 1e-300, np.sqrt(W2) * (1 + 1e-12))
        out.append(memo[key])
    return out


def _centred_gram(R: Readout, part: Part) -> tuple[np.ndarray, float]:
    """(G, err): G = sum_j (a_j - mu)(a_j - mu)^T [d, d] (float64) over the part's score-map
    columns a_j (mu their mean), and a bound err on ||G - exact||_2. The plain unembedding is
    multiplied in float32 blocks of 1024 columns (exact float32 inputs: its stored values) and
    accumulated in float64: each block's product errs by at most gamma_1024 |W_b| |W_b|^T,
    whose norm is at most gamma_1024 ||W_b||_F^2. One BLAS thread, whatever the machine (the
    products' last bits depend on OpenBLAS's thread count, and lambda goes into the share
    brackets). Memoised on the model."""
    memo = R.model.__dict__.setdefault("_centred_gram", {})
    if part.name in memo:
        return memo[part.name]
    m = R.model
    with one_blas_thread():
        if part.name == "vocab" and m.tensors[m._resolve("unembed.W_U")[0]].dtype in ("F32", "F16", "BF16"):
            W = m.stored("unembed.W_U")                                      # [d, V] stored values
            d, V = W.shape
            G, s1, fro = np.zeros((d, d)), np.zeros(d), 0.0
            n_c = 1024
            for s in range(0, V, n_c):
                b = np.asarray(W[:, s:s + n_c], np.float32)                 # [d, n_c] exact
                G += b @ b.T                                                 # [d, d] float32 product
                s1 += b.sum(1, dtype=np.float64)
                fro += float(np.einsum("ij,ij->", b, b, dtype=np.float64))
            mu = s1 / V
            G -= V * np.outer(mu, mu)
            eps32 = float(np.finfo(np.float32).eps)
            err = (n_c + 2) * eps32 * fro * 1.01 + 1e-12 * fro
        else:
            d = m.cfg.d_model
            G, s1, fro, n = np.zeros((d, d)), np.zeros(d), 0.0, 0
            for b in _part_matrix_columns(R, part):                          # [n_b, d] float64
                G += b.T @ b
                s1 += b.sum(0)
                fro += float(np.einsum("ij,ij->", b, b))
                n += b.shape[0]
            mu = s1 / n
            G -= n * np.outer(mu, mu)
            err = (n + 8) * float(np.finfo(np.float64).eps) * fro * 4 + 1e-300
    memo[part.name] = out = (G, err)
    return out


def _lambda_key(R: Readout, part_name: str) -> tuple[str, str]:
    """gram_lambda's memo key: the part and whether the readout has a norm map (gamma)."""
    return part_name, "norm" if R.has_norm else "raw"


def gram_lambda(R: Readout, part: Part) -> float:
    """A certified upper bound on lambda_max(N1^T G N1) with N1 the frozen norm map at unit scale
    (gamma and centring; identity without a norm): ||A y - mean||^2 <= lambda ||v||^2 / scale^2
    for y the part input of v. Memoised on the model per readout kind."""
    key = _lambda_key(R, part.name)
    memo = R.model.__dict__.setdefault("_gram_lambda", {})
    if key in memo:
        return memo[key]
    G, err = _centred_gram(R, part)
    if R.has_norm:
        gam = np.asarray(R.gamma, np.float64)
        G = gam[:, None] * G * gam[None, :]
        err = err * float(np.abs(gam).max()) ** 2 * (1 + 1e-12)
        if R.centre:                                                        # P G P, P = I - 11^T/d
            G = G - G.mean(0, keepdims=True)
            G = G - G.mean(1, keepdims=True)
    G = (G + G.T) / 2
    # every eigenvalue (0.1 s for d = 1024; scipy's eigh(subset_by_index) takes 10x longer), with
    # NumPy's LAPACK on one BLAS thread (SciPy's OpenBLAS has its own thread count)
    with one_blas_thread():
        lam = float(np.linalg.eigvalsh(G)[-1])
    fro = float(np.sqrt((G ** 2).sum()))
    memo[key] = out = max(lam, 0.0) + err + 1e-9 * fro + 1e-300          # eigh: backward stable
    return out


class ModelConstants:
    """The per-model constants of the brackets (readout_constants and, spectral, gram_lambda:
    one pass over the unembedding and its d x d Gram matrix, ~1-2 s for GPT2-medium) computed
    on a thread of their own while the caller runs the forward pass and the analysis up to the
    counts, which do not need them. Only for a plain softmax (its constants read the stored
    unembedding, never the model's weight cache, which is not shared between threads); the
    caller keeps the BLAS thread count at one until wait() (the constants' last bits must not
    depend on it). With `stored` (what `refimpl prepare` stored, see load_stored_constants) the
    thread only spot-checks them (check_stored_constants, ~0.1 s) and computes them only if
    the check fails (a warning at wait()). wait() re-raises the thread's error."""

    def __init__(self, R: Readout, spectral: bool, stored: dict | None = None):
        import threading
        self.error, self.warning = None, None

        def work():
            try:
                if stored is not None:
                    self.warning = check_stored_constants(R, stored, spectral)
                    if self.warning is None:
                        _memo_constants(R, stored, spectral)
                readout_constants(R, 0)                                      # no work once memoised
                if spectral:
                    gram_lambda(R, parts(R, 0)[0])
            except BaseException as e:                                       # re-raised by wait()
                self.error = e
        self.thread = threading.Thread(target=work, name="refimpl-constants", daemon=True)
        self.thread.start()

    @classmethod
    def start(cls, model, kind: str, spectral: bool):
        """A ModelConstants, or None where there is nothing to do (adaptive softmax, lens, known)."""
        if model.cfg.unembedding == "adaptive" or kind == "lens":
            return None
        R = Readout(model, np.ones(model.cfg.d_model), kind)               # gamma read here (weight cache)
        memo = model.__dict__
        if ("vocab",) in memo.get("_readout_constants", {}) and (
                not spectral or _lambda_key(R, "vocab") in memo.get("_gram_lambda", {})):
            return None
        return cls(R, spectral, load_stored_constants(model))

    def wait(self) -> None:
        self.thread.join()
        if self.warning is not None:
            import warnings
            warning, self.warning = self.warning, None
            warnings.warn(warning, stacklevel=2)
        if self.error is not None:
            err, self.error = self.error, None
            raise err


def load_stored_constants(model) -> dict | None:
    """The constants `refimpl prepare` stored for exactly this model's files and compute dtype
    (refimpl/cache.py: the manifest binds them to the files' identity and their own sha256),
    or None: a stale or damaged entry is never used (a warning; they are computed instead).
    Read once per model."""
    if "_stored_constants" in model.__dict__:
        return model._stored_constants
    import warnings
    from . import cache
    v, why = cache.load_constants(model)
    if v is None and why:
        warnings.warn(f"{why}; the constants are computed instead (`refimpl prepare` stores them again)",
                      stacklevel=3)
    model._stored_constants = v
    return v


def _memo_constants(R: Readout, v: dict, spectral: bool) -> None:
    """Stored constants of the plain softmax into the memos of readout_constants and (spectral)
    of gram_lambda: what check_stored_constants checked (the lambda of R's kind of map only)."""
    rc = R.model.__dict__.setdefault("_readout_constants", {})
    rc.setdefault(("vocab",), tuple(v["readout"]["vocab"]))
    if not spectral:
        return
    key = _lambda_key(R, "vocab")
    R.model.__dict__.setdefault("_gram_lambda", {}).setdefault(key, v["lambda"]["|".join(key)])


def _power_rayleigh(W: np.ndarray, dtype, gam: np.ndarray, centre: bool, steps: int) -> float:
    """About (float32 products) a lower bound on lambda_max(N1^T C^T C N1), C the centred
    unembedding [V, d] (its stored values W [d, V] rounded to `dtype`) and N1 = gamma *
    (centring): the largest Rayleigh quotient of `steps` power iterations from a fixed start.
    Stored float32 values are multiplied as they are (one read of W per product, nothing
    widened); others a block of 1024 columns at a time in float64."""
    d, V = W.shape
    f32 = W.dtype == np.float32

    def Wt(y):                                                               # W^T y [V]
        if f32:
            return np.asarray(y.astype(np.float32) @ W, np.float64)
        s = np.empty(V)
        for a, b in column_blocks64(W, 1024, dtype):                        # [d, n_b]
            s[a:a + b.shape[1]] = y @ b
        return s

    def Wv(s):                                                               # W s [d]
        if f32:
            return np.asarray(W @ s.astype(np.float32), np.float64)
        z = np.zeros(d)
        for a, b in column_blocks64(W, 1024, dtype):
            z += b @ s[a:a + b.shape[1]]
        return z
    x = np.random.default_rng(0).standard_normal(d)                          # [d]
    rq = 0.0
    for _ in range(steps):
        nx = float(np.linalg.norm(x))
        if not nx > 0:                                                       # a zero map: quotient 0
            break
        x = x / nx
        y = gam * (x - x.mean() if centre else x)                            # N1 x [d]
        s = Wt(y)
        s -= s.mean()                                                        # C N1 x [V]
        z = gam * Wv(s)
        z = z - z.mean() if centre else z                                    # N1^T C^T C N1 x [d]
        rq = max(rq, float(x @ z))
        x = z
    return rq


def check_stored_constants(R: Readout, v: dict, spectral: bool = True, n_cols: int = 64,
                           steps: int = 2) -> str | None:
    """None if stored constants pass a check against the model's own unembedding, else why not.
    Their record (sha256, file identities) already guards against corruption and a changed
    model; this catches constants edited together with their record, as the weight copy's spot
    check does. One pass over the columns a_j (float64, as the weights are) gives their mean and
    largest norm: W must be that norm (relative 1e-6); B^2 at least the centred norms of n_cols
    columns and at most 4 W^2; (spectral) R's lambda at least the largest Rayleigh quotient of
    `steps` power iterations (margin 1e-3: float32 products) and at most max|gamma|^2 sum_j
    |a_j|^2 (its trace bound). Values too small would make the brackets too narrow: caught
    down to ~0.7 of lambda (two power steps); larger values only widen the brackets (the counts
    stay exact). `refimpl verify` recomputes them all."""
    from . import cache
    m = R.model
    key = _lambda_key(R, "vocab")
    try:
        B2, Wn = (float(x) for x in v["readout"]["vocab"])
        lam = float(v["lambda"]["|".join(key)])
    except (KeyError, TypeError, ValueError):
        return f"{cache.cache_dir(m)}: the stored bracket constants do not cover this readout; computed instead"
    W = m.stored("unembed.W_U")                                              # [d, V]
    d, V = W.shape
    mu, w2max, fro = _column_moments(R, parts(R, 0)[0])                     # [d], floats
    Wt = float(np.sqrt(w2max))
    cols = np.unique(np.linspace(0, V - 1, n_cols).astype(np.int64))
    A = np.asarray(np.asarray(W[:, cols], m.dtype), np.float64)              # [d, n] as the weights are
    bad = []
    if not abs(Wn - Wt) <= 1e-6 * Wt + 1e-300:
        bad.append("W")
    if not (((A - mu[:, None]) ** 2).sum(0).max() <= B2 * (1 + 1e-6) and B2 <= 4 * w2max * (1 + 1e-6) + 1e-299):
        bad.append("B")
    gam = np.asarray(R.gamma, np.float64) if R.has_norm else np.ones(d)
    if spectral and not (_power_rayleigh(W, m.dtype, gam, R.has_norm and R.centre, steps) <= lam * (1 + 1e-3)
                         and lam <= float(np.abs(gam).max()) ** 2 * fro * 1.01 + 1e-299):
        bad.append("lambda")
    if bad:
        return (f"{cache.cache_dir(m)}: the stored bracket constants ({', '.join(bad)}) do not match a check "
                f"against the model's unembedding (edited?); not used, computed instead (run `refimpl verify`, "
                f"then `refimpl prepare`)")
    return None


def prepare_constants(model) -> dict:
    """The per-model constants of the counts' brackets for a plain softmax, for both kinds of
    readout map (with the final norm's gamma: frozen; without: raw): {"readout": {part: [B^2,
    W]}, "lambda": {"part|norm": lambda, "part|raw": lambda}} (what cache.save_constants
    stores; {} for an adaptive softmax, whose constants are computed in each run)."""
    if model.cfg.unembedding == "adaptive":
        return {}
    for _, blk in column_blocks64(model.stored("unembed.W_U"), 4096, model.dtype):
        if not np.isfinite(blk).all():
            raise RefimplError(f"{model.path}: non-finite values (NaN/Inf) in unembed.W_U; run `refimpl verify`")
    out = {"readout": {}, "lambda": {}}
    for kind in ("frozen", "raw"):
        R = Readout(model, np.ones(model.cfg.d_model), kind)
        with one_blas_thread():
            (B2, W), = readout_constants(R, 0)
            part = parts(R, 0)[0]
            out["readout"][part.name] = [float(B2), float(W)]
            out["lambda"]["|".join(_lambda_key(R, part.name))] = float(gram_lambda(R, part))
    return out


def _row_norms(model, i: int) -> np.ndarray:
    """||fc2_k|| of every neuron of layer i [F] (float64, an upper bound: inflated by the
    rounding of the sums of squares), memoised on the model."""
    memo = model.__dict__.setdefault("_fc2_norms", {})
    if i not in memo:
        memo[i] = _out_pass(model, i, None)[1]
    return memo[i]


def _out_pass(model, i: int, g: np.ndarray | None) -> tuple[np.ndarray | None, np.ndarray]:
    """(W_out g [F] or None, ||fc2_k|| [F]) in float64 for W_out [F, d] of layer i, in one pass
    over its rows (Model.row_blocks: a layer the weight cache does not hold is not widened
    whole). Products and sums of squares of the compute-dtype values, in float64."""
    name = f"blocks.{i}.mlp.W_out"
    F, d = model.cfg.d_ff, model.cfg.d_model
    gv, sq = (None if g is None else np.empty(F)), np.empty(F)
    for a0, blk in model.row_blocks(name):
        for s in range(0, len(blk), 256):
            b = blk[s:s + 256]
            b64 = b if b.dtype == np.float64 else np.asarray(b, np.float64)  # [n_b, d] exact widening
            a, n = a0 + s, len(b)
            sq[a:a + n] = np.einsum("ij,ij->i", b64, b64)                    # [n_b]
            if g is not None:
                gv[a:a + n] = b64 @ g                                        # [n_b] float64 products
    eps = float(np.finfo(np.float64).eps)
    return gv, np.sqrt(sq * (1 + (d + 4) * eps)) * (1 + 4 * eps)


def _g64(R: Readout, bases: np.ndarray, w: int) -> np.ndarray:
    """g_vector in float64 for bases [n, d] (rounding of g itself is then negligible; the
    softmax p is the readout's own, computed in the model's dtype)."""
    b2 = np.atleast_2d(np.asarray(bases, R.model.dtype))
    g = np.zeros(b2.shape)
    m = R.model
    for part, (lp, sel) in zip(parts(R, w), R._base_groups(b2, w)):
        e = -np.exp(np.asarray(lp, np.float64))
        e[..., sel] += 1.0
        if part.name == "vocab":
            W = m.weight("unembed.W_U")                                      # [d, V]
            for s, b in column_blocks64(W):                                  # [d, n]
                g += e[:, s:s + b.shape[1]] @ b.T
        else:
            g += np.asarray(part.adjoint(e), np.float64)
    if R.has_norm:
        gam = np.asarray(R.gamma, np.float64)
        g = gam * g / float(R.scale[0])
        if R.centre:
            g = g - g.mean(-1, keepdims=True)
    return g


def _norm_factor(R: Readout) -> float:
    """||y|| <= factor * ||v|| for the part input y of a vector v (the frozen norm map)."""
    if not R.has_norm:
        return 1.0
    return float(np.abs(np.asarray(R.gamma, np.float64)).max() / float(R.scale[0])) * (1 + 1e-12)


def score_error(R: Readout, w: int, y_norm: np.ndarray, dtype) -> np.ndarray:
    """Bound on |computed C - C| for the exact scoring (Readout.increase) in `dtype` of
    vectors with part-input norms <= y_norm [n]: the normalisation and the score products
    (error (d + d_proj) eps relative to W ||y|| each, C being 2-Lipschitz in the scores), the
    readout's own base p (relative error <~ eps (log V + ...)) and the final reductions."""
    eps = float(np.finfo(dtype).eps)
    cfg = R.model.cfg
    d_eff = cfg.d_model + (cfg.d_model if R.head.adaptive else 0)
    out = np.zeros(len(y_norm))
    for B2, Wm in readout_constants(R, w):
        U = Wm * y_norm                                                      # >= max |u_j|
        out += eps * ((4 * d_eff + 32) * U + (4 * np.log(cfg.d_vocab + 1) + 64) * np.exp(np.minimum(U, 50)) * U)
    return out


def _pmax(R: Readout, bases: np.ndarray, w: int) -> list[np.ndarray]:
    """Per softmax part, an upper bound on the largest probability at each base [n]."""
    eps_dt = float(np.finfo(R.model.dtype).eps)
    return [np.exp(np.asarray(lp, np.float64).max(-1)) * (1 + 64 * eps_dt * (1 + np.abs(lp.max(-1))))
            for lp, _ in R._base_groups(np.atleast_2d(bases), w)]


def slack(R: Readout, w: int, pmax: list, v_norm: np.ndarray, spectral: bool = True) -> np.ndarray:
    """An upper bound on R = g.v - C(v) >= 0 (the second-order term) for vectors of norm <= v_norm
    [n] added to a base whose parts' largest probabilities are <= pmax (floats), summed over the
    softmax parts, each the smaller of
      Popoviciu:  R <= B^2 ||y||^2 / 2                       (scores' range r <= 2 B ||y||)
      spectral:   R <= c ||A y - mean||^2 <= c lambda ||v||^2 / scale^2
    where ||y|| <= ||v|| max|gamma| / scale is the part input, c = min(1/4, p_max (e^r - 1 - r) / r^2)
    integrates the largest softmax probability along the path (q_s <= p e^{s r}; and lambda_max of
    a softmax covariance is at most 1/2), and lambda is gram_lambda. spectral=False: Popoviciu
    alone (no Gram matrix needed)."""
    v_norm = np.asarray(v_norm, np.float64)
    y_norm = v_norm * _norm_factor(R)
    sc2 = float(R.scale[0]) ** 2 if R.has_norm else 1.0
    out = np.zeros(len(v_norm))
    for part, (B2, _), pm in zip(parts(R, w), readout_constants(R, w), pmax):
        pop = B2 * y_norm ** 2 / 2
        if not spectral:
            out += pop
            continue
        r = 2 * np.sqrt(B2) * y_norm                                        # >= range of the part's scores
        rr = np.minimum(np.maximum(r, 1e-4), 700.0)
        # (e^r - 1 - r) / r^2 = sum_k r^k / (k + 2)! <= e^r / 2 (used below 1e-4, where the
        # quotient would cancel); increasing in r, so r capped at 700 only where c is capped anyway
        c = np.where(r < 1e-4, 0.5 * np.exp(np.minimum(r, 1e-4)), (np.expm1(rr) - rr) / rr ** 2) * min(float(pm), 1.0)
        c = np.minimum(c, 0.25)
        out += np.minimum(pop, c * gram_lambda(R, part) * v_norm ** 2 / sc2)
    return out * (1 + 1e-9)


def vector_brackets(R: Readout, base: np.ndarray, w: int, V: np.ndarray, spectral: bool = True):
    """(lower, upper) on C(v) for any vectors V [n, d] added to `base` [d] (exact arithmetic on the
    given vectors; the evaluation's own rounding is not included): upper = g.v, lower = g.v - slack."""
    V = np.atleast_2d(np.asarray(V, np.float64))
    g = _g64(R, np.asarray(base)[None], w)[0]
    upper = V @ g
    vn = np.linalg.norm(V, axis=1) * (1 + 1e-12)
    return upper - slack(R, w, [p[0] for p in _pmax(R, base, w)], vn, spectral), upper


def base_p_error(R: Readout, w: int, y_norm: np.ndarray, dtype) -> np.ndarray:
    """Bound on |(p_computed - p) . u| for the base softmax p computed in `dtype` and scores u of
    vectors with part-input norms <= y_norm: sum_j |dp_j| |u_j| <= eps (4 log V + 64) max|u|
    (the relative error of p_j is ~eps (|log p_j| + log V); sum_j p_j |log p_j| <= log V)."""
    eps = float(np.finfo(dtype).eps)
    logv = np.log(R.model.cfg.d_vocab + 1)
    return sum(eps * (4 * logv + 64) * Wm * y_norm for _, Wm in readout_constants(R, w))


def bracket_parts(trace, i: int, w: int, t: int, R: Readout):
    """What ffn_brackets needs besides the per-model constants, for layer i: (g [d] in float64
    at Lres_i, W_out g [F], ||fc2_k|| [F], the largest probability of each part at Lres_i).
    g and p_max are computed for every layer at once; memoised per trace. `locate` asks for
    every layer while the per-model constants are computed (ModelConstants)."""
    memo, t = R.trace_memo(trace), t % trace.T
    key = ("bracket_parts", i, t, int(w))
    if key not in memo:
        model = trace.model
        gkey = ("g64", t, int(w))
        if gkey not in memo:
            memo[gkey] = _g64(R, np.array([Lt.lres[t] for Lt in trace.layers]), w)   # [L, d]
        g = memo[gkey][i]
        norms = model.__dict__.setdefault("_fc2_norms", {})
        gv, wn = _out_pass(model, i, g)                                      # [F] float64 products, [F]
        wn = norms.setdefault(i, wn)
        pkey = ("pmax", t, int(w))
        if pkey not in memo:                                                 # every part at every Lres_i
            memo[pkey] = _pmax(R, np.array([Lt.lres[t] for Lt in trace.layers]), w)
        memo[key] = (g, gv, wn, [p[i] for p in memo[pkey]])
    return memo[key]


def ffn_brackets(trace, i: int, w: int, t: int, R: Readout, spectral: bool = True):
    """Certified (lower, upper) on the exact C of every FFN subvalue of layer i at position t
    (the subvalue as the trace computes it, m_k * fc2_k in the model's dtype), without any
    vocabulary-sized work per neuron: upper = g . v (Jensen), lower = g . v - B^2 ||y||^2 / 2,
    (R bounded by _slack), each widened by the rounding of its own evaluation. Also returns
    y_norm [F], the bound on the part input norms (for score_error). Memoised per trace."""
    memo, t = R.trace_memo(trace), t % trace.T
    key = ("ffn_brackets", i, t, int(w), spectral)
    if key in memo:
        return memo[key]
    model = trace.model
    g, gv, wn, pmax = bracket_parts(trace, i, w, t, R)
    m = np.asarray(trace.layers[i].m[t], np.float64)                          # [F]
    upper = m * gv
    y_norm = np.abs(m) * wn * _norm_factor(R) * (1 + 4 * np.finfo(model.dtype).eps)
    sl = slack(R, w, pmax, np.abs(m) * wn * (1 + 4 * np.finfo(model.dtype).eps), spectral)
    eps_dt, eps64 = float(np.finfo(model.dtype).eps), float(np.finfo(np.float64).eps)
    gn = float(np.linalg.norm(g))
    d = model.cfg.d_model
    # v = fl(m * fc2) (one rounding per entry), g . v in float64, base p in the model's dtype
    # and the class is that of the exact C (bounds.class_values re-scores near +-tau in float64):
    # the brackets allow for the float64 scoring's rounding and for the base p computed in the
    # working dtype (g is built from it; the float64 re-scoring recomputes p)
    margin = (2 * eps_dt + (d + 8) * eps64) * np.abs(m) * wn * gn \
        + score_error(R, w, y_norm, np.float64) + base_p_error(R, w, y_norm, model.dtype)
    lower, upper = upper - sl - margin, upper + margin
    zero = m == 0                                                            # v = 0: C = 0 exactly
    lower[zero], upper[zero] = 0.0, 0.0
    memo[key] = out = (lower, upper, y_norm)
    return out


def _readout64(R: Readout) -> Readout:
    """The same readout computed in float64 (weights widened exactly; the frozen scale is the
    run's own value), for re-scoring subvalues whose class the working dtype cannot decide."""
    if R.model.dtype == np.float64:
        return R
    r64 = getattr(R, "_r64", None)
    if r64 is None:
        from .model import load
        m64 = R.model.__dict__.get("_model64")
        if m64 is None:
            m64 = R.model._model64 = load(R.model.path, dtype="float64")
        r64 = Readout(m64, np.ones(R.model.cfg.d_model), R.kind)
        if R.has_norm:
            r64.scale = np.asarray(R.scale, np.float64)
        R._r64 = r64
    return r64


def increase64(trace, i: int, w: int, t: int, R: Readout, neurons: np.ndarray) -> np.ndarray:
    """C [n] of FFN subvalues `neurons` of layer i (over Lres_i) in float64: increase64_layers."""
    neurons = np.asarray(neurons, np.int64)
    return increase64_layers(trace, np.full(len(neurons), int(i)), neurons, w, t, R)


def increase64_layers(trace, layers: np.ndarray, neurons: np.ndarray, w: int, t: int, R: Readout,
                      rows: int | None = None) -> np.ndarray:
    """C [n] (Eq. 19) of the FFN subvalues (layers[j], neurons[j]), each over its own Lres_i,
    computed in float64 whatever the working dtype: the subvalues and the base states as the
    run computed them, the run's frozen scale, weights widened exactly (the plain unembedding
    a block of columns at a time, once per `rows` subvalues of all layers together, so no
    float64 copy of it is kept; `rows` defaults to what fits 256 MB of float64 scores, so the
    few hundred undecided subvalues of a report widen it once)."""
    layers, neurons = np.asarray(layers, np.int64), np.asarray(neurons, np.int64)
    rows = rows or max(256, (256 << 20) // (8 * trace.model.cfg.d_vocab))
    t = t % trace.T
    out = np.empty(len(neurons))
    if len(neurons) == 0:
        return out
    uniq, which = np.unique(layers, return_inverse=True)                      # bases [m], which [n]
    V = np.empty((len(neurons), trace.model.cfg.d_model))                     # [n, d] float64
    for j, i in enumerate(uniq):
        sel = np.flatnonzero(which == j)
        V[sel] = np.asarray(trace.ffn_subvalues(int(i), t, neurons[sel]), np.float64)
    bases = np.array([np.asarray(trace.layers[int(i)].lres[t], np.float64) for i in uniq])   # [m, d]
    if R.model.dtype == np.float64:
        return np.asarray(R.increase(bases, which, V, w)[0], np.float64)
    if R.head.adaptive:
        return _readout64(R).increase(bases, which, V, w)[0]
    from .readout import log_softmax_shift
    from . import nn

    def norm64(X, offset):
        if not R.has_norm:
            return X
        if R.centre:
            X = X - X.mean(-1, keepdims=True)
        Y = np.asarray(R.gamma, np.float64) * (X / float(R.scale[0]))
        if offset and R.kind == "frozen" and R.centre and R.beta is not None:
            Y = Y + np.asarray(R.beta, np.float64)
        return Y
    W = R.model.weight("unembed.W_U")                                        # [d, V]
    bias = np.asarray(R.head.bias(), np.float64)
    yb, Y = norm64(bases, True), norm64(V, False)                             # [m, d], [n, d]
    nV, B = W.shape[1], 8192
    lp = None                                                                 # [m, V] log p of each base
    for a in range(0, len(V), rows):
        u = np.empty((min(rows, len(V) - a), nV))                            # [c, V]
        z = np.empty((len(yb), nV)) if lp is None else None                   # [m, V]
        for s_, Wc in column_blocks64(W, B):                                 # [d, B] widened exactly
            if z is not None:
                z[:, s_:s_ + B] = yb @ Wc
            u[:, s_:s_ + B] = Y[a:a + rows] @ Wc
        if z is not None:
            z = z + bias
            lp = z - nn.logsumexp(z, keepdims=True)                         # [m, V]
        wh = which[a:a + rows]
        for b in np.unique(wh):
            r = np.flatnonzero(wh == b)
            out[a + r] = log_softmax_shift(lp[b], u[r], w)
    return out


def class_values(trace, i: int, w: int, t: int, R: Readout, neurons: np.ndarray, c: np.ndarray,
                 tau: float) -> np.ndarray:
    """The values that decide the class (helpful C > tau, unhelpful C < -tau, negligible) of FFN
    subvalues `neurons` of layer i with exact scores c (computed in the model's dtype): c
    itself, except where c is within its rounding bound of +-tau, where C is re-scored in
    float64 (so a float32 run counts what the exact C says, not its rounding). Lens scores are
    used as they are."""
    c = np.asarray(c, np.float64)
    if R.kind == "lens" or R.model.dtype == np.float64 or len(c) == 0:
        return c
    m = np.asarray(trace.layers[i].m[t % trace.T], np.float64)[neurons]
    y_norm = np.abs(m) * _row_norms(trace.model, i)[neurons] * _norm_factor(R) * (1 + 4 * np.finfo(np.float32).eps)
    err = score_error(R, w, y_norm, R.model.dtype)
    near = np.flatnonzero((np.abs(c - tau) <= err) | (np.abs(c + tau) <= err))
    if len(near) == 0:
        return c
    out = c.copy()
    out[near] = increase64(trace, i, w, t, R, np.asarray(neurons)[near])
    return out
