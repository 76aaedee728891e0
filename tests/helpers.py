"""Shared test helpers: random canonical models and tolerance checks."""
import os
import tempfile

import numpy as np

import refimpl
from refimpl.synthetic import random_config, write_random_model

_CACHE = {}


def random_model(family="gpt2", dtype="float64", seed=0, store="F32", **sizes):
    """A random canonical model of `family`, written once per (config, seed) and loaded."""
    key = (family, seed, store, repr(sorted(sizes.items(), key=str)))
    if key not in _CACHE:
        cfg = random_config(family, **sizes)
        d = os.path.join(tempfile.mkdtemp(prefix="refimpl-rand-"), "m")
        write_random_model(d, cfg, seed=seed, dtype=store)
        _CACHE[key] = d
    return refimpl.load(_CACHE[key], dtype=dtype)


def rel_err(a, b):
    """max |a - b| / max(max |b|, 1e-300)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


def assert_close(a, b, rel, what=""):
    e = rel_err(a, b)
    assert e <= rel, f"{what}: relative error {e:.3e} > {rel:.1e}"


def draw_sizes(draw, st, family: str, d_heads=(2, 4, 8), d_ff_max: int = 40, vocab_max: int = 70,
               n_ctx: int = 32) -> dict:
    """Hypothesis: random small sizes for a model of `family` (GQA head counts for Llama,
    one or two adaptive-softmax cutoffs and a band-divisible width for fairseq)."""
    n_heads = draw(st.sampled_from([1, 2, 4]))
    sizes = dict(n_layers=draw(st.integers(1, 3)), n_heads=n_heads, d_head=draw(st.sampled_from(list(d_heads))),
                 d_model=draw(st.sampled_from([8, 16, 24])), d_ff=draw(st.integers(4, d_ff_max)),
                 d_vocab=draw(st.integers(12, vocab_max)), n_ctx=n_ctx)
    if family == "llama":
        sizes["n_kv_heads"] = draw(st.sampled_from([k for k in (1, 2, 4) if n_heads % k == 0]))
    if family == "fairseq_lm":
        V = sizes["d_vocab"]
        c1 = draw(st.integers(2, V - 4))
        c2 = draw(st.integers(c1 + 1, V - 1))
        sizes["cutoffs"] = draw(st.sampled_from([[c1], [c1, c2]]))
        sizes["d_model"] = 16 * draw(st.integers(1, 2))       # bands of width d/4, d/16
    return sizes
