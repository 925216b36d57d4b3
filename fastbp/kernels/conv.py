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

Four algorithms compute the same numbers:

- ``tap`` (stride 1 from TAP_MIN_CHANNELS input channels, the default when the bundled
  OpenBLAS exposes CBLAS): per-kernel-row GEMMs on shifted windows of the padded input,
  no im2col; see "per-tap GEMMs" below.
  From SPLIT_MACS multiply-adds, fastbp's Python threads (``fastbp._pool.run_split``)
  each run a compiled loop that claims groups of samples one at a time (an atomic
  counter, ``fastbp._pool.claim``), each on one BLAS thread; the weight gradient has
  one partial per group, summed in group order, so the result is the same bits on any
  thread count. (Claiming balances the threads: with a fixed half each, one thread of a
  cifar conv2 backward took 8.7 ms and the other 10.0; claimed, the call took 9.9 ms
  against 10.3.)

- ``direct``: plain loops, parallel over (sample, output channel) for y, over
  (sample, input channel) for dx and over (output channel, input channel) for dW, so
  every thread owns what it writes (race-free, deterministic). With stride 1, y and dW
  run on the flattened padded planes (``flat_*``: one long vectorisable loop per tap);
  other strides use row loops. The dx loop is written as the flipped-kernel correlation
  above, skipping the structural zeros of ``dyd``.
- ``gemm``: im2col packing + one BLAS GEMM per chunk of samples (``fastbp._cblas.dot``,
  outside any ``prange``); dW = dz-matrix × colsᵀ accumulated chunk by chunk in a fixed order
  (deterministic). For stride 1, dx is the identity above taken literally: im2col of dz
  padded by (KH−1−ph, KW−1−pw), times the flipped kernel as a (C, F·KH·KW) matrix. For
  other strides it is col2im(Wᵀ × dz-matrix), the scatter form of the same identity
  (no GEMM work is spent on the zeros of the dilation).

- ``winograd`` (3×3 kernels at stride 1, ``fastbp.kernels.winograd``): F(2×2, 3×3), 16
  GEMMs over the channels per sample with 2.25x fewer multiply-adds; dx is the same
  transform of dz with the flipped kernel, dW the transposed products, one partial per
  fixed group of samples summed in group order.

``conv2d_forward``/``conv2d_backward`` pick ``direct`` for tiny problems (``DIRECT_MAX_WORK``),
``winograd`` for 3×3 stride-1 layers with enough channels and pixels (``wino_chosen``),
``tap`` for other stride-1 layers (one input channel: direct forward and dW), else
``gemm``; without CBLAS, stride 1 with few input channels
(``DIRECT_MAX_CHANNELS``) runs ``direct`` (measured; see asv_benchmarks/benchmarks/conv.py).
"""
import threading

import numpy as np
from numba import prange

from .. import _blas, _cblas, _pool, config
from .._cblas import dot
from .._jit import dual, jit
from . import pool as _pk
from . import winograd as _wg

# Algorithm choice, measured single-threaded on the 2-vCPU dev machine (asv_benchmarks/
# benchmarks/conv.py): with stride 1 the flat direct forward beat im2col + GEMM 4x at C = 1,
# 1.5x at C = 3 and tied from C = 8 on; the flat dW won 4x at C = 1 but lost 2x at C = 3;
# the row-wise loops (other strides, and dx) lose from about 2·10⁴ scalar ops up.
DIRECT_MAX_CHANNELS = 3         # forward: flat direct loops up to this many input channels
DIRECT_DW_MAX_CHANNELS = 1      # dW: flat direct loops (4x faster at C = 1, 2x slower at 3)
DIRECT_MAX_WORK = 20_000        # below this forward work everything runs direct
FLIPPED_DX_GEMM = True          # stride-1 GEMM dx: flipped-kernel im2col (True) or col2im
# im2col entries per chunk of samples (8 MB float32): the packed chunk mostly stays in cache
# between packing and its GEMM, and chunks stay few (each costs ~5 kernel launches).
# 2^17 .. 2^23 measured within noise of each other on the busy 2-vCPU dev machine.
CHUNK_ELEMENTS = 1 << 21
# Per-tap GEMMs (stride 1, CBLAS) from this many input channels. Measured (2 threads, float32,
# asv conv.Conv2D, GFLOP/s forward/backward) on the Intel AVX-512 machine: C = 1 tap 29/17 vs
# direct 29/4.5 (dW alone a tie); C = 3 tap 59-77/54 vs direct 32/5 and gemm 18/9; C = 32
# tap 97/87 vs gemm 40/36. On an AMD EPYC (Zen 3, AVX2) 2-vCPU machine, interleaved medians,
# ms, direct vs tap: lenet conv1 (64×1×28×28, 8@5×5) forward 0.74 vs 1.20 and dW alone 1.88
# vs 2.53; C = 2 forward 1.14 vs 1.95; C = 3 tap wins (forward 1.92 vs 2.26, dW 4.2 vs 6.4).
# On a second Intel AVX-512 machine (Xeon, AMX) the same lenet conv1 went the other way,
# best of three medians, ms, direct vs tap: forward 0.79-0.84 vs 0.54, backward without dx
# 1.36-1.41 vs 0.95. OpenBLAS's AVX-512 GEMM kernels make the taps win there; the direct
# loops (256-bit vectors) gain nothing. So with AVX-512 every channel count runs on taps;
# without it one input channel runs direct (forward, and dW when no dx is wanted: the
# direct dx loses 2.5x, so with dx the backward stays on taps).
def _host_avx512():
    try:
        from llvmlite import binding as ll
        return bool(ll.get_host_cpu_features().get("avx512f", False))
    except Exception:           # an llvmlite without the query: the conservative choice
        return False


TAP_MIN_CHANNELS = 1 if _host_avx512() else 2
# scratch entries per group of samples (packed input + output grid), sized to stay in L2
TAP_GROUP_ELEMENTS = 1 << 17
# Multiply-adds from which a tap call splits its samples over fastbp's Python threads
# (backward counts dW and dx). Measured, 2 threads, ms one thread → split: forward
# 3.7M 0.23 → 0.26, 7.1M 0.23 → 0.20, 7.4M 0.44 → 0.38, 28M 0.93 → 0.76; backward 1.8M
# (dW only 0.9M) 0.33 → 0.35, 3.3M+ 0.62 → 0.46, 13M+ 2.16 → 1.14.
SPLIT_MACS = 1 << 22
# Winograd F(2×2, 3×3) (``fastbp.kernels.winograd``) for 3×3 kernels at stride 1 with at
# least WINO_MIN_CHANNELS input and output channels, WINO_MIN_CHANNEL_PRODUCT for C·F (the
# GEMMs are F × C by C × tiles: thin channel counts starve them while the transforms cost
# the same) and WINO_MIN_PIXELS outputs per plane (small planes carry proportionally more
# junk tiles). Alternating runs, 2 threads, AMD EPYC (Zen 4), Winograd / per-tap time for
# forward, dW-only and dW+dx backward (N×C×H×W F@3×3 p1): 32×8×32² 8@ 1.52, 1.47, 1.75;
# 32×12×32² 12@ 1.08, 1.34, 1.40; 32×16×32² 16@ 1.06, 1.21, 1.26; 32×24×32² 24@ 0.81,
# 0.89, 0.92; 32×32×32² 32@ 0.64, 0.92, 0.82; 32×64×16² 64@ 0.82, 0.96, 0.99; 32×32×32²
# 16@ 0.69, 0.74, 0.79; 32×16×32² 32@ 0.72, 1.02, 1.03; 64×16×12² 32@ 1.26, 1.08, 1.24.
WINO_MIN_CHANNELS = 16
WINO_MIN_CHANNEL_PRODUCT = 512
WINO_MIN_PIXELS = 256


def out_size(H, Wd, KH, KW, sh, sw, ph, pw):
    """Output spatial size ``((H + 2ph − KH)//sh + 1, (W + 2pw − KW)//sw + 1)``."""
    return (H + 2 * ph - KH) // sh + 1, (Wd + 2 * pw - KW) // sw + 1


# ---------------------------------------------------------------------------- direct loops
# VIEWS_IN_BRANCHES: a slice or row view made inside an ``if`` in a hot loop (``if relu:
# ys = y[n, f, i]``) costs reference-count updates that Numba does not prune; the ReLU-masked
# gradient copy of the tap backward ran 3-4x slower that way (lenet conv1, one thread:
# 160 against 530 µs per call). The kernels make such views unconditionally.
# MASK_LOOPS: the ReLU-masked copy is two loops under ``if relu:`` (the views made before
# it), each a plain select, not one loop over ``src[j] if (ys[j] > 0 or not relu) else 0``:
# that one ran as compares and branches, which the random signs of y mispredict. cifar
# conv1's dW-only backward (32×3×32×32, 32@3×3, two threads): 1019 → 818-835 µs. Flat
# indices instead of row views ran 2x slower (the index arithmetic blocked vectorising).
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
def flat_forward(xp, W, b, relu, y):
    """Direct cross-correlation for stride 1 on the flattened padded planes.

    xp (N, C, Hp, Wp) the zero-padded input, W (F, C, KH, KW), b (F,) or (0,), y
    (N, F, OH, OW) output with OH = Hp − KH + 1, OW = Wp − KW + 1. Each plane is a vector
    of Hp·Wp entries; tap (p, q) of output u = i·Wp + j reads entry u + p·Wp + q, so every
    tap is one long axpy over L = (OH − 1)·Wp + OW entries (it vectorises; columns
    j ≥ OW are computed and dropped). y = b + Σ_c,p,q W[f,c,p,q]·xp[n,c,i+p,j+q], then
    max(y, 0) if ``relu``. Parallel over (n, f).
    """
    N, C, Hp, Wp = xp.shape
    F, _, KH, KW = W.shape
    OH, OW = y.shape[2], y.shape[3]
    L = (OH - 1) * Wp + OW
    xf = xp.reshape(N, C, Hp * Wp)
    zero = y.dtype.type(0)
    has_bias = b.shape[0] > 0
    for t in prange(N * F):
        n = t // F
        f = t - n * F
        acc = np.empty(L, dtype=y.dtype)
        b0 = b[f] if has_bias else zero
        for u in range(L):
            acc[u] = b0
        for c in range(C):
            xr = xf[n, c]
            for p in range(KH):
                for q in range(KW):
                    w = W[f, c, p, q]
                    xs = xr[p * Wp + q:p * Wp + q + L]
                    for u in range(L):
                        acc[u] += w * xs[u]
        for i in range(OH):
            for j in range(OW):
                v = acc[i * Wp + j]
                y[n, f, i, j] = zero if relu and v < zero else v


@jit(inline="always")
def _channel_sum(dz, f):
    """Σ_n,i,j dz[n, f, i, j] in a fixed order (per-column partials, then their sum)."""
    N, _, OH, OW = dz.shape
    accb = np.zeros(OW, dtype=dz.dtype)
    for n in range(N):
        for i in range(OH):
            for j in range(OW):
                accb[j] += dz[n, f, i, j]
    s = dz.dtype.type(0)
    for j in range(OW):
        s += accb[j]
    return s


# Reassociation lets LLVM vectorise the dot products below (several vector accumulators,
# summed at the end); without it a float sum stays one scalar chain. The order is fixed by
# the compiled code, and each (f, c) is computed by one thread, so the result does not
# depend on the thread count. The serial and parallel builds are checked bit for bit.
@dual("conv", fastmath={"reassoc", "contract"})
def flat_backward_dw(xp, dz, dW, db):
    """Weight and bias gradients for stride 1 on the flattened padded planes.

    xp (N, C, Hp, Wp) the zero-padded input, dz (N, F, OH, OW); dW (F, C, KH, KW) and db
    (F,) or (0,) outputs. dW[f,c,p,q] = Σ_n,i,j dz[n,f,i,j]·xp[n,c,i+p,j+q],
    db[f] = Σ_n,i,j dz[n,f,i,j]. Parallel over (f, c). Per sample, dz[n, f] is laid on
    the Wp-wide grid (dzg, zero in columns j ≥ OW) and each tap is one dot product
    Σ_u dzg[u]·xp[n, c, u + p·Wp + q] over the plane, four taps of a kernel row per pass
    (one load of dzg feeds four FMAs); the per-tap sums are accumulated over samples in
    float64, in sample order (deterministic).
    """
    N, C, Hp, Wp = xp.shape
    F, _, KH, KW = dW.shape
    OH, OW = dz.shape[2], dz.shape[3]
    L = (OH - 1) * Wp + OW
    xf = xp.reshape(N, C, Hp * Wp)
    zero = dW.dtype.type(0)
    for t in prange(F * C):
        f = t // C
        c = t - f * C
        acc = np.zeros(KH * KW, dtype=np.float64)
        dzg = np.zeros(L, dtype=dW.dtype)
        for n in range(N):
            for i in range(OH):
                for j in range(OW):
                    dzg[i * Wp + j] = dz[n, f, i, j]
            xr = xf[n, c]
            for p in range(KH):
                q = 0
                while q + 4 <= KW:          # slices, not xr[o + u]: that index blocks SIMD
                    o = p * Wp + q
                    x0 = xr[o:o + L]
                    x1 = xr[o + 1:o + 1 + L]
                    x2 = xr[o + 2:o + 2 + L]
                    x3 = xr[o + 3:o + 3 + L]
                    s0 = zero
                    s1 = zero
                    s2 = zero
                    s3 = zero
                    for u in range(L):
                        d = dzg[u]
                        s0 += d * x0[u]
                        s1 += d * x1[u]
                        s2 += d * x2[u]
                        s3 += d * x3[u]
                    r = p * KW + q
                    acc[r] += s0
                    acc[r + 1] += s1
                    acc[r + 2] += s2
                    acc[r + 3] += s3
                    q += 4
                while q < KW:
                    o = p * Wp + q
                    xs = xr[o:o + L]
                    s = zero
                    for u in range(L):
                        s += dzg[u] * xs[u]
                    acc[p * KW + q] += s
                    q += 1
        for r in range(KH * KW):
            dW[f, c, r // KW, r - (r // KW) * KW] = acc[r]
        if c == 0 and db.shape[0] > 0:
            db[f] = _channel_sum(dz, f)


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
            db[f] = _channel_sum(dz, f)


# ---------------------------------------------------------------------------- im2col + GEMM
@dual("conv")
def im2col(x, n0, KH, KW, sh, sw, ph, pw, OH, OW, cols):
    """Pack patches of samples n0 .. n0+m−1 as columns.

    x (N, C, H, W); cols (C·KH·KW, m·OH·OW) output, m = cols.shape[1] // (OH·OW):
    cols[(c·KH+p)·KW+q, k·OH·OW + i·OW + j] = xp[n0+k, c, i·sh+p, j·sw+q] (0 in the padding).
    Parallel over (channel, kernel row): each thread writes whole rows of cols.
    """
    N, C, H, Wd = x.shape
    P = OH * OW
    m = cols.shape[1] // P
    zero = cols.dtype.type(0)
    for t in prange(C * KH):
        c = t // KH
        p = t - c * KH
        for q in range(KW):
            row = cols[(c * KH + p) * KW + q]
            # output columns j whose input column j·sw + q − pw lies inside the image
            jlo = min(OW, max(0, (pw - q + sw - 1) // sw))
            jhi = max(jlo, min(OW, (Wd - 1 + pw - q) // sw + 1))
            for k in range(m):
                xs = x[n0 + k, c]
                for i in range(OH):
                    dst = row[k * P + i * OW:k * P + (i + 1) * OW]
                    h = i * sh + p - ph
                    if h < 0 or h >= H:
                        dst[:] = zero
                        continue
                    dst[:jlo] = zero
                    dst[jhi:] = zero
                    if sw == 1:
                        lo = jlo + q - pw
                        dst[jlo:jhi] = xs[h, lo:lo + jhi - jlo]
                    else:
                        xr = xs[h]
                        for j in range(jlo, jhi):
                            dst[j] = xr[j * sw + q - pw]


@dual("conv")
def im2col_flat(xp, n0, KH, KW, OH, cols):
    """Stride-1 packing on the flattened padded planes (rows are contiguous copies).

    xp (N, C, Hp, Wp) zero-padded input; cols (C·KH·KW, m·OH·Wp) output with
    cols[(c·KH+p)·KW+q, k·OH·Wp + u] = xp[n0+k, c].flat[u + p·Wp + q] for
    u < L = (OH−1)·Wp + OW (OW = Wp − KW + 1) and 0 after. Column u = i·Wp + j is output
    pixel (i, j) when j < OW; columns j ≥ OW are junk that the scatter drops (and that the
    gradient gather fills with zeros). Parallel over (channel, kernel row).
    """
    N, C, Hp, Wp = xp.shape
    OW = Wp - KW + 1
    L = (OH - 1) * Wp + OW
    PX = OH * Wp
    m = cols.shape[1] // PX
    xf = xp.reshape(N, C, Hp * Wp)
    zero = cols.dtype.type(0)
    for t in prange(C * KH):
        c = t // KH
        p = t - c * KH
        for q in range(KW):
            row = cols[(c * KH + p) * KW + q]
            base = p * Wp + q
            for k in range(m):
                src = xf[n0 + k, c]
                dst = row[k * PX:(k + 1) * PX]
                dst[:L] = src[base:base + L]
                dst[L:] = zero


@dual("conv")
def gemm_to_nchw(t, b, n0, m, relu, pitch, PX, y):
    """Scatter a GEMM result for samples n0 .. n0+m−1 into NCHW, adding the bias and
    applying ReLU.

    t (F, ≥ (m−1)·PX + (OH−1)·pitch + OW), b (F,) or (0,), y (N, F, OH, OW) output; a
    sample's columns start every PX, its rows every pitch (≥ OW): PX = OH·pitch or a whole
    padded plane when samples sit side by side, PX = Wp and pitch = m·Wp when their rows
    are interleaved (the per-tap GEMMs).
    y[n0+k, f, i, j] = t[f, k·PX + i·pitch + j] + b[f]; then max(·, 0) if ``relu``.
    Parallel over (k, f).
    """
    F = t.shape[0]
    OH, OW = y.shape[2], y.shape[3]
    zero = t.dtype.type(0)
    has_bias = b.shape[0] > 0
    for u in prange(m * F):
        k = u // F
        f = u - k * F
        b0 = b[f] if has_bias else zero
        for i in range(OH):
            src = t[f, k * PX + i * pitch:k * PX + i * pitch + OW]
            dst = y[n0 + k, f, i]
            if relu:
                for j in range(OW):
                    v = src[j] + b0
                    dst[j] = v if not v < zero else zero
            else:
                for j in range(OW):
                    dst[j] = src[j] + b0


@jit(inline="always")
def _masked_row(src, ys, relu, dst, acc, n):
    """dst[j] = src[j] ⊙ [ys[j] > 0] if ``relu`` else src[j], and acc[j] += dst[j], for
    j < n: one image row of the output gradient (see MASK_LOOPS)."""
    zero = dst.dtype.type(0)
    if relu:
        for j in range(n):
            v = src[j]
            dst[j] = v if ys[j] > zero else zero
    else:
        for j in range(n):
            dst[j] = src[j]
    for j in range(n):
        acc[j] += dst[j]


@dual("conv")
def nchw_to_gemm(dy, y, n0, relu, pitch, t, db):
    """Gather dy of samples n0 .. n0+m−1 as a matrix, masking by ReLU and summing the bias grad.

    dy, y (N, F, OH, OW) (y's values used only when ``relu``; pass dy otherwise),
    t (F, m·OH·pitch) output, pitch >= OW, db (F,) accumulated (``db[f] += Σ dz[·, f]``)
    or (0,) for no bias.
    t[f, k·OH·pitch + i·pitch + j] = dz[n0+k, f, i, j] for j < OW and 0 for OW <= j < pitch,
    dz = dy ⊙ [y > 0] if ``relu`` else dy. Parallel over f.
    """
    F = t.shape[0]
    OH, OW = dy.shape[2], dy.shape[3]
    PX = OH * pitch
    m = t.shape[1] // PX
    zero = t.dtype.type(0)
    has_bias = db.shape[0] > 0
    for f in prange(F):
        acc = np.zeros(OW, dtype=t.dtype)
        for k in range(m):
            for i in range(OH):
                dst = t[f, k * PX + i * pitch:k * PX + (i + 1) * pitch]
                src = dy[n0 + k, f, i]
                ys = y[n0 + k, f, i]        # unconditionally: see VIEWS_IN_BRANCHES
                _masked_row(src, ys, relu, dst, acc, OW)
                for j in range(OW, pitch):
                    dst[j] = zero
        if has_bias:
            tot = zero
            for j in range(OW):
                tot += acc[j]
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
    """out = a b through BLAS (the OpenBLAS ``fastbp._blas`` chose and sizes the threads of).

    a (M, K), b (K, N), out (M, N); each C- or F-contiguous (a transposed view is fine)."""
    dot(a, b, out)


_ws = threading.local()


def _workspace(slot, n, dtype):
    """A reusable scratch array of ``n`` elements, one per (thread, slot, dtype).

    Fresh large allocations cost page faults on every call (several ms for tens of MB);
    scratch buffers never leave this module, so each thread keeps and reuses its own."""
    bufs = getattr(_ws, "bufs", None)
    if bufs is None:
        bufs = _ws.bufs = {}
    key = (slot, np.dtype(dtype).char)
    buf = bufs.get(key)
    if buf is None or buf.size < n:
        buf = bufs[key] = np.empty(n, dtype=dtype)
    return buf[:n]


# BLAS threads for the conv GEMMs. On the 2-vCPU dev machine one OpenBLAS thread reached
# the same float32 peak as two (54 vs 53 GFLOP/s, 2048³), and two BLAS threads interleaved
# with the parallel packing kernels made a CIFAR conv layer 6-30x slower (fwd 23 → 148 ms,
# bwd 47 → 400-1400 ms). So by default the GEMMs run on one BLAS thread and the threads go
# to the packing/scatter kernels; set True to size BLAS threads by ``fastbp._blas``.
BLAS_THREADED = False


def _gemm(a, b, out):
    with _blas.use_for(a.shape[0] * a.shape[1] * b.shape[1] if BLAS_THREADED else 0):
        gemm(a, b, out)


# ---------------------------------------------------------------------------- per-tap GEMMs
# Stride 1: no im2col. A group of k samples is zero-padded and flattened channel-major with
# the plane rows of the k samples interleaved: xg[c, (h·k + kk)·Wp + w] = xp[s+kk, c, h, w]
# (Hp·k·Wp columns). Output pixel (i, kk, j), column u = (i·k + kk)·Wp + j, reads
# xg[:, u + p·k·Wp + q] at tap (p, q), so each tap is a GEMM on a window of xg (CBLAS
# leading dimensions), accumulated in place. The KW taps of one kernel row are merged into
# one GEMM with K = KW·C by packing KW shifted copies, xs[q·C + c, v] = xg[c, v + q]; with
# Wk[p] (F, KW·C), Wk[p][f, q·C + c] = W[f, c, p, q], off = p·k·Wp and L = OH·k·Wp:
#   forward  t[:, u]             += Wk[p] · xs[:, u + off]            (F×KW·C)·(KW·C×L)
#            (or its transpose tT (L×F) from TAP_T_MIN_K rows KW·C: a faster GEMM there)
#   dWt[p] (KW·C×F)              += xs[:, off:off + L] · dzgᵀ          (KW·C×L)·(L×F)
#   ds[:, u + off]               += Wk[p]ᵀ · dzg[:, u]                 (KW·C×F)·(F×L)
#   dxg[c, v]                     = Σ_q ds[q·C + c, v − q]
# dzg is the output gradient on the same grid, zero in the columns j ≥ OW, so those junk
# positions add nothing; the ds lines are the scatter form of the flipped-kernel identity.
# Interleaving the samples' rows makes the GEMMs span only the OH output rows of each
# sample (OH·Wp columns, not Hp·Wp: lenet conv2, 12×12 → 8×8, does 1.5x fewer FLOPs).
# Each group is small enough to stay in L2 with its GEMMs.
# The packed rows' pitch: a row of T entries whose byte length is a multiple of 512
# (e.g. every group of 32×32 unpadded planes, 4096 B each) gets PITCH_PAD entries more,
# unused: rows that far apart map to a few L1 sets. cnn_lenet's step with its group size
# forced, against the default 9 (interleaved, AMD EPYC Zen 4): g = 8 (4608 B rows) and 16
# (9216 B) 1.07-1.08 and 1.05-1.09 unpadded, 0.967 and 0.969 padded. Whole layers (fused
# ReLU and pooling, forward and backward, separate processes) padded against unpadded:
# 64×3×32×32 16@5×5 0.983 (0.973-1.011); 64×8×16×16 16@5×5 1.012 (0.988-1.05), level.
PITCH_PAD = 16


@jit(inline="always")
def _pitch(T, itemsize):
    """The row pitch, in entries, for packed rows of T entries of ``itemsize`` bytes."""
    return T + PITCH_PAD if (T * itemsize) % 512 == 0 else T


@jit(inline="always")
def _tap_pack(x, ph, pw, s, k, KW, xs):
    """xs (KW·C, Hp·k·Wp): samples s .. s+k−1 of x zero-padded by (ph, pw), channel-major,
    rows interleaved and shifted: xs[q·C + c, (h·k + kk)·Wp + w + ...] holds
    xp[s+kk, c, h, w + q], i.e. xs[q·C + c, v] = xs[c, v + q] (0 past the end)."""
    _, C, H, Wd = x.shape
    Hp, Wp = H + 2 * ph, Wd + 2 * pw
    kW = k * Wp
    T = Hp * kW
    zero = xs.dtype.type(0)
    for c in range(C):
        row = xs[c]
        for u in range(ph * kW):
            row[u] = zero
        for h in range(H):
            for kk in range(k):
                o = (h + ph) * kW + kk * Wp
                line = row[o:o + Wp]
                for w in range(pw):
                    line[w] = zero
                src = x[s + kk, c, h]
                mid = line[pw:pw + Wd]
                for w in range(Wd):
                    mid[w] = src[w]
                for w in range(pw + Wd, Wp):
                    line[w] = zero
        for u in range((ph + H) * kW, T):
            row[u] = zero
        for q in range(1, KW):                  # sliced views indexed from 0 vectorise
            dst = xs[q * C + c]
            src = row[q:T]
            for v in range(T - q):
                dst[v] = src[v]
            for v in range(T - q, T):
                dst[v] = zero


_to_nchw_serial = gemm_to_nchw.serial    # called from the compiled per-tap loops
# From this many rows of a kernel-row GEMM (KW·C) the forward computes the transposed
# output (pixels × F). Alternating runs, 2 threads, min of 8 medians, ms, transposed vs
# not: cifar conv2 (KW·C = 96) 5.67-5.79 vs 6.52-7.14, lenet conv2 (40) 0.39-0.51 vs
# 0.48-0.52; lenet conv1 (5) level; cifar conv1 (9) 1.18-1.62 vs 0.95-1.10.
TAP_T_MIN_K = 32
# From this many rows of a kernel-row GEMM (KW·C) the forward runs one GEMM for all kernel
# rows, (KH·F × KW·C)·(KW·C × Hp·k·Wp), and sums the rows' shifted products in the scatter
# (``_tap_shift_scatter``) instead of KH GEMMs of F rows: taller GEMMs run nearer the
# BLAS's peak. One OpenBLAS thread, AMD EPYC (Zen 4), GFLOP/s: cifar conv2's 96×96×1156
# 79-88 against 54-71 for 32×96×1088 (either orientation); lenet conv2's 80×40×1296 65-72
# against 86-94 for 16×40×864, so thin kernel rows stay on the per-row GEMMs.
TAP_STACK_MIN_K = 64


@jit(inline="always")
def _tap_scatter(t, b, s, k, Wp, relu, y):
    """y[s+kk, f, i, j] = t[(i·k + kk)·Wp + j, f] + b[f] (then max(·, 0) if ``relu``) for
    the k samples of a group: t (≥ OH·k·Wp, F) is the transposed GEMM result (pixels by
    rows, channels along them), b (F,) or (0,)."""
    F = t.shape[1]
    OH, OW = y.shape[2], y.shape[3]
    zero = t.dtype.type(0)
    has_bias = b.shape[0] > 0
    for kk in range(k):
        for i in range(OH):
            tile = t[(i * k + kk) * Wp:(i * k + kk) * Wp + OW]      # (OW, F), in L1
            for f in range(F):
                b0 = b[f] if has_bias else zero
                dst = y[s + kk, f, i]
                if relu:
                    for j in range(OW):
                        v = tile[j, f] + b0
                        dst[j] = v if not v < zero else zero
                else:
                    for j in range(OW):
                        dst[j] = tile[j, f] + b0


@jit(inline="always")
def _tap_shift_scatter(t3, b, s, k, Wp, KH, relu, y):
    """y[s+kk, f, i, j] = b[f] + Σ_p t3[p·F + f, ((i + p)·k + kk)·Wp + j] (then max(·, 0)
    if ``relu``) for the k samples of a group: t3 (KH·F, ≥ Hp·k·Wp) holds every kernel
    row's product with the whole packed input (``_tap_forward_rows``, stacked mode), so
    kernel row p's contribution to output row i sits p input rows further on."""
    F = y.shape[1]
    OH, OW = y.shape[2], y.shape[3]
    zero = t3.dtype.type(0)
    has_bias = b.shape[0] > 0
    for kk in range(k):
        for f in range(F):
            b0 = b[f] if has_bias else zero
            for i in range(OH):
                dst = y[s + kk, f, i]
                o = (i * k + kk) * Wp
                src = t3[f, o:o + OW]
                for j in range(OW):
                    dst[j] = src[j] + b0
                for p in range(1, KH):
                    o = ((i + p) * k + kk) * Wp
                    src = t3[p * F + f, o:o + OW]
                    for j in range(OW):
                        dst[j] += src[j]
                if relu:
                    for j in range(OW):
                        v = dst[j]
                        dst[j] = v if not v < zero else zero


_max2_serial = _pk.max_forward_2x2.serial   # the fused max pooling, per group
_max_serial = _pk.max_forward.serial


@jit
def _tap_forward_rows(x, Wk, b, ph, pw, relu, n0, n1, g, mode, xbuf, tbuf, y,
                     mkl_threads, pool, yp, ip):
    """y[n0:n1] by per-kernel-row GEMMs, g samples at a time.

    x (N, C, H, W), Wk (KH, F, KW, C) = W transposed (Wk[p, f, q, c] = W[f, c, p, q]),
    b (F,) or (0,), y (N, F, OH, OW) output; xbuf, tbuf flat scratch of at least
    KW·C·(g·S + PITCH_PAD) and F·g·S entries (S = Hp·Wp; KH·F·(g·S + PITCH_PAD) in
    mode 2). ``mode`` (``tap_mode``): 0, the
    GEMMs write the output grid as F × pixels (then ``gemm_to_nchw``); 1, as pixels × F
    (then ``_tap_scatter``); 2, one GEMM for all kernel rows (then ``_tap_shift_scatter``).
    y[n,f,i,j] = b[f] + Σ_p,q Σ_c W[f,c,p,q]·xp[n,c,i+p,j+q], then max(·, 0) if ``relu``.
    ``mkl_threads``: 1 to run MKL's GEMMs on this thread alone (set here and restored), 0
    without MKL (``fastbp._blas.mkl_one_thread_count``).
    Fused max pooling when ``yp`` is not empty: y is then a scratch (≥ g, F, OH, OW) that
    holds one group, pooled right away into yp and ip (N, F, POH, POW) by windows
    ``pool`` = (KH, KW, sh, sw) as ``fastbp.kernels.pool.max_forward``.
    """
    prev = _cblas.mkl_threads_enter(mkl_threads)
    _, C, H, Wd = x.shape
    KH, F, KW, _ = Wk.shape
    OH = H + 2 * ph - KH + 1
    Wp = Wd + 2 * pw
    Hp = H + 2 * ph
    R = KW * C
    pooled = yp.shape[0] > 0
    two = pool[0] == 2 and pool[1] == 2 and pool[2] == 2 and pool[3] == 2
    for s in range(n0, n1, g):
        k = min(g, n1 - s)
        T = Hp * k * Wp
        Tp = _pitch(T, x.itemsize)
        L = OH * k * Wp
        ys = 0 if pooled else s                 # y's first sample for this group
        xs = xbuf[:R * Tp].reshape(R, Tp)       # columns T.. unused
        _tap_pack(x, ph, pw, s, k, KW, xs)
        if mode == 2:
            t3 = tbuf[:KH * F * Tp].reshape(KH * F, Tp)   # t3 = Wk (KH·F×R) · xs (R×T)
            _cblas.gemm1(False, False, KH * F, T, R, Wk, 0, R, xs, 0, Tp, 0, t3, 0, Tp)
            _tap_shift_scatter(t3, b, ys, k, Wp, KH, relu, y)
        elif mode == 1:
            tt = tbuf[:L * F].reshape(L, F)
            for p in range(KH):                 # tT (L×F) += xs windowᵀ · Wk[p]ᵀ
                _cblas.gemm1(True, True, L, F, R, xs, p * k * Wp, Tp,
                            Wk, p * F * R, R, 0 if p == 0 else 1, tt, 0, F)
            _tap_scatter(tt, b, ys, k, Wp, relu, y)
        else:
            t = tbuf[:F * L].reshape(F, L)
            for p in range(KH):                 # t (F×L) += Wk[p] · xs window
                _cblas.gemm1(False, False, F, L, R, Wk, p * F * R, R,
                            xs, p * k * Wp, Tp, 0 if p == 0 else 1, t, 0, L)
            _to_nchw_serial(t, b, ys, k, relu, k * Wp, Wp, y)
        if pooled:
            if two:
                _max2_serial(y[:k], yp[s:s + k], ip[s:s + k])
            else:
                _max_serial(y[:k], pool[0], pool[1], pool[2], pool[3], yp[s:s + k],
                            ip[s:s + k])
    _cblas.mkl_threads_exit(prev)


@jit
def _dz_pooled(dyq, yq, iq, relu, s, k, Wp, OH, OW, zg, acc, db, gi):
    """zg (F, OH·k·Wp): the output gradient of samples s..s+k−1 on the tap grid (as the
    copy loop in ``_tap_backward_rows`` writes it) rebuilt from a fused max pooling's
    gradient: zero but at each window's arg-max, which gets the window's dyq ⊙ [yq > 0]
    (the mask when ``relu``: there y equals the pooled yq), summed over the windows that
    share it in window order, as ``fastbp.kernels.pool.max_backward``. dyq, yq, iq
    (N·F, POH·POW), iq the arg-max h·OW + w in its plane. db[gi] (F,) or (0,) += the sums
    of zg's rows (in the copy loop's order: the same bits). A table maps plane positions
    to grid columns (no division); the scatter ran 1.3x faster than max-pool backward
    into a scratch followed by the copy."""
    F = zg.shape[0]
    zero = zg.dtype.type(0)
    has_bias = db.shape[1] > 0
    Q = dyq.shape[1]
    grid = np.empty(OH * OW, np.int64)         # h·OW + w → h·k·Wp + w
    for h in range(OH):
        for w in range(OW):
            grid[h * OW + w] = h * k * Wp + w
    for f in range(F):
        row = zg[f]
        for u in range(row.shape[0]):
            row[u] = zero
        for kk in range(k):
            t = (s + kk) * F + f
            gq = dyq[t]
            yv = yq[t]
            a = iq[t]
            base = row[kk * Wp:]
            if relu:                                # (MASK_LOOPS)
                for u in range(Q):
                    v = gq[u]
                    base[grid[a[u]]] += v if yv[u] > zero else zero
            else:
                for u in range(Q):
                    base[grid[a[u]]] += gq[u]
        acc[:] = zero
        for i in range(OH):
            for kk in range(k):
                src = row[(i * k + kk) * Wp:(i * k + kk) * Wp + OW]
                for j in range(OW):
                    acc[j] += src[j]
        if has_bias:
            tot = zero
            for j in range(OW):
                tot += acc[j]
            db[gi, f] += tot


@jit
def _tap_backward_rows(x, Wk, dy, y, relu, ph, pw, n0, n1, g, input_grad,
                       xbuf, zbuf, dbuf, dWt, db, dx, mkl_threads, pidx):
    """Gradients of samples n0:n1 by per-kernel-row GEMMs, g samples at a time.

    x (N, C, H, W), Wk (KH, F, KW, C), dy and y (N, F, OH, OW) (y's values used only
    when ``relu``: dz = dy ⊙ [y > 0], else dz = dy; pass dy as y then). Accumulates, per
    group of samples gi = s // g (n0 is a multiple of g), dWt[gi] (KH, KW, C, F) +=
    Σ_n dz ⋆ xp (dWt[gi, p, q, c, f] is that group's part of dW[f, c, p, q]; this
    orientation, R×F per kernel row, ran the GEMM at 83-88 GFLOP/s on one thread against 57
    for F×R) and db[gi] (F,) or (0,) += Σ_n,i,j dz; when
    ``input_grad`` writes dx[n0:n1] (N, C, H, W), the flipped-kernel correlation of dz in
    its scatter form. xbuf, zbuf, dbuf: flat scratch of at least KW·C·(g·S + PITCH_PAD),
    F·g·S and KW·C·(g·S + PITCH_PAD) entries (S = Hp·Wp). ``mkl_threads``: as in
    ``_tap_forward_rows``.
    Behind a fused max pooling (``pidx`` not empty): dy, y and pidx are the pooled
    gradient, output and arg-max (N, F, POH, POW), and ``_dz_pooled`` builds each group's
    output gradient (the same numbers as max-pool backward, then the mask on the full
    output).
    """
    prev = _cblas.mkl_threads_enter(mkl_threads)
    _, C, H, Wd = x.shape
    KH, F, KW, _ = Wk.shape
    OH = H + 2 * ph - KH + 1
    OW = Wd + 2 * pw - KW + 1
    Wp = Wd + 2 * pw
    Hp = H + 2 * ph
    R = KW * C
    zero = dy.dtype.type(0)
    has_bias = db.shape[1] > 0
    block = KH * R * F                          # one group's dWt entries
    acc = np.zeros(OW, dtype=dy.dtype)
    pooled = pidx.shape[0] > 0
    N, Q = dy.shape[0], dy.shape[2] * dy.shape[3]
    dyq = dy.reshape(N * F, Q)
    yq = y.reshape(N * F, Q)
    iq = pidx.reshape(pidx.shape[0] * pidx.shape[1], pidx.shape[2] * pidx.shape[3])
    for s in range(n0, n1, g):
        k = min(g, n1 - s)
        gi = s // g
        T = Hp * k * Wp
        Tp = _pitch(T, x.itemsize)
        L = OH * k * Wp
        xs = xbuf[:R * Tp].reshape(R, Tp)       # columns T.. unused
        zg = zbuf[:F * L].reshape(F, L)
        _tap_pack(x, ph, pw, s, k, KW, xs)
        if pooled:
            _dz_pooled(dyq, yq, iq, relu, s, k, Wp, OH, OW, zg, acc, db, gi)
        # (pooled: zg and db are done; the loop runs no rounds. A branch around it would
        # make its row views cost reference counting: see VIEWS_IN_BRANCHES)
        for f in range(0 if pooled else F):
            row = zg[f]
            acc[:] = zero
            for i in range(OH):
                for kk in range(k):
                    o = (i * k + kk) * Wp
                    src = dy[s + kk, f, i]
                    dst = row[o:o + OW]
                    ys = y[s + kk, f, i]    # unconditionally: see VIEWS_IN_BRANCHES
                    _masked_row(src, ys, relu, dst, acc, OW)
                    junk = row[o + OW:o + Wp]
                    for j in range(Wp - OW):
                        junk[j] = zero
            if has_bias:
                tot = zero
                for j in range(OW):
                    tot += acc[j]
                db[gi, f] += tot
        for p in range(KH):                     # dWt[p] (R×F) += xs window · dzgᵀ
            _cblas.gemm1(False, True, R, F, L, xs, p * k * Wp, Tp, zg, 0, L, 1,
                        dWt, gi * block + p * R * F, F)
        if input_grad:
            ds = dbuf[:R * Tp].reshape(R, Tp)
            ds[:, :] = zero
            for p in range(KH):
                _cblas.gemm1(True, False, R, L, F, Wk, p * F * R, R,
                            zg, 0, L, 1, ds, p * k * Wp, Tp)
            for c in range(C):
                # dxg[c, v] = Σ_q ds[q·C + c, v − q] over the whole grid, in place in ds[c]
                # (long loops; per image row they were short ones: 2x slower in all)
                dxc = ds[c]
                for q in range(1, KW):
                    src = ds[q * C + c]
                    dst = dxc[q:]
                    for v in range(T - q):
                        dst[v] += src[v]
                for kk in range(k):
                    for h in range(H):
                        o = ((h + ph) * k + kk) * Wp + pw
                        dst = dx[s + kk, c, h]
                        for w in range(Wd):
                            dst[w] = dxc[o + w]
    _cblas.mkl_threads_exit(prev)


# The split calls: each thread runs one of these, claiming groups until none are left, so
# no Python runs between groups. Claimed one group at a time from Python (the GIL taken
# and handed over around every group), two threads ran lenet conv1's forward 1.05-1.1x
# faster than one, and its backward 1.1-1.2x.
@jit
def _tap_forward_claimed(x, Wk, b, ph, pw, relu, g, mode, xbuf, tbuf, y, mkl_threads,
                         pool, yp, ip, counter):
    """``_tap_forward_rows`` over groups of g samples claimed one at a time from ``counter``
    (``fastbp._pool.claim``; group i is samples i·g .. min(N, i·g + g) − 1)."""
    N = x.shape[0]
    G = (N + g - 1) // g
    while True:
        i = _pool.claim(counter)
        if i >= G:
            return
        _tap_forward_rows(x, Wk, b, ph, pw, relu, i * g, min(N, i * g + g), g, mode,
                          xbuf, tbuf, y, mkl_threads, pool, yp, ip)


@jit
def _tap_backward_claimed(x, Wk, dy, y, relu, ph, pw, g, input_grad, xbuf, zbuf, dbuf,
                          dWt, db, dx, mkl_threads, pidx, counter):
    """``_tap_backward_rows`` over groups of g samples claimed from ``counter``, as in
    ``_tap_forward_claimed``."""
    N = x.shape[0]
    G = (N + g - 1) // g
    while True:
        i = _pool.claim(counter)
        if i >= G:
            return
        _tap_backward_rows(x, Wk, dy, y, relu, ph, pw, i * g, min(N, i * g + g), g,
                           input_grad, xbuf, zbuf, dbuf, dWt, db, dx, mkl_threads, pidx)


# ---------------------------------------------------------------------------- entry points
def _pair(v):
    return (v, v) if isinstance(v, (int, np.integer)) else (int(v[0]), int(v[1]))


METHODS = ("auto", "direct", "gemm", "tap", "winograd")


def _check_method(fn, method):
    """A ValueError naming ``fn`` when ``method`` is not one of METHODS."""
    if method not in METHODS:
        raise ValueError(f"{fn}: method must be one of {', '.join(METHODS)}; got {method!r}")


def choose_method(C, stride, work):
    """``"direct"`` when the forward work 2·N·F·OH·OW·C·KH·KW is below DIRECT_MAX_WORK;
    for stride 1 ``"tap"`` from TAP_MIN_CHANNELS input channels (when CBLAS is
    there), else ``"direct"`` up to DIRECT_MAX_CHANNELS; otherwise ``"gemm"``."""
    if work < DIRECT_MAX_WORK:
        return "direct"
    if tuple(stride) == (1, 1):
        if C >= TAP_MIN_CHANNELS and _cblas.available:
            return "tap"
        if C <= DIRECT_MAX_CHANNELS:
            return "direct"
    return "gemm"


def choose_backward(C, stride, work, input_grad=True):
    """(method for dW, method for dx): both ``"direct"`` when tiny, both ``"tap"`` where
    ``choose_method`` picks it (or, with CBLAS and stride 1, below TAP_MIN_CHANNELS when dx
    is wanted), else dW ``"direct"`` for stride 1 with at most DIRECT_DW_MAX_CHANNELS input
    channels and dx ``"gemm"``."""
    if work < DIRECT_MAX_WORK:
        return "direct", "direct"
    if choose_method(C, stride, work) == "tap":
        return "tap", "tap"
    if input_grad and tuple(stride) == (1, 1) and _cblas.available:
        return "tap", "tap"
    if C <= DIRECT_DW_MAX_CHANNELS and tuple(stride) == (1, 1):
        return "direct", "gemm"
    return "gemm", "gemm"


def _padded(x, ph, pw):
    """x zero-padded by (ph, pw) on both sides of H and W (x itself when no padding)."""
    if ph == 0 and pw == 0:
        return x
    N, C, H, Wd = x.shape
    xp = np.zeros((N, C, H + 2 * ph, Wd + 2 * pw), dtype=x.dtype)
    xp[:, :, ph:ph + H, pw:pw + Wd] = x
    return xp


def _padded_ws(slot, x, ph, pw):
    """Like ``_padded`` but into a reused scratch buffer (never returned to callers)."""
    N, C, H, Wd = x.shape
    shape = (N, C, H + 2 * ph, Wd + 2 * pw)
    xp = _workspace(slot, N * C * shape[2] * shape[3], x.dtype).reshape(shape)
    if ph or pw:
        xp[...] = 0
    xp[:, :, ph:ph + H, pw:pw + Wd] = x
    return xp


def _chunk(N, rows, P):
    """Samples per im2col chunk: at most CHUNK_ELEMENTS entries (at least one sample),
    with the batch split into chunks of near-equal size."""
    m = max(1, min(N, CHUNK_ELEMENTS // max(1, rows * P)))
    nchunks = -(-N // m)
    return -(-N // nchunks)


# The group size g is also kept within one OpenBLAS "small matrix" GEMM per kernel row
# (at most 100³ multiply-adds, taken unpacked) when the rows are thin: on the thin
# per-row products of a tap call those kernels ran at 100-107 GFLOP/s on one thread where
# the packed path just above that size ran at 64 (AMD EPYC Zen 4: 40×16 outputs by 1500
# against 1600 deep; 5×8 by 2000: 63 against 15 at 30000). cnn_lenet's whole step, 2
# threads, against its default g = 9 (interleaved runs): g = 15 0.98, 17 1.23 (conv2's
# products 1.04M multiply-adds), 32 1.36 (and g = 8, 16: see PITCH_PAD); cnn_cifar's
# conv1 (3→32, 3×3 on 34×34 padded) at g = 4, 1.25M per product, 1.11 of its g = 2.
SMALL_GEMM_MACS = 1_000_000
SMALL_GEMM_MAX_DIM = 64         # the widest thin row measured (KW·C, and F)


def _tap_plan(x_shape, F, KH, KW, ph, pw):
    """(S, g): padded plane size and samples per group: about TAP_GROUP_ELEMENTS of
    packed input, output grid and input-gradient scratch, and for thin kernel rows (KW·C
    and F at most SMALL_GEMM_MAX_DIM) at most SMALL_GEMM_MACS multiply-adds per kernel
    row's GEMM (see above)."""
    N, C, H, Wd = x_shape
    Hp, Wp = H + 2 * ph, Wd + 2 * pw
    S = Hp * Wp
    g = max(1, min(N, TAP_GROUP_ELEMENTS // max(1, (2 * KW * C + F) * S)))
    R = KW * C
    per_sample = R * F * max(0, Hp - KH + 1) * Wp       # one kernel row's GEMM, per sample
    if max(R, F) <= SMALL_GEMM_MAX_DIM and 0 < per_sample <= SMALL_GEMM_MACS:
        g = min(g, SMALL_GEMM_MACS // per_sample)
    return S, _balanced(N, g)


def _balanced(N, g):
    """The group size for N samples in groups of at most g: as many groups as g needs,
    rounded up to an even count when there are several (two threads claim them), and
    sizes as equal as one size allows. The result depends on N and g only, never on the
    thread count, so the weight gradient's per-group sums stay the same bits on any
    thread count. lenet (N = 64, g = 9): groups of 9 left a group of 1 and one thread
    four groups to the other's three; 8 groups of 8 instead: its conv2 backward 584 →
    552 µs, the training step 0.968 (0.957-0.997) in alternating blocks."""
    G = -(-N // max(1, g))
    if G > 1 and G % 2:
        G += 1
    return max(1, -(-N // G))


def tap_usable(C, F, H, Wd, stride, padding, KW):
    """Per-tap GEMMs need stride 1, CBLAS and int32-sized windows (any padding)."""
    ph, pw = padding
    return (tuple(stride) == (1, 1) and _cblas.available
            and _cblas.fits((2 * KW * C + F) * (H + 2 * ph) * (Wd + 2 * pw)))


def _tap_threads(N, macs):
    """Threads for a tap call: fastbp's thread count from SPLIT_MACS multiply-adds, else 1."""
    k = min(config.get_num_threads(), N)
    return k if k >= 2 and macs >= SPLIT_MACS else 1


_NO_POOL = np.zeros(4, np.int64)


def _no_pool(dtype):
    """Stand-ins for the fused pooling arguments of the tap kernels (no pooling)."""
    return np.empty((0, 1, 1, 1), dtype), np.empty((0, 1, 1, 1), np.int32)


def tap_mode(R):
    """The forward's GEMM layout for kernel rows of R = KW·C entries: 2 (all kernel rows in
    one GEMM) from TAP_STACK_MIN_K, 1 (pixels × F) from TAP_T_MIN_K, else 0 (F × pixels)."""
    return 2 if R >= TAP_STACK_MIN_K else 1 if R >= TAP_T_MIN_K else 0


def wino_usable(KH, KW, stride, padding):
    """Winograd can run: a 3×3 kernel at stride 1, CBLAS, padding at most 2 (the input
    gradient pads by 2 − p)."""
    return (KH == 3 and KW == 3 and tuple(stride) == (1, 1) and _cblas.available
            and max(padding) <= 2)


def wino_chosen(C, F, KH, KW, stride, padding, OH, OW):
    """``"auto"`` runs Winograd: usable, with at least WINO_MIN_CHANNELS input and output
    channels, C·F ≥ WINO_MIN_CHANNEL_PRODUCT and OH·OW ≥ WINO_MIN_PIXELS."""
    return (wino_usable(KH, KW, stride, padding) and min(C, F) >= WINO_MIN_CHANNELS
            and C * F >= WINO_MIN_CHANNEL_PRODUCT and OH * OW >= WINO_MIN_PIXELS)


def _wino_forward(x, W, b, ph, pw, relu, y, pool=None):
    """y = conv(x) (+ ReLU) by Winograd F(2×2, 3×3), samples claimed by fastbp's threads;
    ``pool`` as in ``_tap_forward`` (y None, each sample pooled into yp, ip at once)."""
    N, C, H, Wd = x.shape
    F = W.shape[0]
    OH, OW = H + 2 * ph - 2, Wd + 2 * pw - 2
    U = _wg.transform_weights(W)
    sizes = _wg.scratch_sizes(C, F, OH, OW)
    threads = _tap_threads(N, N * F * OH * OW * C * 9)
    if pool is None:
        windows, (yp, ip) = _NO_POOL, _no_pool(x.dtype)
    else:
        windows, yp, ip = pool
    bb = b if b is not None else np.zeros(0, dtype=x.dtype)
    counter = np.zeros(1, np.int64)

    def prepare():
        rb, v, mb, s4 = (_workspace(f"wino_{i}", k, x.dtype) for i, k in enumerate(sizes))
        yy = y if pool is None else \
            _workspace("wino_y", F * OH * OW, x.dtype).reshape(1, F, OH, OW)
        _blas.threads_for(0)            # OpenBLAS: one thread per fastbp thread
        return x, U, bb, ph, pw, relu, yy, rb, v, mb, s4, windows, yp, ip, counter
    _pool.run_split(prepare, _wg.forward_claimed, threads)


def _wino_dw(x, dz, ph, pw, dW, db):
    """dW (and db when it has entries) by Winograd from x and the output gradient dz."""
    N, C = x.shape[0], x.shape[1]
    F, OH, OW = dz.shape[1], dz.shape[2], dz.shape[3]
    sizes = _wg.gradient_sizes(C, F, OH, OW)
    parts = np.empty((_wg.dw_groups(N, F, C), 16, F, C), dtype=x.dtype)
    threads = _tap_threads(N, N * F * OH * OW * C * 9)
    counter = np.zeros(1, np.int64)

    def prepare():
        rb, v, g4, d = (_workspace(f"wino_{i}", k, x.dtype) for i, k in enumerate(sizes))
        _blas.threads_for(0)
        return x, dz, ph, pw, rb, v, g4, d, parts, counter
    _pool.run_split(prepare, _wg.dw_claimed, threads)
    dW[...] = _wg.weight_gradient(parts.sum(axis=0))     # in group order: deterministic
    if db.shape[0]:
        db[...] = dz.sum(axis=(0, 2, 3))


def _wino_dx(dz, W, ph, pw, dx):
    """dx = the flipped-kernel correlation of dz padded by (2 − ph, 2 − pw), by Winograd."""
    Wf = np.ascontiguousarray(W[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))
    _wino_forward(dz, Wf, None, 2 - ph, 2 - pw, False, dx)


def _tap_forward(x, W, b, ph, pw, relu, y, pool=None):
    """y = conv(x) (+ ReLU) by the per-tap GEMMs. With ``pool = (windows, yp, ip)`` (windows
    an int64 array (KH, KW, sh, sw)), y is None and the output is max-pooled group by
    group into yp and ip instead (y then lives in a per-thread scratch of one group)."""
    N, C, H, Wd = x.shape
    F, _, KH, KW = W.shape
    OH, OW = H + 2 * ph - KH + 1, Wd + 2 * pw - KW + 1
    S, g = _tap_plan(x.shape, F, KH, KW, ph, pw)
    Wk = np.ascontiguousarray(W.transpose(2, 0, 3, 1))
    threads = _tap_threads(N, N * F * OH * OW * C * KH * KW)
    mode = tap_mode(KW * C)
    if pool is None:
        windows, (yp, ip) = _NO_POOL, _no_pool(x.dtype)
    else:
        windows, yp, ip = pool

    counter = np.zeros(1, np.int64)

    def prepare():
        xbuf = _workspace("tap_x", KW * C * (g * S + PITCH_PAD), x.dtype)
        tbuf = _workspace("tap_t", (KH if mode == 2 else 1) * F * (g * S + PITCH_PAD),
                          x.dtype)
        yy = y if pool is None else \
            _workspace("tap_y", g * F * OH * OW, x.dtype).reshape(g, F, OH, OW)
        _blas.threads_for(0)            # OpenBLAS: one thread (the thin GEMMs)
        return (x, Wk, b, ph, pw, relu, g, mode, xbuf, tbuf, yy,
                _blas.mkl_one_thread_count(), windows, yp, ip, counter)
    # every thread claims groups until none are left: balanced, and a thread that starts
    # late finds less (or nothing) to do
    _pool.run_split(prepare, _tap_forward_claimed, threads)


def _tap_backward(x, W, dy, y, ph, pw, input_grad, dW, db, dx, pidx=None):
    """dW, db (and dx when ``input_grad``) by the per-tap GEMMs; dz = dy ⊙ [y > 0] when y is
    given, else dy. With ``pidx`` (the arg-max of a fused max pooling), dy and y are the
    pooled gradient and output (see ``_tap_backward_rows``)."""
    N, C, H, Wd = x.shape
    F, _, KH, KW = W.shape
    OH, OW = H + 2 * ph - KH + 1, Wd + 2 * pw - KW + 1
    S, g = _tap_plan(x.shape, F, KH, KW, ph, pw)
    Wk = np.ascontiguousarray(W.transpose(2, 0, 3, 1))
    relu = y is not None
    dy = np.ascontiguousarray(dy)               # the kernel flattens planes (no copy if C)
    yy = np.ascontiguousarray(y) if relu else dy
    dxo = dx if input_grad else np.empty((0, 1, 1, 1), dtype=x.dtype)
    pooled = pidx is not None
    pidx = _no_pool(x.dtype)[1] if not pooled else np.ascontiguousarray(pidx)
    G = -(-N // g)
    # per-group partials, summed in group order below: the same numbers whichever thread
    # ran a group, and for any thread count
    dWt = np.zeros((G, KH, KW, C, F), dtype=x.dtype)
    dbg = np.zeros((G, db.shape[0]), dtype=x.dtype)
    threads = _tap_threads(N, N * F * OH * OW * C * KH * KW * (2 if input_grad else 1))

    counter = np.zeros(1, np.int64)

    def prepare():
        xbuf = _workspace("tap_x", KW * C * (g * S + PITCH_PAD), x.dtype)
        zbuf = _workspace("tap_t", F * g * S, x.dtype)
        dbuf = _workspace("tap_d", KW * C * (g * S + PITCH_PAD) if input_grad else 0,
                          x.dtype)
        _blas.threads_for(0)            # OpenBLAS: one thread (the thin GEMMs)
        return (x, Wk, dy, yy, relu, ph, pw, g, input_grad, xbuf, zbuf, dbuf, dWt, dbg, dxo,
                _blas.mkl_one_thread_count(), pidx, counter)
    _pool.run_split(prepare, _tap_backward_claimed, threads)    # as in _tap_forward
    _tap_reduce(dWt, dbg, dW, db)


@jit
def _tap_reduce(dWt, dbg, dW, db):
    """dW[f, c, p, q] = Σ_gi dWt[gi, p, q, c, f] and db[f] = Σ_gi dbg[gi, f], summed in
    group order, so the same bits whichever thread ran a group, on any thread count
    (compiled: 3.7 µs where NumPy's ``out += dWt[gi]`` over lenet conv2's 8 groups, then
    the transposed copy, took 12)."""
    G, KH, KW, C, F = dWt.shape
    n = KH * KW * C * F
    flat = dWt.reshape(G, n)
    acc = flat[0].copy()
    for gi in range(1, G):
        row = flat[gi]
        for i in range(n):
            acc[i] += row[i]
    i = 0
    for p in range(KH):
        for q in range(KW):
            for c in range(C):
                for f in range(F):
                    dW[f, c, p, q] = acc[i]
                    i += 1
    for f in range(db.shape[0]):
        s = dbg[0, f]
        for gi in range(1, G):
            s += dbg[gi, f]
        db[f] = s


def conv2d_forward(x, W, b, stride=1, padding=0, relu=False, method="auto"):
    """Conv2D forward: a cross-correlation with bias (see the module docstring).

    x (N, C, H, W) C-contiguous, W (F, C, KH, KW) C-contiguous, b (F,) or (0,) for no bias,
    all of one float dtype; stride, padding: int or (h, w). ``relu`` applies max(·, 0) to
    the output (fused). method: ``"auto"``, ``"direct"``, ``"gemm"``, ``"tap"`` (stride 1
    only; falls back to ``"gemm"`` elsewhere) or ``"winograd"`` (3×3 kernels at stride 1
    with padding ≤ 2; falls back to ``"tap"`` elsewhere).
    Returns y (N, F, OH, OW) = b + Σ_c,p,q W[f,c,p,q]·xp[n,c,i·sh+p,j·sw+q].
    Checks are the caller's job (the Conv2D layer validates shapes and dtypes).
    """
    _check_method("conv2d_forward", method)
    sh, sw = _pair(stride)
    ph, pw = _pair(padding)
    N, C, H, Wd = x.shape
    F, _, KH, KW = W.shape
    OH, OW = out_size(H, Wd, KH, KW, sh, sw, ph, pw)
    y = np.empty((N, F, OH, OW), dtype=x.dtype)
    R, P = C * KH * KW, OH * OW
    if method == "auto":
        method = choose_method(C, (sh, sw), 2 * N * F * P * R)
        if method == "tap" and wino_chosen(C, F, KH, KW, (sh, sw), (ph, pw), OH, OW):
            method = "winograd"
    if N == 0 or F == 0 or P == 0:
        return y
    if method == "winograd" and not wino_usable(KH, KW, (sh, sw), (ph, pw)):
        method = "tap"
    if method == "winograd":
        _wino_forward(x, W, b, ph, pw, relu, y)
        return y
    if method == "tap" and not tap_usable(C, F, H, Wd, (sh, sw), (ph, pw), KW):
        method = "gemm"
    if method == "tap":
        _tap_forward(x, W, b, ph, pw, relu, y)
        return y
    if method == "direct":
        if sh == sw == 1:
            flat_forward(_padded(x, ph, pw), W, b, relu, y, work=2 * N * F * P * R)
        else:
            direct_forward(x, W, b, sh, sw, ph, pw, relu, y, work=2 * N * F * P * R)
        return y
    W2 = W.reshape(F, R)
    flat = sh == sw == 1
    if flat:                                   # packed rows are contiguous runs of xp
        xp = _padded_ws("xpad", x, ph, pw)
        pitch = Wd + 2 * pw
    else:
        pitch = OW
    PX = OH * pitch
    m = _chunk(N, R, PX)
    cbuf = _workspace("cols", R * m * PX, x.dtype)
    tbuf = _workspace("out", F * m * PX, x.dtype)
    for n0 in range(0, N, m):
        k = min(m, N - n0)
        cols = cbuf[:R * k * PX].reshape(R, k * PX)
        t = tbuf[:F * k * PX].reshape(F, k * PX)
        if flat:
            im2col_flat(xp, n0, KH, KW, OH, cols, work=R * k * PX)
        else:
            im2col(x, n0, KH, KW, sh, sw, ph, pw, OH, OW, cols, work=R * k * P)
        _gemm(W2, cols, t)
        gemm_to_nchw(t, b, n0, k, relu, pitch, PX, y, work=F * k * P)
    return y


def _flipped_dx_gemm(dy, y, W, ph, pw, dx):
    """dx for stride 1 as the literal identity: im2col of dz padded by (KH−1−ph, KW−1−pw),
    times the flipped kernel Wf (C, F·KH·KW), Wf[c,f,p,q] = W[f,c,KH−1−p,KW−1−q]."""
    N, F, OH, OW = dy.shape
    _, C, KH, KW = W.shape
    H, Wd = dx.shape[2], dx.shape[3]
    dtype = dy.dtype
    if y is not None:
        dz = _workspace("dz", dy.size, dtype).reshape(dy.shape)
        relu_mask(dy.reshape(-1), y.reshape(-1), dz.reshape(-1), work=dy.size)
    else:
        dz = dy
    Wf = np.ascontiguousarray(W[:, :, ::-1, ::-1].transpose(1, 0, 2, 3)).reshape(C, F * KH * KW)
    dzp = _padded_ws("dzpad", dz, KH - 1 - ph, KW - 1 - pw)     # (N, F, H+KH−1, W+KW−1)
    pitch = dzp.shape[3]
    R, PX = F * KH * KW, H * pitch
    m = _chunk(N, R, PX)
    cbuf = _workspace("cols", R * m * PX, dtype)
    tbuf = _workspace("dxT", C * m * PX, dtype)
    none = np.zeros(0, dtype=dtype)
    for n0 in range(0, N, m):
        k = min(m, N - n0)
        c = cbuf[:R * k * PX].reshape(R, k * PX)
        t = tbuf[:C * k * PX].reshape(C, k * PX)
        im2col_flat(dzp, n0, KH, KW, H, c, work=R * k * PX)
        _gemm(Wf, c, t)
        gemm_to_nchw(t, none, n0, k, False, pitch, PX, dx, work=C * k * H * Wd)


def conv2d_backward(x, W, dy, stride=1, padding=0, has_bias=True, input_grad=True, y=None,
                    method="auto"):
    """Conv2D backward: returns (dx, dW, db).

    x (N, C, H, W), W (F, C, KH, KW), dy (N, F, OH, OW), all C-contiguous, one float dtype.
    ``y``: the forward output when the forward fused a ReLU (the gradient is then first
    masked, dz = dy ⊙ [y > 0]); None otherwise (dz = dy).

    - dx (N, C, H, W): the cross-correlation of dz, dilated by the stride and zero-padded by
      (KH − 1 − ph, KW − 1 − pw), with the flipped kernel Wf[c,f,p,q] = W[f,c,KH−1−p,KW−1−q];
      None when ``input_grad`` is False (its work is skipped).
    - dW (F, C, KH, KW): the cross-correlation of the (padded) input with dz,
      dW[f,c,p,q] = Σ_n,i,j dz[n,f,i,j]·xp[n,c,i·sh+p,j·sw+q].
    - db (F,) = Σ_n,i,j dz[n,f,i,j], or an empty (0,) array when not ``has_bias``.
    Deterministic: every reduction runs in a fixed order whatever the thread count.
    method: as ``conv2d_forward``; with ``"winograd"`` (which ``"auto"`` picks where the
    forward does) dz is made whole first and dW, db and dx all come from Winograd.
    """
    _check_method("conv2d_backward", method)
    sh, sw = _pair(stride)
    ph, pw = _pair(padding)
    N, C, H, Wd = x.shape
    F, _, KH, KW = W.shape
    OH, OW = dy.shape[2], dy.shape[3]
    dtype = x.dtype
    relu = y is not None
    R, P = C * KH * KW, OH * OW
    work = 2 * N * F * P * R
    if method == "auto":
        wm, xm = choose_backward(C, (sh, sw), work, input_grad)
        if wm == "tap" and wino_chosen(C, F, KH, KW, (sh, sw), (ph, pw), OH, OW):
            wm = xm = "winograd"
    else:
        wm = xm = method
    dW = np.zeros((F, C, KH, KW), dtype=dtype)
    db = np.zeros(F if has_bias else 0, dtype=dtype)
    dx = np.empty((N, C, H, Wd), dtype=dtype) if input_grad else None
    if N == 0 or F == 0 or P == 0:
        if dx is not None:
            dx[...] = 0
        return dx, dW, db
    if wm == "winograd" and not wino_usable(KH, KW, (sh, sw), (ph, pw)):
        wm = xm = "tap"
    if wm == "tap" and not tap_usable(C, F, H, Wd, (sh, sw), (ph, pw), KW):
        wm = xm = "gemm"
    if wm == "winograd":                # dz made whole, then dW, db and dx from it
        dy = np.ascontiguousarray(dy)
        if relu:
            dz = np.empty_like(dy)
            relu_mask(dy.reshape(-1), np.ascontiguousarray(y).reshape(-1), dz.reshape(-1),
                      work=dy.size)
        else:
            dz = dy
        _wino_dw(x, dz, ph, pw, dW, db)
        if input_grad:
            _wino_dx(dz, W, ph, pw, dx)
        return dx, dW, db
    if wm == "tap":
        _tap_backward(x, W, dy, y, ph, pw, input_grad, dW, db, dx)
        return dx, dW, db
    if wm == "direct" or (input_grad and xm == "direct"):
        if relu:
            dz = np.empty_like(dy)
            relu_mask(dy.reshape(-1), y.reshape(-1), dz.reshape(-1), work=dy.size)
        else:
            dz = dy
        if wm == "direct":
            if sh == sw == 1:
                flat_backward_dw(_padded(x, ph, pw), dz, dW, db, work=work)
            else:
                direct_backward_dw(x, dz, sh, sw, ph, pw, dW, db, work=work)
        if input_grad and xm == "direct":
            direct_backward_dx(dz, W, sh, sw, ph, pw, dx, work=work)
    if wm == "direct" and not (input_grad and xm == "gemm"):
        return dx, dW, db
    # im2col + GEMM for dW (wm == "gemm") and/or dx (xm == "gemm"), chunk by chunk
    gemm_dw = wm == "gemm"
    gemm_dx = input_grad and xm == "gemm"
    W2 = W.reshape(F, R)
    dW2 = dW.reshape(F, R)
    flat = sh == sw == 1
    flipped = gemm_dx and FLIPPED_DX_GEMM and flat and ph <= KH - 1 and pw <= KW - 1
    # the flat packing (pitch Wp) also serves col2im only when col2im is not needed
    flat_dw = flat and gemm_dw and not (gemm_dx and not flipped)
    if gemm_dw or (gemm_dx and not flipped):
        if flat_dw:
            xp = _padded_ws("xpad", x, ph, pw)
            pitch = Wd + 2 * pw
        else:
            pitch = OW
        PX = OH * pitch
        m = _chunk(N, R, PX)
        cbuf = _workspace("cols", R * m * PX, dtype)
        tbuf = _workspace("out", F * m * PX, dtype)
        part = _workspace("part", F * R, dtype).reshape(F, R)
        yy = y if relu else dy
        db_g = db if gemm_dw else np.zeros(0, dtype=dtype)
        for n0 in range(0, N, m):
            k = min(m, N - n0)
            t = tbuf[:F * k * PX].reshape(F, k * PX)
            c = cbuf[:R * k * PX].reshape(R, k * PX)
            nchw_to_gemm(dy, yy, n0, relu, pitch, t, db_g, work=F * k * PX)
            if gemm_dw:
                if flat_dw:
                    im2col_flat(xp, n0, KH, KW, OH, c, work=R * k * PX)
                else:
                    im2col(x, n0, KH, KW, sh, sw, ph, pw, OH, OW, c, work=R * k * P)
                if n0 == 0:
                    _gemm(t, c.T, dW2)
                else:
                    _gemm(t, c.T, part)
                    dW2 += part
            if gemm_dx and not flipped:
                _gemm(W2.T, t, c)                  # dcols = Wᵀ·dz, (R, k·P)
                col2im(c, n0, KH, KW, sh, sw, ph, pw, OH, OW, dx, work=R * k * P)
    if flipped:
        _flipped_dx_gemm(dy, y, W, ph, pw, dx)
    return dx, dW, db


# ---------------------------------------------------------------------------- fused pooling
_WINDOWS: dict = {}


def _pool_windows(size, stride):
    """``(KH, KW, sh, sw)`` as Python ints and as the int64 array the kernels take (one
    array per distinct window, made once and never written: a call builds no array;
    not flagged read-only, which Numba would compile as another type)."""
    KH, KW = _pair(size)
    sh, sw = _pair(size if stride is None else stride)
    key = (KH, KW, sh, sw)
    arr = _WINDOWS.get(key)
    if arr is None:
        arr = _WINDOWS.setdefault(key, np.array(key, np.int64))
    return key, arr


def conv2d_maxpool_forward(x, W, b, stride=1, padding=0, relu=False, pool_size=2,
                           pool_stride=None, method="auto"):
    """Conv2D (then ReLU if ``relu``) then max pooling, in one pass where it can.

    x, W, b, stride, padding, relu, method: as ``conv2d_forward``; pool_size, pool_stride:
    the max pooling's window and stride (int or (h, w); the stride defaults to the size).
    Returns ``(yp, idx)``, exactly ``fastbp.kernels.pool.maxpool2d_forward(y, pool_size,
    pool_stride)`` of the convolution's output y (N, F, OH, OW): yp, idx (N, F, POH, POW)
    with ``POH = (OH − KH)//sh + 1``. On the per-tap path each group of samples is pooled
    as soon as it is computed, and y is never stored whole; on the Winograd path each
    sample is, and a 2×2 pooling with stride 2 comes straight from the output tiles.
    """
    _check_method("conv2d_maxpool_forward", method)
    sh, sw = _pair(stride)
    ph, pw = _pair(padding)
    N, C, H, Wd = x.shape
    F, _, KH, KW = W.shape
    OH, OW = out_size(H, Wd, KH, KW, sh, sw, ph, pw)
    wins, windows = _pool_windows(pool_size, pool_stride)
    POH, POW = _pk.out_size(OH, OW, *wins)
    if method == "auto":
        method = choose_method(C, (sh, sw), 2 * N * F * OH * OW * C * KH * KW)
        if method == "tap" and wino_chosen(C, F, KH, KW, (sh, sw), (ph, pw), OH, OW):
            method = "winograd"
    if method == "winograd" and wino_usable(KH, KW, (sh, sw), (ph, pw)) and N > 0 and \
            F > 0 and POH >= 1 and POW >= 1:
        yp = np.empty((N, F, POH, POW), dtype=x.dtype)
        idx = np.empty((N, F, POH, POW), dtype=np.int32)
        _wino_forward(x, W, b, ph, pw, relu, None, (windows, yp, idx))
        return yp, idx
    if method == "winograd":
        method = "tap"
    if method != "tap" or N == 0 or F == 0 or POH < 1 or POW < 1 or \
            not tap_usable(C, F, H, Wd, (sh, sw), (ph, pw), KW):
        y = conv2d_forward(x, W, b, stride, padding, relu,
                           "gemm" if method == "tap" else method)
        return _pk.maxpool2d_forward(y, pool_size, pool_stride)
    yp = np.empty((N, F, POH, POW), dtype=x.dtype)
    idx = np.empty((N, F, POH, POW), dtype=np.int32)
    _tap_forward(x, W, b, ph, pw, relu, None, (windows, yp, idx))
    return yp, idx


def conv2d_maxpool_backward(x, W, dyp, idx, yp, stride=1, padding=0, pool_size=2,
                            pool_stride=None, has_bias=True, input_grad=True, relu=False,
                            method="auto"):
    """Backward of ``conv2d_maxpool_forward``: returns (dx, dW, db) as ``conv2d_backward``.

    dyp (N, F, POH, POW) the gradient of the pooled output; idx and yp what the forward
    returned. The convolution's output gradient is
    ``dz = maxpool2d_backward(dyp ⊙ [yp > 0], idx)`` with ReLU (the mask is taken on the
    pooled output: at a window's arg-max, y equals yp), else
    ``maxpool2d_backward(dyp, idx)``; then ``conv2d_backward`` of dz without a mask. The
    same numbers as the layers run one by one (there the full output gradient is masked
    by [y > 0]). On the per-tap path dz is rebuilt group by group inside the split loop
    (the full (N, F, OH, OW) gradient never exists); scattering dyp straight into the
    GEMM layout instead (the arg-max row and column per window) was slower.
    """
    _check_method("conv2d_maxpool_backward", method)
    sh, sw = _pair(stride)
    ph, pw = _pair(padding)
    N, C, H, Wd = x.shape
    F, _, KH, KW = W.shape
    OH, OW = out_size(H, Wd, KH, KW, sh, sw, ph, pw)
    dtype = x.dtype
    if method == "auto":
        method = choose_backward(C, (sh, sw), 2 * N * F * OH * OW * C * KH * KW,
                                 input_grad)[0]
        if method == "tap" and wino_chosen(C, F, KH, KW, (sh, sw), (ph, pw), OH, OW):
            method = "winograd"             # below: dz made whole, then conv2d_backward
    if method == "tap" and N > 0 and F > 0 and \
            tap_usable(C, F, H, Wd, (sh, sw), (ph, pw), KW):
        dW = np.zeros((F, C, KH, KW), dtype=dtype)
        db = np.zeros(F if has_bias else 0, dtype=dtype)
        dx = np.empty((N, C, H, Wd), dtype=dtype) if input_grad else None
        _tap_backward(x, W, dyp, yp if relu else None, ph, pw, input_grad, dW, db, dx, idx)
        return dx, dW, db
    dz = np.empty_like(dyp)
    if relu:
        relu_mask(dyp.reshape(-1), yp.reshape(-1), dz.reshape(-1), work=dyp.size)
    else:
        dz[...] = dyp
    dy = _pk.maxpool2d_backward(dz, idx, (N, F, OH, OW))
    return conv2d_backward(x, W, dy, stride, padding, has_bias, input_grad, None, method)
