"""Winograd F(2×2, 3×3) convolution: 3×3 kernels at stride 1, any padding.

Each 2×2 block of the output comes from the 4×4 input tile d under it (tile (ti, tj)
starts at padded row 2·ti, column 2·tj)::

    y_tile = Aᵀ [ Σ_c (G w_fc Gᵀ) ⊙ (Bᵀ d_c B) ] A

with Bᵀ = [[1, 0, −1, 0], [0, 1, 1, 0], [0, −1, 1, 0], [0, 1, 0, −1]],
G = [[1, 0, 0], [½, ½, ½], [½, −½, ½], [0, 0, 1]], Aᵀ = [[1, 1, 1, 0], [0, 1, −1, −1]].
So the 16 entries ξ of the transformed tiles give 16 independent GEMMs over the channels,
``M[ξ] (F × tiles) = U[ξ] (F × C) · V[ξ] (C × tiles)``, with 16 multiply-adds per 2×2
output block and channel pair against 36 for the direct sum: 2.25x fewer. The transforms
only add and subtract (and halve, in U), so float32 results stay within a few ulps of the
direct sum's (measured: max error against float64 2.4e-6 for both on a 32-channel layer).

The transforms run as long flat loops over whole planes, not per tile: the padded input
is stored as two planes of alternate rows (``_pack``), so every tile row's four input
rows are the same flat offsets of those planes, and every tile's columns are 2·m + t of
its row (m the tile's flat index); see ``_input``. The tile grid carries one junk column
(TW + 1 tiles per row) and the planes one junk row, so that these indices stay affine:
about 6% more GEMM work, and no short loops (per tile or per tile row, the loops ran
16-element trips and the loop overheads took 3x the arithmetic).

The input gradient of a 3×3 stride-1 convolution is itself such a convolution (of dz,
padded by 2 − p, with the flipped kernel), so the backward reuses ``forward_sample``.
"""
import numpy as np

from .. import _cblas, _pool
from .._jit import jit
from . import pool as _pk

_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))


def transform_weights(W):
    """U (16, F, C) = G w Gᵀ per (f, c), entry ξ = 4·i + j of the 4×4 result, for W
    (F, C, 3, 3); in W's dtype (G's entries are exact in binary)."""
    F, C = W.shape[0], W.shape[1]
    G = np.array(_G, dtype=W.dtype)
    U = np.einsum("ip,fcpq,jq->ijfc", G, W, G)
    return np.ascontiguousarray(U.reshape(16, F, C), dtype=W.dtype)


def tiles(OH, OW):
    """(TH, TW): tile rows and columns for an OH × OW output (the last tile of an odd
    size is half junk)."""
    return (OH + 1) // 2, (OW + 1) // 2


def scratch_sizes(C, F, OH, OW):
    """Entries of the four per-thread scratch arrays of ``forward_sample``: the packed
    input planes (both layouts), the transformed input V, the GEMM products M and the
    output stage."""
    TH, TW = tiles(OH, OW)
    P1 = TW + 1
    Q = (TH + 1) * P1                  # tiles per channel plane (with the junk row/column)
    Wq = 2 * P1
    rb = 2 * C * (TH + 1) * Wq + 2 * Wq + 8
    e4 = 4 * (C * Q + 2 * P1 + 8)
    v = 16 * (C * Q + 8)
    n = TH * P1
    return rb + e4, v, 16 * F * n, 8 * F * n


@jit(inline="always")
def _pack(x, n, ph, pw, TH, TW, Rb):
    """Rb: x[n] zero-padded by (ph, pw) as two planes of alternate rows, channel-major:
    Rb[r·C·(TH+1)·Wq + (c·(TH+1) + hh)·Wq + u] = xpad[c, 2·hh + r, u], Wq = 2·TW + 2;
    the tail past both planes zero."""
    _, C, H, Wd = x.shape
    Wq = 2 * TW + 2
    plane = C * (TH + 1) * Wq
    zero = Rb.dtype.type(0)
    for c in range(C):
        for h in range(2 * TH + 2):
            r = h % 2
            o = r * plane + (c * (TH + 1) + h // 2) * Wq
            row = Rb[o:o + Wq]
            hh = h - ph
            if 0 <= hh < H:
                src = x[n, c, hh]
                for u in range(pw):
                    row[u] = zero
                w1 = min(Wd, Wq - pw)
                mid = row[pw:pw + w1]
                for w in range(w1):
                    mid[w] = src[w]
                for u in range(pw + w1, Wq):
                    row[u] = zero
            else:
                for u in range(Wq):
                    row[u] = zero
    tail = Rb[2 * plane:]
    for u in range(tail.shape[0]):
        tail[u] = zero


@jit(inline="always")
def _input(Rb, C, TH, TW, E4, V):
    """V[ξ·S + c·Q + m] = (Bᵀ d B)[ξ] for every tile (S = C·Q + 8 per ξ, Q = (TH+1)(TW+1),
    m = hh·(TW+1) + j over the tile grid with its junk row and column).

    First the packed planes are split by column parity into E4 (4 planes of C·Q entries:
    plane 2·r + t holds row parity r, column parity t): E4[(2r + t)·Z + m] = Rb[r·2·C·Q +
    2·m + t] (Z = C·Q + 2·(TW+1) + 8 per plane), one loop that reads both parities
    (LLVM vectorises that interleaved load; a stride-2 load alone runs scalar, 6x slower).
    Then tile row ti's input row 2·ti + a is row ti + a//2 of row parity a % 2, and tile
    m's column 2j + t is entry m + t//2 of column parity t % 2: every operand of the
    transform is a flat plane at a fixed offset, and each of the 16 outputs is one long
    unit-stride loop."""
    P1 = TW + 1
    Q = (TH + 1) * P1
    L = C * Q
    S = L + 8
    Z = L + 2 * P1 + 8
    zero = V.dtype.type(0)
    for r in range(2):
        src = Rb[r * 2 * L:]
        e = E4[(2 * r) * Z:(2 * r) * Z + Z]
        o = E4[(2 * r + 1) * Z:(2 * r + 1) * Z + Z]
        for m in range(L):
            e[m] = src[2 * m]
            o[m] = src[2 * m + 1]
        for m in range(L, Z):
            e[m] = zero
            o[m] = zero
    for i in range(4):
        # Bᵀ row i: d0 − d2, d1 + d2, d2 − d1, d1 − d3 → (row a, row b, sign of b)
        a = 0 if i == 0 else 2 if i == 2 else 1
        bb = 2 if i < 2 else 1 if i == 2 else 3
        ea = E4[(2 * (a % 2)) * Z + (a // 2) * P1:]
        oa = E4[(2 * (a % 2) + 1) * Z + (a // 2) * P1:]
        eb = E4[(2 * (bb % 2)) * Z + (bb // 2) * P1:]
        ob = E4[(2 * (bb % 2) + 1) * Z + (bb // 2) * P1:]
        ea1 = ea[1:]
        oa1 = oa[1:]
        eb1 = eb[1:]
        ob1 = ob[1:]
        v0 = V[(4 * i) * S:(4 * i) * S + L]
        v1 = V[(4 * i + 1) * S:(4 * i + 1) * S + L]
        v2 = V[(4 * i + 2) * S:(4 * i + 2) * S + L]
        v3 = V[(4 * i + 3) * S:(4 * i + 3) * S + L]
        # q_t (columns 2j + t) = row a ± row b; then (q0 − q2, q1 + q2, q2 − q1, q1 − q3)
        if i == 1:
            for m in range(L):
                v0[m] = (ea[m] + eb[m]) - (ea1[m] + eb1[m])
            for m in range(L):
                v1[m] = (oa[m] + ob[m]) + (ea1[m] + eb1[m])
            for m in range(L):
                v2[m] = (ea1[m] + eb1[m]) - (oa[m] + ob[m])
            for m in range(L):
                v3[m] = (oa[m] + ob[m]) - (oa1[m] + ob1[m])
        else:
            for m in range(L):
                v0[m] = (ea[m] - eb[m]) - (ea1[m] - eb1[m])
            for m in range(L):
                v1[m] = (oa[m] - ob[m]) + (ea1[m] - eb1[m])
            for m in range(L):
                v2[m] = (ea1[m] - eb1[m]) - (oa[m] - ob[m])
            for m in range(L):
                v3[m] = (oa[m] - ob[m]) - (oa1[m] - ob1[m])


@jit(inline="always")
def _rows(Mb, F, TH, TW, S4):
    """The row half of Aᵀ M A for every tile: S4[s·L + m] = m0 + m1 + m2 and
    S4[(4 + s)·L + m] = m1 − m2 − m3 for column s of the 4×4 products Mb[ξ·L + m]
    (ξ = 4·i + s, L = F·TH·(TW+1))."""
    L = F * TH * (TW + 1)
    for s in range(4):
        m0 = Mb[s * L:s * L + L]
        m1 = Mb[(4 + s) * L:(4 + s) * L + L]
        m2 = Mb[(8 + s) * L:(8 + s) * L + L]
        m3 = Mb[(12 + s) * L:(12 + s) * L + L]
        r0 = S4[s * L:s * L + L]
        r1 = S4[(4 + s) * L:(4 + s) * L + L]
        for m in range(L):
            r0[m] = m0[m] + m1[m] + m2[m]
        for m in range(L):
            r1[m] = m1[m] - m2[m] - m3[m]


@jit(inline="always")
def _output(Mb, F, TH, TW, b, relu, S4, yn):
    """yn (F, OH, OW) = Aᵀ M A + b (then max(·, 0) if ``relu``) per tile, from the GEMM
    products Mb[ξ·F·n + f·n + ti·(TW+1) + j] (n = TH·(TW+1)). S4: scratch (8·F·n). The
    column half (c0 + c1 + c2, c1 − c2 − c3) is computed as the two output columns of
    each tile are written."""
    P1 = TW + 1
    n = TH * P1
    L = F * n
    OH, OW = yn.shape[1], yn.shape[2]
    zero = yn.dtype.type(0)
    has_bias = b.shape[0] > 0
    _rows(Mb, F, TH, TW, S4)
    half = OW // 2
    for f in range(F):
        bf = b[f] if has_bias else zero
        for ti in range(TH):
            for r in range(2):
                i = 2 * ti + r
                if i >= OH:
                    continue
                o = (4 * r) * L + f * n + ti * P1
                c0 = S4[o:o + P1]
                c1 = S4[o + L:o + L + P1]
                c2 = S4[o + 2 * L:o + 2 * L + P1]
                c3 = S4[o + 3 * L:o + 3 * L + P1]
                dst = yn[f, i]
                if relu:
                    for j in range(half):
                        u = c0[j] + c1[j] + c2[j] + bf
                        w = c1[j] - c2[j] - c3[j] + bf
                        dst[2 * j] = u if not u < zero else zero
                        dst[2 * j + 1] = w if not w < zero else zero
                else:
                    for j in range(half):
                        dst[2 * j] = c0[j] + c1[j] + c2[j] + bf
                        dst[2 * j + 1] = c1[j] - c2[j] - c3[j] + bf
                if OW % 2:
                    u = c0[half] + c1[half] + c2[half] + bf
                    dst[OW - 1] = u if (not relu or not u < zero) else zero


@jit(inline="always")
def _output_pool2(Mb, F, TH, TW, b, relu, S4, OW, ypn, ipn):
    """``_output`` then 2×2 max pooling with stride 2, without storing the output: pooling
    window (i, j) is exactly tile (i, j)'s 2×2 block. ypn, ipn (F, POH, POW): the window
    max and its flat index in the (OH, OW) output plane, first of the row-major order on
    ties (``fastbp.kernels.pool.max_forward``). Returns True when a window holds a NaN
    (then the caller redoes the sample exactly: NaN wins there)."""
    P1 = TW + 1
    n = TH * P1
    L = F * n
    POH, POW = ypn.shape[1], ypn.shape[2]
    zero = ypn.dtype.type(0)
    has_bias = b.shape[0] > 0
    _rows(Mb, F, TH, TW, S4)
    bad = False
    for f in range(F):
        bf = b[f] if has_bias else zero
        for ti in range(POH):
            o = f * n + ti * P1
            a0 = S4[o:o + P1]
            a1 = S4[o + L:o + L + P1]
            a2 = S4[o + 2 * L:o + 2 * L + P1]
            a3 = S4[o + 3 * L:o + 3 * L + P1]
            c0 = S4[o + 4 * L:o + 4 * L + P1]
            c1 = S4[o + 5 * L:o + 5 * L + P1]
            c2 = S4[o + 6 * L:o + 6 * L + P1]
            c3 = S4[o + 7 * L:o + 7 * L + P1]
            yr = ypn[f, ti]
            ir = ipn[f, ti]
            base = 2 * ti * OW
            for j in range(POW):
                v00 = a0[j] + a1[j] + a2[j] + bf
                v01 = a1[j] - a2[j] - a3[j] + bf
                v10 = c0[j] + c1[j] + c2[j] + bf
                v11 = c1[j] - c2[j] - c3[j] + bf
                if relu:
                    v00 = v00 if not v00 < zero else zero
                    v01 = v01 if not v01 < zero else zero
                    v10 = v10 if not v10 < zero else zero
                    v11 = v11 if not v11 < zero else zero
                u = (v00 + v01) + (v10 + v11)
                bad |= u != u
                yr[j], ir[j] = _pk.max4(v00, v01, v10, v11, base + 2 * j, OW)
    return bad


# The pieces below are compiled once each and called (not inlined) from the per-sample
# kernels: a call per sample costs nothing measurable, and each inlined copy of the
# transforms added seconds to the first compile.
@jit
def transform_input(x, n, ph, pw, TH, TW, Rb, V):
    """V = the transformed tiles of sample n of x padded by (ph, pw) (``_pack``, ``_input``);
    Rb: flat scratch of ``scratch_sizes(...)[0]`` entries."""
    C = x.shape[1]
    Wq = 2 * (TW + 1)
    nr = 2 * C * (TH + 1) * Wq + 2 * Wq + 8
    _pack(x, n, ph, pw, TH, TW, Rb[:nr])
    _input(Rb[:nr], C, TH, TW, Rb[nr:], V)


@jit
def products(x, n, U, ph, pw, TH, TW, Rb, V, Mb):
    """Mb[ξ] (F × TH·(TW+1)) = U[ξ] · V[ξ] for sample n: input transform, 16 GEMMs."""
    C = x.shape[1]
    F = U.shape[1]
    P1 = TW + 1
    Q = (TH + 1) * P1
    S = C * Q + 8
    ncol = TH * P1
    transform_input(x, n, ph, pw, TH, TW, Rb, V)
    for xi in range(16):          # M[ξ] (F × ncol) = U[ξ] (F × C) · V[ξ] (C × ncol, rows Q apart)
        _cblas.gemm0(False, False, F, ncol, C, U, xi * F * C, C, V, xi * S, Q, 0,
                     Mb, xi * F * ncol, ncol)


@jit
def forward_sample(x, n, U, b, ph, pw, relu, yn, Rb, V, Mb, S4):
    """yn (F, OH, OW) = the 3×3 stride-1 cross-correlation of sample n of x (N, C, H, W),
    zero-padded by (ph, pw), + b (F,) or (0,) for none, then max(·, 0) if ``relu``:
    yn[f,i,j] = b[f] + Σ_c,p,q w[f,c,p,q]·xpad[c,i+p,j+q], through U = transform_weights(w)
    (16, F, C). Rb, V, Mb, S4: flat scratch of ``scratch_sizes`` entries. The GEMMs run on
    the calling thread's OpenBLAS (the caller sets one thread)."""
    OH, OW = yn.shape[1], yn.shape[2]
    TH, TW = (OH + 1) // 2, (OW + 1) // 2
    products(x, n, U, ph, pw, TH, TW, Rb, V, Mb)
    _output(Mb, U.shape[1], TH, TW, b, relu, S4, yn)


@jit
def forward_pool2_sample(x, n, U, b, ph, pw, relu, OH, OW, ypn, ipn, Rb, V, Mb, S4):
    """``forward_sample`` followed by 2×2 max pooling with stride 2 into ypn, ipn
    (F, OH//2, OW//2), the output itself never stored. Returns True when a pooling
    window held a NaN (ypn, ipn then need the exact pass)."""
    TH, TW = (OH + 1) // 2, (OW + 1) // 2
    products(x, n, U, ph, pw, TH, TW, Rb, V, Mb)
    return _output_pool2(Mb, U.shape[1], TH, TW, b, relu, S4, OW, ypn, ipn)


_max2_serial = _pk.max_forward_2x2.serial
_max_serial = _pk.max_forward.serial


@jit
def forward_claimed(x, U, b, ph, pw, relu, y, Rb, V, Mb, S4, pool, yp, ip, counter):
    """``forward_sample`` for the samples claimed one at a time from ``counter``
    (``fastbp._pool.claim``), into y (N, F, OH, OW); with a fused max pooling (``yp`` not
    empty) y is a one-sample scratch (1, F, OH, OW) pooled at once into yp and ip
    (N, F, POH, POW) by windows ``pool`` = (KH, KW, sh, sw), as
    ``fastbp.kernels.pool.max_forward``."""
    N = x.shape[0]
    pooled = yp.shape[0] > 0
    two = pool[0] == 2 and pool[1] == 2 and pool[2] == 2 and pool[3] == 2
    while True:
        n = _pool.claim(counter)
        if n >= N:
            return
        if pooled and two:       # pooled straight from the tiles; a NaN: the exact pass
            OH, OW = y.shape[2], y.shape[3]
            if not forward_pool2_sample(x, n, U, b, ph, pw, relu, OH, OW, yp[n], ip[n],
                                        Rb, V, Mb, S4):
                continue
        k = 0 if pooled else n
        forward_sample(x, n, U, b, ph, pw, relu, y[k], Rb, V, Mb, S4)
        if pooled:
            if two:
                _max2_serial(y[:1], yp[n:n + 1], ip[n:n + 1])
            else:
                _max_serial(y[:1], pool[0], pool[1], pool[2], pool[3], yp[n:n + 1],
                            ip[n:n + 1])


# ---------------------------------------------------------------------------- weight gradient
# With Z[ξ] = Σ_c U[ξ] ⊙ V[ξ] and y = Aᵀ Z A per tile, ∂L/∂Z = A dz Aᵀ (4×4 from the 2×2
# block of dz), so ∂L/∂U[ξ] (F × C) = Σ_tiles (A dz Aᵀ)[ξ] (F × tiles) · V[ξ]ᵀ: 16 more
# GEMMs with the tiles as the long inner dimension, and dW[f,c] = Gᵀ (∂L/∂U[f,c]) G.
def gradient_sizes(C, F, OH, OW):
    """Entries of the per-thread scratch of ``dw_sample``: (packed input planes, V, the
    split output gradient planes, the transformed gradient)."""
    rb, v, _, _ = scratch_sizes(C, F, OH, OW)
    TH, TW = tiles(OH, OW)
    n = TH * (TW + 1)
    return rb, v, 4 * F * n, 16 * F * n


@jit(inline="always")
def _grad_tiles(dz, n, TH, TW, G4, D):
    """D[ξ·F·nc + f·nc + ti·(TW+1) + j] = (A g Aᵀ)[ξ] for the 2×2 block g of dz[n]
    (N, F, OH, OW) under tile (ti, j), zero for the junk column and past OH, OW;
    A = [[1, 0], [1, 1], [1, −1], [0, −1]], nc = TH·(TW+1). G4: scratch of 4·F·nc entries
    (the blocks' four corners as planes)."""
    F, OH, OW = dz.shape[1], dz.shape[2], dz.shape[3]
    P1 = TW + 1
    nc = TH * P1
    L = F * nc
    zero = D.dtype.type(0)
    half = OW // 2
    for f in range(F):
        for i in range(2 * TH):
            r = i % 2
            o = f * nc + (i // 2) * P1
            e = G4[(2 * r) * L + o:(2 * r) * L + o + P1]
            od = G4[(2 * r + 1) * L + o:(2 * r + 1) * L + o + P1]
            if i < OH:
                src = dz[n, f, i]
                for j in range(half):
                    e[j] = src[2 * j]
                    od[j] = src[2 * j + 1]
                e[half] = src[OW - 1] if OW % 2 else zero     # then the junk column
                od[half] = zero
                if half + 1 < P1:
                    e[half + 1] = zero
                    od[half + 1] = zero
            else:
                for j in range(P1):
                    e[j] = zero
                    od[j] = zero
    g00 = G4[0:L]
    g01 = G4[L:2 * L]
    g10 = G4[2 * L:3 * L]
    g11 = G4[3 * L:4 * L]
    for i in range(4):            # A rows: g0, g0 + g1, g0 − g1, −g1 (then the same on columns)
        d0 = D[(4 * i) * L:(4 * i) * L + L]
        d1 = D[(4 * i + 1) * L:(4 * i + 1) * L + L]
        d2 = D[(4 * i + 2) * L:(4 * i + 2) * L + L]
        d3 = D[(4 * i + 3) * L:(4 * i + 3) * L + L]
        if i == 0:
            for m in range(L):
                d0[m] = g00[m]
            for m in range(L):
                d1[m] = g00[m] + g01[m]
            for m in range(L):
                d2[m] = g00[m] - g01[m]
            for m in range(L):
                d3[m] = -g01[m]
        elif i == 1:
            for m in range(L):
                d0[m] = g00[m] + g10[m]
            for m in range(L):
                d1[m] = (g00[m] + g10[m]) + (g01[m] + g11[m])
            for m in range(L):
                d2[m] = (g00[m] + g10[m]) - (g01[m] + g11[m])
            for m in range(L):
                d3[m] = -(g01[m] + g11[m])
        elif i == 2:
            for m in range(L):
                d0[m] = g00[m] - g10[m]
            for m in range(L):
                d1[m] = (g00[m] - g10[m]) + (g01[m] - g11[m])
            for m in range(L):
                d2[m] = (g00[m] - g10[m]) - (g01[m] - g11[m])
            for m in range(L):
                d3[m] = -(g01[m] - g11[m])
        else:
            for m in range(L):
                d0[m] = -g10[m]
            for m in range(L):
                d1[m] = -(g10[m] + g11[m])
            for m in range(L):
                d2[m] = -(g10[m] - g11[m])
            for m in range(L):
                d3[m] = g11[m]


@jit
def dw_sample(x, dz, n, ph, pw, Rb, V, G4, D, dU, beta):
    """dU (16, F, C) = beta·dU + ∂L/∂U from sample n, where ∂L/∂U[ξ] = Σ_tiles
    (A dz Aᵀ)[ξ] · (Bᵀ d B)[ξ]ᵀ for x (N, C, H, W) padded by (ph, pw) and dz (N, F, OH, OW)
    (OH = H + 2·ph − 2); beta is 0 (overwrite) or 1 (accumulate). Rb, V, G4, D: flat
    scratch of ``gradient_sizes`` entries."""
    C = x.shape[1]
    F, OH, OW = dz.shape[1], dz.shape[2], dz.shape[3]
    TH, TW = (OH + 1) // 2, (OW + 1) // 2
    P1 = TW + 1
    Q = (TH + 1) * P1
    S = C * Q + 8
    nc = TH * P1
    transform_input(x, n, ph, pw, TH, TW, Rb, V)
    _grad_tiles(dz, n, TH, TW, G4, D)
    for xi in range(16):          # dU[ξ] (F × C) = D[ξ] (F × nc) · V[ξ]ᵀ (nc × C)
        _cblas.gemm0(False, True, F, C, nc, D, xi * F * nc, nc, V, xi * S, Q, beta,
                     dU, xi * F * C, C)


@jit
def dw_claimed(x, dz, ph, pw, Rb, V, G4, D, parts, counter):
    """``dw_sample`` for groups of samples claimed from ``counter``: with G = len(parts)
    groups of gs = ⌈N / G⌉ consecutive samples, group i accumulates its samples in order
    into parts[i] (G, 16, F, C). Summed afterwards in group order, the result does not
    depend on which thread ran which group."""
    N = x.shape[0]
    G = parts.shape[0]
    gs = (N + G - 1) // G
    while True:
        i = _pool.claim(counter)
        if i >= G:
            return
        for n in range(i * gs, min(N, i * gs + gs)):
            dw_sample(x, dz, n, ph, pw, Rb, V, G4, D, parts[i], 0 if n == i * gs else 1)
        if i * gs >= N:                   # an empty last group (5 samples in 4 groups of 2)
            parts[i][:] = 0


# at most this many groups (weight-gradient partials) per call, and at most about this
# many partial entries in all: memory stays bounded for large batches and channel counts
DW_GROUPS = 16
DW_PARTIAL_ENTRIES = 1 << 24


def dw_groups(N, F, C):
    """The number of weight-gradient partials (groups of samples) for N samples: fixed by
    the shapes alone, so the result is the same on any thread count."""
    return max(1, min(N, DW_GROUPS, DW_PARTIAL_ENTRIES // (16 * F * C)))


def weight_gradient(dU):
    """dW (F, C, 3, 3) = Gᵀ dU G per (f, c), from dU (16, F, C)."""
    F, C = dU.shape[1], dU.shape[2]
    G = np.array(_G, dtype=dU.dtype)
    X = np.ascontiguousarray(dU.reshape(4, 4, F * C).transpose(2, 0, 1))   # (F·C, 4, 4)
    return (G.T @ X @ G).reshape(F, C, 3, 3)
