"""Simple (Elman) RNN kernels: one cell step, and a whole sequence with backprop through time.

Formula (time-major, ``x (T, N, D)``, hidden state ``(N, H)``)::

    a_t = x_t Wx + h_{t-1} Wh + b          Wx (D, H), Wh (H, H), b (H,)
    h_t = f(a_t)                           f = tanh, or relu when ``relu`` is True

Backward (BPTT), from t = T-1 down to 0, with ``g`` the gradient arriving at ``h_t``
(from the output at step t and from step t+1)::

    da_t    = g ⊙ f'(a_t)                  f' = 1 - h_t² (tanh), [h_t > 0] (relu)
    g_{t-1} = da_t Whᵀ                     (at t = 0 this is dh0)

then, with every ``da_t`` kept, one GEMM each: ``dWx = Σ_t x_tᵀ da_t``,
``dWh = Σ_t h_{t-1}ᵀ da_t``, ``db = Σ_t Σ_n da_t``, ``dx_t = da_t Wxᵀ``.

The sequence kernels do the input projection ``x Wx`` of all steps as one GEMM before
the recurrence, and run the time loop in compiled code (no Python per step). The product
``h_{t-1} Wh`` of one step is a BLAS GEMM, or a plain loop for 2..8 rows, where a BLAS call
costs more than the arithmetic (see ``SMALL_MATMUL``).

Cache / memory: forward returns ``hs (T, N, H)``, the only thing backward needs besides the
inputs ``x``, ``h0`` and the weights: O(T·N·H). Backward allocates ``da (T, N, H)`` more.

The public functions take C-contiguous arrays of one float dtype (float32 or float64) and
validate nothing else: layers (``fastbp.layers.recurrent``) check shapes first.
"""
import numpy as np
from numba import prange

from .. import _blas, _pool
from .._cblas import dot, matmul, transposed
from .._jit import dual, jit
from ._math import _wide, ftanh

# The per-step product h_{t-1} Wh is a plain loop for 2..8 rows with at most SMALL_MATMUL
# multiply-adds, else BLAS. Measured on the 2-vCPU AVX-512 machine (float32, K = H, M = 4H):
# loop/BLAS time 0.45 at N=4 H=32, 0.70 at N=8 H=32, 0.62 at N=8 H=128, but 1.48 at N=1
# (BLAS's GEMV is better) and 1.2-1.8 at N >= 16 with H = 32.
SMALL_MATMUL = 1 << 19
# OpenBLAS runs a GEMM of m·n·k <= 65536·4 on one thread (interface/gemm.c).
BLAS_SERIAL_MNK = 1 << 18


@jit(inline="always")
def _col_blocks(B, N):
    """B (K, M) split into nb contiguous column blocks (nb, K, M/nb), nb the smallest divisor
    of M with N·K·M/nb <= BLAS_SERIAL_MNK (nb = 1 when N <= 8, when no split is needed, or
    when blocks would be narrower than 16 columns: then the GEMM is big enough for threads)."""
    K, M = B.shape
    nb = 1
    if N > 8 and N * K * 16 <= BLAS_SERIAL_MNK:
        while nb < M and (N * K * (M // nb) > BLAS_SERIAL_MNK or M % nb != 0):
            nb += 1
    cb = M // nb
    Bb = np.empty((nb, K, cb), dtype=B.dtype)
    for k in range(nb):
        Bb[k] = B[:, k * cb:(k + 1) * cb]
    return Bb


@jit(inline="always")
def _matmul_into(a, B, Bb, tmp, out):
    """out = a B.   a (N, K), B (K, M), out (N, M); Bb = _col_blocks(B, N) (nb, K, M/nb),
    tmp (nb, N, M/nb) scratch; all C-contiguous, one dtype.

    2..8 rows: a plain loop. Otherwise BLAS, one call per column block: OpenBLAS runs a GEMM
    of m·n·k <= 65536·4 on one thread, and its threaded GEMM costs a thread hand-off per
    call; once per time step that measured 2-5x slower on the shared 2-vCPU machine.
    """
    N, K = a.shape
    M = B.shape[1]
    if 1 < N <= 8 and N * K * M <= SMALL_MATMUL:
        zero = out.dtype.type(0)
        for n in range(N):
            for j in range(M):
                out[n, j] = zero
            for k in range(K):
                ank = a[n, k]
                for j in range(M):
                    out[n, j] += ank * B[k, j]
    elif Bb.shape[0] == 1:
        dot(a, B, out)
    else:
        nb, _, cb = Bb.shape
        for k in range(nb):
            tk = tmp[k]
            dot(a, Bb[k], tk)
            for n in range(N):
                for j in range(cb):
                    out[n, k * cb + j] = tk[n, j]


@jit(inline="always")
def _add_into(g, d):
    """g += d, both (M, H)."""
    for n in range(g.shape[0]):
        for j in range(g.shape[1]):
            g[n, j] += d[n, j]


@jit(inline="always")
def _col_sum(a):
    """Σ over the rows of a (R, G) -> (G,), rows in order (db of a stacked dz)."""
    s = np.zeros(a.shape[1], dtype=a.dtype)
    for r in range(a.shape[0]):
        for j in range(a.shape[1]):
            s[j] += a[r, j]
    return s


@jit(inline="always")
def _weight_grads(x, h0, hs, dz, input_grad, Wx):
    """The weight gradients from the stored per-step pre-activation gradients, one GEMM each.

    x (T, N, D), h0 (N, H), hs (T, N, H), dz (T, N, G), Wx (D, G). Returns
    (dx (T, N, D) = dz Wxᵀ or (0, 0, 0), dWx (D, G) = Σ_t x_tᵀ dz_t,
    dWh (H, G) = h0ᵀ dz_0 + Σ_{t>=1} h_{t-1}ᵀ dz_t, db (G,) = Σ_{t,n} dz_t[n]).
    """
    T, N, D = x.shape
    H = h0.shape[1]
    G = dz.shape[2]
    dz2 = dz.reshape(T * N, G)
    dWx = matmul(x.reshape(T * N, D).T, dz2)
    dWh = matmul(h0.T, dz[0])
    if T > 1:
        dWh += matmul(hs[:T - 1].reshape((T - 1) * N, H).T, dz[1:].reshape((T - 1) * N, G))
    db = _col_sum(dz2)
    if input_grad:
        dx = matmul(dz2, Wx.T).reshape(T, N, D)
    else:
        dx = np.zeros((0, 0, 0), dtype=dz.dtype)
    return dx, dWx, dWh, db


# --- one time step ---------------------------------------------------------------------
@jit(inline="always")
def _rnn_act_row(xw, hw, b, relu, out):
    """out = f(xw + hw + b) for one row.   all (H,)"""
    _wide()
    zero = out.dtype.type(0)
    if relu:
        for j in range(out.shape[0]):
            v = xw[j] + hw[j] + b[j]
            out[j] = v if not v < zero else zero
    else:
        for j in range(out.shape[0]):
            out[j] = ftanh(xw[j] + hw[j] + b[j])


@jit(inline="always")
def _rnn_grad_row(h, g, relu, da):
    """da = g ⊙ f'(a) from h = f(a).   all (H,)"""
    zero = h.dtype.type(0)
    one = h.dtype.type(1)
    if relu:
        for j in range(h.shape[0]):
            da[j] = g[j] if h[j] > zero else zero
    else:
        for j in range(h.shape[0]):
            da[j] = g[j] * (one - h[j] * h[j])


@jit
def _rnn_cell_forward(x, h, Wx, Wh, b, relu):
    _wide()
    N, H = h.shape
    xw = matmul(x, Wx)
    hw = matmul(h, Wh)
    out = np.empty((N, H), dtype=h.dtype)
    for n in range(N):
        _rnn_act_row(xw[n], hw[n], b, relu, out[n])
    return out


@jit
def _rnn_cell_backward(x, h, h_new, Wx, Wh, dh_new, relu):
    N, H = h.shape
    da = np.empty((N, H), dtype=h.dtype)
    for n in range(N):
        _rnn_grad_row(h_new[n], dh_new[n], relu, da[n])
    dx = matmul(da, Wx.T)
    dh = matmul(da, Wh.T)
    dWx = matmul(x.T, da)
    dWh = matmul(h.T, da)
    return dx, dh, dWx, dWh, _col_sum(da)


def rnn_cell_forward(x, h, Wx, Wh, b, relu=False):
    """One RNN step: ``h_new = f(x Wx + h Wh + b)``, f = tanh (or relu).

    x (N, D), h (N, H) the previous state, Wx (D, H), Wh (H, H), b (H,).
    Returns h_new (N, H). For backward keep x, h and h_new.
    """
    return _rnn_cell_forward(*_c(x, h, Wx, Wh, b), bool(relu))


def rnn_cell_backward(x, h, h_new, Wx, Wh, dh_new, relu=False):
    """Backward of one RNN step.

    x (N, D), h (N, H), h_new (N, H) = rnn_cell_forward(x, h, ...), Wx (D, H), Wh (H, H),
    dh_new (N, H) the gradient at h_new. With ``da = dh_new ⊙ f'`` (f' = 1 - h_new² or
    [h_new > 0]) returns (dx = da Wxᵀ (N, D), dh = da Whᵀ (N, H), dWx = xᵀ da (D, H),
    dWh = hᵀ da (H, H), db = Σ_n da (H,)).
    """
    return _rnn_cell_backward(*_c(x, h, h_new, Wx, Wh, dh_new), bool(relu))


# --- a whole sequence ------------------------------------------------------------------
@dual("rnn")
def _rnn_forward(x, h0, Wx, Wh, b, relu):
    _wide()
    T, N, D = x.shape
    H = h0.shape[1]
    xw = matmul(x.reshape(T * N, D), Wx).reshape(T, N, H)   # all input projections at once
    hs = np.empty((T, N, H), dtype=x.dtype)
    hw = np.empty((N, H), dtype=x.dtype)
    Whb = _col_blocks(Wh, N)
    tmp = np.empty((Whb.shape[0], N, Whb.shape[2]), dtype=x.dtype)
    for t in range(T):
        hprev = h0 if t == 0 else hs[t - 1]
        _matmul_into(hprev, Wh, Whb, tmp, hw)
        ht = hs[t]
        xwt = xw[t]
        for n in prange(N):
            _rnn_act_row(xwt[n], hw[n], b, relu, ht[n])
    return hs


@dual("rnn")
def _rnn_backward(x, h0, hs, Wx, Wh, dhs, dhT, relu, input_grad):
    T, N, D = x.shape
    H = h0.shape[1]
    WhT = transposed(Wh)
    WhTb = _col_blocks(WhT, N)
    tmp = np.empty((WhTb.shape[0], N, WhTb.shape[2]), dtype=x.dtype)
    da = np.empty((T, N, H), dtype=x.dtype)
    g = dhT.copy()                       # gradient arriving at h_t
    per_step = dhs.shape[0] == T
    for t in range(T - 1, -1, -1):
        ht = hs[t]
        dat = da[t]
        if per_step:
            dht = dhs[t]
            for n in prange(N):
                for j in range(H):
                    g[n, j] += dht[n, j]
        for n in prange(N):
            _rnn_grad_row(ht[n], g[n], relu, dat[n])
        _matmul_into(dat, WhT, WhTb, tmp, g)     # g_{t-1} = da_t Whᵀ
    dx, dWx, dWh, db = _weight_grads(x, h0, hs, da, input_grad, Wx)
    return dx, g, dWx, dWh, db


# --- the batch split (see fastbp/_pool.py): rows n0:n1 of the recurrence, on one thread ---
@jit(inline="always")
def _proj(x, Wx):
    """x (T, N, D) -> x Wx (T, N, G): the input projections of all steps, one GEMM."""
    T, N, D = x.shape
    return matmul(x.reshape(T * N, D), Wx).reshape(T, N, Wx.shape[1])


@jit(inline="always")
def _chunk_weight_grads(x, h0, hs, dzc, input_grad, Wx, dx, n0, n1):
    """``_weight_grads`` for rows n0:n1: dzc (T, n1-n0, G) is the chunk's dz. Writes
    dx[:, n0:n1] = dzc Wxᵀ when input_grad; returns the chunk's partial (dWx, dWh, db)."""
    T, N, D = x.shape
    H = h0.shape[1]
    M = n1 - n0
    G = dzc.shape[2]
    dz2 = dzc.reshape(T * M, G)
    xc = np.ascontiguousarray(x[:, n0:n1]).reshape(T * M, D)
    dWx = matmul(xc.T, dz2)
    hp = np.empty((T, M, H), dtype=x.dtype)
    hp[0] = h0[n0:n1]
    if T > 1:
        hp[1:] = hs[:T - 1, n0:n1]
    dWh = matmul(hp.reshape(T * M, H).T, dz2)
    db = _col_sum(dz2)
    if input_grad:
        dx[:, n0:n1] = matmul(dz2, Wx.T).reshape(T, M, D)
    return dWx, dWh, db


def _sum_chunks(parts, x, input_grad, dx):
    """The chunks' partial weight gradients summed in chunk order (deterministic)."""
    dWx, dWh, db = (p.copy() for p in parts[0])
    for p in parts[1:]:
        dWx += p[0]
        dWh += p[1]
        db += p[2]
    if not input_grad:
        dx = np.zeros((0, 0, 0), dtype=x.dtype)
    return dx, dWx, dWh, db


@jit
def _rnn_forward_rows(x, h0, Wx, Wh, b, relu, hs, n0, n1):
    """The forward recurrence for rows n0:n1 only, writing hs[:, n0:n1]. x (T, N, D),
    h0 (N, H), Wx (D, H), Wh (H, H), b (H,), hs (T, N, H) the shared output. The chunk's
    input projection is done here too, so no threaded BLAS runs beside the chunks."""
    _wide()
    H = h0.shape[1]
    M = n1 - n0
    xw = _proj(np.ascontiguousarray(x[:, n0:n1]), Wx)
    T = xw.shape[0]
    hw = np.empty((M, H), dtype=xw.dtype)
    Whb = _col_blocks(Wh, M)
    tmp = np.empty((Whb.shape[0], M, Whb.shape[2]), dtype=xw.dtype)
    for t in range(T):
        hprev = h0[n0:n1] if t == 0 else hs[t - 1, n0:n1]
        _matmul_into(hprev, Wh, Whb, tmp, hw)
        for n in range(M):
            _rnn_act_row(xw[t, n], hw[n], b, relu, hs[t, n0 + n])


@jit
def _rnn_backward_rows(x, h0, hs, Wx, WhT, dhs, dhT, relu, input_grad, dx, dh0, n0, n1):
    """BPTT for rows n0:n1 only, writing dh0[n0:n1] and dx[:, n0:n1] (shared outputs) and
    returning the chunk's partial (dWx, dWh, db). hs (T, N, H), WhT (H, H) = Whᵀ,
    dhs (T or 0, N, H), dhT (N, H)."""
    T, N, H = hs.shape
    M = n1 - n0
    da = np.empty((T, M, H), dtype=hs.dtype)
    WhTb = _col_blocks(WhT, M)
    tmp = np.empty((WhTb.shape[0], M, WhTb.shape[2]), dtype=hs.dtype)
    g = dhT[n0:n1].copy()
    per_step = dhs.shape[0] == T
    for t in range(T - 1, -1, -1):
        if per_step:
            _add_into(g, dhs[t, n0:n1])
        for n in range(M):
            _rnn_grad_row(hs[t, n0 + n], g[n], relu, da[t, n])
        _matmul_into(da[t], WhT, WhTb, tmp, g)
    dh0[n0:n1] = g
    return _chunk_weight_grads(x, h0, hs, da, input_grad, Wx, dx, n0, n1)


@jit
def _transposed(a):
    """A new C-contiguous aᵀ (``_cblas.transposed``: OpenBLAS's omatcopy), from Python."""
    return transposed(a)


def _c(*arrays):
    return tuple(np.ascontiguousarray(a) for a in arrays)


def _use_blas(T, N, D, H, G):
    """BLAS threads for the sequence's big GEMMs (x Wx, and dWx, dWh, dx in backward).
    The per-step products are split into blocks OpenBLAS runs on one thread anyway (see
    ``_col_blocks``). Without this the count is whatever the previous layer set: one
    thread after a small Dense, which ran lstm_seq's dWh at half speed. Use it as a
    ``with`` block (``fastbp._blas.use_for``)."""
    return _blas.use_for(T * N * max(D, H) * G)


def _work(N, H):
    # A parallel region is launched per time step, so one step's work is what must outweigh
    # the launch cost: its N·H elements are compared with the family threshold (default
    # 65536, e.g. N = H = 256). Below that the serial build measured faster (par/ser 1.3-2.7
    # for N = 32..128, H = 128 on the loaded 2-vCPU machine).
    return N * H


def rnn_forward(x, h0, Wx, Wh, b, relu=False):
    """RNN over a whole sequence: ``h_t = f(x_t Wx + h_{t-1} Wh + b)``, t = 0..T-1.

    x (T, N, D), h0 (N, H) the initial state (zeros for none), Wx (D, H), Wh (H, H), b (H,).
    Returns hs (T, N, H), every h_t (hs[-1] is the final state). Backward needs x, h0, hs.
    """
    x, h0, Wx, Wh, b = _c(x, h0, Wx, Wh, b)
    T, N, D = x.shape
    H = h0.shape[1]
    chunks = _pool.row_chunks(N, T * N * H * H)
    if chunks is None:
        with _use_blas(T, N, D, 0, Wx.shape[1]):
            return _rnn_forward(x, h0, Wx, Wh, b, bool(relu), work=_work(N, H))
    hs = np.empty((T, N, H), dtype=x.dtype)

    def rows(n0, n1):
        with _blas.use_for(0):       # one BLAS thread each: the chunks run side by side
            _rnn_forward_rows(x, h0, Wx, Wh, b, bool(relu), hs, n0, n1)
    _pool.run(rows, chunks)
    return hs


def rnn_backward(x, h0, hs, Wx, Wh, dhs, dhT, relu=False, input_grad=True):
    """Backprop through time for ``rnn_forward``.

    x (T, N, D), h0 (N, H), hs (T, N, H) from rnn_forward, Wx (D, H), Wh (H, H).
    dhs (T, N, H): the gradient at every h_t, or shape (0, N, H) when only the final state
    is used; dhT (N, H): a gradient at the final state h_{T-1} from outside (zeros for none;
    added to dhs[-1]). Returns (dx (T, N, D), or (0, 0, 0) when not ``input_grad``,
    dh0 (N, H), dWx (D, H), dWh (H, H), db (H,)), as in the module docstring.
    """
    x, h0, hs, Wx, Wh, dhs, dhT = _c(x, h0, hs, Wx, Wh, dhs, dhT)
    T, N, D = x.shape
    H = h0.shape[1]
    chunks = _pool.row_chunks(N, T * N * H * H)
    if chunks is None:
        with _use_blas(T, N, D, H, Wx.shape[1]):
            return _rnn_backward(x, h0, hs, Wx, Wh, dhs, dhT, bool(relu), bool(input_grad),
                                 work=_work(N, H))
    WhT = _transposed(Wh)
    dh0 = np.empty((N, H), dtype=x.dtype)
    dx = np.empty((T, N, D) if input_grad else (0, 0, 0), dtype=x.dtype)

    def rows(n0, n1):
        with _blas.use_for(0):       # one BLAS thread each: the chunks run side by side
            return _rnn_backward_rows(x, h0, hs, Wx, WhT, dhs, dhT, bool(relu),
                                      bool(input_grad), dx, dh0, n0, n1)
    dx, dWx, dWh, db = _sum_chunks(_pool.run(rows, chunks), x, input_grad, dx)
    return dx, dh0, dWx, dWh, db
