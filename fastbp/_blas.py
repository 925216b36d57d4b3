"""BLAS thread count per GEMM size, for the GEMMs that kernels run through ``np.dot``.

Numba's ``np.dot`` calls SciPy's OpenBLAS. OpenBLAS threads any GEMM with at least
2^18 multiply-adds, and on a 2-core machine waking its second thread for a small GEMM
costs more than the product: a 32×128×128 product ran 1.3-2× slower with 2 threads than
with 1, and on a busy machine (other processes on the cores) the spinning handshake made
some calls 1000× slower. So before a kernel runs its GEMMs, the layer calls
``use_for(macs)``: products below ``threshold`` multiply-adds run on one BLAS thread,
larger ones on ``max_threads``.

The count is set with ``openblas_set_num_threads_local`` (OpenBLAS ≥ 0.3.27), which only
affects the calling Python thread, and only when it changes. Where SciPy's BLAS is not an
OpenBLAS with that call, this module does nothing.
"""
from __future__ import annotations

import ctypes
import glob
import os
import threading

# Multiply-adds (m·k·n) from which a GEMM gets all BLAS threads. Measured on the 2-vCPU
# reference machine: 1 thread wins up to ~0.5M, 2 threads from ~8M (see asv threads bench).
threshold = 1 << 21
_state = threading.local()


def _load():
    try:
        import scipy
    except ImportError:  # pragma: no cover
        return None, None, 1
    libdir = os.path.dirname(scipy.__file__) + ".libs"
    for path in sorted(glob.glob(os.path.join(libdir, "libscipy_openblas*.so*"))):
        try:
            lib = ctypes.CDLL(path)
            setter = lib.openblas_set_num_threads_local
            getter = lib.scipy_openblas_get_num_threads
        except (OSError, AttributeError):
            continue
        setter.argtypes, setter.restype = [ctypes.c_int], ctypes.c_int
        getter.argtypes, getter.restype = [], ctypes.c_int
        return setter, path, max(1, int(getter()))
    return None, None, 1


_set_local, library, max_threads = _load()


def thread_timeout():
    """log2 of the cycles OpenBLAS's idle workers spin before sleeping (the
    OPENBLAS_THREAD_TIMEOUT in force when SciPy's OpenBLAS loaded), or None if unknown."""
    if library is None:
        return None
    try:
        fn = ctypes.CDLL(library).openblas_thread_timeout
    except (OSError, AttributeError):  # pragma: no cover - other OpenBLAS builds
        return None
    fn.argtypes, fn.restype = [], ctypes.c_int
    n = int(fn())                      # the variable as read; 0 = unset (OpenBLAS uses 28)
    return 28 if n <= 0 else min(30, max(4, n))


def set_max_threads(n: int) -> None:
    """BLAS threads for large GEMMs (default: OpenBLAS's own count at import)."""
    global max_threads
    max_threads = max(1, int(n))
    _state.current = None


def use_for(macs: int) -> None:
    """Set the calling thread's BLAS thread count for a GEMM of ``macs`` multiply-adds."""
    if _set_local is None:
        return
    n = 1 if macs < threshold else max_threads
    if getattr(_state, "current", None) != n:
        _set_local(n)
        _state.current = n


def gemm_macs(m: int, k: int, n: int) -> int:
    return int(m) * int(k) * int(n)


__all__ = ["use_for", "set_max_threads", "threshold", "max_threads", "library", "gemm_macs"]
