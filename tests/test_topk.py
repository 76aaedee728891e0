"""Exact top-K FFN subvalues without brute force (docs/topk.md): the bounds-based fast path
against the exhaustive one, and the bounds against exact scores from the slow reference
of tests/test_analyses.py (float64, random models of the three families)."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import refimpl
from refimpl import bounds
from refimpl.errors import RefimplError
from refimpl.significance import attn_position_significance_all_layers
from refimpl.topk import ffn_counts, top_attn_subvalues, top_ffn_subvalues
from tests.helpers import draw_sizes, random_model
from tests.test_analyses import Slow, near, slow_ffn_subvalues

SLACK = 1e-12          # absolute rounding slack on the bounds

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def cases(draw):
    family = draw(st.sampled_from(["gpt2", "llama", "fairseq_lm"]))
    sizes = draw_sizes(draw, st, family, d_heads=(2, 4), d_ff_max=48, vocab_max=80, n_ctx=16)
    seed = draw(st.integers(0, 3))
    T = draw(st.integers(1, 6))
    ids = draw(st.lists(st.integers(2, sizes["d_vocab"] - 1), min_size=T, max_size=T))   # no pad id 1
    t = draw(st.integers(-T, T - 1))
    target = draw(st.one_of(st.none(), st.integers(0, sizes["d_vocab"] - 1)))            # None: top-1
    readout = draw(st.sampled_from(["frozen", "raw"]))
    return family, sizes, seed, ids, t, target, readout


def _setup(case):
    family, sizes, seed, ids, t, target, readout = case
    model = random_model(family, seed=seed, **sizes)
    tr = refimpl.run(model, ids)
    w = int(np.argmax(tr.log_probs[t])) if target is None else target
    return model, tr, t, w, readout


def check_fast_equals_exhaustive(tr, w, t, readout, K, batch=64):
    fast = top_ffn_subvalues(tr, w, t, K, readout, batch=batch)
    slow = top_ffn_subvalues(tr, w, t, K, readout, exhaustive=True)
    n = min(K, len(tr.layers) * tr.model.cfg.d_ff)
    assert len(fast["layer"]) == len(slow["layer"]) == n
    assert np.array_equal(fast["layer"], slow["layer"]) and np.array_equal(fast["neuron"], slow["neuron"]), \
        f"K={K}: fast {list(zip(fast['layer'], fast['neuron']))} != exhaustive {list(zip(slow['layer'], slow['neuron']))}"
    near(fast["log_prob_increase"], slow["log_prob_increase"], f"K={K} C")
    near(fast["prob_increase"], slow["prob_increase"], f"K={K} P")
    assert slow["scored"] == len(tr.layers) * tr.model.cfg.d_ff
    assert fast["scored"] <= slow["scored"]
    return fast["scored"], slow["scored"]


def check_attn_fast_equals_exhaustive(tr, w, t, readout, K, batch):
    """Attention subvalues by source position: the branch and bound gives the exhaustive top-K,
    and both agree with a ranking of attn_position_significance_all_layers (scored separately)."""
    fast = top_attn_subvalues(tr, w, t, K, readout, batch=batch)
    slow = top_attn_subvalues(tr, w, t, K, readout, exhaustive=True)
    C, P = attn_position_significance_all_layers(tr, w, t, readout)               # [L, t+1]
    lay, pos = np.divmod(np.arange(C.size), C.shape[1])
    order = np.lexsort((pos, lay, -C.ravel()))[:K]
    for r in (fast, slow):
        assert np.array_equal(r["layer"], lay[order]) and np.array_equal(r["position"], pos[order]), \
            f"K={K}: {list(zip(r['layer'], r['position']))} != {list(zip(lay[order], pos[order]))}"
        near(r["log_prob_increase"], C.ravel()[order], f"K={K} attn C")
        near(r["prob_increase"], P.ravel()[order], f"K={K} attn P")
    assert fast["scored"] <= slow["scored"] == C.size


def check_counts(tr, w, t, readout):
    """Counts identical to the exhaustive ones; the exact shares equal, the bound-mode brackets
    contain them (tests/test_counts.py does this across dtypes, readouts and thresholds)."""
    fast = ffn_counts(tr, w, t, readout)
    slow = ffn_counts(tr, w, t, readout, exhaustive=True)
    bound = ffn_counts(tr, w, t, readout, share="bound")
    for f, s, b in zip(fast, slow, bound):
        for key in ("layer", "activated", "helpful", "unhelpful", "negligible", "threshold"):
            assert f[key] == s[key] == b[key], f"layer {s['layer']} {key}: fast {f[key]} != exhaustive {s[key]}"
        for key in ("top10_share", "top10_share_unhelpful"):
            assert abs(f[key] - s[key]) <= 1e-9, (key, f[key], s[key])
            lo, hi = b[key]
            assert lo <= hi
            assert lo - SLACK <= s[key] <= hi + SLACK, f"{key} {s[key]} outside [{lo}, {hi}]"


@SETTINGS
@given(cases(), st.sampled_from([1, 3, 64]))
def test_fast_top_k_equals_exhaustive(case, batch):
    model, tr, t, w, readout = _setup(case)
    for K in (1, 5, 20):
        check_fast_equals_exhaustive(tr, w, t, readout, K, batch)
        check_attn_fast_equals_exhaustive(tr, w, t, readout, K, batch)
    check_counts(tr, w, t, readout)


def check_bounds(model, tr, w, t, readout, rng, n_random=8):
    """lower <= C <= upper for every neuron (C from the slow reference; the brackets of the counts,
    bounds.ffn_brackets, and the top-K's upper bound); C(v) <= g.v for random v."""
    tt = t % tr.T
    R = tr.readout(tt, readout)
    S = Slow(model, tr.final[tt], readout)
    for i, L in enumerate(tr.layers):
        base = L.lres[tt]
        lower, upper, _ = bounds.ffn_brackets(tr, i, w, tt, R)
        up_only = bounds.ffn_upper(tr, i, w, tt, R)
        c = np.array([S.C(base, v, w)[0] for v in slow_ffn_subvalues(model, tr, i, tt)])
        assert np.all(lower <= upper)
        for lo, up in ((lower, upper), (lower, up_only)):
            bad = np.flatnonzero((c > up + SLACK) | (c < lo - SLACK))
            assert len(bad) == 0, f"L{i} neurons {bad}: C {c[bad]} not in [{lo[bad]}, {up[bad]}]"
        # the upper bound holds for any vector, not just FFN subvalues (and any base)
        for b in (base, L.lin[tt]):
            g = bounds.g_vector(R, b, w)
            for s in rng.choice([1e-3, 0.1, 1.0, 10.0], n_random):
                v = s * np.linalg.norm(b) / np.sqrt(len(b)) * rng.standard_normal(len(b))
                cv = S.C(b, v, w)[0]
                assert cv <= g @ v + SLACK, f"C(v) = {cv} > g.v = {g @ v}"
    return True


@SETTINGS
@given(cases(), st.integers(0, 2 ** 32 - 1))
def test_bounds_are_sound(case, seed):
    model, tr, t, w, readout = _setup(case)
    check_bounds(model, tr, w, t, readout, np.random.default_rng(seed))


def test_bounds_refuse_lens():
    model = random_model("gpt2", seed=0, n_layers=1, d_vocab=20)
    tr = refimpl.run(model, [3, 4, 5])
    with pytest.raises(RefimplError):
        bounds.g_vector(tr.readout(-1, "lens"), tr.layers[0].lres[-1], 0)
    # lens is scored exhaustively by the top-K search
    a = top_ffn_subvalues(tr, 0, -1, 5, "lens")
    b = top_ffn_subvalues(tr, 0, -1, 5, "lens", exhaustive=True)
    assert np.array_equal(a["neuron"], b["neuron"]) and a["scored"] == b["scored"]


# --- realistic sizes: the bounds must prune ------------------------------------------------------

PRUNE = {
    "gpt2": ("gpt2", dict(n_layers=3, d_model=32, n_heads=4, d_ff=128, d_vocab=300)),
    "llama": ("llama", dict(n_layers=3, d_model=32, n_heads=4, n_kv_heads=2, d_ff=128, d_vocab=300)),
    "fairseq_lm": ("fairseq_lm", dict(n_layers=3, d_model=32, n_heads=4, d_ff=128, d_vocab=300, cutoffs=[60, 150])),
}
PROMPTS = [[2, 5, 7, 9, 11, 3], [17, 250, 4, 99, 180, 33, 71, 8], [40, 41]]


@pytest.mark.parametrize("name", sorted(PRUNE))
def test_pruning_on_realistic_models(name):
    family, sizes = PRUNE[name]
    model = random_model(family, seed=1, **sizes)
    total = sizes["n_layers"] * sizes["d_ff"]
    pruned, report, small, counted = {1: 0, 5: 0, 10: 0}, [], [], []
    rng = np.random.default_rng(0)
    for ids in PROMPTS:
        tr = refimpl.run(model, ids)
        for t in (-1, 0):
            top1 = int(np.argmax(tr.log_probs[t]))
            for w in (top1, 250):
                for readout in (["frozen", "raw"] if model.cfg.final_norm else ["frozen"]):
                    for K in (1, 5, 10):
                        scored, _ = check_fast_equals_exhaustive(tr, w, t, readout, K)
                        pruned[K] += scored < total
                        report.append(scored / total)
                        small.append(check_fast_equals_exhaustive(tr, w, t, readout, K, batch=4)[0] / total)
                    check_counts(tr, w, t, readout)
                    counts = ffn_counts(tr, w, t, readout)
                    counted.append(sum(c["scored"] for c in counts) / total)
                    if w == top1 and t == -1:
                        check_bounds(model, tr, w, t, readout, rng, n_random=3)
    print(f"\n{name}: fraction of FFN subvalues scored by the fast top-K: "
          f"min {min(report):.3f} median {np.median(report):.3f} max {max(report):.3f} "
          f"(searches pruned of {len(report) // 3} per K: {pruned}); with batch 4: median {np.median(small):.3f} "
          f"max {max(small):.3f}; helpful/unhelpful counts scored at most {max(counted):.3f}")
    for K, n in pruned.items():
        assert n > 0, f"{name}: the bounds never pruned the top-{K} search"
