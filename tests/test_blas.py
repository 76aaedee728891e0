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
