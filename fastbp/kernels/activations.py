"""Element-wise activation kernels, forward and backward, and row-wise softmax.

Every kernel works on flat (1-D, C-contiguous) arrays — the layer ravels — except softmax,
which takes rows ``(M, K)``. Each writes into an explicit output buffer and is compiled
serial and parallel from one source (``dual``); the caller passes ``work=x.size``.
Constants are made with ``x.dtype.type(...)`` so float32 work stays float32.
"""
from numba import prange

from .._jit import dual
from ._math import fexp, ftanh, fsigmoid


# --- forward -------------------------------------------------------------------------
@dual("activations")
def sigmoid_forward(x, out):
    """out = σ(x) = 1 / (1 + e^-x).   x, out: (n,)"""
    for i in prange(x.shape[0]):
        out[i] = fsigmoid(x[i])


@dual("activations")
def tanh_forward(x, out):
    """out = tanh(x).   x, out: (n,)"""
    for i in prange(x.shape[0]):
        out[i] = ftanh(x[i])


@dual("activations")
def relu_forward(x, out):
    """out = max(x, 0) (NaN propagates).   x, out: (n,)"""
    zero = x.dtype.type(0)
    for i in prange(x.shape[0]):
        v = x[i]
        out[i] = v if not v < zero else zero


@dual("activations")
def leaky_relu_forward(x, alpha, out):
    """out = x if x > 0 else alpha·x.   x, out: (n,); alpha: scalar of x's dtype"""
    zero = x.dtype.type(0)
    for i in prange(x.shape[0]):
        v = x[i]
        out[i] = v if not v < zero else alpha * v


@dual("activations")
def elu_forward(x, alpha, out):
    """out = x if x > 0 else alpha·(e^x − 1).   x, out: (n,); alpha: scalar of x's dtype"""
    zero = x.dtype.type(0)
    one = x.dtype.type(1)
    for i in prange(x.shape[0]):
        v = x[i]
        e = alpha * (fexp(min(v, zero)) - one)
        out[i] = v if not v < zero else e


@dual("activations")
def gelu_forward(x, out):
    """out = ½·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))) (the tanh form).   x, out: (n,)"""
    half = x.dtype.type(0.5)
    one = x.dtype.type(1)
    c = x.dtype.type(0.7978845608028654)   # sqrt(2/pi)
    k = x.dtype.type(0.044715)
    for i in prange(x.shape[0]):
        v = x[i]
        out[i] = half * v * (one + ftanh(c * (v + k * v * v * v)))


# --- backward ------------------------------------------------------------------------
@dual("activations")
def sigmoid_backward(y, dy, dx):
    """dx = dy·y·(1 − y), with y = σ(x).   y, dy, dx: (n,)"""
    one = y.dtype.type(1)
    for i in prange(y.shape[0]):
        dx[i] = dy[i] * y[i] * (one - y[i])


@dual("activations")
def tanh_backward(y, dy, dx):
    """dx = dy·(1 − y²), with y = tanh(x).   y, dy, dx: (n,)"""
    one = y.dtype.type(1)
    for i in prange(y.shape[0]):
        dx[i] = dy[i] * (one - y[i] * y[i])


@dual("activations")
def relu_backward(x, dy, dx):
    """dx = dy·[x > 0] (the subgradient at 0 is 0, as in PyTorch).   x, dy, dx: (n,)"""
    zero = x.dtype.type(0)
    for i in prange(x.shape[0]):
        dx[i] = dy[i] if x[i] > zero else zero


@dual("activations")
def leaky_relu_backward(x, alpha, dy, dx):
    """dx = dy if x > 0 else alpha·dy.   x, dy, dx: (n,)"""
    zero = x.dtype.type(0)
    for i in prange(x.shape[0]):
        dx[i] = dy[i] if x[i] > zero else alpha * dy[i]


@dual("activations")
def elu_backward(x, y, alpha, dy, dx):
    """dx = dy if x > 0 else dy·(y + alpha)  (since d/dx alpha(e^x − 1) = y + alpha).   (n,)"""
    zero = x.dtype.type(0)
    for i in prange(x.shape[0]):
        dx[i] = dy[i] if x[i] > zero else dy[i] * (y[i] + alpha)


@dual("activations")
def gelu_backward(x, dy, dx):
    """dx = dy·(½(1 + t) + ½·x·(1 − t²)·√(2/π)·(1 + 3·0.044715·x²)),
    t = tanh(√(2/π)(x + 0.044715 x³)).   x, dy, dx: (n,)"""
    half = x.dtype.type(0.5)
    one = x.dtype.type(1)
    c = x.dtype.type(0.7978845608028654)
    k = x.dtype.type(0.044715)
    k3 = x.dtype.type(3 * 0.044715)
    zero = x.dtype.type(0)
    for i in prange(x.shape[0]):
        v = x[i]
        t = ftanh(c * (v + k * v * v * v))
        s = one - t * t
        g = half * (one + t)
        if s != zero:   # tanh saturated (large |x|): skip the term, x² could overflow (0·inf = NaN)
            g += half * v * s * c * (one + k3 * v * v)
        dx[i] = dy[i] * g


# --- softmax over the last axis ------------------------------------------------------
@dual("activations")
def softmax_forward(x, out):
    """out[m] = exp(x[m] − max x[m]) / Σ_k exp(x[m, k] − max x[m]).   x, out: (M, K)"""
    M, K = x.shape
    for m in prange(M):
        mx = x[m, 0]
        for k in range(1, K):
            mx = max(mx, x[m, k])
        s = x.dtype.type(0)
        for k in range(K):
            e = fexp(x[m, k] - mx)
            out[m, k] = e
            s += e
        inv = x.dtype.type(1) / s
        for k in range(K):
            out[m, k] *= inv


@dual("activations")
def softmax_backward(y, dy, dx):
    """dx[m] = y[m] ⊙ (dy[m] − ⟨dy[m], y[m]⟩), with y = softmax(x).   y, dy, dx: (M, K)"""
    M, K = y.shape
    for m in prange(M):
        s = y.dtype.type(0)
        for k in range(K):
            s += dy[m, k] * y[m, k]
        for k in range(K):
            dx[m, k] = y[m, k] * (dy[m, k] - s)
