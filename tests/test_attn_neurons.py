"""Attention neurons (head h, head dimension e, source position j) and the frozen-nobias readout.

    attn_i^{t.j,h,e} = alpha_h[t, j] * v_h[j, e] * O_h[e]

References: the slow transcriptions of tests/test_analyses.py (Slow readout, slow attention
subvalues; they read stored weights and trace vectors, never refimpl's decomposition or
readout code), written out neuron by neuron here. The fast exact top-K (branch and bound on
the Jensen bound) is checked against `exhaustive=True` and against a ranking of every
neuron's score, as tests/test_topk.py does for FFN subvalues.
"""
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import refimpl
from refimpl import bounds
from refimpl import significance as sig
from refimpl.cli import main as cli_main
from refimpl.decomposition import attn_neuron_coefficients
from refimpl.topk import top_attn_neurons
from tests.helpers import draw_sizes, random_model
from tests.test_analyses import IDS, MODELS, Slow, exact_sum, near, slow_attn_bias, slow_attn_subvalues

SLACK = 1e-12


class SlowNoBias(Slow):
    """The authors' convention from its definition: frozen final-norm scale, final LayerNorm
    bias beta never added (so a residual state reads y = gamma (x - mean x) / sigma_f)."""

    def y(self, x, offset):
        return super().y(x, False)


def slow_neurons(model, tr, i, t):
    """[H, d_head, t+1, d] neuron by neuron: alpha_h[t, j] * v[j, g(h), e] * W_O[h, e]."""
    c, L = model.cfg, tr.layers[i]
    W_O = np.asarray(model.stored(f"blocks.{i}.attn.W_O"), np.float64)
    out = np.zeros((c.n_heads, c.d_head, t + 1, c.d_model))
    for h in range(c.n_heads):
        g = h // (c.n_heads // c.n_kv_heads)
        for e in range(c.d_head):
            for j in range(t + 1):
                out[h, e, j] = L.pattern[h, t, j] * L.v[j, g, e] * W_O[h, e]
    return out


@pytest.fixture(params=sorted(MODELS), scope="module")
def case(request):
    family, sizes = MODELS[request.param]
    model = random_model(family, seed=11, **sizes)
    return model, refimpl.run(model, IDS)


def test_decomposition(case):
    model, tr = case
    for t in (-1, 3):
        tt = t % tr.T
        for i in range(model.cfg.n_layers):
            sv = tr.attn_subvalues(i, t, "head_neuron_position")
            near(sv, slow_neurons(model, tr, i, tt), f"neurons L{i} t{tt}")
            # summed over head dimensions: the head-and-position subvalues; over everything + b_O: ATTN_i
            near(sv.sum(1), slow_attn_subvalues(model, tr, i, tt), f"sum over e L{i}")
            for k in range(model.cfg.d_model):
                exact_sum(np.append(sv[..., k].ravel(), slow_attn_bias(model, i)[k]), tr.layers[i].attn[tt, k],
                          f"neurons + b_O = ATTN L{i}[{k}]")
            coef = attn_neuron_coefficients(tr, i, t)
            W_O = np.asarray(model.stored(f"blocks.{i}.attn.W_O"), np.float64)
            near(coef[..., None] * W_O[:, :, None, :], sv, f"coefficient x O_h[e] L{i}")


def test_significance_and_frozen_nobias(case):
    """C and P of every attention neuron (all readouts, frozen-nobias included) against the slow
    readout; frozen-nobias layer scores against its definition; it equals frozen where the
    final norm has no bias (RMSNorm, fairseq's missing final norm)."""
    model, tr = case
    has_beta = model.cfg.final_norm and model.cfg.norm == "layernorm" and model.has("ln_final.b")
    kinds = ["frozen", "frozen-nobias", "raw", "lens"] if model.cfg.final_norm else ["frozen", "frozen-nobias"]
    for t, w in ((-1, int(np.argmax(tr.log_probs[-1]))), (3, model.cfg.d_vocab - 2)):
        tt = t % tr.T
        for kind in kinds:
            S = SlowNoBias(model, tr.final[tt], "frozen") if kind == "frozen-nobias" else Slow(model, tr.final[tt], kind)
            for i, L in enumerate(tr.layers):
                sv = slow_neurons(model, tr, i, tt)
                got = sig.attn_subvalue_significance(tr, i, w, t, "head_neuron_position", kind)
                cp = np.array([S.C(L.lin[tt], v, w) for v in sv.reshape(-1, model.cfg.d_model)])
                near(got["log_prob_increase"], cp[:, 0].reshape(sv.shape[:3]), f"{kind} neuron C L{i}")
                near(got["prob_increase"], cp[:, 1].reshape(sv.shape[:3]), f"{kind} neuron P L{i}")
            if kind == "frozen-nobias":
                for row, L in zip(sig.layer_significance(tr, w, t, kind), tr.layers):
                    near(row["attn"]["log_prob_increase"], S.C(L.lin[tt], L.attn[tt], w)[0], "nobias attn layer")
                    near(row["ffn"]["log_prob_increase"], S.C(L.lres[tt], L.ffn[tt], w)[0], "nobias ffn layer")
                R, F = tr.readout(tt, "frozen-nobias"), tr.readout(tt, "frozen")
                near(R.scores(tr.final[tt]), S.scores(tr.final[tt]), "nobias bs of the final state")
                if has_beta:                # the final state's readout is no longer the model's logits
                    assert np.abs(R.scores(tr.final[tt]) - F.scores(tr.final[tt])).max() > 1e-6
                else:
                    assert np.array_equal(R.scores(tr.final[tt]), F.scores(tr.final[tt]))


# --- exact top-K ------------------------------------------------------------------------------

def ranking(tr, w, t, readout, k):
    """(layer, head, dim, position, C, P) of the k best attention neurons from the per-layer scores."""
    rows = []
    for i in range(len(tr.layers)):
        s = sig.attn_subvalue_significance(tr, i, w, t, "head_neuron_position", readout)
        c, p = s["log_prob_increase"], s["prob_increase"]
        for (h, e, j), cc in np.ndenumerate(c):
            rows.append((-cc, i, h, e, j, p[h, e, j]))
    rows.sort()
    return [(i, h, e, j, -mc, pp) for mc, i, h, e, j, pp in rows[:k]]


def check_fast_equals_exhaustive(tr, w, t, readout, K, batch=64):
    fast = top_attn_neurons(tr, w, t, K, readout, batch=batch)
    slow = top_attn_neurons(tr, w, t, K, readout, exhaustive=True)
    want = ranking(tr, w, t, readout, K)
    for r in (fast, slow):
        got = list(zip(r["layer"], r["head"], r["dim"], r["position"]))
        assert got == [x[:4] for x in want], f"K={K} {readout}: {got} != {[x[:4] for x in want]}"
        near(r["log_prob_increase"], [x[4] for x in want], f"K={K} C")
        near(r["prob_increase"], [x[5] for x in want], f"K={K} P")
    cfg = tr.model.cfg
    total = len(tr.layers) * cfg.n_heads * cfg.d_head * (t % tr.T + 1)
    assert slow["scored"] == total and fast["scored"] <= total
    return fast["scored"], total


@st.composite
def cases(draw):
    family = draw(st.sampled_from(["gpt2", "llama", "fairseq_lm"]))
    sizes = draw_sizes(draw, st, family, d_heads=(2, 4), d_ff_max=16, vocab_max=60, n_ctx=16)
    T = draw(st.integers(1, 6))
    ids = draw(st.lists(st.integers(2, sizes["d_vocab"] - 1), min_size=T, max_size=T))     # no pad id 1
    t = draw(st.integers(-T, T - 1))
    target = draw(st.one_of(st.none(), st.integers(0, sizes["d_vocab"] - 1)))
    readout = draw(st.sampled_from(["frozen", "frozen-nobias", "raw"]))
    return family, sizes, draw(st.integers(0, 3)), ids, t, target, readout


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases(), st.sampled_from([1, 3, 64]))
def test_fast_top_k_equals_exhaustive(case_, batch):
    family, sizes, seed, ids, t, target, readout = case_
    model = random_model(family, seed=seed, **sizes)
    tr = refimpl.run(model, ids)
    w = int(np.argmax(tr.log_probs[t])) if target is None else target
    for K in (1, 5, 20):
        check_fast_equals_exhaustive(tr, w, t, readout, K, batch)


def test_bound_is_sound_and_prunes():
    """C <= (alpha v_e) (O_h[e] . g_i) for every neuron, and on a realistic shape the search
    scores a fraction of the neurons."""
    model = random_model("gpt2", seed=1, n_layers=3, d_model=32, n_heads=4, d_ff=128, d_vocab=300)
    pruned = 0
    for ids in ([2, 5, 7, 9, 11, 3], [17, 250, 4, 99, 180, 33, 71, 8]):
        tr = refimpl.run(model, ids)
        t = tr.T - 1
        for w in (int(np.argmax(tr.log_probs[t])), 250):
            for readout in ("frozen", "frozen-nobias", "raw"):
                R = tr.readout(t, readout)
                g = bounds.g_vector(R, np.array([L.lin[t] for L in tr.layers]), w)
                for i, L in enumerate(tr.layers):
                    up = attn_neuron_coefficients(tr, i, t) * (model.weight(f"blocks.{i}.attn.W_O") @ g[i])[..., None]
                    c = sig.attn_subvalue_significance(tr, i, w, t, "head_neuron_position", R)["log_prob_increase"]
                    assert np.all(c <= up + SLACK), f"L{i}: bound violated by {float((c - up).max()):.2e}"
                for K in (1, 10):
                    scored, total = check_fast_equals_exhaustive(tr, w, t, readout, K)
                    pruned += scored < total
    assert pruned > 0, "the bound never pruned the attention-neuron search"


def test_lens_scores_exhaustively():
    model = random_model("gpt2", seed=0, n_layers=2, d_vocab=30)
    tr = refimpl.run(model, [3, 4, 5])
    a = top_attn_neurons(tr, 0, -1, 5, "lens")
    b = top_attn_neurons(tr, 0, -1, 5, "lens", exhaustive=True)
    assert a["scored"] == b["scored"] and np.array_equal(a["head"], b["head"]) and np.array_equal(a["dim"], b["dim"])


# --- CLI --------------------------------------------------------------------------------------

def test_cli_subvalues_and_locate(capsys):
    model = random_model("llama", seed=2, n_layers=2, d_model=16, n_heads=4, n_kv_heads=2, d_ff=24, d_vocab=40)
    ids = ",".join(map(str, IDS))
    tr = refimpl.run(model, IDS)
    w = int(np.argmax(tr.log_probs[-1]))
    assert cli_main(["subvalues", "--model", model.path, "--ids", ids, "--layer", "1", "--kind", "attn",
                     "--by", "head-neuron", "--top", "all", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    want = sig.attn_subvalue_significance(tr, 1, w, -1, "head_neuron_position")["log_prob_increase"]
    assert out["by"] == "head_neuron_position" and out["n_subvalues"] == len(out["subvalues"]) == want.size
    got = np.full(want.shape, np.nan)
    for e in out["subvalues"]:
        got[e["head"], e["dim"], e["position"]] = e["log_prob_increase"]
        assert e["source_token"] == model.token_str(IDS[e["position"]])
    assert np.array_equal(got, want)
    assert [e["log_prob_increase"] for e in out["subvalues"]] == sorted(want.ravel(), reverse=True)
    results = []
    for extra in ([], ["--exhaustive"]):
        assert cli_main(["locate", "--model", model.path, "--ids", ids, "--top", "7", "--json", *extra]) == 0
        r = json.loads(capsys.readouterr().out)
        results.append([s for s in r["top_subvalues"] if s["kind"] == "attn_neuron"])
    fast, slow = results
    assert len(fast) == 7
    assert [(s["layer"], s["head"], s["dim"], s["position"]) for s in fast] == \
        [(s["layer"], s["head"], s["dim"], s["position"]) for s in slow]
    near([s["log_prob_increase"] for s in fast], [s["log_prob_increase"] for s in slow], "locate attn neurons")
    want = ranking(tr, w, -1, "frozen", 7)
    assert [(s["layer"], s["head"], s["dim"], s["position"]) for s in fast] == [x[:4] for x in want]
    d_head = model.cfg.d_head
    for s in fast:
        assert s["index"] == s["head"] * d_head + s["dim"]
        assert s["source_token"] == model.token_str(IDS[s["position"]])
    assert cli_main(["locate", "--model", model.path, "--ids", ids, "--top", "3"]) == 0
    assert "top attention neurons (layer, head, head dimension, source position)" in capsys.readouterr().out
