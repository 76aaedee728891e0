"""The streaming path (a model larger than the weight cache: per-layer reused buffers, blockwise
bounds, row access for chosen neurons) gives the same results as the cached path."""
import numpy as np
import pytest

import refimpl
from refimpl.locate import locate
from refimpl.synthetic import random_config, write_random_model


@pytest.mark.parametrize("family,store", [("gpt2", "F32"), ("llama", "F16"), ("fairseq_lm", "F16"), ("llama", "F32")])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_streaming_equals_cached(tmp_path, family, store, dtype):
    sizes = dict(n_layers=3, d_model=32, n_heads=4, d_ff=96, d_vocab=120)
    if family == "llama":
        sizes["n_kv_heads"] = 2
    d = tmp_path / "m"
    write_random_model(str(d), random_config(family, **sizes), seed=2, dtype=store)
    cached = refimpl.load(str(d), dtype=dtype)
    streamed = refimpl.load(str(d), dtype=dtype, cache_bytes=0)
    assert cached._fits_cache() and not streamed._fits_cache()
    ids = [2, 17, 5, 99, 31, 8]
    a, b = refimpl.run(cached, ids), refimpl.run(streamed, ids)
    assert np.array_equal(a.log_probs, b.log_probs)
    for la, lb in zip(a.layers, b.layers):
        assert np.array_equal(la.lout, lb.lout) and np.array_equal(la.m, lb.m)
    ra, rb = locate(cached, ids, top=8, counts=True), locate(streamed, ids, top=8, counts=True)
    key = lambda r: [(s["kind"], s["layer"], s["index"]) for s in r["top_subvalues"]]
    assert key(ra) == key(rb)
    tol = 1e-12 if dtype == "float64" else 1e-5
    for sa, sb in zip(ra["top_subvalues"], rb["top_subvalues"]):
        assert abs(sa["log_prob_increase"] - sb["log_prob_increase"]) <= tol * max(1, abs(sa["log_prob_increase"]))
    assert ra["ffn_counts"] == rb["ffn_counts"]


@pytest.mark.parametrize("family,store", [("gpt2", "F32"), ("llama", "F16"), ("fairseq_lm", "F32")])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_rows_and_columns_are_exact_copies(tmp_path, family, store, dtype):
    """Model.rows / Model.columns equal the slices of the whole upcast tensor (ties resolved),
    and never share memory with a cached or mapped tensor (a view would keep a whole upcast
    layer alive: the 7B float64 run held 8 GB that way)."""
    sizes = dict(n_layers=2, d_model=16, n_heads=2, d_ff=24, d_vocab=40)
    d = tmp_path / "m"
    write_random_model(str(d), random_config(family, **sizes), seed=4, dtype=store)
    for cache_bytes in (1 << 30, 0):
        m = refimpl.load(str(d), dtype=dtype, cache_bytes=cache_bytes)
        names = ["blocks.1.mlp.W_out", "blocks.0.mlp.W_in", "blocks.0.attn.W_O"]
        names += ["unembed.W_U"] if m.has("unembed.W_U") else []
        for name in names:
            whole = np.array(m.weight(name))
            for idx in (1, [1, 0, 1], np.array([1])):
                r = m.rows(name, idx)
                assert r.dtype == m.dtype and np.array_equal(r, whole[idx])
                assert not np.shares_memory(r, m.weight(name))
                if whole.ndim == 2:
                    c = m.columns(name, idx)
                    assert c.dtype == m.dtype and np.array_equal(c, whole[:, idx])
                    assert not np.shares_memory(c, m.weight(name))
