"""Dense (fully connected) kernels: ``y = x W + b``, with an optional fused ReLU.

Arrays are 2-D and C-contiguous; the layer flattens any leading dimensions first.
GEMMs go through BLAS (``fastbp._cblas.dot``, on the OpenBLAS ``fastbp._blas`` chose), so
these kernels are compiled serial: BLAS brings its own threads, and BLAS must never run
inside prange.
"""
import numpy as np

from .. import _cblas
from .._cblas import dot
from .._jit import jit


@jit(inline="always")
def _bias_relu(y, b, relu):
    """y += b (when b is not empty), then max(y, 0) when ``relu``: one pass over y (M, N)."""
    M, N = y.shape
    zero = y.dtype.type(0)
    has_bias = b.shape[0] > 0
    for i in range(M):
        row = y[i]
        if has_bias and relu:
            for j in range(N):
                row[j] = max(row[j] + b[j], zero)
        elif has_bias:
            for j in range(N):
                row[j] += b[j]
        elif relu:
            for j in range(N):
                row[j] = max(row[j], zero)


@jit(inline="always")
def _mask_colsum(d, y, relu, has_bias, db):
    """dz = d ⊙ [y > 0] when ``relu`` (else d itself) and, when ``has_bias``,
    db = Σ_rows dz, in one pass. d, y (M, N); db (N,). Returns dz."""
    M, N = d.shape
    zero = d.dtype.type(0)
    if has_bias:
        db[:] = zero
    if not relu:
        if has_bias:
            for i in range(M):
                row = d[i]
                for j in range(N):
                    db[j] += row[j]
        return d
    dz = np.empty_like(d)
    for i in range(M):
        src, ys, dst = d[i], y[i], dz[i]
        for j in range(N):
            dst[j] = src[j] if ys[j] > zero else zero
        if has_bias:
            for j in range(N):
                db[j] += dst[j]
    return dz


@jit
def dense_forward(x, W, b, relu):
    """Dense forward.

    x (M, D), W (D, N), b (N,) or (0,) for no bias, relu: bool.
    Returns y (M, N) = x W + b, then max(y, 0) when ``relu``.
    """
    y = np.empty((x.shape[0], W.shape[1]), dtype=x.dtype)
    dot(x, W, y)
    _bias_relu(y, b, relu)
    return y


@jit
def dense_backward(x, W, dy, y, relu, has_bias, input_grad):
    """Dense backward.

    x (M, D), W (D, N), dy (M, N); y (M, N) is the forward output, read only when ``relu``
    (then the incoming gradient is first masked: dz = dy ⊙ [y > 0], else dz = dy).
    Returns (dx (M, D) = dz Wᵀ or an empty (0, 0) array when not ``input_grad``,
    dW (D, N) = xᵀ dz, db (N,) = Σ_rows dz or an empty (0,) array without bias).
    """
    M, N = dy.shape
    db = np.zeros(N if has_bias else 0, dtype=dy.dtype)
    dz = _mask_colsum(dy, y, relu, has_bias, db)
    dW = np.empty((x.shape[1], N), dtype=dy.dtype)
    dot(x.T, dz, dW)
    if input_grad:
        dx = np.empty((M, W.shape[0]), dtype=dy.dtype)
        dot(dz, W.T, dx)
    else:
        dx = np.zeros((0, 0), dtype=dy.dtype)
    return dx, dW, db


@jit
def maxout_reduce(z, pieces):
    """Maxout selection: y[m, o] = max_p z[m, o·P + p], idx[m, o] = its arg-max (first on ties).

    z (M, O·P) → y (M, O), idx (M, O) int64.  NaN propagates (a NaN piece wins).
    """
    M = z.shape[0]
    O = z.shape[1] // pieces
    y = np.empty((M, O), dtype=z.dtype)
    idx = np.empty((M, O), dtype=np.int64)
    for m in range(M):
        for o in range(O):
            base = o * pieces
            best = z[m, base]
            arg = 0
            for p in range(1, pieces):
                v = z[m, base + p]
                if v > best or (v != v and best == best):
                    best = v
                    arg = p
            y[m, o] = best
            idx[m, o] = arg
    return y, idx


@jit
def maxout_scatter(dy, idx, pieces):
    """Maxout backward selection: dz[m, o·P + idx[m, o]] = dy[m, o], every other entry 0.

    dy (M, O), idx (M, O) → dz (M, O·P).
    """
    M, O = dy.shape
    dz = np.zeros((M, O * pieces), dtype=dy.dtype)
    for m in range(M):
        for o in range(O):
            dz[m, o * pieces + idx[m, o]] = dy[m, o]
    return dz


# --- a chain of dense layers in one call ------------------------------------------------
# ``Sequential`` runs a model made only of Dense layers (each optionally followed by a
# ReLU) through these two kernels: one compiled call per pass instead of one per layer.
# Plural arguments are tuples with one entry per layer; ``bs[i]`` is (0,) without bias.
@jit
def mlp_forward(x, Ws, bs, relus, ys, mkl_threads):
    """Forward through L dense layers, writing every layer's output.

    x (M, D0); Ws[i] (D_i, D_{i+1}); bs[i] (D_{i+1},) or (0,); relus[i] bool;
    ys[i] (M, D_{i+1}) preallocated outputs: ``h_0 = x``,
    ``ys[i] = h_{i+1} = act_i(h_i W_i + b_i)`` with act_i = ReLU if relus[i] else identity.
    mkl_threads: MKL's thread count for these GEMMs, set and restored here (0: leave MKL
    alone; ``fastbp._blas.mkl_threads_for``).
    """
    prev = _cblas.mkl_threads_enter(mkl_threads)
    h = x
    for i in range(len(Ws)):
        y = ys[i]
        dot(h, Ws[i], y)
        _bias_relu(y, bs[i], relus[i])
        h = y
    _cblas.mkl_threads_exit(prev)


@jit
def mlp_backward(x, Ws, ys, dy, relus, has_bias, input_grad, dWs, dbs, mkl_threads):
    """Backward through the chain of ``mlp_forward``, from the last layer to the first.

    x (M, D0), Ws, ys, relus as in ``mlp_forward``; dy (M, D_L) the gradient of the last
    output. For layer i: ``dz_i = d_{i+1} ⊙ [ys[i] > 0]`` if relus[i] else ``d_{i+1}``;
    ``dWs[i] = h_iᵀ dz_i``; ``dbs[i] = Σ_rows dz_i`` when has_bias[i];
    ``d_i = dz_i W_iᵀ``. dWs[i] (D_i, D_{i+1}) and dbs[i] are preallocated outputs.
    Returns dx = d_0 (M, D0), or an empty (0, 0) array when not ``input_grad``.
    mkl_threads: as in ``mlp_forward``.

    ``d_i = dz_i W_iᵀ`` is computed as ``(dz_iᵀ)ᵀ W_iᵀ`` from a transposed copy of dz_i
    (``_cblas.transposed``): OpenBLAS runs that TT product like its NN ones and the row-
    major NT form ``dz Wᵀ`` slower (one thread, 32×128×128: NT 15.0-15.4 µs, TT 9.4, NN
    9.2; AMD EPYC Zen 4).
    """
    prev = _cblas.mkl_threads_enter(mkl_threads)
    L = len(Ws)
    M = dy.shape[0]
    d = dy
    dx = np.zeros((0, 0), dtype=dy.dtype)
    for j in range(L):
        i = L - 1 - j
        dz = _mask_colsum(d, ys[i], relus[i], has_bias[i], dbs[i])
        h = x if i == 0 else ys[i - 1]
        dot(h.T, dz, dWs[i])
        if i > 0 or input_grad:
            K, N = Ws[i].shape
            d = np.empty((M, K), dtype=dy.dtype)
            if M > 0:               # (BLAS rejects the leading dimension M = 0)
                _cblas.gemm(True, True, M, K, N, _cblas.transposed(dz), 0, M, Ws[i], 0, N, 0,
                            d, 0, K)
            if i == 0:
                dx = d
    _cblas.mkl_threads_exit(prev)
    return dx


# --- pieces of the chain for callers that run the GEMMs themselves -----------------------
# ``fastbp._mlp`` splits the large GEMMs of a chain in column blocks over Python threads,
# each on a one-thread MKL GEMM (``gemm_block``), and runs the element-wise passes here.
@jit
def gemm_block(ta, tb, a, b, out, c0, c1, one_thread):
    """out[:, c0:c1] = op(a) · op(b)[:, c0:c1], op(m) = mᵀ when its flag is set.

    a, b, out 2-D C-contiguous, one float dtype: op(a) (M, K), op(b) (K, N), out (M, N).
    ``one_thread``: on ``_cblas.gemm1`` (MKL's one-thread GEMM when fastbp found MKL), else
    on ``_cblas.gemm`` (the kernels' OpenBLAS, with the caller's thread count).
    """
    M, N = out.shape
    K = a.shape[0] if ta else a.shape[1]
    if c1 <= c0 or M == 0:
        return
    if K == 0:
        out[:, c0:c1] = 0
        return
    ldb = b.shape[1]
    ib = c0 * ldb if tb else c0            # first column of op(b)'s block
    if one_thread:
        _cblas.gemm1(ta, tb, M, c1 - c0, K, a, 0, a.shape[1], b, ib, ldb, 0, out, c0, N)
    else:
        _cblas.gemm(ta, tb, M, c1 - c0, K, a, 0, a.shape[1], b, ib, ldb, 0, out, c0, N)


@jit
def bias_relu(y, b, relu):
    """In place on y (M, N): y += b (b (N,), or (0,) for none), then max(y, 0) if ``relu``."""
    _bias_relu(y, b, relu)


@jit
def mask_colsum(d, y, relu, has_bias, db):
    """dz = d ⊙ [y > 0] if ``relu`` (a new array) else d itself; db (N,) = Σ_rows dz when
    ``has_bias``. d, y (M, N). Returns dz."""
    return _mask_colsum(d, y, relu, has_bias, db)
