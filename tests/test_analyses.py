"""Every analysis against a DIRECT, SLOW transcription of its definition.

The references below are written from the paper's definitions and docs/format.md: they
read the model's stored weights (`model.stored`) and the trace's stored vectors
(Lin/Lres/Lout/ATTN/FFN, alpha, v, m) and never call refimpl's readout, decomposition
or analysis code. Everything is float64 on random models of the three families
(GPT-2; Llama with grouped-query attention; fairseq with one and two adaptive tail
bands). Tolerances: values agree to 1e-12 of max(1, magnitude); sums that are exact
identities hold to 1e-12 of the magnitude of their terms.
"""
import json
import math

import numpy as np
import pytest

import refimpl
from refimpl import baseline, compare, subkeys, tracing, vocab
from refimpl import significance as sig
from refimpl.errors import RefimplError
from refimpl.locate import locate
from tests.helpers import random_model

TOL = 1e-12

MODELS = {
    "gpt2": ("gpt2", dict(n_layers=2, d_model=16, n_heads=4, d_ff=24, d_vocab=40)),
    "llama-gqa": ("llama", dict(n_layers=2, d_model=16, n_heads=4, n_kv_heads=2, d_ff=24, d_vocab=40)),
    "llama-mqa": ("llama", dict(n_layers=1, d_model=16, n_heads=4, n_kv_heads=1, d_ff=20, d_vocab=36)),
    "fairseq-2tails": ("fairseq_lm", dict(n_layers=2, d_model=16, n_heads=2, d_ff=24, d_vocab=40, cutoffs=[10, 25])),
    "fairseq-1tail": ("fairseq_lm", dict(n_layers=3, d_model=16, n_heads=4, d_ff=20, d_vocab=32, cutoffs=[12])),
}
IDS = [2, 7, 3, 15, 29, 11, 5]          # no id 1 (fairseq's padding index)


def near(got, want, what="", scale=None):
    """|got - want| <= 1e-12 * max(1, |want|) (or * scale)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    s = max(1.0, float(np.abs(want).max(initial=0.0))) if scale is None else scale
    err = float(np.abs(got - want).max(initial=0.0))
    assert err <= TOL * s, f"{what}: error {err:.3e} > {TOL:.0e} * {s:.3g}"


def exact_sum(terms, total, what=""):
    """An identity: sum(terms) == total up to 1e-12 of the terms' magnitude."""
    terms = np.asarray(terms, np.float64)
    s = max(1.0, float(np.abs(terms).sum()), abs(float(total)))
    err = abs(float(terms.sum()) - float(total))
    assert err <= TOL * s, f"{what}: sum off by {err:.3e} (scale {s:.3g})"


# --- the slow reference ---------------------------------------------------------------------

def log_softmax(z):
    m = max(z)
    return np.array([zi - m for zi in z]) - math.log(sum(math.exp(zi - m) for zi in z))


class Slow:
    """Readout p(w | x) and bs-values of the model at one analysed position, from the definitions.

    frozen: y = gamma (x - mean x) / sigma_f + beta (LayerNorm) or gamma x / s_f (RMSNorm),
            sigma_f, s_f the statistics of the final residual x_f at the analysed position
    raw:    y = x (no final norm)
    lens:   y = final norm of x with x's own statistics
    logits = y @ W_U (+ b_U); fairseq: the two-level adaptive softmax (no final norm there)."""

    def __init__(self, model, x_f, kind="frozen"):
        self.c = c = model.cfg
        self.model, self.kind = model, kind
        self.d = c.d_model
        self.norm = c.final_norm and kind != "raw"
        if self.norm:
            self.gamma = self.W("ln_final.w")
            self.beta = self.W("ln_final.b") if model.has("ln_final.b") else np.zeros(self.d)
            self.scale = self.stats(np.asarray(x_f, np.float64))[1]
        self.bU = self.W("unembed.b_U") if c.unembedding == "linear" and model.has("unembed.b_U") else 0.0

    def W(self, name):
        return np.asarray(self.model.stored(name), np.float64)

    def stats(self, x):
        d, eps = self.d, self.c.norm_eps
        if self.c.norm == "layernorm":
            mu = sum(x) / d
            return mu, math.sqrt(sum((xi - mu) ** 2 for xi in x) / d + eps)
        return 0.0, math.sqrt(sum(xi * xi for xi in x) / d + eps)

    def y(self, x, offset):
        """The vector the unembedding sees (with beta when `offset`)."""
        x = np.asarray(x, np.float64)
        if not self.norm:
            return x
        mu, own = self.stats(x)
        y = self.gamma * (x - mu) / (own if self.kind == "lens" else self.scale)
        return y + self.beta if offset and self.c.norm == "layernorm" else y

    def adaptive(self, y):
        def band(b):
            p = f"unembed.adaptive.{b}.W_proj"
            yy = y @ self.W(p) if self.model.has(p) else y
            return yy @ self.W(f"unembed.adaptive.{b}.W_U")
        return band(0), y @ self.W("unembed.adaptive.head.W_cls"), {b: band(b) for b in range(1, len(self.c.bands))}

    def flat(self, y):
        """E y without bias: y @ W_U, or the flattened two-level logits (docs/format.md)."""
        if self.c.unembedding == "linear":
            return y @ self.W("unembed.W_U")
        z0, zcls, zc = self.adaptive(y)
        return np.concatenate([z0] + [zcls[b - 1] + zc[b] for b in range(1, len(self.c.bands))])

    def scores(self, x):
        """bs(x) of a residual state (offset included)."""
        return self.flat(self.y(x, True)) + self.bU

    def bs(self, v):
        """bs-values of a vector: the linear part A(v) (the logit lens of v for `lens`)."""
        if self.kind == "lens":
            return self.scores(v)
        return self.flat(self.y(v, False))

    def log_probs(self, x):
        y = self.y(x, True)
        if self.c.unembedding == "linear":
            return log_softmax(y @ self.W("unembed.W_U") + self.bU)
        z0, zcls, zc = self.adaptive(y)
        n0 = len(z0)
        head = log_softmax(np.concatenate([z0, zcls]))
        out = [head[:n0]] + [log_softmax(zc[b]) + head[n0 + b - 1] for b in range(1, len(self.c.bands))]
        return np.concatenate(out)

    def C(self, base, v, w):
        """(log p(w | base + v) - log p(w | base), p(w | base + v) - p(w | base))."""
        a, b = self.log_probs(np.asarray(base) + v)[w], self.log_probs(base)[w]
        return a - b, math.exp(a) - math.exp(b)


def slow_attn_subvalues(model, tr, i, t):
    """[H, t+1, d]: alpha_h[t, j] * v[j, h // (H / H_kv)] @ W_O[h]."""
    c, L = model.cfg, tr.layers[i]
    W_O = np.asarray(model.stored(f"blocks.{i}.attn.W_O"), np.float64)
    out = np.zeros((c.n_heads, t + 1, c.d_model))
    for h in range(c.n_heads):
        g = h // (c.n_heads // c.n_kv_heads)
        for j in range(t + 1):
            out[h, j] = L.pattern[h, t, j] * (L.v[j, g] @ W_O[h])
    return out


def slow_attn_bias(model, i):
    n = f"blocks.{i}.attn.b_O"
    return np.asarray(model.stored(n), np.float64) if model.has(n) else np.zeros(model.cfg.d_model)


def slow_ffn_bias(model, i):
    n = f"blocks.{i}.mlp.b_out"
    return np.asarray(model.stored(n), np.float64) if model.has(n) else np.zeros(model.cfg.d_model)


def slow_ffn_subvalues(model, tr, i, t):
    """[F, d]: m[t, k] * W_out[k]."""
    W_out = np.asarray(model.stored(f"blocks.{i}.mlp.W_out"), np.float64)
    return np.array([tr.layers[i].m[t, k] * W_out[k] for k in range(model.cfg.d_ff)])


def slow_order(s, largest=True):
    """Token ids sorted by score (largest or smallest first), ties: lower id first."""
    return sorted(range(len(s)), key=lambda u: (-s[u] if largest else s[u], u))


def slow_rank(s, w):
    return slow_order(s).index(int(w))


def slow_norm_stats(model, x):
    c = model.cfg
    if c.norm == "layernorm":
        mu = sum(x) / c.d_model
        return mu, math.sqrt(sum((xi - mu) ** 2 for xi in x) / c.d_model + c.norm_eps)
    return 0.0, math.sqrt(sum(xi * xi for xi in x) / c.d_model + c.norm_eps)


# --- fixtures ---------------------------------------------------------------------------------

@pytest.fixture(params=sorted(MODELS), scope="module")
def case(request):
    family, sizes = MODELS[request.param]
    model = random_model(family, seed=11, **sizes)
    tr = refimpl.run(model, IDS)
    return model, tr


def points(model, tr):
    """(t, w) pairs: last position given as -1 and a middle one; the top-1 target and a
    low-probability one in the last band (a tail band for fairseq)."""
    out = []
    for t in (-1, 3):
        tt = t % tr.T
        out += [(t, int(np.argmax(tr.log_probs[tt]))), (t, model.cfg.d_vocab - 2)]
    return out


def readouts(model):
    """Readouts that differ for this model (fairseq has no final norm: frozen == raw == lens)."""
    return ["frozen", "raw", "lens"] if model.cfg.final_norm else ["frozen"]


# --- 1. layer significance --------------------------------------------------------------------

def test_layer_significance(case):
    model, tr = case
    for kind in ("frozen", "raw", "lens"):
        for t, w in points(model, tr):
            tt = t % tr.T
            S = Slow(model, tr.final[tt], kind)
            got = sig.layer_significance(tr, w, t, kind)
            assert [g["layer"] for g in got] == list(range(model.cfg.n_layers))
            total = []
            for i, L in enumerate(tr.layers):
                ca, pa = S.C(L.lin[tt], L.attn[tt], w)
                cf, pf = S.C(L.lres[tt], L.ffn[tt], w)
                near(got[i]["attn"]["log_prob_increase"], ca, f"{kind} C(ATTN_{i})")
                near(got[i]["attn"]["prob_increase"], pa, f"{kind} P(ATTN_{i})")
                near(got[i]["ffn"]["log_prob_increase"], cf, f"{kind} C(FFN_{i})")
                near(got[i]["ffn"]["prob_increase"], pf, f"{kind} P(FFN_{i})")
                total += [got[i]["attn"]["log_prob_increase"], got[i]["ffn"]["log_prob_increase"]]
            # telescoping (every readout: each base is the previous state)
            exact_sum(total, S.log_probs(tr.final[tt])[w] - S.log_probs(tr.Lin0[tt])[w], f"{kind} telescoping")
            if kind != "raw":        # frozen and lens both reproduce the model at its own final state
                near(S.log_probs(tr.final[tt]), tr.log_probs[tt], f"{kind} readout of final = model")


# --- 2. subvalue significance -----------------------------------------------------------------

def test_attn_subvalue_significance(case):
    model, tr = case
    for kind in readouts(model):
        for t, w in points(model, tr):
            tt = t % tr.T
            S = Slow(model, tr.final[tt], kind)
            all_c, all_p = sig.attn_position_significance_all_layers(tr, w, t, kind)   # [L, t+1], one batch
            for i, L in enumerate(tr.layers):
                hp = slow_attn_subvalues(model, tr, i, tt)
                base = L.lin[tt]
                cp = np.array([S.C(base, v, w) for v in hp.sum(0)])
                near(all_c[i], cp[:, 0], f"{kind} all-layers attn C L{i}")
                near(all_p[i], cp[:, 1], f"{kind} all-layers attn P L{i}")
                want = {"head_position": hp, "position": hp.sum(0), "head": hp.sum(1)}
                for by, sv in want.items():
                    got = sig.attn_subvalue_significance(tr, i, w, t, by, kind)
                    flat = sv.reshape(-1, model.cfg.d_model)
                    cp = np.array([S.C(base, v, w) for v in flat]).reshape(sv.shape[:-1] + (2,))
                    near(got["log_prob_increase"], cp[..., 0], f"{kind} attn C by {by} L{i}")
                    near(got["prob_increase"], cp[..., 1], f"{kind} attn P by {by} L{i}")
                    near(got["bias"], S.C(base, slow_attn_bias(model, i), w), f"{kind} attn bias L{i}")


def slow_ffn_C(model, tr, S, i, tt, w):
    base = tr.layers[i].lres[tt]
    return np.array([S.C(base, v, w) for v in slow_ffn_subvalues(model, tr, i, tt)])     # [F, 2]


def test_ffn_subvalue_significance_and_summary(case):
    model, tr = case
    for kind in readouts(model):
        for t, w in points(model, tr):
            tt = t % tr.T
            S = Slow(model, tr.final[tt], kind)
            for i in range(model.cfg.n_layers):
                cp = slow_ffn_C(model, tr, S, i, tt, w)
                c, p = sig.ffn_subvalue_significance(tr, i, w, t, readout=kind)
                near(c, cp[:, 0], f"{kind} ffn C L{i}")
                near(p, cp[:, 1], f"{kind} ffn P L{i}")
                sub = [5, 0, 3]
                c2, p2 = sig.ffn_subvalue_significance(tr, i, w, t, neurons=sub, readout=kind, chunk=2)
                near(c2, cp[sub, 0], f"{kind} ffn C subset L{i}")
                near(p2, cp[sub, 1], f"{kind} ffn P subset L{i}")
                # Fig. 6-7 summary from a slow loop: helpful C > tau, unhelpful C < -tau, else negligible
                s = sig.ffn_layer_summary(tr, i, w, t, readout=kind)
                tau = s["threshold"]
                assert tau == 1e-6
                L = tr.layers[i]
                act = int(((L.gate_pre[tt] if L.gate_pre is not None else L.m[tt]) > 0).sum())
                help_ = unhelp = negl = 0
                helpful, unhelpful = [], []
                for k in range(model.cfg.d_ff):
                    if cp[k, 0] > tau:
                        help_ += 1
                        helpful.append(cp[k, 0])
                    elif cp[k, 0] < -tau:
                        unhelp += 1
                        unhelpful.append(-cp[k, 0])
                    else:
                        negl += 1
                helpful.sort(reverse=True)
                unhelpful.sort(reverse=True)
                share = sum(helpful[:10]) / sum(helpful) if helpful else 0.0
                share_u = sum(unhelpful[:10]) / sum(unhelpful) if unhelpful else 0.0
                assert (s["layer"], s["activated"], s["helpful"], s["unhelpful"], s["negligible"]) == \
                    (i, act, help_, unhelp, negl), f"{kind} L{i} summary {s} != {(act, help_, unhelp, negl)}"
                near(s["top10_share"], share, f"{kind} top-10 share L{i}")
                near(s["top10_share_unhelpful"], share_u, f"{kind} top-10 share (unhelpful) L{i}")


def test_zero_subvalue_scores_exactly_zero():
    """C(0) = 0 by definition: ReLU neurons with m = 0 are neither helpful nor unhelpful."""
    model = random_model("fairseq_lm", seed=1, n_layers=3, d_model=32, n_heads=4, d_ff=128, d_vocab=300,
                         cutoffs=[60, 150])
    tr = refimpl.run(model, [2, 5, 7, 9, 11, 3])
    w = int(np.argmax(tr.log_probs[-1]))
    for i in range(model.cfg.n_layers):
        zero = tr.layers[i].m[-1] == 0
        assert zero.any()
        c, p = sig.ffn_subvalue_significance(tr, i, w, -1)
        assert np.all(c[zero] == 0) and np.all(p[zero] == 0)
        s = sig.ffn_layer_summary(tr, i, w, -1)
        tau = s["threshold"]
        assert s["helpful"] + s["unhelpful"] == int((np.abs(c) > tau).sum())
        assert s["negligible"] >= int(zero.sum()) and s["helpful"] + s["unhelpful"] + s["negligible"] == model.cfg.d_ff


# --- 3. vocabulary view -----------------------------------------------------------------------

class _Fixed:
    """A stand-in readout whose bs-values are given (to exercise ties)."""

    def __init__(self, s):
        self.s = s

    def bs(self, v):
        return self.s


def check_view(model, view, s, w, k):
    top, bottom = slow_order(s)[:k], slow_order(s, largest=False)[:k]
    assert [x["id"] for x in view["top"]] == top
    assert [x["id"] for x in view["bottom"]] == bottom
    assert [x["token"] for x in view["top"]] == [model.token_str(u) for u in top]
    near([x["bs"] for x in view["top"]], [s[u] for u in top], "top bs")
    if w is not None:
        assert view["target_rank"] == slow_rank(s, w)
        near(view["target_bs"], s[w], "target bs")


def test_vocab_view(case):
    model, tr = case
    for kind in readouts(model):
        for t, w in points(model, tr):
            tt = t % tr.T
            S = Slow(model, tr.final[tt], kind)
            R = tr.readout(tt, kind)
            for i, L in enumerate(tr.layers):
                hp = slow_attn_subvalues(model, tr, i, tt)
                vecs = [L.attn[tt], L.ffn[tt], hp.sum(0)[0], hp.sum(0)[-1], hp[0, -1]]
                for v in vecs:
                    s = S.bs(v)
                    near(R.bs(v), s, f"{kind} bs")
                    check_view(model, vocab.vocab_view(model, R, v, w, k=7), s, w, 7)
                W_out = np.asarray(model.stored(f"blocks.{i}.mlp.W_out"), np.float64)
                for k in (0, 4, model.cfg.d_ff - 1):
                    view = vocab.ffn_subvalue_view(tr, i, k, t, w, R, k=5)
                    check_view(model, view, S.bs(tr.layers[i].m[tt, k] * W_out[k]), w, 5)
                    assert view["coefficient"] == tr.layers[i].m[tt, k]
                    assert view["target_rank_in_fc2"] == slow_rank(S.bs(W_out[k]), w)


def test_vocab_view_ties():
    """Rank = number of tokens with larger bs, ties broken by lower id first."""
    model = random_model("gpt2", seed=11, **MODELS["gpt2"][1])
    tr = refimpl.run(model, IDS)
    R = tr.readout()
    z = vocab.vocab_view(model, R, np.zeros(model.cfg.d_model), 17, k=6)        # all bs-values 0
    assert [x["id"] for x in z["top"]] == list(range(6)) == [x["id"] for x in z["bottom"]]
    assert z["target_rank"] == 17
    rng = np.random.default_rng(0)
    for _ in range(20):
        s = rng.integers(0, 4, model.cfg.d_vocab).astype(np.float64)
        for w in (0, 7, model.cfg.d_vocab - 1):
            check_view(model, vocab.vocab_view(model, _Fixed(s), None, w, k=12), s, w, 12)
            assert refimpl.rank_of(s, w) == slow_rank(s, w)


# --- 4. additivity and F(l) -------------------------------------------------------------------

def test_additivity(case):
    model, tr = case
    for kind in readouts(model):
        for t, w in points(model, tr):
            tt = t % tr.T
            S = Slow(model, tr.final[tt], kind)
            for i, L in enumerate(tr.layers):
                for what, base, sv in (("ffn", L.lres[tt], slow_ffn_subvalues(model, tr, i, tt)),
                                       ("attn", L.lin[tt], slow_attn_subvalues(model, tr, i, tt).sum(0))):
                    cp = np.array([S.C(base, v, w) for v in sv])
                    helpful = sorted((k for k in range(len(sv)) if cp[k, 0] > 0), key=lambda k: (-cp[k, 0], k))
                    for k_max in (None, 3):
                        idx = helpful[:k_max]
                        got = sig.additivity(tr, i, w, t, what, k_max, kind)
                        assert list(got["indices"]) == idx, f"{kind} {what} L{i} order"
                        acc, sums_c, sums_p, of_sum_c, of_sum_p = np.zeros(model.cfg.d_model), [], [], [], []
                        for n, k in enumerate(idx):
                            acc = acc + sv[k]
                            sums_c.append(sum(cp[j, 0] for j in idx[:n + 1]))
                            sums_p.append(sum(cp[j, 1] for j in idx[:n + 1]))
                            c_, p_ = S.C(base, acc, w)
                            of_sum_c.append(c_)
                            of_sum_p.append(p_)
                        near(got["sum_of_log_prob_increases"], np.array(sums_c), "sum of C")
                        near(got["sum_of_prob_increases"], np.array(sums_p), "sum of P")
                        near(got["log_prob_increase_of_sum"], np.array(of_sum_c), "C of sum")
                        near(got["prob_increase_of_sum"], np.array(of_sum_p), "P of sum")
    with pytest.raises(RefimplError):
        sig.additivity(tr, 0, 0, -1, "nope")


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa"])
def test_f_curves(name):
    """F(l): softmax with w's logit alone raised by l, recomputed directly (plain softmax models)."""
    family, sizes = MODELS[name]
    model = random_model(family, seed=11, **sizes)
    tr = refimpl.run(model, IDS)
    ls = np.linspace(-12, 12, 25)
    for kind in ("frozen", "raw"):
        for t, w in points(model, tr):
            tt = t % tr.T
            S, R = Slow(model, tr.final[tt], kind), tr.readout(tt, kind)
            for base in [tr.Lin0[tt], tr.layers[0].lres[tt], tr.final[tt]]:
                z = S.scores(base)
                lp0 = log_softmax(z)[w]
                want_c, want_p = [], []
                for l in ls:
                    zl = z.copy()
                    zl[w] += l
                    lp = log_softmax(zl)[w]
                    want_c.append(lp - lp0)
                    want_p.append(math.exp(lp) - math.exp(lp0))
                got = sig.f_curves(R, base, w, ls)
                near(got["l"], ls)
                near(got["log_prob_increase"], want_c, f"{kind} F_logp")
                near(got["prob_increase"], want_p, f"{kind} F_p")


def test_f_curves_confident_base():
    """A base where p(w) is close to 1: log(1 - p(w)) must not be taken from p(w) itself."""
    model = random_model("gpt2", seed=11, **MODELS["gpt2"][1])
    tr = refimpl.run(model, IDS)
    R, S = tr.readout(-1, "raw"), Slow(model, tr.final[-1], "raw")
    w = int(np.argmax(S.scores(tr.final[-1])))
    ls = np.array([-20.0, -5.0, 0.0, 5.0])
    for scale in (10.0, 40.0):
        base = scale * tr.final[-1]
        z = S.scores(base)
        lp0 = log_softmax(z)[w]
        want = []
        for l in ls:
            zl = z.copy()
            zl[w] += l
            want.append(log_softmax(zl)[w] - lp0)
        got = sig.f_curves(R, base, w, ls)
        near(got["log_prob_increase"], want, f"F_logp at p(w) = 1 - {-math.expm1(lp0):.1e}")


# --- 5. subkeys --------------------------------------------------------------------------------

def test_subkeys(case):
    model, tr = case
    c = model.cfg
    W = lambda n: np.asarray(model.stored(n), np.float64)
    for i in range(c.n_layers):
        p = f"blocks.{i}."
        gamma = W(p + "ln2.w")
        beta = W(p + "ln2.b") if model.has(p + "ln2.b") else np.zeros(c.d_model)
        for which in (["gate", "in"] if c.gated_ffn else ["in"]):
            Wm = W(p + ("mlp.W_in" if which == "in" else "mlp.W_gate"))
            b_in = W(p + "mlp.b_in") if which == "in" and model.has(p + "mlp.b_in") else np.zeros(c.d_ff)
            all_sk = subkeys.subkey(model, i, None, which)
            for tt in range(tr.T):
                x = tr.layers[i].lres[tt]
                mu, sigma = slow_norm_stats(model, x)
                fwd = (tr.layers[i].pre if which == "in" else tr.layers[i].gate_pre)[tt]
                terms = subkeys.preactivation(tr, i, tt, None, which)
                near(terms["sigma"], sigma, "sigma")
                near(terms["mu"], mu, "mu")
                hs = []
                for k in range(c.d_ff):
                    K = gamma * Wm[:, k]
                    lam = sum(K)
                    B = beta @ Wm[:, k] + b_in[k]
                    h = x @ K / sigma - mu * lam / sigma + B
                    hs.append(h)
                    near(h, fwd[k], f"Eq. 23 slow vs forward ({which}) L{i} t{tt} k{k}")
                    if tt == 0:
                        sk = subkeys.subkey(model, i, k, which)
                        near(sk.K, K, "K")
                        near(sk.lam, lam, "lambda")
                        near(sk.B, B, "B")
                        near(all_sk.K[:, k], K, "K (all)")
                near(terms["h"], np.array(hs), f"preactivation ({which})")
                near(terms["h"], fwd, f"preactivation vs forward ({which})")
                # level 1: contributions of earlier vectors + remainder
                for k in (0, c.d_ff // 2, c.d_ff - 1):
                    K = gamma * Wm[:, k]
                    srcs = [("emb.token", tr.embed_tok[tt])]
                    if tr.embed_pos is not None:
                        srcs.append(("emb.position", tr.embed_pos[tt]))
                    for j in range(i):
                        srcs += [(f"attn.{j}", tr.layers[j].attn[tt]), (f"ffn.{j}", tr.layers[j].ffn[tt])]
                    srcs.append((f"attn.{i}", tr.layers[i].attn[tt]))
                    want = [(n, u @ K / sigma) for n, u in srcs]
                    want.append(("remainder", -mu * sum(K) / sigma + beta @ Wm[:, k] + b_in[k]))
                    got = subkeys.preactivation_contributions(tr, i, tt, k, which)
                    assert [n for n, _ in got] == [n for n, _ in want]
                    near([v for _, v in got], [v for _, v in want], "contributions")
                    exact_sum([v for _, v in got], fwd[k], f"contributions sum to h ({which}) L{i} k{k}")
                    lvl1 = tracing.trace_activation(tr, i, k, tt, which)
                    assert lvl1["pre_activation"] == fwd[k]
                    assert [(x["source"], x["value"]) for x in lvl1["contributions"]] == got


# --- 6. activation tracing, level 2 -------------------------------------------------------------

def test_trace_source(case):
    model, tr = case
    c = model.cfg
    W = lambda n: np.asarray(model.stored(n), np.float64)
    for i in range(c.n_layers):
        gamma = W(f"blocks.{i}.ln2.w")
        for which in (["gate", "in"] if c.gated_ffn else ["in"]):
            Wm = W(f"blocks.{i}.mlp." + ("W_in" if which == "in" else "W_gate"))
            for t in (-1, 2):
                tt = t % tr.T
                _, sigma = slow_norm_stats(model, tr.layers[i].lres[tt])
                for k in (1, c.d_ff - 2):
                    K = gamma * Wm[:, k]
                    lvl1 = {x["source"]: x["value"] for x in tracing.trace_activation(tr, i, k, t, which)["contributions"]}
                    for src in [s for s in lvl1 if s != "remainder"]:
                        kind, _, j = src.partition(".")
                        if kind == "emb":
                            cases = {"position": [tr.embed_tok[tt] if j == "token" else tr.embed_pos[tt]]}
                        elif kind == "attn":
                            hp = slow_attn_subvalues(model, tr, int(j), tt)
                            b = slow_attn_bias(model, int(j))
                            cases = {"position": list(hp.sum(0)) + [b], "head": list(hp.sum(1)) + [b],
                                     "head_position": list(hp.reshape(-1, c.d_model)) + [b]}
                        else:
                            cases = {"position": list(slow_ffn_subvalues(model, tr, int(j), tt)) + [slow_ffn_bias(model, int(j))]}
                        for by, svs in cases.items():
                            got = tracing.trace_source(tr, i, k, src, t, which, by)
                            want = [u @ K / sigma for u in svs]
                            assert len(got["labels"]) == len(want)
                            near(got["values"], want, f"level 2 {src} by {by}")
                            exact_sum(got["values"], lvl1[src], f"level 2 {src} by {by} sums to level 1")
                            near(got["total"], lvl1[src], "total")
                    later = [f"ffn.{i}"] + ([f"attn.{i + 1}", f"ffn.{i + 1}"] if i + 1 < c.n_layers else [])
                    for src in later:
                        with pytest.raises(RefimplError):
                            tracing.trace_source(tr, i, k, src, t, which)


# --- 7. token comparison ---------------------------------------------------------------------

def test_token_comparison(case):
    model, tr = case
    for kind in (["frozen", "raw"] if model.cfg.final_norm else ["frozen"]):
        for t, w in points(model, tr):
            tt = t % tr.T
            S = Slow(model, tr.final[tt], kind)
            toks = [w, 0, 5, model.cfg.d_vocab - 1]
            got = compare.bs_trajectory(tr, toks, t, kind)
            states = [("Lin_0", tr.Lin0[tt])]
            for i, L in enumerate(tr.layers):
                states += [(f"Lres_{i}", L.lres[tt]), (f"Lout_{i}", L.lout[tt])]
            assert got["states"] == [n for n, _ in states]
            near(got["bs"], np.array([S.scores(x)[toks] for _, x in states]), f"{kind} trajectory")
            a, b = w, 5 if w != 5 else 6
            d = compare.bs_difference_changes(tr, a, b, t, kind)
            start, end = S.scores(tr.Lin0[tt]), S.scores(tr.final[tt])
            near(d["start"], start[a] - start[b], "start")
            near(d["end"], end[a] - end[b], "end")
            changes = []
            for i, L in enumerate(tr.layers):
                ua, uf = S.bs(L.attn[tt]), S.bs(L.ffn[tt])
                near(d["layers"][i]["attn"], ua[a] - ua[b], "attn change")
                near(d["layers"][i]["ffn"], uf[a] - uf[b], "ffn change")
                changes += [d["layers"][i]["attn"], d["layers"][i]["ffn"]]
            exact_sum(changes, d["end"] - d["start"], f"{kind} changes sum to end - start")


# --- 8. baseline -------------------------------------------------------------------------------

def test_baseline(case):
    model, tr = case
    for kind in readouts(model):
        for t, w in points(model, tr):
            tt = t % tr.T
            S = Slow(model, tr.final[tt], kind)
            for signed in (False, True):      # Table 4's |m| x ||fc2|| (default), m x ||fc2|| on request
                rows = []
                for i in range(model.cfg.n_layers):
                    W_out = np.asarray(model.stored(f"blocks.{i}.mlp.W_out"), np.float64)
                    m = tr.layers[i].m[tt]
                    norm = [math.sqrt(sum(x * x for x in W_out[k])) for k in range(model.cfg.d_ff)]
                    g = [(m[k] if signed else abs(m[k])) * norm[k] for k in range(model.cfg.d_ff)]
                    near(baseline.geva_scores(tr, i, t, signed=signed), g, "geva")
                    cs = slow_ffn_C(model, tr, S, i, tt, w)[:, 0]
                    rows += [(i, k, cs[k], g[k], m[k] * W_out[k], m[k], norm[k]) for k in range(model.cfg.d_ff)]
                for layers in (None, [model.cfg.n_layers - 1]):
                    sel = [r for r in rows if layers is None or r[0] in layers]
                    got = baseline.compare_rankings(tr, w, t, k=6, readout=kind, layers=layers, signed=signed)
                    for key, col in (("by_log_prob_increase", 2), ("by_coef_x_norm", 3)):
                        want = sorted(sel, key=lambda r: (-r[col], r[0], r[1]))[:6]
                        assert [(x["layer"], x["neuron"]) for x in got[key]] == [(r[0], r[1]) for r in want], key
                        near([x["log_prob_increase"] for x in got[key]], [r[2] for r in want], key)
                        near([x["coef_x_norm"] for x in got[key]], [r[3] for r in want], key)
                        near([x["coefficient"] for x in got[key]], [r[5] for r in want], key)
                        near([x["fc2_norm"] for x in got[key]], [r[6] for r in want], key)
                        assert [x["target_rank"] for x in got[key]] == [slow_rank(S.bs(r[4]), w) for r in want]


# --- 9. locate end to end --------------------------------------------------------------------

LAYER_KEYS = {"layer", "attn", "ffn"}
SUB_KEYS = {"kind", "layer", "index", "log_prob_increase", "prob_increase", "target_rank", "top_tokens"}


def check_locate(model, tr, r, t, w, kind, top):
    c = model.cfg
    tt = t % tr.T
    S = Slow(model, tr.final[tt], kind)
    for key in ("ids", "tokens", "position", "target", "readout", "layers", "top_subvalues"):
        assert key in r, key
    assert r["ids"] == [int(i) for i in tr.ids] and r["tokens"] == [model.token_str(i) for i in tr.ids]
    assert r["position"] == tt and r["readout"] == kind
    model_lp = Slow(model, tr.final[tt], "lens").log_probs(tr.final[tt])     # the model's own output
    tg = r["target"]
    assert set(tg) >= {"id", "token", "log_prob", "prob", "rank"}
    assert tg["id"] == w and tg["token"] == model.token_str(w)
    near(tg["log_prob"], model_lp[w], "target log p")
    near(tg["prob"], math.exp(model_lp[w]), "target p")
    assert tg["rank"] == slow_rank(model_lp, w)
    # layers
    assert len(r["layers"]) == c.n_layers
    for i, (row, L) in enumerate(zip(r["layers"], tr.layers)):
        assert set(row) >= LAYER_KEYS and row["layer"] == i
        for part, base, v in (("attn", L.lin[tt], L.attn[tt]), ("ffn", L.lres[tt], L.ffn[tt])):
            assert set(row[part]) >= {"log_prob_increase", "prob_increase"}
            cc, pp = S.C(base, v, w)
            near(row[part]["log_prob_increase"], cc, f"locate {part} L{i}")
            near(row[part]["prob_increase"], pp, f"locate {part} P L{i}")
    # top subvalues: exhaustive slow ranking over all layers (and positions)
    attn_all, ffn_all = [], []
    for i, L in enumerate(tr.layers):
        for j, v in enumerate(slow_attn_subvalues(model, tr, i, tt).sum(0)):
            attn_all.append((*S.C(L.lin[tt], v, w), i, j, v))
        for k, v in enumerate(slow_ffn_subvalues(model, tr, i, tt)):
            ffn_all.append((*S.C(L.lres[tt], v, w), i, k, v))
    subs = r["top_subvalues"]
    for s in subs:
        assert set(s) >= SUB_KEYS
    for kind_, allv in (("attn", attn_all), ("ffn", ffn_all)):
        want = sorted(allv, key=lambda x: (-x[0], x[2], x[3]))[:top]
        got = [s for s in subs if s["kind"] == kind_]
        assert [(s["layer"], s["index"]) for s in got] == [(x[2], x[3]) for x in want], kind_
        near([s["log_prob_increase"] for s in got], [x[0] for x in want], f"{kind_} top C")
        near([s["prob_increase"] for s in got], [x[1] for x in want], f"{kind_} top P")
        for s, x in zip(got, want):
            bs = S.bs(x[4])
            assert s["target_rank"] == slow_rank(bs, w)
            assert s["top_tokens"] == [model.token_str(u) for u in slow_order(bs)[:10]]
            if kind_ == "ffn":
                W_out = np.asarray(model.stored(f"blocks.{x[2]}.mlp.W_out"), np.float64)
                assert s["coefficient"] == tr.layers[x[2]].m[tt, x[3]]
                assert s["target_rank_in_fc2"] == slow_rank(S.bs(W_out[x[3]]), w)
            else:
                assert s["source_token"] == model.token_str(tr.ids[x[3]])
    # counts
    for i, cnt in enumerate(r.get("ffn_counts", [])):
        cs = np.array([x[0] for x in ffn_all if x[2] == i])
        L, tau = tr.layers[i], cnt["threshold"]
        act = (L.gate_pre[tt] if L.gate_pre is not None else L.m[tt]) > 0
        assert (cnt["activated"], cnt["helpful"], cnt["unhelpful"], cnt["negligible"]) == \
            (int(act.sum()), int((cs > tau).sum()), int((cs < -tau).sum()), int((np.abs(cs) <= tau).sum())), \
            f"counts L{i}"
        h = sorted(cs[cs > tau], reverse=True)
        share = sum(h[:10]) / sum(h) if h else 0.0
        assert cnt["share"] == "exact"
        assert abs(cnt["top10_share"] - share) <= TOL, f"top-10 share {cnt['top10_share']} != {share}"
    # activation trace: level-1 contributions sum to the pre-activation
    for a in r.get("activation_trace", []):
        exact_sum([x["value"] for x in a["contributions"]], a["pre_activation"], "activation trace")
    json.loads(json.dumps(r))


def test_locate(case):
    model, tr = case
    for kind in readouts(model):
        for position, exhaustive, top in ((None, False, 5), (3, True, 4), (None, False, 1)):
            r = locate(model, IDS, position=position, top=top, readout=kind, exhaustive=exhaustive)
            t = tr.T - 1 if position is None else position
            w = int(np.argmax(tr.log_probs[t]))
            check_locate(model, tr, r, t, w, kind, top)
    r = locate(model, IDS, target_id=model.cfg.d_vocab - 2, top=3)
    check_locate(model, tr, r, -1, model.cfg.d_vocab - 2, "frozen", 3)


def test_locate_text_prompt_and_target(case):
    model, _ = case
    prompt = "t7 t3 t15 t29"
    tr = refimpl.run(model, prompt)
    assert list(tr.ids) == list(model.cfg.prepend_ids) + [7, 3, 15, 29]
    r = locate(model, prompt, target="t9", top=3)
    assert r["target"]["id"] == 9 and r["target"]["token"] == "t9"
    check_locate(model, tr, r, -1, 9, "frozen", 3)
    with pytest.raises(RefimplError) as e:
        locate(model, prompt, target="t9 t12")
    msg = str(e.value)
    assert "single token" in msg and "'t9'(9)" in msg and "'t12'(12)" in msg, msg
    with pytest.raises(RefimplError):
        locate(model, prompt, target="")
    with pytest.raises(RefimplError):
        locate(model, prompt, target_id=model.cfg.d_vocab)
    with pytest.raises(RefimplError):
        locate(model, prompt, position=99)


def test_lens_state_unchanged_scores_exactly_zero():
    """With the (non-linear) lens readout a subvalue too small to change the state scores
    exactly 0, not the rounding difference between a batched and a single product."""
    model = random_model("gpt2", dtype="float32", seed=5, n_layers=1, d_model=64, n_heads=2, d_head=32,
                         d_ff=16, d_vocab=30)
    tr = refimpl.run(model, [1, 2, 3])
    R = tr.readout(-1, "lens")
    base = tr.layers[0].lres[-1]
    V = np.full((300, 64), 1e-30, np.float32) * np.sign(np.random.default_rng(0).standard_normal((300, 64)))
    assert np.all(base + V == base)
    C, P = R.increase(base[None], np.zeros(300, dtype=np.int64), V, 3)
    assert np.all(C == 0) and np.all(P == 0)
