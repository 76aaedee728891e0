"""Best-effort control of the BLAS thread count (OpenBLAS as NumPy's wheels ship it).

The forward pass at prompt length multiplies a handful of rows by each weight matrix:
OpenBLAS's threads then mostly wait for each other, and they compete with the thread that
widens the next layer's weights (refimpl.model). `one_blas_thread()` runs a block with one
BLAS thread and restores the count afterwards.

The thread count is also part of what makes a result reproducible to the last bit: OpenBLAS
splits some products differently with more threads (a [5, 1024] x [1024, 50257] product, or
one row times a matrix, differs in the last bits between 1 and 2 threads here). So the forward
pass, `locate`'s analysis up to the per-layer counts and the counts' per-model constants
(bounds.ModelConstants, computed meanwhile on the other core) always run with one BLAS thread
(whatever the machine), and a Dask worker of `refimpl batch` runs the rest with the client's
thread count (`blas_threads(n)`), so its records equal the client's own `refimpl locate` to
the last bit. Where the library or its symbols are
not found (another BLAS, another build) these do nothing.
"""
from __future__ import annotations

import contextlib
import os

_LIB = None         # (set, get, library): OpenBLAS's thread-count functions, or False when not available


def _funcs():
    global _LIB
    if _LIB is None:
        _LIB = False
        try:
            import ctypes
            import numpy as np
            np.ones((2, 2)) @ np.ones((2, 2))          # numpy's BLAS is loaded
            # NumPy's own OpenBLAS (numpy.libs/): SciPy ships another one, which may be mapped first
            found = []
            with open("/proc/self/maps") as f:
                for line in f:
                    if "openblas" in line and ".so" in line and line.split()[-1] not in found:
                        found.append(line.split()[-1])
            here = os.path.dirname(os.path.dirname(os.path.abspath(np.__file__)))
            own = [p for p in found if p.startswith(os.path.join(here, "numpy"))]
            path = own[0] if own else (found[0] if len(found) == 1 else None)
            if path and os.path.isfile(path):
                lib = ctypes.CDLL(path)
                for s, g in (("scipy_openblas_set_num_threads64_", "scipy_openblas_get_num_threads64_"),
                             ("openblas_set_num_threads64_", "openblas_get_num_threads64_"),
                             ("openblas_set_num_threads", "openblas_get_num_threads")):
                    if hasattr(lib, s) and hasattr(lib, g):
                        setf, getf = getattr(lib, s), getattr(lib, g)
                        setf.argtypes, setf.restype, getf.restype = [ctypes.c_int], None, ctypes.c_int
                        _LIB = (setf, getf, lib)
                        break
        except (OSError, AttributeError, ValueError):
            _LIB = False
    return _LIB


def identity() -> str:
    """What the last bits of a product depend on besides its inputs and the thread count:
    numpy's version and its BLAS (OpenBLAS's build configuration and the CPU kernel it chose).
    Derived data whose bits must equal a fresh computation records it (refimpl/cache.py)."""
    import numpy as np
    out = f"numpy {np.__version__}"
    f = _funcs()
    if not f:                                 # another BLAS: at least the CPU it runs on
        import platform
        cpu = platform.machine()
        try:
            with open("/proc/cpuinfo", errors="replace") as fh:
                cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
        except OSError:
            pass
        return out + f"; BLAS unknown; CPU {cpu}"
    import ctypes
    lib = f[2]
    for name in ("get_config", "get_corename"):
        for sym in (f"scipy_openblas_{name}64_", f"openblas_{name}64_", f"openblas_{name}"):
            if hasattr(lib, sym):
                fn = getattr(lib, sym)
                fn.restype = ctypes.c_char_p
                out += "; " + (fn() or b"").decode("ascii", "replace").strip()
                break
    return out


def threads() -> int | None:
    """The BLAS thread count now (None where it cannot be read)."""
    f = _funcs()
    return int(f[1]()) if f else None


@contextlib.contextmanager
def blas_threads(n: int | None):
    """Run a block with n BLAS threads (None: as it is), then restore the count."""
    f = _funcs()
    if not f or n is None:
        yield
        return
    setf, getf = f[0], f[1]
    old = getf()
    if old == n:
        yield
        return
    setf(int(n))
    try:
        yield
    finally:
        setf(old)


def one_blas_thread():
    return blas_threads(1)
