"""Helpful / unhelpful / negligible FFN counts on a REAL model against a high-precision reference
(helpful C > tau, unhelpful C < -tau, negligible |C| <= tau; tau = 1e-6 nats by default).

On a trained GELU model most FFN subvalues have |C| far below the rounding of log p (~1e-16):
their sign cannot be read off log p(w | L + v) - log p(w | L) in float64. The reference here
is independent of refimpl's readout and scoring code and certain of every neuron's class:

  * m = 0 exactly: C = 0.
  * |C| clearly large: C from the float64 definition (log-softmax difference, written here);
    its error is far below the 1e-9 margin used (checked below against 50-digit values).
  * otherwise, at 50 significant digits (mpmath), from the stored float32 weights and the
    trace's float64 states taken as exact inputs: C lies in [g.v - R^2/8, g.v] (Jensen and
    Hoeffding's lemma for log E_p e^u), with g.v the first-order term computed at 50 digits and
    R >= max u - min u bounded from above; where that interval does not decide the class,
    C itself at 50 digits.

Model: the embedded capitals-gpt2 (4 layers, d 128, d_ff 512, vocabulary 1047, GELU),
prompt "The capital of France is", frozen readout, float64.
"""
import math

import numpy as np
import pytest

mpmath = pytest.importorskip("mpmath")

import refimpl  # noqa: E402
from refimpl.embedded import resolve_model  # noqa: E402
from refimpl.locate import locate  # noqa: E402
from refimpl.significance import ffn_layer_summary, ffn_subvalue_significance  # noqa: E402

mp = mpmath.mp
PROMPT = "The capital of France is"
CLEAR = 1e-9          # float64 C decides a class when it is this far from the threshold


def mpf_vec(a):
    return [mp.mpf(float(x)) for x in a]


class Reference:
    """The frozen LayerNorm readout of one analysed position at 50 digits (GPT-2: tied W_U)."""

    def __init__(self, model, trace, t):
        mp.dps = 50
        self.model, self.trace, self.t = model, trace, t
        W_E = np.asarray(model.stored("embed.W_E"), np.float64)            # [V, d]; W_U = W_E^T
        self.W_U64 = W_E.T                                                   # [d, V]
        self.W_U = [mpf_vec(row) for row in self.W_U64]                      # d lists of V
        self.gamma64 = np.asarray(model.stored("ln_final.w"), np.float64)
        self.gamma = mpf_vec(self.gamma64)
        self.beta = mpf_vec(np.asarray(model.stored("ln_final.b"), np.float64))
        x_f = mpf_vec(trace.final[t])
        d = len(x_f)
        mu = mp.fsum(x_f) / d
        self.sigma = mp.sqrt(mp.fsum((x - mu) ** 2 for x in x_f) / d + mp.mpf(model.cfg.norm_eps))
        self.sigma64 = float(self.sigma)
        self.d, self.V = d, self.W_U64.shape[1]

    def a(self, v):
        """gamma * (v - mean v) / sigma_f at 50 digits (the normalised vector the unembedding reads)."""
        mu = mp.fsum(v) / self.d
        return [g * (x - mu) / self.sigma for g, x in zip(self.gamma, v)]

    def logits(self, x):
        """z = (gamma (x - mean x) / sigma_f + beta) W_U for a residual state x (mpf list)."""
        y = [ai + bi for ai, bi in zip(self.a(x), self.beta)]
        return [mp.fdot(y, [self.W_U[e][j] for e in range(self.d)]) for j in range(self.V)]

    def base(self, x, w):
        """log p at a base state: the log-partition and p (50 digits), and c = W_U (e_w - p)."""
        z = self.logits(x)
        zmax = max(z)
        lse = zmax + mp.log(mp.fsum(mp.exp(zj - zmax) for zj in z))
        p = [mp.exp(zj - lse) for zj in z]
        c = [self.W_U[e][w] - mp.fdot(self.W_U[e], p) for e in range(self.d)]
        return {"p": p, "c": c, "w": w}

    def C_exact(self, b, v):
        """C(v) = u_w - log sum_j p_j e^{u_j} with u = a(v) W_U, at 50 digits."""
        a = self.a(v)
        u = [mp.fdot(a, [self.W_U[e][j] for e in range(self.d)]) for j in range(self.V)]
        return u[b["w"]] - mp.log(mp.fsum(pj * mp.exp(uj) for pj, uj in zip(b["p"], u)))

    def interval(self, b, v):
        """[lo, hi] containing C(v): [g.v - R^2/8, g.v] (Jensen / Hoeffding), g.v at 50 digits."""
        a = self.a(v)
        first = mp.fdot(a, b["c"])                                            # u_w - p.u
        a64 = np.abs(np.array([float(x) for x in a]))
        R = 2.0 * float((a64 @ np.abs(self.W_U64)).max()) * (1 + 1e-9)      # >= max u - min u
        return first - mp.mpf(R) ** 2 / 8, first


def float64_C(ref, x, V, w):
    """C of vectors V [n, d] over base x by the float64 definition (log-softmax difference)."""
    def log_p(X):
        Y = ref.gamma64 * (X - X.mean(-1, keepdims=True)) / ref.sigma64 + np.asarray(
            ref.model.stored("ln_final.b"), np.float64)
        Z = Y @ ref.W_U64                                                    # [n, V]
        zmax = Z.max(-1, keepdims=True)
        return Z[:, w] - (zmax[:, 0] + np.log(np.exp(Z - zmax).sum(-1)))
    return log_p(x[None] + V) - log_p(x[None])[0]


def classify(lo, hi, tau):
    """+1 helpful (C > tau), -1 unhelpful (C < -tau), 0 negligible (|C| <= tau); None if [lo, hi]
    does not decide it."""
    tau = mp.mpf(tau)
    if lo > tau:
        return 1
    if hi < -tau:
        return -1
    if lo >= -tau and hi <= tau:
        return 0
    return None


@pytest.fixture(scope="module")
def real():
    model = refimpl.load(resolve_model(None), dtype="float64")
    trace = refimpl.run(model, PROMPT)
    t = trace.T - 1
    w = int(np.argmax(trace.log_probs[t]))
    return model, trace, t, w, Reference(model, trace, t)


def reference_classes(real, i, tau):
    """Certain class of every neuron of layer i; also returns how each was decided."""
    model, trace, t, w, ref = real
    x = trace.layers[i].lres[t]
    m = trace.layers[i].m[t]
    W_out = np.asarray(model.stored(f"blocks.{i}.mlp.W_out"), np.float64)
    V = m[:, None] * W_out                                                   # [F, d] in float64
    C64 = float64_C(ref, x, V, w)
    b = ref.base(mpf_vec(x), w)
    out, how, values = [], {"zero": 0, "float64": 0, "interval": 0, "exact": 0}, {}
    for k in range(model.cfg.d_ff):
        if m[k] == 0:
            out.append(classify(mp.mpf(0), mp.mpf(0), tau))
            how["zero"] += 1
            continue
        if abs(C64[k] - tau) > CLEAR and abs(C64[k] + tau) > CLEAR and abs(C64[k]) > CLEAR:
            out.append(classify(mp.mpf(C64[k] - CLEAR / 10), mp.mpf(C64[k] + CLEAR / 10), tau))
            how["float64"] += 1
            continue
        v = [mp.mpf(float(m[k])) * mp.mpf(float(W_out[k, e])) for e in range(model.cfg.d_model)]  # exact
        lo, hi = ref.interval(b, v)
        c = classify(lo, hi, tau)
        if c is None:
            cx = ref.C_exact(b, v)
            lo = hi = cx
            c = classify(cx, cx, tau)
            how["exact"] += 1
        else:
            how["interval"] += 1
        values[k] = (lo, hi)
        out.append(c)
    return np.array(out), how, values, C64, b


def test_float64_reference_is_good_to_far_below_the_margin(real):
    """The float64 branch of the reference is trusted only where |C| > 1e-9: check its error on
    the largest neurons of every layer against C at 50 digits (must be far below 1e-9)."""
    model, trace, t, w, ref = real
    for i in range(model.cfg.n_layers):
        x = trace.layers[i].lres[t]
        m = trace.layers[i].m[t]
        W_out = np.asarray(model.stored(f"blocks.{i}.mlp.W_out"), np.float64)
        C64 = float64_C(ref, x, m[:, None] * W_out, w)
        b = ref.base(mpf_vec(x), w)
        for k in np.argsort(-np.abs(C64))[:3]:
            v = [mp.mpf(float(m[k])) * mp.mpf(float(W_out[k, e])) for e in range(model.cfg.d_model)]
            assert abs(C64[k] - float(ref.C_exact(b, v))) <= 1e-12, (i, k)


def test_counts_equal_the_high_precision_reference(real):
    """Every layer: the helpful / unhelpful counts of the report (exhaustive summary and the fast
    path of `locate`) equal the reference's certain classes; refimpl's per-neuron C of every tiny
    subvalue lies in the reference interval (to 1e-9 relative) and has its sign."""
    model, trace, t, w, ref = real
    fast = locate(model, PROMPT, counts=True)["ffn_counts"]
    full = locate(model, PROMPT, counts=True, exhaustive=True)["ffn_counts"]
    n_tiny = 0
    for i in range(model.cfg.n_layers):
        R = trace.readout(t)
        summary = ffn_layer_summary(trace, i, w, t, R)
        tau = float(summary["threshold"])
        assert tau == fast[i]["threshold"] == full[i]["threshold"] == 1e-6        # the documented default
        cls, how, values, C64, _ = reference_classes(real, i, tau)
        want = {"helpful": int((cls == 1).sum()), "unhelpful": int((cls == -1).sum()),
                "negligible": int((cls == 0).sum())}
        assert sum(want.values()) == model.cfg.d_ff
        for name, got in (("summary", summary), ("locate", fast[i]), ("exhaustive", full[i])):
            assert {k: got[k] for k in want} == want, (name, i, got, want, how)
        C, _ = ffn_subvalue_significance(trace, i, w, t, readout=R)
        for k, (lo, hi) in values.items():
            slack = 1e-9 * max(abs(float(lo)), abs(float(hi)))
            assert float(lo) - slack <= C[k] <= float(hi) + slack, (i, k, C[k], float(lo), float(hi))
            if lo > 0 or hi < 0:
                assert np.sign(C[k]) == (1 if lo > 0 else -1), (i, k)
        n_tiny += len(values)
    assert n_tiny > 100           # the point of the test: many subvalues below float64 rounding of log p
