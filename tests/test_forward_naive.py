"""The vectorised forward pass against a slow per-position, per-head transcription of the
definitions (written here, independent of refimpl.forward / refimpl.readout)."""
import math

import numpy as np
import pytest

import refimpl
from tests.helpers import random_model


def naive_log_probs(model, ids):
    c = model.cfg
    W = lambda n: np.asarray(model.stored(n), np.float64)
    has = model.has
    d, H, Hk, dh = c.d_model, c.n_heads, c.n_kv_heads, c.d_head

    def norm(x, p):
        if c.norm == "layernorm":
            mu = sum(x) / d
            var = sum((xi - mu) ** 2 for xi in x) / d
            return W(p + ".w") * (x - mu) / math.sqrt(var + c.norm_eps) + (W(p + ".b") if has(p + ".b") else 0)
        return W(p + ".w") * x / math.sqrt(sum(xi * xi for xi in x) / d + c.norm_eps)

    act = {"gelu_new": lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3))),
           "relu": lambda x: np.maximum(x, 0), "silu": lambda x: x / (1 + np.exp(-x))}[c.act]

    def rope(vec, p):                           # half-split: dim i pairs with i + dh/2
        out = vec.copy()
        for i in range(dh // 2):
            a = p * c.rope_theta ** (-2 * i / dh)
            x1, x2 = vec[i], vec[i + dh // 2]
            out[i], out[i + dh // 2] = x1 * math.cos(a) - x2 * math.sin(a), x2 * math.cos(a) + x1 * math.sin(a)
        return out

    def embed(tok, t):
        if c.embedding == "linear":
            e = W("embed.W_E")[tok].copy()
        else:
            for b, (lo, hi) in enumerate(c.bands):
                if lo <= tok < hi:
                    e = W(f"embed.adaptive.{b}.W_E")[tok - lo] @ W(f"embed.adaptive.{b}.W_proj")
        e = e * c.embed_scale
        if c.positions == "learned":
            e = e + W("pos_embed.W_pos")[t]
        if c.positions == "sinusoidal":                      # no pads in these prompts: row padding_idx + 1 + t
            p, half = c.padding_idx + 1 + t, d // 2
            f = [math.exp(-i * math.log(10000) / (half - 1)) for i in range(half)]
            e = e + np.array([math.sin(p * fi) for fi in f] + [math.cos(p * fi) for fi in f])
        return e

    xs = [embed(tok, t) for t, tok in enumerate(ids)]
    for i in range(c.n_layers):
        p = f"blocks.{i}."
        ks, vs, new = [], [], []
        for t in range(len(ids)):
            y = norm(xs[t], p + "ln1")
            q = [y @ W(p + "attn.W_Q")[h] + (W(p + "attn.b_Q")[h] if has(p + "attn.b_Q") else 0) for h in range(H)]
            k = [y @ W(p + "attn.W_K")[g] + (W(p + "attn.b_K")[g] if has(p + "attn.b_K") else 0) for g in range(Hk)]
            v = [y @ W(p + "attn.W_V")[g] + (W(p + "attn.b_V")[g] if has(p + "attn.b_V") else 0) for g in range(Hk)]
            if c.positions == "rope":
                q, k = [rope(x, t) for x in q], [rope(x, t) for x in k]
            ks.append(k)
            vs.append(v)
            out = W(p + "attn.b_O").copy() if has(p + "attn.b_O") else np.zeros(d)
            for h in range(H):
                g = h * Hk // H
                s = np.array([q[h] @ ks[j][g] / math.sqrt(dh) for j in range(t + 1)])
                a = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
                out = out + sum(a[j] * vs[j][g] for j in range(t + 1)) @ W(p + "attn.W_O")[h]
            r = xs[t] + out
            y = norm(r, p + "ln2")
            pre = y @ W(p + "mlp.W_in") + (W(p + "mlp.b_in") if has(p + "mlp.b_in") else 0)
            m = act(y @ W(p + "mlp.W_gate")) * pre if c.gated_ffn else act(pre)
            new.append(r + m @ W(p + "mlp.W_out") + (W(p + "mlp.b_out") if has(p + "mlp.b_out") else 0))
        xs = new
    res = []
    for x in xs:
        y = norm(x, "ln_final") if c.final_norm else x
        if c.unembedding == "linear":
            z = y @ W("unembed.W_U")
            res.append(z - z.max() - math.log(np.exp(z - z.max()).sum()))
            continue
        bands = c.bands
        def band_logits(b):
            yy = y @ W(f"unembed.adaptive.{b}.W_proj") if has(f"unembed.adaptive.{b}.W_proj") else y
            return yy @ W(f"unembed.adaptive.{b}.W_U")
        head = np.concatenate([band_logits(0), y @ W("unembed.adaptive.head.W_cls")])
        lhead = head - math.log(np.exp(head).sum())
        lp = list(lhead[:bands[0][1]])
        for b in range(1, len(bands)):
            z = band_logits(b)
            lp += list(z - math.log(np.exp(z).sum()) + lhead[bands[0][1] + b - 1])
        res.append(np.array(lp))
    return np.array(res)


@pytest.mark.parametrize("family,sizes", [
    ("gpt2", dict(n_layers=2, d_model=12, n_heads=3, d_ff=20, d_vocab=30)),
    ("llama", dict(n_layers=2, d_model=16, n_heads=4, n_kv_heads=2, d_ff=24, d_vocab=30)),
    ("llama", dict(n_layers=1, d_model=16, n_heads=4, n_kv_heads=1, d_ff=24, d_vocab=30, rope_theta=500.0)),
    ("fairseq_lm", dict(n_layers=2, d_model=16, n_heads=2, d_ff=20, d_vocab=40, cutoffs=[10, 25])),
])
def test_forward_matches_naive_definition(family, sizes):
    model = random_model(family, seed=3, **sizes)
    ids = [2, 7, 3, 15, 29, 11]
    got = refimpl.run(model, ids).log_probs
    ref = naive_log_probs(model, ids)
    assert np.abs(got - ref).max() < 1e-12
