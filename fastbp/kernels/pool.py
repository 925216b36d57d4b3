"""2-D pooling kernels (NCHW), forward and backward, no padding.

x (N, C, H, W) → y (N, C, OH, OW), windows of (KH, KW) with stride (sh, sw):
``OH = (H − KH)//sh + 1``, ``OW = (W − KW)//sw + 1``. Every kernel is parallel over the
N·C image planes (each thread owns the planes it writes: race-free, deterministic).

Max pooling sends each output's gradient to its arg-max. The arg-max is found exactly as
PyTorch's CPU kernel does: scanning the window row by row, a value replaces the current
best when it is greater or NaN, so on ties the first position wins and a NaN is never
passed over (the last NaN in the window wins).
"""
import numpy as np
from numba import prange

from .._jit import dual


@dual("pool")
def max_forward(x, KH, KW, sh, sw, y, idx):
    """Max pooling forward.

    x (N, C, H, W); y (N, C, OH, OW) and idx (N, C, OH, OW) int32 outputs:
    y[n,c,i,j] = max_{p<KH, q<KW} x[n,c,i·sh+p,j·sw+q]; idx = the flat position h·W + w of
    the arg-max in the plane (first on ties, NaN wins).
    """
    N, C, H, Wd = x.shape
    OH, OW = y.shape[2], y.shape[3]
    for t in prange(N * C):
        n = t // C
        c = t - n * C
        for i in range(OH):
            for j in range(OW):
                h0 = i * sh
                w0 = j * sw
                best = x[n, c, h0, w0]
                arg = h0 * Wd + w0
                for p in range(KH):
                    for q in range(KW):
                        v = x[n, c, h0 + p, w0 + q]
                        if v > best or v != v:
                            best = v
                            arg = (h0 + p) * Wd + w0 + q
                y[n, c, i, j] = best
                idx[n, c, i, j] = arg


@dual("pool")
def max_backward(dy, idx, dx):
    """Max pooling backward on flattened planes: dx[t, idx[t, u]] += dy[t, u], zero elsewhere.

    dy, idx (N·C, OH·OW); dx (N·C, H·W) output (overwritten). Overlapping windows
    (stride < size) accumulate. Each plane t is owned by one thread.
    """
    P, HW = dx.shape
    Q = dy.shape[1]
    zero = dx.dtype.type(0)
    for t in prange(P):
        plane = dx[t]
        for v in range(HW):
            plane[v] = zero
        g = dy[t]
        a = idx[t]
        for u in range(Q):
            plane[a[u]] += g[u]


@dual("pool")
def max_forward_2x2(x, y, idx):
    """Max pooling forward for the common 2×2 window with stride 2 (same result as
    ``max_forward`` with KH = KW = sh = sw = 2; unrolled window)."""
    N, C, H, Wd = x.shape
    OH, OW = y.shape[2], y.shape[3]
    for t in prange(N * C):
        n = t // C
        c = t - n * C
        for i in range(OH):
            h0 = 2 * i
            for j in range(OW):
                w0 = 2 * j
                best = x[n, c, h0, w0]
                arg = h0 * Wd + w0
                v = x[n, c, h0, w0 + 1]
                if v > best or v != v:
                    best = v
                    arg = h0 * Wd + w0 + 1
                v = x[n, c, h0 + 1, w0]
                if v > best or v != v:
                    best = v
                    arg = (h0 + 1) * Wd + w0
                v = x[n, c, h0 + 1, w0 + 1]
                if v > best or v != v:
                    best = v
                    arg = (h0 + 1) * Wd + w0 + 1
                y[n, c, i, j] = best
                idx[n, c, i, j] = arg


@dual("pool")
def avg_forward(x, KH, KW, sh, sw, y):
    """Average pooling forward.

    x (N, C, H, W); y (N, C, OH, OW) output:
    y[n,c,i,j] = (1 / (KH·KW)) Σ_{p<KH, q<KW} x[n,c,i·sh+p,j·sw+q].
    """
    N, C, H, Wd = x.shape
    OH, OW = y.shape[2], y.shape[3]
    scale = x.dtype.type(1.0 / (KH * KW))
    zero = x.dtype.type(0)
    for t in prange(N * C):
        n = t // C
        c = t - n * C
        for i in range(OH):
            for j in range(OW):
                s = zero
                for p in range(KH):
                    for q in range(KW):
                        s += x[n, c, i * sh + p, j * sw + q]
                y[n, c, i, j] = s * scale


@dual("pool")
def avg_backward(dy, KH, KW, sh, sw, dx):
    """Average pooling backward.

    dy (N, C, OH, OW); dx (N, C, H, W) output (overwritten):
    dx[n,c,i·sh+p,j·sw+q] += dy[n,c,i,j] / (KH·KW) for every window position (p, q).
    """
    N, C, H, Wd = dx.shape
    OH, OW = dy.shape[2], dy.shape[3]
    scale = dx.dtype.type(1.0 / (KH * KW))
    zero = dx.dtype.type(0)
    for t in prange(N * C):
        n = t // C
        c = t - n * C
        for h in range(H):
            for w_ in range(Wd):
                dx[n, c, h, w_] = zero
        for i in range(OH):
            for j in range(OW):
                g = dy[n, c, i, j] * scale
                for p in range(KH):
                    for q in range(KW):
                        dx[n, c, i * sh + p, j * sw + q] += g


# ---------------------------------------------------------------------------- entry points
def _pair(v):
    return (v, v) if isinstance(v, (int, np.integer)) else (int(v[0]), int(v[1]))


def out_size(H, Wd, KH, KW, sh, sw):
    """Output spatial size ``((H − KH)//sh + 1, (W − KW)//sw + 1)``."""
    return (H - KH) // sh + 1, (Wd - KW) // sw + 1


def maxpool2d_forward(x, size, stride=None):
    """Max pooling. x (N, C, H, W) C-contiguous; size, stride: int or (h, w), stride
    defaults to size. Returns (y (N, C, OH, OW), idx (N, C, OH, OW) int32 arg-max positions
    h·W + w within each plane; first on ties, as PyTorch)."""
    KH, KW = _pair(size)
    sh, sw = _pair(size if stride is None else stride)
    N, C, H, Wd = x.shape
    OH, OW = out_size(H, Wd, KH, KW, sh, sw)
    y = np.empty((N, C, OH, OW), dtype=x.dtype)
    idx = np.empty((N, C, OH, OW), dtype=np.int32)
    work = N * C * OH * OW * KH * KW
    if KH == KW == sh == sw == 2:
        max_forward_2x2(x, y, idx, work=work)
    else:
        max_forward(x, KH, KW, sh, sw, y, idx, work=work)
    return y, idx


def maxpool2d_backward(dy, idx, x_shape):
    """Max pooling backward. dy, idx (N, C, OH, OW) → dx (x_shape) with
    dx.flat-per-plane[idx] += dy and zeros elsewhere."""
    N, C, H, Wd = x_shape
    dx = np.empty(x_shape, dtype=dy.dtype)
    OH, OW = dy.shape[2], dy.shape[3]
    max_backward(dy.reshape(N * C, OH * OW), idx.reshape(N * C, OH * OW),
                 dx.reshape(N * C, H * Wd), work=dx.size + dy.size)
    return dx


def avgpool2d_forward(x, size, stride=None):
    """Average pooling. x (N, C, H, W) C-contiguous → y (N, C, OH, OW), the mean of each
    (KH, KW) window; size, stride: int or (h, w), stride defaults to size."""
    KH, KW = _pair(size)
    sh, sw = _pair(size if stride is None else stride)
    N, C, H, Wd = x.shape
    OH, OW = out_size(H, Wd, KH, KW, sh, sw)
    y = np.empty((N, C, OH, OW), dtype=x.dtype)
    avg_forward(x, KH, KW, sh, sw, y, work=y.size * KH * KW)
    return y


def avgpool2d_backward(dy, x_shape, size, stride=None):
    """Average pooling backward. dy (N, C, OH, OW) → dx (x_shape): each output's gradient
    spread evenly, dy/(KH·KW), over its window (overlaps accumulate)."""
    KH, KW = _pair(size)
    sh, sw = _pair(size if stride is None else stride)
    dx = np.empty(x_shape, dtype=dy.dtype)
    avg_backward(dy, KH, KW, sh, sw, dx, work=dy.size * KH * KW + dx.size)
    return dx
