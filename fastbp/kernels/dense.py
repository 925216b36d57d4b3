"""Dense (fully connected) kernels: ``y = x W + b``, with an optional fused ReLU.

Arrays are 2-D and C-contiguous; the layer flattens any leading dimensions first.
GEMMs go through BLAS (``np.dot`` inside njit reaches it through SciPy), so these kernels
are compiled serial: BLAS brings its own threads, and BLAS must never run inside prange.
"""
import numpy as np

from .._jit import jit


@jit
def dense_forward(x, W, b, relu):
    """Dense forward.

    x (M, D), W (D, N), b (N,) or (0,) for no bias, relu: bool.
    Returns y (M, N) = x W + b, then max(y, 0) when ``relu``.
    """
    y = np.dot(x, W)
    M, N = y.shape
    zero = y.dtype.type(0)
    if b.shape[0] > 0:
        for i in range(M):
            for j in range(N):
                y[i, j] += b[j]
    if relu:
        for i in range(M):
            for j in range(N):
                y[i, j] = max(y[i, j], zero)
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
    zero = dy.dtype.type(0)
    if relu:
        dz = np.empty_like(dy)
        for i in range(M):
            for j in range(N):
                dz[i, j] = dy[i, j] if y[i, j] > zero else zero
    else:
        dz = dy
    dW = np.dot(x.T, dz)
    if has_bias:
        db = np.zeros(N, dtype=dy.dtype)
        for i in range(M):
            for j in range(N):
                db[j] += dz[i, j]
    else:
        db = np.zeros(0, dtype=dy.dtype)
    if input_grad:
        dx = np.dot(dz, W.T)
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
def mlp_forward(x, Ws, bs, relus, ys):
    """Forward through L dense layers, writing every layer's output.

    x (M, D0); Ws[i] (D_i, D_{i+1}); bs[i] (D_{i+1},) or (0,); relus[i] bool;
    ys[i] (M, D_{i+1}) preallocated outputs: ``h_0 = x``,
    ``ys[i] = h_{i+1} = act_i(h_i W_i + b_i)`` with act_i = ReLU if relus[i] else identity.
    """
    h = x
    for i in range(len(Ws)):
        y = ys[i]
        np.dot(h, Ws[i], y)
        b = bs[i]
        M, N = y.shape
        zero = y.dtype.type(0)
        if b.shape[0] > 0:
            for r in range(M):
                for j in range(N):
                    y[r, j] += b[j]
        if relus[i]:
            for r in range(M):
                for j in range(N):
                    y[r, j] = max(y[r, j], zero)
        h = y


@jit
def mlp_backward(x, Ws, ys, dy, relus, has_bias, input_grad, dWs, dbs):
    """Backward through the chain of ``mlp_forward``, from the last layer to the first.

    x (M, D0), Ws, ys, relus as in ``mlp_forward``; dy (M, D_L) the gradient of the last
    output. For layer i: ``dz_i = d_{i+1} ⊙ [ys[i] > 0]`` if relus[i] else ``d_{i+1}``;
    ``dWs[i] = h_iᵀ dz_i``; ``dbs[i] = Σ_rows dz_i`` when has_bias[i];
    ``d_i = dz_i W_iᵀ``. dWs[i] (D_i, D_{i+1}) and dbs[i] are preallocated outputs.
    Returns dx = d_0 (M, D0), or an empty (0, 0) array when not ``input_grad``.
    """
    L = len(Ws)
    d = dy
    dx = np.zeros((0, 0), dtype=dy.dtype)
    zero = dy.dtype.type(0)
    for j in range(L):
        i = L - 1 - j
        y = ys[i]
        M, N = y.shape
        if relus[i]:
            dz = np.empty_like(d)
            for r in range(M):
                for c in range(N):
                    dz[r, c] = d[r, c] if y[r, c] > zero else zero
        else:
            dz = d
        h = x if i == 0 else ys[i - 1]
        np.dot(h.T, dz, dWs[i])
        if has_bias[i]:
            db = dbs[i]
            db[:] = zero
            for r in range(M):
                for c in range(N):
                    db[c] += dz[r, c]
        if i > 0 or input_grad:
            d = np.dot(dz, Ws[i].T)
            if i == 0:
                dx = d
    return dx
