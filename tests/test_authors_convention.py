"""`--readout frozen-nobias` reproduces the authors' published method on a transformers GPT-2.

The reference below is written from the description of the authors' convention (not from
their code), in torch float64 on a transformers `GPT2LMHeadModel` with random weights
(every bias and norm weight randomised, so the dropped ln_f bias matters):

  * readout of a vector v at the analysed position t: centre v, divide by the standard
    deviation sqrt(var + eps) of the final residual (the input of ln_f) at t, multiply by
    ln_f.weight, apply lm_head; ln_f.bias is NOT added;
  * log p(w | x) = log(softmax(readout(x)))[w], the target w the model's top-1 prediction;
  * scoring loops: C(v) = log p(w | base + v) - log p(w | base), with base the layer input
    for attention vectors and the residual after attention for FFN vectors; layer vectors
    (ATTN_i, FFN_i), every FFN neuron m_k * fc2_k, every attention subvalue by source
    position (heads summed) and every attention neuron alpha_h[t, j] * v_h[j, e] * O_h[e].

The model is converted with refimpl's own converter and analysed through the CLI
(`locate --readout frozen-nobias --json --dtype float64`, `subvalues ... --json`): every
score agrees to 1e-10 and the top-20 orders are the same. With the default `frozen` readout
the same comparison fails (the test can tell the two conventions apart).
"""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import converters  # noqa: E402
from refimpl.cli import main as cli_main  # noqa: E402
from refimpl.synthetic import word_tokenizer_json  # noqa: E402
from tests import hf_oracle as O  # noqa: E402

TOL = 1e-10
VOCAB, LAYERS, D, HEADS = 100, 3, 32, 4
IDS = [7, 42, 3, 99, 15, 61, 28]
TOP = 20


# --- the authors' method, written independently in torch ------------------------------------------

class Authors:
    """Their readout and scoring loops on a float64 transformers GPT-2 (hooks, no refimpl code)."""

    def __init__(self, hf_model, ids):
        m = hf_model.to(torch.float64).eval()
        self.m, self.T = m, len(ids)
        cap = {k: {} for k in ("attn", "resid", "ffn", "coef", "qkv")}
        hooks = []
        for i, blk in enumerate(m.transformer.h):
            hooks += [blk.attn.register_forward_hook(lambda mod, a, out, i=i: cap["attn"].__setitem__(i, out[0][0])),
                      blk.ln_2.register_forward_hook(lambda mod, a, out, i=i: cap["resid"].__setitem__(i, a[0][0])),
                      blk.mlp.register_forward_hook(lambda mod, a, out, i=i: cap["ffn"].__setitem__(i, out[0])),
                      blk.mlp.act.register_forward_hook(lambda mod, a, out, i=i: cap["coef"].__setitem__(i, out[0])),
                      blk.attn.c_attn.register_forward_hook(lambda mod, a, out, i=i: cap["qkv"].__setitem__(i, out[0]))]
        hooks.append(m.transformer.ln_f.register_forward_hook(lambda mod, a, out: cap.__setitem__("final", a[0][0])))
        try:
            with torch.no_grad():
                out = m(torch.tensor([ids]), output_hidden_states=True, output_attentions=True, use_cache=False)
        finally:
            for h in hooks:
                h.remove()
        self.cap, self.t = cap, self.T - 1
        self.layer_in = [out.hidden_states[i][0] for i in range(LAYERS)]           # input of block i
        self.alpha = [a[0] for a in out.attentions]                                 # [H, T, T]
        logits = out.logits[0, self.t]
        self.w = int(torch.argmax(logits))
        x_f = cap["final"][self.t]
        self.sigma_f = torch.sqrt(x_f.var(unbiased=False) + m.config.layer_norm_epsilon)

    def readout(self, v):
        """lm_head(ln_f.weight * (v - mean v) / sigma_f): the frozen scale, no ln_f.bias."""
        centred = v - v.mean(-1, keepdim=True)
        return self.m.lm_head(centred / self.sigma_f * self.m.transformer.ln_f.weight)

    def log_p(self, x):
        return torch.log(torch.softmax(self.readout(x), -1))[..., self.w]

    def increase(self, base, vectors):
        """C of each row of `vectors` added to `base`."""
        with torch.no_grad():
            return (self.log_p(base + vectors) - self.log_p(base)).numpy()

    def layers(self):
        t, out = self.t, []
        for i in range(LAYERS):
            lin, attn = self.layer_in[i][t], self.cap["attn"][i][t]
            res, ffn = self.cap["resid"][i][t], self.cap["ffn"][i][t]
            out.append((float(self.increase(lin, attn[None])[0]), float(self.increase(res, ffn[None])[0])))
        return out

    def ffn_neurons(self, i):
        fc2 = self.m.transformer.h[i].mlp.c_proj.weight.detach()          # Conv1D: [d_ff, d], row k = fc2_k
        m = self.cap["coef"][i][self.t]                                   # [d_ff]
        return self.increase(self.cap["resid"][i][self.t], m[:, None] * fc2)

    def attn_neuron_vectors(self, i):
        """[H, d_head, T, d]: alpha_h[t, j] * v_h[j, e] * O_h[e]."""
        dh = D // HEADS
        v = self.cap["qkv"][i][:, 2 * D:].reshape(self.T, HEADS, dh)       # value vectors (bias included)
        O = self.m.transformer.h[i].attn.c_proj.weight.reshape(HEADS, dh, D)   # O_h[e] = row h*dh+e
        a = self.alpha[i][:, self.t, :]                                    # [H, T]
        return torch.einsum("hj,jhe,hed->hejd", a, v, O)

    def attn_positions(self, i):
        with torch.no_grad():
            sv = self.attn_neuron_vectors(i).sum((0, 1))                       # [T, d] heads and dims summed
        return self.increase(self.layer_in[i][self.t], sv)

    def attn_neurons(self, i):
        with torch.no_grad():
            sv = self.attn_neuron_vectors(i)
        return self.increase(self.layer_in[i][self.t], sv.reshape(-1, D)).reshape(sv.shape[:3])


# --- the same model through refimpl ----------------------------------------------------------------

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    hf = O.tiny_gpt2(vocab=VOCAB, seed=11, n_layer=LAYERS, n_embd=D, n_head=HEADS)
    assert float(hf.transformer.ln_f.bias.detach().abs().max()) > 0.05          # the bias the convention drops
    d = tmp_path_factory.mktemp("authors")
    src = O.save(hf, str(d / "src"), "safetensors")
    (d / "src" / "tokenizer.json").write_text(word_tokenizer_json([f"w{i}" for i in range(VOCAB)]))
    out = converters.convert(src, str(d / "model"))
    return out, Authors(hf, IDS)


def run_json(capsys, *args):
    assert cli_main(list(args)) == 0
    return json.loads(capsys.readouterr().out)


def refimpl_all(capsys, model_dir, readout):
    ids = ",".join(map(str, IDS))
    common = ["--model", model_dir, "--ids", ids, "--readout", readout, "--json", "--dtype", "float64"]
    loc = run_json(capsys, "locate", *common, "--top", str(TOP))
    per_layer = []
    T, dh = len(IDS), D // HEADS
    for i in range(LAYERS):
        out = []
        for extra, shape, where in ((["--kind", "ffn"], (4 * D,), lambda e: (e["neuron"],)),
                                    (["--kind", "attn", "--by", "position"], (T,), lambda e: (e["position"],)),
                                    (["--kind", "attn", "--by", "head-neuron"], (HEADS, dh, T),
                                     lambda e: (e["head"], e["dim"], e["position"]))):
            r = run_json(capsys, "subvalues", *common, "--layer", str(i), *extra, "--top", "all")
            assert r["n_subvalues"] == len(r["subvalues"]) == int(np.prod(shape))
            c = np.full(shape, np.nan)
            for e in r["subvalues"]:
                c[where(e)] = e["log_prob_increase"]
            assert not np.isnan(c).any()
            out.append(c)
        per_layer.append(tuple(out))
    return loc, per_layer


def top_order(scores_by_layer, k):
    """(layer, flat index) of the k largest scores over all layers, best first."""
    flat = [(float(c), i, n) for i, s in enumerate(scores_by_layer) for n, c in enumerate(np.ravel(s))]
    return [(i, n) for c, i, n in sorted(flat, key=lambda x: -x[0])[:k]]


def test_frozen_nobias_reproduces_the_authors_method(setup, capsys):
    model_dir, A = setup
    loc, per_layer = refimpl_all(capsys, model_dir, "frozen-nobias")
    assert loc["target"]["id"] == A.w and loc["position"] == A.t
    worst = {}
    # layer scores
    ref_layers = A.layers()
    got = [(L["attn"]["log_prob_increase"], L["ffn"]["log_prob_increase"]) for L in loc["layers"]]
    worst["layers"] = float(np.abs(np.array(got) - np.array(ref_layers)).max())
    # every FFN neuron, attention position and attention neuron of every layer
    ref_ffn = [A.ffn_neurons(i) for i in range(LAYERS)]
    ref_pos = [A.attn_positions(i) for i in range(LAYERS)]
    ref_neu = [A.attn_neurons(i) for i in range(LAYERS)]
    for i, (ffn, pos, neu) in enumerate(per_layer):
        assert ffn.shape == ref_ffn[i].shape and pos.shape == ref_pos[i].shape and neu.shape == ref_neu[i].shape
        worst[f"ffn L{i}"] = float(np.abs(ffn - ref_ffn[i]).max())
        worst[f"attn positions L{i}"] = float(np.abs(pos - ref_pos[i]).max())
        worst[f"attn neurons L{i}"] = float(np.abs(neu - ref_neu[i]).max())
    # the final state read out their way is not the model's distribution; the layer scores telescope to it
    final = A.cap["final"][A.t]
    worst["final readout"] = abs(loc["readout_log_prob"] - float(A.log_p(final).detach()))
    assert abs(loc["readout_log_prob"] - loc["target"]["log_prob"]) > 1e-6
    worst["telescoping"] = abs(sum(a + f for a, f in got) - (loc["readout_log_prob"]
                                                              - float(A.log_p(A.layer_in[0][A.t]).detach())))
    print("\nmax |refimpl frozen-nobias - authors' method|:", {k: f"{v:.1e}" for k, v in worst.items()})
    assert max(worst.values()) <= TOL, worst
    # the top-20 of each kind over all layers, in the same order and with the same scores
    tops = loc["top_subvalues"]
    dh, T = D // HEADS, len(IDS)
    ffn_top = [(s["layer"], s["index"], s["log_prob_increase"]) for s in tops if s["kind"] == "ffn"]
    assert [(i, n) for i, n, _ in ffn_top] == top_order(ref_ffn, TOP)
    pos_top = [(s["layer"], s["index"], s["log_prob_increase"]) for s in tops if s["kind"] == "attn"]
    assert [(i, n) for i, n, _ in pos_top] == top_order(ref_pos, TOP)
    neu_top = [(s["layer"], (s["head"] * dh + s["dim"]) * T + s["position"], s["log_prob_increase"])
               for s in tops if s["kind"] == "attn_neuron"]
    assert [(i, n) for i, n, _ in neu_top] == top_order(ref_neu, TOP)
    for got_top, ref in ((ffn_top, ref_ffn), (pos_top, ref_pos), (neu_top, ref_neu)):
        assert len(got_top) == TOP
        assert max(abs(c - float(np.ravel(ref[i])[n])) for i, n, c in got_top) <= TOL


def test_default_frozen_readout_is_not_the_authors_convention(setup, capsys):
    """The comparison above can fail: refimpl's default keeps ln_f.bias and differs."""
    model_dir, A = setup
    loc = run_json(capsys, "locate", "--model", model_dir, "--ids", ",".join(map(str, IDS)), "--json")
    got = np.array([(L["attn"]["log_prob_increase"], L["ffn"]["log_prob_increase"]) for L in loc["layers"]])
    assert np.abs(got - np.array(A.layers())).max() > 1e-4
