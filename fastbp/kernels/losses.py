"""Loss kernels: the value and the gradient of a mean loss, computed together.

Every kernel writes the gradient into an output buffer of the input's dtype and returns
the SUM of the per-row (or per-chunk) losses as a float64; the caller divides by the
number of rows. Reductions are race-free and deterministic: each parallel iteration
writes its own partial loss into a buffer, and that buffer is summed by a serial loop
afterwards, so the serial and the parallel build give bit-identical results.

Arrays reach these kernels already validated, C-contiguous and reshaped to 2-D
``(M, K)`` (row losses) or 1-D ``(n,)`` (element-wise losses). Labels are int64.
"""
import numpy as np
from numba import prange, types
from numba.extending import overload

from .._jit import dual, jit
from ._math import fexp

# Element-wise losses are reduced in fixed chunks of this many elements. The chunking
# does not depend on the thread count, so the summation order never changes.
CHUNK = 4096
# Row losses work on blocks of about this many elements (whole rows); per-row results
# do not depend on the blocking.
ROW_BLOCK = 1024


@jit(inline="always")
def _row_max(x):
    """max(x) of a non-empty row, four running maxima (breaks the dependency chain).
    NaN is never picked up unless at x[0]; the caller's exp(x - max) propagates it."""
    n = x.size
    m0 = x[0]
    m1 = m0
    m2 = m0
    m3 = m0
    j = 1
    while j + 4 <= n:
        m0 = x[j] if x[j] > m0 else m0
        m1 = x[j + 1] if x[j + 1] > m1 else m1
        m2 = x[j + 2] if x[j + 2] > m2 else m2
        m3 = x[j + 3] if x[j + 3] > m3 else m3
        j += 4
    while j < n:
        m0 = x[j] if x[j] > m0 else m0
        j += 1
    m0 = m1 if m1 > m0 else m0
    m2 = m3 if m3 > m2 else m2
    return m2 if m2 > m0 else m0


@jit(inline="always")
def _row_sum(x):
    """Sum of a row in x's dtype, four fixed accumulators (breaks the add chain;
    the order is fixed, so the result is deterministic)."""
    n = x.size
    a0 = x.dtype.type(0)
    a1 = a0
    a2 = a0
    a3 = a0
    j = 0
    while j + 4 <= n:
        a0 += x[j]
        a1 += x[j + 1]
        a2 += x[j + 2]
        a3 += x[j + 3]
        j += 4
    while j < n:
        a0 += x[j]
        j += 1
    return (a0 + a1) + (a2 + a3)


@jit(inline="always")
def _exp_shifted_rows(z, dz, rows, r0, r1):
    """For rows r0..r1-1: rows[i] = m_i = max(z[i]) and dz[i] = exp(z[i] - m_i).

    dz is first filled with each row's max, then ONE flat loop over the whole block
    computes exp(z - dz): it vectorises even when K is small (e.g. 10 classes).
    """
    K = z.shape[1]
    for i in range(r0, r1):
        m = _row_max(z[i])
        rows[i] = m              # float64 holds float32/float64 exactly
        di = dz[i]
        for j in range(K):
            di[j] = m
    zf = z.reshape(-1)[r0 * K:r1 * K]
    df = dz.reshape(-1)[r0 * K:r1 * K]
    for k in range(zf.size):
        df[k] = fexp(zf[k] - df[k])


@dual("losses")
def softmax_ce_index(z, y, dz, inv_m):
    """Softmax cross-entropy with class-index labels.

    z (M, K) float logits, y (M,) int64 labels in [0, K), dz (M, K) output, same dtype
    as z; inv_m = 1/M as z's dtype. With m_i = max(z[i]), s_i = sum_j exp(z[i, j] - m_i)
    and p = softmax(z[i]):
        loss_i = (m_i - z[i, y_i]) + log(s_i)     (= logsumexp(z[i]) - z[i, y_i])
        dz[i]  = (p - onehot(y_i)) * inv_m
    Returns sum_i loss_i as float64.
    """
    M, K = z.shape
    rows = np.empty(M, np.float64)
    rb = max(1, ROW_BLOCK // K)
    for b in prange((M + rb - 1) // rb):
        r0 = b * rb
        r1 = min(r0 + rb, M)
        _exp_shifted_rows(z, dz, rows, r0, r1)
        for i in range(r0, r1):
            di = dz[i]
            s = _row_sum(di)
            scale = inv_m / s
            for j in range(K):
                di[j] *= scale
            yi = y[i]
            di[yi] -= inv_m
            # in float64: no overflow, and m is not added to log(s) before z_y is removed
            rows[i] = (rows[i] - np.float64(z[i, yi])) + np.log(np.float64(s))
    total = 0.0
    for i in range(M):
        total += rows[i]
    return total


@dual("losses")
def softmax_ce_prob(z, t, dz, inv_m):
    """Softmax cross-entropy with probability (or one-hot) targets.

    z, t, dz (M, K), one float dtype; inv_m = 1/M as z's dtype. With m_i = max(z[i]),
    s_i = sum_j exp(z[i, j] - m_i), p = softmax(z[i]) and S_i = sum_j t[i, j] (1 for
    proper distributions):
        loss_i = -sum_j t[i, j] log p_j = sum_j t[i, j] (m_i - z[i, j]) + S_i log(s_i)
        dz[i]  = (S_i p - t[i]) * inv_m
    Returns sum_i loss_i as float64.
    """
    M, K = z.shape
    rows = np.empty(M, np.float64)
    rb = max(1, ROW_BLOCK // K)
    for b in prange((M + rb - 1) // rb):
        r0 = b * rb
        r1 = min(r0 + rb, M)
        _exp_shifted_rows(z, dz, rows, r0, r1)
        for i in range(r0, r1):
            zi = z[i]
            ti = t[i]
            di = dz[i]
            m = rows[i]
            s = _row_sum(di)
            ts = _row_sum(ti)
            acc = 0.0
            for j in range(K):
                if ti[j] != 0:  # 0 * log 0 = 0: zero targets contribute nothing
                    acc += np.float64(ti[j]) * (m - np.float64(zi[j]))
            scale = ts * inv_m / s
            for j in range(K):
                di[j] = di[j] * scale - ti[j] * inv_m
            rows[i] = acc + np.float64(ts) * np.log(np.float64(s))
    total = 0.0
    for i in range(M):
        total += rows[i]
    return total


@dual("losses")
def mse(p, t, dp, scale):
    """Squared error, summed; gradient of the mean.

    p, t, dp (n,), one float dtype; scale = 2/n as p's dtype.
        dp[k] = (p[k] - t[k]) * scale
    Returns sum_k (p[k] - t[k])^2 as float64.
    """
    n = p.size
    nc = (n + CHUNK - 1) // CHUNK
    part = np.empty(nc, np.float64)
    for c in prange(nc):
        lo = c * CHUNK
        hi = min(lo + CHUNK, n)
        acc = 0.0
        for k in range(lo, hi):
            d = p[k] - t[k]
            dp[k] = d * scale
            dd = np.float64(d)
            acc += dd * dd
        part[c] = acc
    total = 0.0
    for c in range(nc):
        total += part[c]
    return total


def log1p_unit(u):
    """log(1 + u) for 0 <= u <= 1, float32/float64 (njit-callable; NumPy in Python)."""
    return np.log1p(u)


@overload(log1p_unit, inline="always")
def _ol_log1p_unit(u):
    """Branch-free, so loops that call it vectorise (np.log1p is a scalar libm call).

    log(1 + u) = 2 atanh(s) = 2 s (1 + s^2/3 + s^4/5 + ...), s = u/(2 + u) in [0, 1/3],
    truncated where the remainder, below (1/9)^n/(2n + 1) relative, is under the dtype's
    rounding: n = 8 terms for float32, 17 for float64. Written out term by term (LLVM
    does not unroll, and so not vectorise, a 17-step loop); float64 evaluates pairs of
    terms in s^4 to halve the dependency chain.
    """
    if not isinstance(u, types.Float):
        return None
    ft = np.float32 if u.bitwidth == 32 else np.float64
    c = tuple(ft(1.0 / (2 * k + 1)) for k in range(17))
    two = ft(2)

    def impl32(u):
        s = u / (two + u)
        s2 = s * s
        p = c[7]
        p = p * s2 + c[6]
        p = p * s2 + c[5]
        p = p * s2 + c[4]
        p = p * s2 + c[3]
        p = p * s2 + c[2]
        p = p * s2 + c[1]
        p = p * s2 + c[0]
        return two * s * p

    def impl64(u):
        s = u / (two + u)
        s2 = s * s
        s4 = s2 * s2
        p = c[16]
        p = p * s4 + (c[14] + c[15] * s2)
        p = p * s4 + (c[12] + c[13] * s2)
        p = p * s4 + (c[10] + c[11] * s2)
        p = p * s4 + (c[8] + c[9] * s2)
        p = p * s4 + (c[6] + c[7] * s2)
        p = p * s4 + (c[4] + c[5] * s2)
        p = p * s4 + (c[2] + c[3] * s2)
        p = p * s4 + (c[0] + c[1] * s2)
        return two * s * p
    return impl32 if u.bitwidth == 32 else impl64


@dual("losses")
def binary_cross_entropy(z, t, dz, scale):
    """Binary cross-entropy on logits, summed; gradient of the mean.

    z, t, dz (n,), one float dtype, t in [0, 1]; scale = 1/n as z's dtype.
        loss_k = max(z, 0) - z t + log1p(exp(-|z|))      (stable for any finite z)
        dz[k]  = (sigmoid(z) - t) * scale
    sigmoid reuses e = exp(-|z|): 1/(1+e) for z >= 0, e/(1+e) otherwise.
    Returns sum_k loss_k as float64.
    """
    n = z.size
    nc = (n + CHUNK - 1) // CHUNK
    part = np.empty(nc, np.float64)
    zero = z.dtype.type(0)
    one = z.dtype.type(1)
    for c in prange(nc):
        lo = c * CHUNK
        hi = min(lo + CHUNK, n)
        loss = np.empty(hi - lo, z.dtype)
        for k in range(lo, hi):     # no reduction here, so this loop vectorises
            x = z[k]
            tk = t[k]
            e = fexp(-abs(x))
            r = one / (one + e)
            sig = r if x >= zero else e * r
            dz[k] = (sig - tk) * scale
            xpos = x if x > zero else zero
            loss[k - lo] = (xpos - x * tk) + log1p_unit(e)
        acc = 0.0
        for k in range(hi - lo):
            acc += np.float64(loss[k])
        part[c] = acc
    total = 0.0
    for c in range(nc):
        total += part[c]
    return total


@dual("losses")
def hinge(s, y, ds, inv_m):
    """Multiclass SVM (hinge) loss, cs231n form, margin 1.

    s (M, K) float scores, y (M,) int64 labels in [0, K), ds (M, K) output, same dtype
    as s; inv_m = 1/M as s's dtype. With margin_j = s[i, j] - s[i, y_i] + 1:
        loss_i   = sum_{j != y_i} max(0, margin_j)
        ds[i, j] = inv_m if margin_j > 0 else 0             (j != y_i)
        ds[i, y_i] = -(number of j with margin_j > 0) * inv_m
    Margins are formed in float64 (no overflow). A NaN margin makes the row's loss and
    gradient NaN. Returns sum_i loss_i as float64.
    """
    M, K = s.shape
    rows = np.empty(M, np.float64)
    zero = s.dtype.type(0)
    one = s.dtype.type(1)
    for i in prange(M):
        yi = y[i]
        sy = np.float64(s[i, yi])
        cnt = zero
        acc = 0.0
        for j in range(K):
            if j == yi:
                continue
            marg = np.float64(s[i, j]) - sy + 1.0
            if marg > 0.0:
                acc += marg
                ds[i, j] = inv_m
                cnt += one
            elif marg <= 0.0:
                ds[i, j] = zero
            else:  # NaN: propagate to loss and gradient
                acc += marg
                nan = s[i, j] - s[i, yi]
                ds[i, j] = nan
                cnt += nan
        ds[i, yi] = -cnt * inv_m
        rows[i] = acc
    total = 0.0
    for i in range(M):
        total += rows[i]
    return total
