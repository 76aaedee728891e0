"""`locate --plots`: every figure is a real PNG, its data is in the JSON result, and the data
agrees with an independent recomputation (a direct NumPy readout written from the frozen readout's definition
in docs/design-choices.md, not refimpl's readout/significance/compare code)."""
import contextlib
import io
import json
import sys

import numpy as np
import pytest

import refimpl
from refimpl.cli import main
from refimpl.errors import RefimplError
from refimpl.locate import locate
from tests.helpers import random_model

pytest.importorskip("matplotlib")
from refimpl import plots  # noqa: E402

FIGURES = {"layer_significance", "ffn_counts", "top10_share", "additivity", "subkey_linearity",
           "activation_trace", "bs_trajectory", "bs_difference"}
IDS = [2, 7, 3, 15, 29, 11, 5]
# (family, sizes, locate options): between them the bounds bracket, counts computed by the
# plots module (--no-counts), and exact top-10 shares (--exhaustive); a non-last position
CASES = {
    "gpt2": ("gpt2", dict(n_layers=2, d_model=16, n_heads=4, d_ff=24, d_vocab=40), {}),
    "llama": ("llama", dict(n_layers=2, d_model=16, n_heads=4, n_kv_heads=2, d_ff=24, d_vocab=40),
              dict(counts=False, position=4)),
    "fairseq": ("fairseq_lm", dict(n_layers=2, d_model=16, n_heads=2, d_ff=24, d_vocab=40, cutoffs=[10, 25]),
                dict(exhaustive=True)),
}


def W(model, name):
    return np.asarray(model.stored(name), np.float64)


def log_softmax(z):
    z = z - z.max()
    return z - np.log(np.exp(z).sum())


class Direct:
    """Frozen readout at x_f: bs(x) = E(norm_f(x)) with norm_f's statistics fixed at x_f, and
    log p(. | x) from those scores (the two-level adaptive softmax for fairseq)."""

    def __init__(self, model, x_f):
        self.m, c = model, model.cfg
        if c.final_norm:
            mu = x_f.mean() if c.norm == "layernorm" else 0.0
            self.mu_on = c.norm == "layernorm"
            self.scale = np.sqrt(((x_f - mu) ** 2).mean() + c.norm_eps)

    def parts(self, x):
        m, c = self.m, self.m.cfg
        y = x
        if c.final_norm:
            y = W(m, "ln_final.w") * (x - (x.mean() if self.mu_on else 0.0)) / self.scale
            if m.has("ln_final.b"):
                y = y + W(m, "ln_final.b")
        if c.unembedding == "linear":
            return y @ W(m, "unembed.W_U") + (W(m, "unembed.b_U") if m.has("unembed.b_U") else 0.0), None

        def band(b):
            p = f"unembed.adaptive.{b}.W_proj"
            return (y @ W(m, p) if m.has(p) else y) @ W(m, f"unembed.adaptive.{b}.W_U")
        cls = y @ W(m, "unembed.adaptive.head.W_cls")
        return np.concatenate([band(0)] + [cls[b - 1] + band(b) for b in range(1, len(c.bands))]), cls

    def scores(self, x):
        return self.parts(np.asarray(x, np.float64))[0]

    def log_probs(self, x):
        flat, cls = self.parts(np.asarray(x, np.float64))
        if cls is None:
            return log_softmax(flat)
        bands = self.m.cfg.bands
        n0 = bands[0][1]
        head = log_softmax(np.concatenate([flat[:n0], cls]))
        return np.concatenate([head[:n0]] + [log_softmax(flat[lo:hi] - cls[b - 1]) + head[n0 + b - 1]
                                             for b, (lo, hi) in enumerate(bands[1:], start=1)])


def near(a, b, what, tol=1e-10):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, f"{what}: shape {a.shape} != {b.shape}"
    err = float(np.abs(a - b).max(initial=0.0))
    assert err <= tol * max(1.0, float(np.abs(b).max(initial=0.0))), f"{what}: error {err:.3e}"


def check_png(path):
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    assert len(data) > 5000, f"{path}: only {len(data)} bytes"


@pytest.mark.parametrize("name", sorted(CASES))
def test_figures_and_their_data(name, tmp_path):
    family, sizes, opts = CASES[name]
    model = random_model(family, seed=5, **sizes)
    r = locate(model, IDS, top=3, **opts)
    import matplotlib.pyplot as plt
    paths = plots.write_figures(model, IDS, r, str(tmp_path / "figs" / "sub"))
    assert not plt.get_fignums(), "figures left open"
    assert set(paths) == FIGURES and set(r["figure_data"]) == FIGURES
    for p in paths.values():
        check_png(p)
    fd = json.loads(json.dumps(r, allow_nan=False))["figure_data"]
    assert fd == r["figure_data"], "figure data is not plain JSON"

    # independent recomputation on a fresh trace
    tr = refimpl.run(model, IDS)
    t, w = r["position"], r["target"]["id"]
    assert t == opts.get("position", len(IDS) - 1)
    D = Direct(model, tr.final[t])
    near(D.log_probs(tr.final[t]), tr.log_probs[t], "direct readout vs the model's own output")

    def incr(base, v):
        a, b = D.log_probs(base + v)[w], D.log_probs(base)[w]
        return a - b, np.exp(a) - np.exp(b)
    L = fd["layer_significance"]
    assert L["layer"] == list(range(model.cfg.n_layers))
    for i, lay in enumerate(tr.layers):
        for part, base, v in (("attn", lay.lin[t], lay.attn[t]), ("ffn", lay.lres[t], lay.ffn[t])):
            c, p = incr(base, v)
            near(L[f"{part}_log_prob_increase"][i], c, f"{part} {i} log-prob")
            near(L[f"{part}_prob_increase"][i], p, f"{part} {i} prob")

    B = fd["bs_trajectory"]
    order = [int(x) for x in np.argsort(-tr.log_probs[t], kind="stable") if x != w]
    assert B["token_ids"] == [w] + order[:2]
    assert B["tokens"] == [model.token_str(i) for i in B["token_ids"]]
    states = [("Lin_0", tr.Lin0[t])] + [(f"{s}_{i}", x[t]) for i, lay in enumerate(tr.layers)
                                         for s, x in (("Lres", lay.lres), ("Lout", lay.lout))]
    assert B["states"] == [s for s, _ in states]
    near(B["bs"], [D.scores(x)[B["token_ids"]] for _, x in states], "bs trajectory")

    d = fd["bs_difference"]
    assert (d["a"], d["b"]) == tuple(B["token_ids"][:2])
    ends = np.asarray(B["bs"])[[0, -1]]
    near([d["start"], d["end"]], ends[:, 0] - ends[:, 1], "bs difference ends")
    near(d["start"] + sum(x["attn"] + x["ffn"] for x in d["layers"]), d["end"], "changes telescope")

    # the rest: consistency with the locate result and exact identities
    counts = r.get("ffn_counts")
    if counts is not None:
        assert fd["ffn_counts"]["helpful"] == [c["helpful"] for c in counts]
    assert fd["ffn_counts"]["activated"] == [int(((lay.gate_pre if lay.gate_pre is not None else lay.m)[t] > 0).sum())
                                             for lay in tr.layers]       # SwiGLU: the gate is open
    assert fd["top10_share"]["exact"] == all(not isinstance(s, list) for s in fd["top10_share"]["top10_share"])
    if opts.get("exhaustive"):
        assert fd["top10_share"]["exact"]
    a = fd["additivity"]
    assert a["layer"] == int(np.argmax(L["ffn_log_prob_increase"]))
    if a["k"]:
        near(a["sum_of_log_prob_increases"][0], a["log_prob_increase_of_sum"][0], "k = 1")
    assert len(a["f_curves"]["l"]) == len(a["f_curves"]["log_prob_increase"]) and 0 in a["f_curves"]["l"]
    for s in fd["subkey_linearity"]["subkeys"]:
        i = fd["subkey_linearity"]["layer"]
        lay = tr.layers[i]
        near(s["h"], (lay.pre if s["which"] == "in" else lay.gate_pre)[t], f"subkey h ({s['which']})")
        # Fig. 4's y-axis as the paper draws it: x.K/sigma - mu*lambda/sigma, no B^k
        x, Wk = lay.lres[t], W(model, f"blocks.{i}.mlp." + ("W_in" if s["which"] == "in" else "W_gate"))
        K = W(model, f"blocks.{i}.ln2.w")[:, None] * Wk                        # [d, F]
        mu = x.mean() if model.cfg.norm == "layernorm" else 0.0
        sigma = np.sqrt(((x - mu) ** 2).mean() + model.cfg.norm_eps)
        near(s["xK"], x @ K, "x.K")
        near(s["paper_y"], (x @ K) / sigma - mu * K.sum(0) / sigma, f"Fig. 4 y ({s['which']})")
        near(np.asarray(s["paper_y"]) + np.asarray(s["B"]), s["h"], "h = Fig. 4 y + B")
    assert len(fd["subkey_linearity"]["subkeys"]) == (2 if model.cfg.gated_ffn else 1)
    act = fd["activation_trace"]
    for p in act["panels"]:
        near(sum(p["values"]), p["pre_activation"], "level-1 contributions sum to h")
        near(sum(p["source_values"]), p["source_total"], "level-2 contributions sum to the source's")


def test_cli_locate_plots(tmp_path):
    model = random_model("gpt2", seed=5, **CASES["gpt2"][1])
    out = tmp_path / "figs"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["locate", "--ids", "2,7,3,15", "--model", model.path, "--plots", str(out), "--top", "2",
                   "--json"])
    assert rc == 0
    r = json.loads(buf.getvalue())
    assert set(r["figures"]) == FIGURES == set(r["figure_data"])
    for p in r["figures"].values():
        check_png(p)
        assert p.startswith(str(out))


def test_refusals(tmp_path, monkeypatch, capsys):
    model = random_model("gpt2", seed=5, **CASES["gpt2"][1])
    r = locate(model, IDS, top=1)
    f = tmp_path / "a_file"
    f.write_text("x")
    with pytest.raises(RefimplError, match="not a directory"):
        plots.write_figures(model, IDS, r, str(f))
    assert main(["locate", "--ids", "2,7", "--model", model.path, "--plots", str(f)]) == 2
    with pytest.raises(RefimplError, match="does not match"):
        plots.write_figures(model, IDS[:-1], r, str(tmp_path / "x"))
    monkeypatch.setitem(sys.modules, "matplotlib", None)          # import matplotlib -> ImportError
    with pytest.raises(RefimplError, match=r"pip install 'refimpl\[plot\]'"):
        plots.require_matplotlib()
    capsys.readouterr()
    assert main(["locate", "--ids", "2,7", "--model", model.path, "--plots", str(tmp_path / "y")]) == 2
    assert "needs matplotlib" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()
