"""`refimpl prepare`: the compute-dtype weight cache is exact, and a stale or damaged one is never used."""
import json

import numpy as np
import pytest

import refimpl
from refimpl.cli import main
from refimpl.synthetic import random_config, write_random_model


def _model(tmp_path, store="F16"):
    d = tmp_path / "m"
    write_random_model(str(d), random_config("llama", n_kv_heads=2, d_vocab=40), seed=1, dtype=store)
    return d


def test_prepared_weights_give_bit_identical_results(tmp_path):
    d = _model(tmp_path)
    ids = [1, 5, 9, 3, 22]
    before = refimpl.run(refimpl.load(str(d)), ids)
    assert main(["prepare", "--model", str(d)]) == 0
    m = refimpl.load(str(d))
    assert m.upcast_cache is not None
    after = refimpl.run(m, ids)
    assert np.array_equal(before.log_probs, after.log_probs)
    assert all(np.array_equal(a.lout, b.lout) for a, b in zip(before.layers, after.layers))
    assert main(["verify", str(d)]) == 0                      # the cache does not count as tampering


def test_stale_or_damaged_cache_is_ignored(tmp_path):
    d = _model(tmp_path)
    assert main(["prepare", "--model", str(d)]) == 0
    part = d / "cache" / "weights-float64-L0000.safetensors"
    data = bytearray(part.read_bytes())
    part.write_bytes(data[: len(data) // 2])                  # truncated: unreadable
    with pytest.warns(UserWarning, match="changed after it was written"):
        assert refimpl.load(str(d)).upcast_cache is None
    assert main(["prepare", "--model", str(d)]) == 0
    assert refimpl.load(str(d)).upcast_cache is not None
    # a copy built from other model files is not used
    cfg = json.loads((d / "config.json").read_text())
    cfg["files"]["model.safetensors"] = "0" * 64
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match="stale"):
        assert refimpl.load(str(d)).upcast_cache is None


def test_float32_storage_needs_no_cache(tmp_path):
    d = _model(tmp_path, store="F32")
    assert main(["prepare", "--model", str(d), "--dtype", "float32"]) == 0
    m = refimpl.load(str(d), dtype="float32")
    assert m.upcast_cache is None                             # served zero-copy from the model file
    w = m.weight("blocks.0.mlp.W_in")
    assert not w.flags.owndata and not w.flags.writeable         # a view of the read-only map, no copy
