"""Plain-loop NumPy references for convolution and pooling (slow, obviously correct), and
a Sequential run layer by layer (the reference for the fused paths).

Every function follows the textbook definition element by element, with no packing tricks,
so the compiled kernels can be checked against it. NCHW layout, W (F, C, KH, KW).
"""
import numpy as np


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def pad(x, ph, pw):
    """Zero-pad the last two axes by (ph, pw) on each side."""
    N, C, H, W = x.shape
    out = np.zeros((N, C, H + 2 * ph, W + 2 * pw), dtype=x.dtype)
    out[:, :, ph:ph + H, pw:pw + W] = x
    return out


def conv2d(x, W, b=None, stride=1, padding=0):
    """y[n,f,i,j] = b[f] + Σ_c Σ_p Σ_q W[f,c,p,q] · xp[n,c,i·sh+p,j·sw+q]."""
    sh, sw = _pair(stride)
    ph, pw = _pair(padding)
    xp = pad(x, ph, pw)
    N, C, H, Wd = xp.shape
    F, _, KH, KW = W.shape
    OH, OW = (H - KH) // sh + 1, (Wd - KW) // sw + 1
    y = np.zeros((N, F, OH, OW), dtype=x.dtype)
    for n in range(N):
        for f in range(F):
            for i in range(OH):
                for j in range(OW):
                    s = 0.0 if b is None else b[f]
                    for c in range(C):
                        for p in range(KH):
                            for q in range(KW):
                                s += W[f, c, p, q] * xp[n, c, i * sh + p, j * sw + q]
                    y[n, f, i, j] = s
    return y


def conv2d_backward_direct(x, W, dy, stride=1, padding=0):
    """The direct derivative of ``conv2d``: every product W[f,c,p,q]·xp[n,c,i·sh+p,j·sw+q]
    in y[n,f,i,j] sends dy[n,f,i,j]·W to xp and dy[n,f,i,j]·xp to W. Returns (dx, dW, db)."""
    sh, sw = _pair(stride)
    ph, pw = _pair(padding)
    xp = pad(x, ph, pw)
    N, C, H, Wd = x.shape
    F, _, KH, KW = W.shape
    OH, OW = dy.shape[2:]
    dxp = np.zeros_like(xp)
    dW = np.zeros_like(W)
    for n in range(N):
        for f in range(F):
            for i in range(OH):
                for j in range(OW):
                    g = dy[n, f, i, j]
                    for c in range(C):
                        for p in range(KH):
                            for q in range(KW):
                                dxp[n, c, i * sh + p, j * sw + q] += g * W[f, c, p, q]
                                dW[f, c, p, q] += g * xp[n, c, i * sh + p, j * sw + q]
    db = dy.sum(axis=(0, 2, 3))
    return dxp[:, :, ph:ph + H, pw:pw + Wd], dW, db


def dilate(dy, sh, sw):
    """Insert (sh − 1) zero rows between rows and (sw − 1) zero columns between columns."""
    N, F, OH, OW = dy.shape
    out = np.zeros((N, F, (OH - 1) * sh + 1, (OW - 1) * sw + 1), dtype=dy.dtype)
    out[:, :, ::sh, ::sw] = dy
    return out


def conv2d_dx_flipped(dy, W, x_shape, stride=1, padding=0):
    """dx as the full convolution: the cross-correlation of dy, dilated by the stride and
    zero-padded by (KH − 1 − ph, KW − 1 − pw), with the flipped kernel
    Wf[c,f,p,q] = W[f,c,KH−1−p,KW−1−q]. Rows/columns of x that no window reached
    (when (H + 2p − KH) is not a multiple of the stride) get zero gradient."""
    sh, sw = _pair(stride)
    ph, pw = _pair(padding)
    N, C, H, Wd = x_shape
    F, _, KH, KW = W.shape
    d = dilate(dy, sh, sw)
    # pad so that the result covers the padded input (H + 2ph rows), then crop the padding
    Hp, Wp = H + 2 * ph, Wd + 2 * pw
    full = np.zeros((N, F, Hp + KH - 1, Wp + KW - 1), dtype=dy.dtype)
    full[:, :, KH - 1:KH - 1 + d.shape[2], KW - 1:KW - 1 + d.shape[3]] = d
    Wf = W[:, :, ::-1, ::-1].transpose(1, 0, 2, 3)          # (C, F, KH, KW), flipped
    dxp = conv2d(full, np.ascontiguousarray(Wf))             # (N, C, Hp, Wp)
    return dxp[:, :, ph:ph + H, pw:pw + Wd]


def maxpool2d(x, size, stride=None):
    """y = window max, idx = flat arg-max h·W + w (first on ties; NaN wins, as PyTorch)."""
    KH, KW = _pair(size)
    sh, sw = _pair(size if stride is None else stride)
    N, C, H, W = x.shape
    OH, OW = (H - KH) // sh + 1, (W - KW) // sw + 1
    y = np.zeros((N, C, OH, OW), dtype=x.dtype)
    idx = np.zeros((N, C, OH, OW), dtype=np.int64)
    for n in range(N):
        for c in range(C):
            for i in range(OH):
                for j in range(OW):
                    best, arg = -np.inf, i * sh * W + j * sw
                    for p in range(KH):
                        for q in range(KW):
                            v = x[n, c, i * sh + p, j * sw + q]
                            if v > best or np.isnan(v):
                                best, arg = v, (i * sh + p) * W + j * sw + q
                    y[n, c, i, j], idx[n, c, i, j] = best, arg
    return y, idx


def maxpool2d_backward(dy, idx, x_shape):
    dx = np.zeros(x_shape, dtype=dy.dtype)
    N, C, OH, OW = dy.shape
    W = x_shape[3]
    for n in range(N):
        for c in range(C):
            for i in range(OH):
                for j in range(OW):
                    a = idx[n, c, i, j]
                    dx[n, c, a // W, a % W] += dy[n, c, i, j]
    return dx


def avgpool2d(x, size, stride=None):
    KH, KW = _pair(size)
    sh, sw = _pair(size if stride is None else stride)
    N, C, H, W = x.shape
    OH, OW = (H - KH) // sh + 1, (W - KW) // sw + 1
    y = np.zeros((N, C, OH, OW), dtype=x.dtype)
    for i in range(OH):
        for j in range(OW):
            y[:, :, i, j] = x[:, :, i * sh:i * sh + KH, j * sw:j * sw + KW].mean(axis=(2, 3))
    return y


def avgpool2d_backward(dy, x_shape, size, stride=None):
    KH, KW = _pair(size)
    sh, sw = _pair(size if stride is None else stride)
    dx = np.zeros(x_shape, dtype=dy.dtype)
    for i in range(dy.shape[2]):
        for j in range(dy.shape[3]):
            dx[:, :, i * sh:i * sh + KH, j * sw:j * sw + KW] += \
                dy[:, :, i:i + 1, j:j + 1] / (KH * KW)
    return dx


def layer_by_layer(model, params, x, dy):
    """A Sequential run one layer at a time (no fusion), the chain rule by hand.
    Returns (y, dx, grads)."""
    caches = []
    for layer, p in zip(model.layers, params):
        x, c = layer.forward(p, x)
        caches.append(c)
    grads = [None] * len(params)
    for i in range(len(params) - 1, -1, -1):
        dy, grads[i] = model.layers[i].backward(params[i], caches[i], dy)
    return x, dy, grads
