"""Best-effort control of the BLAS thread count (OpenBLAS as NumPy's wheels ship it).

The forward pass at prompt length multiplies a handful of rows by each weight matrix:
OpenBLAS's threads then mostly wait for each other, and they compete with the thread that
widens the next layer's weights (refimpl.model). `one_blas_thread()` runs a block with one
BLAS thread and restores the count afterwards. Where the library or its symbols are not
found (another BLAS, another build) it does nothing: only speed depends on it, never results
(BLAS results here do not depend on the thread count for these shapes; the tests check the
outputs, not the thread count).
"""
from __future__ import annotations

import contextlib
import os

_LIB = None         # (set, get) ctypes functions, or False when not available


def _funcs():
    global _LIB
    if _LIB is None:
        _LIB = False
        try:
            import ctypes
            path = None
            with open("/proc/self/maps") as f:
                for line in f:
                    if "openblas" in line and ".so" in line:
                        path = line.split()[-1]
                        break
            if path and os.path.isfile(path):
                lib = ctypes.CDLL(path)
                for s, g in (("scipy_openblas_set_num_threads64_", "scipy_openblas_get_num_threads64_"),
                             ("openblas_set_num_threads64_", "openblas_get_num_threads64_"),
                             ("openblas_set_num_threads", "openblas_get_num_threads")):
                    if hasattr(lib, s) and hasattr(lib, g):
                        setf, getf = getattr(lib, s), getattr(lib, g)
                        setf.argtypes, setf.restype, getf.restype = [ctypes.c_int], None, ctypes.c_int
                        _LIB = (setf, getf)
                        break
        except (OSError, AttributeError, ValueError):
            _LIB = False
    return _LIB


@contextlib.contextmanager
def one_blas_thread():
    f = _funcs()
    if not f:
        yield
        return
    setf, getf = f
    n = getf()
    if n <= 1:
        yield
        return
    setf(1)
    try:
        yield
    finally:
        setf(n)
