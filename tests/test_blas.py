"""refimpl.blas: the thread count it sets is NumPy's own OpenBLAS's (SciPy's, loaded beside it,
is another library), and what it promises for reproducibility holds: the forward pass gives
the same bits whatever the caller's BLAS thread count, and so does a whole `locate` report
run at a given thread count (what a Dask worker of `refimpl batch` reproduces)."""
import numpy as np
import pytest
import scipy.linalg  # noqa: F401  (SciPy's OpenBLAS mapped too, as in a real session)

import refimpl
from refimpl import blas
from refimpl.forward import run
from refimpl.locate import locate

PROMPTS = ["Paris", "The capital of", "The capital of France is", "Lyon is located in the country of",
           "People in Peru speak the language of the country of"]


@pytest.fixture(scope="module")
def model():
    if not blas._funcs():
        pytest.skip("NumPy's BLAS is not OpenBLAS here: its thread count cannot be set")
    return refimpl.load("capitals-gpt2", dtype="float64")


def test_sets_numpys_own_blas():
    if not blas._funcs():
        pytest.skip("NumPy's BLAS is not OpenBLAS here: its thread count cannot be set")
    n = blas.threads()
    with blas.blas_threads(1):
        assert blas.threads() == 1
        # NumPy's config names its BLAS; the library controlled is that one
        assert np.show_config(mode="dicts")["Build Dependencies"]["blas"]["name"].startswith("scipy-openblas")
    assert blas.threads() == n
    with blas.blas_threads(3):
        assert blas.threads() == 3
    assert blas.threads() == n


@pytest.mark.parametrize("prompt", PROMPTS)
def test_forward_pass_does_not_depend_on_the_thread_count(model, prompt):
    with blas.blas_threads(1):
        a = run(model, prompt)
    with blas.blas_threads(2):
        b = run(model, prompt)
    assert np.array_equal(a.logits, b.logits) and np.array_equal(a.log_probs, b.log_probs)
    for la, lb in zip(a.layers, b.layers):
        assert np.array_equal(la.lout, lb.lout)


def test_a_report_at_a_given_thread_count_is_reproduced(model):
    p = PROMPTS[3]
    with blas.blas_threads(2):
        a = locate(model, p)
    with blas.blas_threads(1), blas.blas_threads(2):
        b = locate(model, p)
    a.pop("timing"), b.pop("timing")
    assert a == b


# --- the counts' per-model constants (bounds.ModelConstants) -----------------------------------

@pytest.fixture(scope="module")
def wide_vocab(tmp_path_factory):
    """A GPT-2-shaped model whose unembedding is wide enough (4096 columns, d = 64) that
    OpenBLAS's float32 Gram products differ in their last bits between 1 and 2 threads."""
    if not blas._funcs():
        pytest.skip("NumPy's BLAS is not OpenBLAS here: its thread count cannot be set")
    from refimpl.synthetic import random_config, write_random_model
    d = str(tmp_path_factory.mktemp("wide") / "m")
    write_random_model(d, random_config("gpt2", n_layers=2, d_model=64, n_heads=4, d_ff=128, d_vocab=4096))
    return d


def _constants(path, threads):
    from refimpl import bounds
    from refimpl.readout import Readout
    m = refimpl.load(path, dtype="float32")
    R = Readout(m, np.ones(m.cfg.d_model), "frozen")
    with blas.blas_threads(threads):
        lam = bounds.gram_lambda(R, bounds.parts(R, 0)[0])
        rc = bounds.readout_constants(R, 0)
    return lam, rc, m


def test_the_counts_constants_do_not_depend_on_the_thread_count(wide_vocab):
    # the float32 Gram product itself does (so this test can fail: it did before the constants
    # were computed on one thread)
    W = refimpl.load(wide_vocab, dtype="float32").stored("unembed.W_U")[:, :1024]
    b = np.asarray(W, np.float32)
    with blas.blas_threads(1):
        g1 = b @ b.T
    with blas.blas_threads(2):
        g2 = b @ b.T
    assert not np.array_equal(g1, g2), "this OpenBLAS gives the same bits at 1 and 2 threads: nothing is tested"
    lam1, rc1, _ = _constants(wide_vocab, 1)
    lam2, rc2, _ = _constants(wide_vocab, 2)
    assert lam1 == lam2 and rc1 == rc2


def test_constants_computed_beside_the_forward_pass_are_the_standalone_ones(wide_vocab):
    lam, rc, _ = _constants(wide_vocab, 2)
    m = refimpl.load(wide_vocab, dtype="float32")
    with blas.blas_threads(2):
        r = locate(m, "t5 t9 t17 t3", share="bound")
        assert blas.threads() == 2                                       # restored after the counts
    assert m._gram_lambda[("vocab", "norm")] == lam and m._readout_constants[("vocab",)] == rc[0]
    assert all(c["share"] == "bound" for c in r["ffn_counts"])


def test_a_report_has_the_same_bits_with_and_without_counts(model):
    p = PROMPTS[2]
    a = locate(model, p, counts=False)
    b = locate(model, p, share="bound")
    for key in ("layers", "top_subvalues", "readout_log_prob", "bs_difference"):
        assert a[key] == b[key], key


def test_an_error_in_the_constants_reaches_the_caller_and_restores_the_thread_count(wide_vocab, monkeypatch):
    from refimpl import bounds

    def broken(R, w):
        raise MemoryError("no room for the constants")
    monkeypatch.setattr(bounds, "readout_constants", broken)
    m = refimpl.load(wide_vocab, dtype="float32")
    with blas.blas_threads(2):
        with pytest.raises(MemoryError, match="no room"):
            locate(m, "t5 t9 t17 t3")
        assert blas.threads() == 2


def test_identity_names_what_the_last_bits_depend_on(monkeypatch):
    """blas.identity() binds stored constants to numpy, its BLAS build and CPU kernel (refimpl/cache.py);
    with a BLAS it cannot read, it still names the CPU, and it never raises."""
    import numpy as np
    from refimpl import blas
    got = blas.identity()
    assert f"numpy {np.__version__}" in got
    if blas.threads() is not None:                    # numpy's OpenBLAS was found: its build and kernel
        assert "OpenBLAS" in got and got.count(";") >= 2, got
    monkeypatch.setattr(blas, "_LIB", False)
    other = blas.identity()
    assert "BLAS unknown" in other and "CPU" in other and other != got
