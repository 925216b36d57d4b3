"""``gemm`` with leading dimensions, offsets and ``beta``, callable from compiled code.

Numba's ``np.dot`` reaches BLAS through SciPy but only as ``C = A B`` on whole contiguous
matrices. The stride-1 convolution kernels need more: a "matrix" that is a window of a
padded image (rows ``ld`` apart, starting at an offset), and ``C += A B`` so the taps of a
kernel accumulate in place. CBLAS has all of that, and SciPy's wheels ship OpenBLAS with
the CBLAS symbols exported under a ``scipy_`` prefix (``scipy_cblas_sgemm``).

The library is loaded with ``llvmlite.binding.load_library_permanently`` and the symbols
are declared as ``numba.types.ExternalFunction``: calls are resolved by name when the
machine code is linked, so kernels that use them can still be cached on disk (a ctypes
function pointer would pin an address and disable the cache).

``available`` is False when SciPy's BLAS is not such an OpenBLAS; callers then take their
``np.dot`` path. Only call ``gemm`` from compiled code when ``available`` is True.
"""
from __future__ import annotations

import numpy as np
from numba import types
from numba.extending import intrinsic, overload

from . import _blas

ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112
# CBLAS (LP64) takes C ints: every size, offset-free dimension and leading dimension must
# fit in 31 bits. Callers check ``fits`` on their largest matrix extent.
INT_MAX = 2 ** 31 - 1

available = False
if _blas.library is not None:
    try:
        import llvmlite.binding as _llvm
        _lib = __import__("ctypes").CDLL(_blas.library)
        _lib.scipy_cblas_sgemm, _lib.scipy_cblas_dgemm  # noqa: B018  (both must exist)
        _llvm.load_library_permanently(_blas.library)
        available = True
    except (OSError, AttributeError, ImportError):  # pragma: no cover - other BLAS builds
        available = False


def fits(n: int) -> bool:
    """True when ``n`` (an element count or extent) can be passed to CBLAS as an int."""
    return int(n) <= INT_MAX


def _decl(name, dt):
    p = types.CPointer(dt)
    i = types.int32
    return types.ExternalFunction(name, types.void(i, i, i, i, i, i, dt, p, i, p, i, dt, p, i))


_sgemm = _decl("scipy_cblas_sgemm", types.float32)
_dgemm = _decl("scipy_cblas_dgemm", types.float64)


@intrinsic
def _ptr(typingctx, arr, off):
    """Pointer to ``arr``'s flat element ``off`` (arr must be contiguous)."""
    sig = types.CPointer(arr.dtype)(arr, off)

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        return builder.gep(ary.data, [args[1]])
    return sig, codegen


def gemm(ta, tb, M, N, K, A, ia, lda, B, ib, ldb, beta, C, ic, ldc):
    """``C = op(A) op(B) + beta·C`` on row-major windows of flat storage (compiled code only).

    ``ta``/``tb``: True to transpose. op(A) is (M, K), op(B) is (K, N), C is (M, N); each
    matrix starts at flat element ``ia``/``ib``/``ic`` of its C-contiguous array and its
    rows are ``lda``/``ldb``/``ldc`` elements apart (the row length before any transpose).
    A, B and C share one float dtype (float32 → sgemm, float64 → dgemm); ``beta`` is 0
    (overwrite C) or 1 (accumulate). No bounds are checked: the caller owns the windows.
    """
    raise NotImplementedError("fastbp._cblas.gemm is only callable from compiled code")


@overload(gemm, jit_options=dict(cache=True))
def _gemm_impl(ta, tb, M, N, K, A, ia, lda, B, ib, ldb, beta, C, ic, ldc):
    if A.dtype == types.float32:
        fn, t = _sgemm, np.float32
    elif A.dtype == types.float64:
        fn, t = _dgemm, np.float64
    else:  # pragma: no cover
        return None

    def impl(ta, tb, M, N, K, A, ia, lda, B, ib, ldb, beta, C, ic, ldc):
        fn(np.int32(ROW_MAJOR), np.int32(TRANS if ta else NO_TRANS),
           np.int32(TRANS if tb else NO_TRANS), np.int32(M), np.int32(N), np.int32(K),
           t(1), _ptr(A, ia), np.int32(lda), _ptr(B, ib), np.int32(ldb), t(beta),
           _ptr(C, ic), np.int32(ldc))
    return impl


__all__ = ["available", "gemm", "fits"]
