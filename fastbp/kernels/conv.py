"""2-D convolution kernels (NCHW), forward and backward.

Layout: x (N, C, H, W), weights W (F, C, KH, KW), bias b (F,), y (N, F, OH, OW) with
``OH = (H + 2·ph − KH)//sh + 1`` and ``OW = (W + 2·pw − KW)//sw + 1``.

Forward is a cross-correlation::

    y[n,f,i,j] = b[f] + Σ_c Σ_p Σ_q W[f,c,p,q] · xp[n,c, i·sh + p, j·sw + q]

where ``xp`` is x zero-padded by (ph, pw). Backward, with ``dy = ∂L/∂y``:

- ``dW[f,c,p,q] = Σ_n Σ_i Σ_j dy[n,f,i,j] · xp[n,c, i·sh + p, j·sw + q]``: the
  cross-correlation of the input with the output gradient;
- ``db[f] = Σ_n Σ_i Σ_j dy[n,f,i,j]``;
- ``dx = ``the cross-correlation of ``dyd`` with the **flipped** kernel, where ``dyd`` is
  dy dilated by the stride (``sh − 1`` zeros between rows, ``sw − 1`` between columns) and
  zero-padded by ``(KH − 1 − ph, KW − 1 − pw)``; the flipped kernel swaps the channel axes
  and reverses both spatial axes: ``Wf[c,f,p,q] = W[f,c,KH−1−p,KW−1−q]``. So
  ``dx[n,c,h,w] = Σ_f Σ_p Σ_q Wf[c,f,p,q] · dyd[n,f,h+p,w+q]`` (a "full convolution").

Two algorithms compute the same numbers:

- ``direct``: plain loops, parallel over (sample, output channel) for y, over
  (sample, input channel) for dx and over (output channel, input channel) for dW, so
  every thread owns what it writes (race-free, deterministic). The dx loop is written as
  the flipped-kernel correlation above, skipping the structural zeros of ``dyd``.
- ``gemm``: im2col packing + one BLAS GEMM per chunk of samples (``np.dot``, outside
  any ``prange``); dW = dyᵀ-matrix × colsᵀ accumulated chunk by chunk in a fixed order
  (deterministic); dx = col2im(Wᵀ × dy-matrix), the scatter form of the same identity.

``conv2d_forward``/``conv2d_backward`` pick by work size (``DIRECT_MAX_WORK``, measured;
see asv_benchmarks/benchmarks/conv.py): on the measured machine im2col + GEMM won from tiny
sizes up even with one input channel, because the direct loops' rows (OW wide) are too
short to vectorise well.
"""
import numpy as np
from numba import prange

from .. import _blas
from .._jit import dual, jit

# Algorithm choice, measured on the 2-vCPU dev machine (asv_benchmarks/benchmarks/conv.py):
# the GEMM path won from about 2·10⁴ scalar ops up, for every channel count tried (C = 1..32);
# the direct loops win only on tiny problems, where buffers and BLAS calls dominate.
DIRECT_MAX_WORK = 20_000
CHUNK_ELEMENTS = 1 << 23         # at most this many im2col entries per chunk (32 MB float32)


def out_size(H, Wd, KH, KW, sh, sw, ph, pw):
    """Output spatial size ``((H + 2ph − KH)//sh + 1, (W + 2pw − KW)//sw + 1)``."""
    return (H + 2 * ph - KH) // sh + 1, (Wd + 2 * pw - KW) // sw + 1


# ---------------------------------------------------------------------------- direct loops
@dual("conv")
def direct_forward(x, W, b, sh, sw, ph, pw, relu, y):
    """Direct cross-correlation into ``y``.

    x (N, C, H, W), W (F, C, KH, KW), b (F,) or (0,) for no bias, y (N, F, OH, OW) output.
    y[n,f,i,j] = b[f] + Σ_c,p,q W[f,c,p,q]·xp[n,c,i·sh+p,j·sw+q]; then max(y, 0) if ``relu``.
    Parallel over (n, f).
    """
    N, C, H, Wd = x.shape
    F, _, KH, KW = W.shape
    OH, OW = y.shape[2], y.shape[3]
    zero = y.dtype.type(0)
    has_bias = b.shape[0] > 0
    for t in prange(N * F):
        n = t // F
        f = t - n * F
        b0 = b[f] if has_bias else zero
        for i in range(OH):
            for j in range(OW):
                y[n, f, i, j] = b0
        for c in range(C):
            for p in range(KH):
                for q in range(KW):
                    w = W[f, c, p, q]
                    # columns j with 0 <= j·sw + q − pw < Wd
                    jlo = max(0, (pw - q + sw - 1) // sw)
                    jhi = min(OW, (Wd - 1 + pw - q) // sw + 1)
                    for i in range(OH):
                        h = i * sh + p - ph
                        if h < 0 or h >= H:
                            continue
                        if sw == 1:
                            off = q - pw
                            for j in range(jlo, jhi):
                                y[n, f, i, j] += w * x[n, c, h, j + off]
                        else:
                            for j in range(jlo, jhi):
                                y[n, f, i, j] += w * x[n, c, h, j * sw + q - pw]
        if relu:
            for i in range(OH):
                for j in range(OW):
                    if y[n, f, i, j] < zero:
                        y[n, f, i, j] = zero


@dual("conv")
def direct_backward_dx(dz, W, sh, sw, ph, pw, dx):
    """Input gradient as the correlation of the dilated, padded dz with the flipped kernel.

    dz (N, F, OH, OW), W (F, C, KH, KW), dx (N, C, H, W) output (overwritten).
    dx[n,c,h,w] = Σ_f Σ_a Σ_e W[f,c,KH−1−a,KW−1−e]·dzd[n,f,h+a,w+e], where dzd is dz
    dilated by (sh, sw) and padded by (KH−1−ph, KW−1−pw); the loops visit only the
    non-zero entries of dzd. Parallel over (n, c).
    """
    N, F, OH, OW = dz.shape
    _, C, KH, KW = W.shape
    H, Wd = dx.shape[2], dx.shape[3]
    zero = dx.dtype.type(0)
    for t in prange(N * C):
        n = t // C
        c = t - n * C
        for h in range(H):
            for w_ in range(Wd):
                dx[n, c, h, w_] = zero
        for f in range(F):
            for h in range(H):
                for a in range(KH):
                    p = KH - 1 - a                    # flipped row
                    r = h + a - (KH - 1 - ph)         # row of dzd, = i·sh for a real row i
                    if r < 0 or r % sh != 0:
                        continue
                    i = r // sh
                    if i >= OH:
                        continue
                    for e in range(KW):
                        q = KW - 1 - e                # flipped column
                        w = W[f, c, p, q]
                        if sw == 1:
                            # dzd column w_ + e − (KW−1−pw) = j
                            off = e - (KW - 1 - pw)
                            lo = max(0, -off)
                            hi = min(Wd, OW - off)
                            for w_ in range(lo, hi):
                                dx[n, c, h, w_] += w * dz[n, f, i, w_ + off]
                        else:
                            # j·sw = w_ + e − (KW−1−pw)  <=>  w_ = j·sw + q − pw
                            for j in range(OW):
                                w_ = j * sw + q - pw
                                if 0 <= w_ < Wd:
                                    dx[n, c, h, w_] += w * dz[n, f, i, j]


@dual("conv")
def direct_backward_dw(x, dz, sh, sw, ph, pw, dW, db):
    """Weight and bias gradients by direct loops.

    x (N, C, H, W), dz (N, F, OH, OW); dW (F, C, KH, KW) and db (F,) or (0,) outputs.
    dW[f,c,p,q] = Σ_n,i,j dz[n,f,i,j]·xp[n,c,i·sh+p,j·sw+q]; db[f] = Σ_n,i,j dz[n,f,i,j].
    Parallel over (f, c); each sum runs in a fixed order (deterministic). The innermost
    loop accumulates a vector over j so it vectorises without reassociating a scalar sum.
    """
    N, C, H, Wd = x.shape
    F, _, KH, KW = dW.shape
    OH, OW = dz.shape[2], dz.shape[3]
    zero = dW.dtype.type(0)
    for t in prange(F * C):
        f = t // C
        c = t - f * C
        acc = np.zeros((KH, KW, OW), dtype=dW.dtype)
        for n in range(N):
            for i in range(OH):
                for p in range(KH):
                    h = i * sh + p - ph
                    if h < 0 or h >= H:
                        continue
                    for q in range(KW):
                        jlo = max(0, (pw - q + sw - 1) // sw)
                        jhi = min(OW, (Wd - 1 + pw - q) // sw + 1)
                        for j in range(jlo, jhi):
                            acc[p, q, j] += dz[n, f, i, j] * x[n, c, h, j * sw + q - pw]
        for p in range(KH):
            for q in range(KW):
                s = zero
                for j in range(OW):
                    s += acc[p, q, j]
                dW[f, c, p, q] = s
        if c == 0 and db.shape[0] > 0:
            accb = np.zeros(OW, dtype=dW.dtype)
            for n in range(N):
                for i in range(OH):
                    for j in range(OW):
                        accb[j] += dz[n, f, i, j]
            s = zero
            for j in range(OW):
                s += accb[j]
            db[f] = s


# ---------------------------------------------------------------------------- im2col + GEMM
@dual("conv")
def im2col(x, n0, KH, KW, sh, sw, ph, pw, OH, OW, cols):
    """Pack patches of samples n0 .. n0+m−1 as columns.

    x (N, C, H, W); cols (C·KH·KW, m·OH·OW) output, m = cols.shape[1] // (OH·OW):
    cols[(c·KH+p)·KW+q, k·OH·OW + i·OW + j] = xp[n0+k, c, i·sh+p, j·sw+q] (0 in the padding).
    Parallel over (sample, channel).
    """
    N, C, H, Wd = x.shape
    P = OH * OW
    m = cols.shape[1] // P
    zero = cols.dtype.type(0)
    for t in prange(m * C):
        k = t // C
        c = t - k * C
        n = n0 + k
        for p in range(KH):
            for q in range(KW):
                r = (c * KH + p) * KW + q
                jlo = max(0, (pw - q + sw - 1) // sw)
                jhi = max(jlo, min(OW, (Wd - 1 + pw - q) // sw + 1))
                for i in range(OH):
                    base = k * P + i * OW
                    h = i * sh + p - ph
                    if h < 0 or h >= H:
                        for j in range(OW):
                            cols[r, base + j] = zero
                        continue
                    for j in range(jlo):
                        cols[r, base + j] = zero
                    if sw == 1:
                        off = q - pw
                        for j in range(jlo, jhi):
                            cols[r, base + j] = x[n, c, h, j + off]
                    else:
                        for j in range(jlo, jhi):
                            cols[r, base + j] = x[n, c, h, j * sw + q - pw]
                    for j in range(jhi, OW):
                        cols[r, base + j] = zero


@dual("conv")
def gemm_to_nchw(t, b, n0, relu, y):
    """Scatter a GEMM result into NCHW, adding the bias and applying ReLU.

    t (F, m·P) with P = OH·OW, b (F,) or (0,), y (N, F, OH, OW) output:
    y[n0+k, f].flat[s] = t[f, k·P + s] + b[f]; then max(·, 0) if ``relu``. Parallel over (k, f).
    """
    F = t.shape[0]
    P = y.shape[2] * y.shape[3]
    m = t.shape[1] // P
    yf = y.reshape(y.shape[0], F, P)
    zero = t.dtype.type(0)
    has_bias = b.shape[0] > 0
    for u in prange(m * F):
        k = u // F
        f = u - k * F
        b0 = b[f] if has_bias else zero
        if relu:
            for s in range(P):
                v = t[f, k * P + s] + b0
                yf[n0 + k, f, s] = v if not v < zero else zero
        else:
            for s in range(P):
                yf[n0 + k, f, s] = t[f, k * P + s] + b0


@dual("conv")
def nchw_to_gemm(dy, y, n0, relu, t, db):
    """Gather dy of samples n0 .. n0+m−1 as a matrix, masking by ReLU and summing the bias grad.

    dy, y (N, F, OH, OW) (y read only when ``relu``), t (F, m·P) output,
    db (F,) accumulated (``db[f] += Σ t[f, :]``) or (0,) for no bias.
    t[f, k·P + s] = dz[n0+k, f].flat[s], dz = dy ⊙ [y > 0] if ``relu`` else dy. Parallel over f.
    """
    F = t.shape[0]
    P = dy.shape[2] * dy.shape[3]
    m = t.shape[1] // P
    dyf = dy.reshape(dy.shape[0], F, P)
    yf = y.reshape(y.shape[0], y.shape[1], P)
    zero = t.dtype.type(0)
    has_bias = db.shape[0] > 0
    for f in prange(F):
        acc = np.zeros(P, dtype=t.dtype)
        for k in range(m):
            for s in range(P):
                v = dyf[n0 + k, f, s]
                if relu and not yf[n0 + k, f, s] > zero:
                    v = zero
                t[f, k * P + s] = v
                acc[s] += v
        if has_bias:
            tot = zero
            for s in range(P):
                tot += acc[s]
            db[f] += tot


@dual("conv")
def col2im(dcols, n0, KH, KW, sh, sw, ph, pw, OH, OW, dx):
    """Scatter-add columns back to images (the adjoint of ``im2col``).

    dcols (C·KH·KW, m·OH·OW); dx (N, C, H, W) output, samples n0 .. n0+m−1 overwritten:
    dx[n0+k, c, i·sh+p−ph, j·sw+q−pw] += dcols[(c·KH+p)·KW+q, k·OH·OW + i·OW + j].
    Parallel over (sample, channel): each thread owns one image plane.
    """
    N, C, H, Wd = dx.shape
    P = OH * OW
    m = dcols.shape[1] // P
    zero = dx.dtype.type(0)
    for t in prange(m * C):
        k = t // C
        c = t - k * C
        n = n0 + k
        for h in range(H):
            for w_ in range(Wd):
                dx[n, c, h, w_] = zero
        for p in range(KH):
            for q in range(KW):
                r = (c * KH + p) * KW + q
                jlo = max(0, (pw - q + sw - 1) // sw)
                jhi = min(OW, (Wd - 1 + pw - q) // sw + 1)
                for i in range(OH):
                    h = i * sh + p - ph
                    if h < 0 or h >= H:
                        continue
                    base = k * P + i * OW
                    if sw == 1:
                        off = q - pw
                        for j in range(jlo, jhi):
                            dx[n, c, h, j + off] += dcols[r, base + j]
                    else:
                        for j in range(jlo, jhi):
                            dx[n, c, h, j * sw + q - pw] += dcols[r, base + j]


@dual("conv")
def relu_mask(dy, y, dz):
    """dz = dy ⊙ [y > 0].   dy, y, dz: (n,) flat."""
    zero = dy.dtype.type(0)
    for i in prange(dy.shape[0]):
        dz[i] = dy[i] if y[i] > zero else zero


@jit
def gemm(a, b, out):
    """out = a b through BLAS (SciPy's, the one ``fastbp._blas`` sizes the threads of).

    a (M, K), b (K, N), out (M, N); each C- or F-contiguous (a transposed view is fine)."""
    np.dot(a, b, out)


def _gemm(a, b, out):
    _blas.use_for(a.shape[0] * a.shape[1] * b.shape[1])
    gemm(a, b, out)


# ---------------------------------------------------------------------------- entry points
def _pair(v):
    return (v, v) if isinstance(v, (int, np.integer)) else (int(v[0]), int(v[1]))


def choose_method(work):
    """``"direct"`` when the forward work 2·N·F·OH·OW·C·KH·KW is below DIRECT_MAX_WORK,
    else ``"gemm"``."""
    return "direct" if work < DIRECT_MAX_WORK else "gemm"


def _chunk(N, rows, P):
    """Samples per im2col chunk: at most CHUNK_ELEMENTS entries (at least one sample),
    with the batch split into chunks of near-equal size."""
    m = max(1, min(N, CHUNK_ELEMENTS // max(1, rows * P)))
    nchunks = -(-N // m)
    return -(-N // nchunks)


def conv2d_forward(x, W, b, stride=1, padding=0, relu=False, method="auto", keep_cols=False):
    """Conv2D forward: a cross-correlation with bias (see the module docstring).

    x (N, C, H, W) C-contiguous, W (F, C, KH, KW) C-contiguous, b (F,) or (0,) for no bias,
    all of one float dtype; stride, padding: int or (h, w). ``relu`` applies max(·, 0) to
    the output (fused). method: ``"auto"``, ``"direct"`` or ``"gemm"``.
    Returns y (N, F, OH, OW) = b + Σ_c,p,q W[f,c,p,q]·xp[n,c,i·sh+p,j·sw+q].
    With ``keep_cols`` returns (y, cols): the im2col matrix (C·KH·KW, N·OH·OW) when the
    GEMM path packed the whole batch in one chunk, else None; pass it to
    ``conv2d_backward`` to skip packing again.
    Checks are the caller's job (the Conv2D layer validates shapes and dtypes).
    """
    sh, sw = _pair(stride)
    ph, pw = _pair(padding)
    N, C, H, Wd = x.shape
    F, _, KH, KW = W.shape
    OH, OW = out_size(H, Wd, KH, KW, sh, sw, ph, pw)
    y = np.empty((N, F, OH, OW), dtype=x.dtype)
    R, P = C * KH * KW, OH * OW
    if method == "auto":
        method = choose_method(2 * N * F * P * R)
    if N == 0 or F == 0 or method == "direct":
        if N > 0 and F > 0:
            direct_forward(x, W, b, sh, sw, ph, pw, relu, y, work=2 * N * F * P * R)
        return (y, None) if keep_cols else y
    W2 = W.reshape(F, R)
    m = _chunk(N, R, P)
    cbuf = np.empty(R * m * P, dtype=x.dtype)
    tbuf = np.empty(F * m * P, dtype=x.dtype)
    for n0 in range(0, N, m):
        k = min(m, N - n0)
        cols = cbuf[:R * k * P].reshape(R, k * P)
        t = tbuf[:F * k * P].reshape(F, k * P)
        im2col(x, n0, KH, KW, sh, sw, ph, pw, OH, OW, cols, work=R * k * P)
        _gemm(W2, cols, t)
        gemm_to_nchw(t, b, n0, relu, y, work=F * k * P)
    if keep_cols:
        return y, (cbuf.reshape(R, N * P) if m == N else None)
    return y


def conv2d_backward(x, W, dy, stride=1, padding=0, has_bias=True, input_grad=True, y=None,
                    method="auto", cols=None):
    """Conv2D backward: returns (dx, dW, db).

    x (N, C, H, W), W (F, C, KH, KW), dy (N, F, OH, OW), all C-contiguous, one float dtype.
    ``y``: the forward output when the forward fused a ReLU (the gradient is then first
    masked, dz = dy ⊙ [y > 0]); None otherwise (dz = dy). ``cols``: the im2col matrix
    returned by ``conv2d_forward(..., keep_cols=True)`` for this x, or None.

    - dx (N, C, H, W): the cross-correlation of dz, dilated by the stride and zero-padded by
      (KH − 1 − ph, KW − 1 − pw), with the flipped kernel Wf[c,f,p,q] = W[f,c,KH−1−p,KW−1−q];
      None when ``input_grad`` is False (its work is skipped).
    - dW (F, C, KH, KW): the cross-correlation of the (padded) input with dz,
      dW[f,c,p,q] = Σ_n,i,j dz[n,f,i,j]·xp[n,c,i·sh+p,j·sw+q].
    - db (F,) = Σ_n,i,j dz[n,f,i,j], or an empty (0,) array when not ``has_bias``.
    Deterministic: every reduction runs in a fixed order whatever the thread count.
    """
    sh, sw = _pair(stride)
    ph, pw = _pair(padding)
    N, C, H, Wd = x.shape
    F, _, KH, KW = W.shape
    OH, OW = dy.shape[2], dy.shape[3]
    dtype = x.dtype
    relu = y is not None
    R, P = C * KH * KW, OH * OW
    if method == "auto":
        method = choose_method(2 * N * F * P * R)
    dW = np.zeros((F, C, KH, KW), dtype=dtype)
    db = np.zeros(F if has_bias else 0, dtype=dtype)
    dx = np.empty((N, C, H, Wd), dtype=dtype) if input_grad else None
    if N == 0 or F == 0 or P == 0:
        if dx is not None:
            dx[...] = 0
        return dx, dW, db
    if method == "direct":
        if relu:
            dz = np.empty_like(dy)
            relu_mask(dy.reshape(-1), y.reshape(-1), dz.reshape(-1), work=dy.size)
        else:
            dz = dy
        direct_backward_dw(x, dz, sh, sw, ph, pw, dW, db, work=2 * N * F * P * R)
        if input_grad:
            direct_backward_dx(dz, W, sh, sw, ph, pw, dx, work=2 * N * F * P * R)
        return dx, dW, db
    W2 = W.reshape(F, R)
    dW2 = dW.reshape(F, R)
    packed = cols is not None and cols.shape == (R, N * P) and cols.dtype == dtype
    m = N if packed else _chunk(N, R, P)
    cbuf = np.empty(R * m * P, dtype=dtype) if (not packed or input_grad) else None
    tbuf = np.empty(F * m * P, dtype=dtype)
    part = np.empty((F, R), dtype=dtype)
    yy = y if relu else dy
    for n0 in range(0, N, m):
        k = min(m, N - n0)
        t = tbuf[:F * k * P].reshape(F, k * P)
        nchw_to_gemm(dy, yy, n0, relu, t, db, work=F * k * P)
        if packed:
            c = cols                                   # from the forward: read only
        else:
            c = cbuf[:R * k * P].reshape(R, k * P)
            im2col(x, n0, KH, KW, sh, sw, ph, pw, OH, OW, c, work=R * k * P)
        if n0 == 0:
            _gemm(t, c.T, dW2)
        else:
            _gemm(t, c.T, part)
            dW2 += part
        if input_grad:
            dcols = cbuf[:R * k * P].reshape(R, k * P)     # Wᵀ·dz, (R, k·P)
            _gemm(W2.T, t, dcols)
            col2im(dcols, n0, KH, KW, sh, sw, ph, pw, OH, OW, dx, work=R * k * P)
    return dx, dW, db
