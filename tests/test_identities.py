"""Property tests: every exact identity of the method on random models of all three families.

float64: 1e-12 relative; float32: float32 rounding (a few hundred ulps of the largest term).
"""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import refimpl
from refimpl import subkeys
from refimpl.decomposition import layer_vectors
from tests.helpers import assert_close, draw_sizes, random_model

TOL = {"float64": 1e-12, "float32": 3e-5}


@st.composite
def configs(draw):
    family = draw(st.sampled_from(["gpt2", "llama", "fairseq_lm"]))
    sizes = draw_sizes(draw, st, family)
    dtype = draw(st.sampled_from(["float64", "float32"]))
    seed = draw(st.integers(0, 3))
    T = draw(st.integers(1, 7))
    ids = draw(st.lists(st.integers(0, sizes["d_vocab"] - 1), min_size=T, max_size=T))
    return family, sizes, dtype, seed, ids


def _trace(case):
    family, sizes, dtype, seed, ids = case
    model = random_model(family, dtype=dtype, seed=seed, **sizes)
    return model, refimpl.run(model, ids), TOL[dtype]


SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(configs())
def test_subvalues_sum_to_layer_outputs(case):
    model, tr, tol = _trace(case)
    for i in range(model.cfg.n_layers):
        for t in range(tr.T):
            b = tr.attn_bias_subvalue(i)
            assert_close(tr.attn_subvalues(i, t, "position").sum(0) + b, tr.ATTN(i)[t], tol, "attn by position")
            assert_close(tr.attn_subvalues(i, t, "head").sum(0) + b, tr.ATTN(i)[t], tol, "attn by head")
            assert_close(tr.attn_subvalues(i, t, "head_position").sum((0, 1)) + b, tr.ATTN(i)[t], tol, "attn by head+pos")
            assert_close(tr.ffn_subvalues(i, t).sum(0) + tr.ffn_bias_subvalue(i), tr.FFN(i)[t], tol, "ffn")
            assert_close(tr.Lin(i)[t] + tr.ATTN(i)[t], tr.Lres(i)[t], tol, "Eq. 3")
            assert_close(tr.Lres(i)[t] + tr.FFN(i)[t], tr.Lout(i)[t], tol, "Eq. 4")


@SETTINGS
@given(configs())
def test_layer_vectors_sum_to_final_residual(case):
    model, tr, tol = _trace(case)
    for t in range(tr.T):
        parts = tr.embedding_parts(t)
        assert_close(sum(parts.values()), tr.Lin0[t], tol, "embedding parts")
        vecs = [v for _, v in layer_vectors(tr, t)]
        assert_close(np.sum(vecs, axis=0), tr.final[t], tol, "Lin_0 + layer vectors")


@SETTINGS
@given(configs())
def test_frozen_readout_reproduces_model_and_is_additive(case):
    model, tr, tol = _trace(case)
    for t in range(tr.T):
        R = tr.readout(t)
        assert_close(R.log_probs(tr.final[t]), tr.log_probs[t], tol, "frozen readout of final = model")
        if tr.logits is not None:
            assert_close(R.scores(tr.final[t]), tr.logits[t], tol, "bs(final) = logits")
        vecs = np.array([v for _, v in layer_vectors(tr, t)])
        assert_close(R.bs(vecs).sum(0) + R.offset, R.scores(tr.final[t]), tol, "bs additivity")
        w = int(np.argmax(tr.log_probs[t]))
        assert_close(R.log_prob(tr.final[t], w), tr.log_probs[t, w], tol, "single-target log p")


@SETTINGS
@given(configs())
def test_layer_log_prob_increases_telescope(case):
    """layer_significance (what the report prints) telescopes: the attention and FFN increases of
    all layers add up to log p_model(w) - log p(w | Lin_0), and the probability increases to
    p_model(w) - p(w | Lin_0), with p_model the forward pass's own output (frozen readout)."""
    from refimpl.significance import layer_significance
    model, tr, tol = _trace(case)
    for t in sorted({0, tr.T - 1}):
        R = tr.readout(t)
        for w in (int(np.argmax(tr.log_probs[t])), int(np.argmin(tr.log_probs[t]))):
            rows = layer_significance(tr, w, t, R)
            assert [r["layer"] for r in rows] == list(range(model.cfg.n_layers))
            lp_model, lp0 = float(tr.log_probs[t, w]), float(R.log_prob(tr.Lin0[t], w))
            total = sum(r["attn"]["log_prob_increase"] + r["ffn"]["log_prob_increase"] for r in rows)
            scale = (2 * len(rows) + 2) * max(1.0, abs(lp_model), abs(lp0))
            assert abs(total - (lp_model - lp0)) <= tol * scale, (total, lp_model - lp0)
            total_p = sum(r["attn"]["prob_increase"] + r["ffn"]["prob_increase"] for r in rows)
            assert abs(total_p - (np.exp(lp_model) - np.exp(lp0))) <= tol * (2 * len(rows) + 2)


@SETTINGS
@given(configs())
def test_subkey_linearisation_is_exact(case):
    model, tr, tol = _trace(case)
    whiches = ["in", "gate"] if model.cfg.gated_ffn else ["in"]
    for i in range(model.cfg.n_layers):
        for t in range(tr.T):
            for which in whiches:
                pre = tr.layers[i].pre[t] if which == "in" else tr.layers[i].gate_pre[t]
                terms = subkeys.preactivation(tr, i, t, None, which)
                assert_close(terms["h"], pre, tol * 10, f"Eq. 23 ({which})")
                k = int(np.argmax(np.abs(pre)))
                contrib = subkeys.preactivation_contributions(tr, i, t, k, which)
                assert abs(sum(v for _, v in contrib) - pre[k]) <= tol * 10 * max(1.0, np.abs(pre).max())


@SETTINGS
@given(configs(), st.floats(-30, -12))
def test_tiny_subvalues_keep_their_sign(case, log10_eps):
    """C(eps v) = eps g.v + O(eps^2) with g = A^T(e_w - p) (the bound's gradient): for a
    subvalue far below rounding of log p (~1e-16 in float64, ~1e-7 in float32), the increase
    must still be that first-order value to relative precision, not noise or 0 (so
    helpful/unhelpful counts are machine-independent). Checked for plain and adaptive softmax,
    both linear readouts, in both compute dtypes. The first-order reference is computed in
    float64 from the same stored weights (the float64 load of the same files)."""
    model, tr, tol = _trace(case)
    family, sizes, dtype, seed, ids = case
    ref_tr = tr if dtype == "float64" else refimpl.run(random_model(family, dtype="float64", seed=seed, **sizes), ids)
    t = tr.T - 1
    w = int(np.argmax(ref_tr.log_probs[t]))
    rng = np.random.default_rng(0)
    V = rng.standard_normal((4, model.cfg.d_model))
    eps = 10.0 ** log10_eps
    # float64: rounding of u (~1e-16 relative); float32: u and p carry float32 rounding (~1e-7
    # relative to |u|, amplified by cancellation in u_w - p.u), plus the float32 forward's base
    rel = 1e-10 if dtype == "float64" else 1e-4
    for kind in ("frozen", "raw"):
        R, R64 = tr.readout(t, kind), ref_tr.readout(t, kind)
        base, base64 = tr.Lres(0)[t], ref_tr.Lres(0)[t]
        p = np.exp(R64.log_probs(base64))                        # [V]
        d_lp = np.array([_directional(R64, base64, v, w) for v in V])   # first-order coefficients
        C, P = R.increase(base[None], np.zeros(4, dtype=np.int64), (eps * V).astype(model.dtype), w)
        # second-order term (eps |u|)^2 is far below this; rounding of log p is not
        tol_c = rel * eps * np.abs(R64.bs(V)).max(-1)
        assert np.all(np.abs(C - eps * d_lp) <= tol_c), (kind, C, eps * d_lp)
        assert np.all(np.sign(C) == np.sign(d_lp)), (kind, C, d_lp)
        assert np.all(np.abs(P - p[w] * C) <= rel * np.abs(p[w] * C) + p[w] * tol_c)


def _directional(R, base, v, w):
    """d/de log p(w | base + e v) at e = 0: log p(w) is a sum of log-softmax groups
    (Readout.head.target_groups) and d log softmax(z)_sel = u_sel - softmax(z).u."""
    y0 = R.normalise(base)
    if R.kind == "frozen" and R.centre and R.beta is not None:
        y0 = y0 + R.beta
    total = 0.0
    for (z, sel), (u, _) in zip(R.head.target_groups(y0, w), R.head.target_groups(R.normalise(v), w, bias=False)):
        q = np.exp(z - z.max())
        total += u[sel] - (q / q.sum()) @ u
    return total


@pytest.mark.parametrize("dtype,rtol", [(np.float32, 2e-5), (np.float64, 1e-12)])
def test_log_softmax_shift_large_and_tiny_shifts(dtype, rtol):
    """log_softmax_shift against the definition log softmax(z + u) - log softmax(z) computed in
    float64, for shifts from 1e-8 to 500 (expm1 would overflow float32 beyond ~88)."""
    from refimpl import nn
    from refimpl.readout import log_softmax_shift
    rng = np.random.default_rng(0)
    z = rng.standard_normal(50).astype(dtype)
    u = (rng.standard_normal((5, 50)) * np.array([1e-8, 1, 60, 100, 500])[:, None]).astype(dtype)
    got = log_softmax_shift(nn.log_softmax(z), u, 3)
    z64, u64 = z.astype(np.float64), u.astype(np.float64)
    want = (nn.log_softmax(z64 + u64) - nn.log_softmax(z64))[:, 3]
    assert np.all(np.isfinite(got))
    # the reference itself is only good to ~1e-16 absolute (it subtracts two log-probabilities)
    assert np.all(np.abs(got - want) <= rtol * np.maximum(np.abs(want), np.abs(u64).max(-1)) + 1e-15)


@pytest.mark.parametrize("dtype,gap,shift", [(np.float32, 20, 25), (np.float32, 10, 15), (np.float64, 30, 40)])
def test_log_softmax_shift_suppressing_a_dominant_token(dtype, gap, shift):
    """A shift that pushes down the token holding almost all the probability (sum p e^u << 1):
    log1p(S - 1) would cancel; the result must still match the definition."""
    from refimpl import nn
    from refimpl.readout import log_softmax_shift
    z = np.zeros(1000, dtype)
    z[0] = gap + np.log(1000)
    u = np.zeros((1, 1000), dtype)
    u[0, 0] = -shift
    z64, u64 = z.astype(np.float64), u.astype(np.float64)
    for sel in (0, 5):
        got = log_softmax_shift(nn.log_softmax(z), u, sel)
        want = (nn.log_softmax(z64 + u64) - nn.log_softmax(z64))[:, sel]
        assert np.all(np.isfinite(got)) and np.allclose(got, want, rtol=1e-5 if dtype == np.float32 else 1e-12, atol=0)


def test_readout_reused_across_traces_never_returns_another_traces_scores():
    """Whole-layer scores and bounds are memoised per trace; one `raw` Readout (which does not
    depend on the trace) used with many short-lived traces must score each one afresh (a
    memo keyed by id(trace) returned a dead trace's scores once Python reused the id)."""
    from refimpl.significance import ffn_subvalue_significance
    model = random_model("gpt2", seed=1, n_layers=1, d_model=8, n_heads=2, d_head=4, d_ff=12, d_vocab=20)
    R = refimpl.run(model, [1, 2]).readout(-1, "raw")

    def scored_with_shared_readout(ids):
        return ffn_subvalue_significance(refimpl.run(model, ids), 0, 3, -1, readout=R)[0]
    for k in range(30):
        ids = [k % 20, (3 * k + 1) % 20, (7 * k + 2) % 20]
        want = ffn_subvalue_significance(refimpl.run(model, ids), 0, 3, -1, readout="raw")[0]
        assert np.array_equal(scored_with_shared_readout(ids), want), k
