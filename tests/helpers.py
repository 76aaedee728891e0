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
