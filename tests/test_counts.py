"""Per-layer FFN counts (Fig. 6) and top-10 shares (Fig. 7) with a negligible threshold tau
(docs/design-choices.md, docs/topk.md): the default fast path (certified brackets, no prepared
data) against `--exhaustive` (every subvalue scored) on random models of the three families,
float32 and float64, every linear readout; the counts against an independent float64
computation from the definitions (tests/test_analyses.py's Slow); the brackets against exact C
on FFN subvalues and on arbitrary, adversarial vectors; the report and the JSON."""
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import refimpl
from refimpl import bounds
from refimpl.errors import RefimplError
from refimpl.locate import format_report, locate
from refimpl.significance import ffn_subvalue_significance
from refimpl.topk import ffn_counts
from tests.helpers import draw_sizes, random_model
from tests.test_analyses import Slow, slow_ffn_subvalues

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
KEYS = ("layer", "activated", "helpful", "unhelpful", "negligible", "threshold")


@st.composite
def cases(draw, readouts=("frozen", "frozen-nobias", "raw"), dtypes=("float32", "float64")):
    family = draw(st.sampled_from(["gpt2", "llama", "fairseq_lm"]))
    sizes = draw_sizes(draw, st, family, d_heads=(2, 4), d_ff_max=48, vocab_max=80, n_ctx=16)
    seed = draw(st.integers(0, 3))
    T = draw(st.integers(1, 6))
    ids = draw(st.lists(st.integers(2, sizes["d_vocab"] - 1), min_size=T, max_size=T))   # no pad id 1
    t = draw(st.integers(-T, T - 1))
    target = draw(st.one_of(st.none(), st.integers(0, sizes["d_vocab"] - 1)))            # None: top-1
    readout = draw(st.sampled_from(list(readouts)))
    dtype = draw(st.sampled_from(list(dtypes)))
    store = draw(st.sampled_from(["F32", "F64"]))
    scale = draw(st.sampled_from([1.0, 1e-3, 30.0]))      # subvalue sizes: tiny to softmax-saturating
    return family, sizes, seed, ids, t, target, readout, dtype, store, scale


def _setup(case):
    family, sizes, seed, ids, t, target, readout, dtype, store, scale = case
    model = random_model(family, dtype=dtype, seed=seed, store=store, **sizes)
    if scale != 1.0:                            # rescale every fc2 row: C from ~1e-7 to saturated
        for i in range(model.cfg.n_layers):
            name = f"blocks.{i}.mlp.W_out"
            model._cache[name] = np.asarray(model.stored(name), model.dtype) * model.dtype.type(scale)
    tr = refimpl.run(model, ids)
    w = int(np.argmax(tr.log_probs[t])) if target is None else target
    model._test_scale = scale
    return model, tr, t % tr.T, w, readout


def _subvalues(model, tr, i, t):
    """m_k * fc2_k from the stored weights (times the test's fc2 scale), float64."""
    return slow_ffn_subvalues(model, tr, i, t) * getattr(model, "_test_scale", 1.0)


def _share_tol(dtype):
    return 1e-9 if dtype == np.float64 else 2e-4


def check_counts(model, tr, t, w, readout, taus):
    R = tr.readout(t, readout)
    F = model.cfg.d_ff
    for tau in taus:
        slow = ffn_counts(tr, w, t, R, exhaustive=True, negligible=tau)
        fast = ffn_counts(tr, w, t, R, negligible=tau)
        bound = ffn_counts(tr, w, t, R, negligible=tau, share="bound")
        for s, f, b in zip(slow, fast, bound):
            for k in KEYS:
                assert f[k] == s[k] == b[k], f"tau {tau} layer {s['layer']} {k}: fast {f[k]} bound {b[k]} exhaustive {s[k]}"
            assert s["helpful"] + s["unhelpful"] + s["negligible"] == F
            assert s["share"] == f["share"] == "exact" and b["share"] == "bound"
            for key in ("top10_share", "top10_share_unhelpful"):
                assert abs(f[key] - s[key]) <= _share_tol(model.dtype), (tau, s["layer"], key, f[key], s[key])
                lo, hi = b[key]
                tol = 1e-9 if model.dtype == np.float64 else _share_tol(model.dtype)   # float32: the scores' own rounding
                assert lo - tol <= s[key] <= hi + tol, (tau, s["layer"], key, s[key], b[key])
            assert f["scored"] <= F and b["scored"] <= f["scored"]
    return slow


@SETTINGS
@given(cases())
def test_fast_counts_and_shares_equal_exhaustive(case):
    """Counts identical, shares equal to rounding, bound-mode brackets contain the exact shares:
    tau = 1e-6 (the default), 0 (bare signs), and a tau in the thick of the C values."""
    model, tr, t, w, readout = _setup(case)
    c = np.concatenate([ffn_subvalue_significance(tr, i, w, t, readout=readout)[0] for i in range(len(tr.layers))])
    a = np.unique(np.abs(c))
    # a tau in the thick of the values, halfway between two of them (a tau equal to a computed C
    # would make the class depend on the last bit of that C, which batching may change)
    mid = float((a[len(a) // 2] + a[len(a) // 2 - 1]) / 2) if len(a) > 1 else 0.5
    check_counts(model, tr, t, w, readout, [1e-6, 0.0, mid])


@SETTINGS
@given(cases(readouts=("frozen", "raw"), dtypes=("float64",)))
def test_counts_equal_the_definition(case):
    """float64 counts against C from the definition (log p(w | L + v) - log p(w | L), written in
    the test), where that C is not within 1e-10 of +-tau; activated = m > 0 (ReLU, GELU) or the
    gate pre-activation > 0 (SwiGLU), from the trace's stored pre-activations."""
    model, tr, t, w, readout = _setup(case)
    S = Slow(model, tr.final[t], readout)
    rows = ffn_counts(tr, w, t, readout)
    for i, row in enumerate(rows):
        c = np.array([S.C(tr.layers[i].lres[t], v, w)[0] for v in _subvalues(model, tr, i, t)])
        tau = row["threshold"]
        if np.any(np.abs(np.abs(c) - tau) < 1e-10 * max(1.0, float(np.abs(c).max()))) or np.any(
                (np.abs(c) < 1e-10) & (c != 0)):
            continue                                # the definition's own rounding could decide these
        L = tr.layers[i]
        act = (L.gate_pre[t] > 0) if model.cfg.gated_ffn else (L.m[t] > 0)
        assert (row["activated"], row["helpful"], row["unhelpful"], row["negligible"]) == \
            (int(act.sum()), int((c > tau).sum()), int((c < -tau).sum()), int((np.abs(c) <= tau).sum())), i
        hel = np.sort(c[c > tau])[::-1]
        want = hel[:10].sum() / hel.sum() if len(hel) else 0.0
        assert abs(row["top10_share"] - want) <= 1e-9, (i, row["top10_share"], want)


def _adversarial(model, R, base, w, rng):
    """Vectors to bracket: random at many scales, along W_U's target column and the most probable
    token's, their difference, the top eigenvector of the readout's Gram matrix (the direction
    that maximises ||A v||), one-hot directions, and huge multiples that saturate the softmax."""
    d = model.cfg.d_model
    S = Slow(model, np.ones(d), "raw")
    A = np.array([S.flat(e) for e in np.eye(d)])                              # [d, V] score map (no norm)
    if R.has_norm:
        gam = np.asarray(model.stored("ln_final.w"), np.float64)
        P = np.eye(d) - (1.0 / d if R.centre else 0.0)
        A = (P * gam[None, :]).T @ A / float(R.scale[0])                     # rows: unit vectors through N
    Ac = A - A.mean(1, keepdims=True)
    top = np.linalg.eigh(Ac @ Ac.T)[1][:, -1]
    p = np.exp(R.log_probs(base))
    j = int(np.argmax(p))
    dirs = [rng.standard_normal(d) for _ in range(6)] + [A[:, w], A[:, j], A[:, w] - A[:, j], top, -top,
                                                          np.eye(d)[0], np.eye(d)[d - 1]]
    out = []
    for v in dirs:
        v = v / max(np.linalg.norm(v), 1e-300)
        for s in (1e-8, 1e-3, 0.1, 1.0, 10.0, 100.0):
            out.append(s * v)
    return np.array(out)


@SETTINGS
@given(cases(readouts=("frozen", "raw"), dtypes=("float64",)), st.integers(0, 2 ** 32 - 1))
def test_brackets_hold(case, seed):
    """lower <= C <= upper: for every FFN subvalue of every layer (bounds.ffn_brackets, C from the
    definition), and for arbitrary vectors including adversarial ones (bounds.vector_brackets),
    with and without the spectral term."""
    model, tr, t, w, readout = _setup(case)
    R = tr.readout(t, readout)
    S = Slow(model, tr.final[t], readout)
    rng = np.random.default_rng(seed)
    for i, L in enumerate(tr.layers):
        base = L.lres[t]
        c = np.array([S.C(base, v, w)[0] for v in _subvalues(model, tr, i, t)])
        tol = 1e-12 * np.maximum(1.0, np.abs(c))                             # the definition's rounding
        for spectral in (True, False):
            lo, up, _ = bounds.ffn_brackets(tr, i, w, t, R, spectral=spectral)
            bad = np.flatnonzero((c < lo - tol) | (c > up + tol))
            assert len(bad) == 0, (i, spectral, bad, c[bad], lo[bad], up[bad])
        V = _adversarial(model, R, base, w, rng)
        c = np.array([S.C(base, v, w)[0] for v in V])
        tol = 1e-12 * np.maximum(1.0, np.abs(c))
        for spectral in (True, False):
            lo, up = bounds.vector_brackets(R, base, w, V, spectral)
            bad = np.flatnonzero((c < lo - tol) | (c > up + tol))
            assert len(bad) == 0, (i, spectral, bad, c[bad], lo[bad], up[bad])


def test_the_spectral_term_is_needed_to_be_tight():
    """On a model whose softmax is flat, the spectral term decides far more subvalues than
    Popoviciu's alone (the reason it exists): fewer undecided neurons with --share bound."""
    model = random_model("gpt2", seed=5, n_layers=2, d_model=32, n_heads=4, d_ff=256, d_vocab=2000)
    tr = refimpl.run(model, [5, 17, 300, 41])
    w = int(np.argmax(tr.log_probs[-1]))
    R = tr.readout(-1)
    width = {s: np.median([np.median(np.subtract(*bounds.ffn_brackets(tr, i, w, -1, R, spectral=s)[1::-1]))
                           for i in range(2)]) for s in (True, False)}
    assert width[True] < width[False] / 5, width


def test_float32_class_uses_the_exact_value_near_tau():
    """A float32 run whose tau sits exactly on a neuron's C (within float32 rounding of it): the
    counts follow C re-scored in float64, identically in the fast and the exhaustive path."""
    model = random_model("gpt2", dtype="float32", seed=3, n_layers=1, d_model=16, n_heads=2, d_ff=32, d_vocab=40)
    tr = refimpl.run(model, [4, 9, 11])
    w = int(np.argmax(tr.log_probs[-1]))
    R = tr.readout(-1)
    c32 = ffn_subvalue_significance(tr, 0, w, -1, readout=R)[0]
    k = int(np.argmax(np.abs(c32)))
    S = Slow(model, np.asarray(tr.final[-1], np.float64), "frozen")
    S.scale = float(R.scale[0])                 # the run's frozen scale (float32), as the counts use it
    x = np.asarray(tr.layers[0].lres[-1], np.float64)
    v = np.asarray(tr.ffn_subvalues(0, -1, [k])[0], np.float64)
    c64 = S.C(x, v, w)[0]
    for tau in (abs(c64) * (1 - 1e-9), abs(c64) * (1 + 1e-9)):
        slow = ffn_counts(tr, w, -1, R, exhaustive=True, negligible=tau)[0]
        fast = ffn_counts(tr, w, -1, R, negligible=tau)[0]
        assert {k_: slow[k_] for k_ in KEYS} == {k_: fast[k_] for k_ in KEYS}
        big = int(abs(c64) > tau)
        others = np.delete(c32, k)
        assert slow["helpful"] + slow["unhelpful"] == big + int((np.abs(others) > tau).sum())


def test_threshold_is_validated_and_recorded():
    m = refimpl.load(None)
    for bad in (-1e-6, float("nan"), float("inf"), "x"):
        with pytest.raises(RefimplError):
            locate(m, "The capital of France is", negligible=bad)
    with pytest.raises(RefimplError):
        locate(m, "The capital of France is", share="approx")
    r = locate(m, "The capital of France is", negligible=1e-3)
    assert all(c["threshold"] == 1e-3 for c in r["ffn_counts"])


def test_report_and_json_label_exact_and_bound(tmp_path):
    """The text names the threshold and the negligible column and says whether shares are exact;
    with --share bound every share is a [lo, hi] pair, labelled as a bound in text and JSON, and
    the output validates against the locate schema."""
    jsonschema = pytest.importorskip("jsonschema")
    from refimpl.output import SCHEMA_DIR
    schema = json.load(open(f"{SCHEMA_DIR}/locate.json"))
    m = refimpl.load(None)
    for share in ("exact", "bound"):
        r = json.loads(json.dumps(locate(m, "The capital of France is", share=share)))
        jsonschema.validate(r, schema)
        text = format_report(r, m)
        assert "negligible" in text and "C > 1e-06" in text
        for c in r["ffn_counts"]:
            assert c["share"] == share
            assert isinstance(c["top10_share"], list) == (share == "bound")
            assert isinstance(c["top10_share_unhelpful"], list) == (share == "bound")
        head = text.split("(Fig. 7), ")[1].split("\n")[0]
        assert head == ("certified bounds [lo, hi], not exact (--share bound):" if share == "bound" else "exact:")
