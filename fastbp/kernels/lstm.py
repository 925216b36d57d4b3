"""LSTM kernels: one cell step, and a whole sequence with backprop through time.

Formula (time-major, ``x (T, N, D)``, states ``(N, H)``, one fused gate matrix of 4H
columns in the order i, f, g, o)::

    z_t = x_t Wx + h_{t-1} Wh + b                      Wx (D, 4H), Wh (H, 4H), b (4H,)
    i = σ(z_i), f = σ(z_f), g = tanh(z_g), o = σ(z_o)   (the four H-column blocks of z_t)
    c_t = i ⊙ g + f ⊙ c_{t-1}
    h_t = o ⊙ tanh(c_t)

Backward (BPTT), t = T-1 .. 0, with ``gh``/``gc`` the gradients arriving at h_t / c_t::

    dc     = gc + gh ⊙ o ⊙ (1 - tanh²(c_t))
    dz_i   = dc ⊙ g ⊙ i(1 - i)          dz_f = dc ⊙ c_{t-1} ⊙ f(1 - f)
    dz_g   = dc ⊙ i ⊙ (1 - g²)          dz_o = gh ⊙ tanh(c_t) ⊙ o(1 - o)
    gc_{t-1} = dc ⊙ f                   gh_{t-1} = dz_t Whᵀ   (+ the output gradient at t-1)

The ``dz_t`` of every step are kept (T, N, 4H) and the weight gradients are one GEMM
each: ``dWx = Σ_t x_tᵀ dz_t``, ``dWh = Σ_t h_{t-1}ᵀ dz_t``, ``db = Σ dz``, ``dx = dz Wxᵀ``.

The sequence kernels project all inputs with one GEMM (``x Wx``, (T·N, D)·(D, 4H)) before
the recurrence and run the time loop compiled (no Python per step). The per-step
``h_{t-1} Wh`` is one GEMM for all four gates (a plain loop when tiny, see
``fastbp.kernels.rnn.SMALL_MATMUL``); the gate non-linearities, the cell update and tanh(c)
are fused in one pass using the fast ``fsigmoid``/``ftanh``.

Cache / memory: forward returns ``gates (T, N, 4H)`` (the activated i, f, g, o),
``cs (T, N, H)`` and ``hs (T, N, H)``: 6·T·N·H numbers, O(T·N·H). tanh(c_t) is recomputed
in backward rather than stored. Backward allocates ``dz (T, N, 4H)`` more.
"""
import numpy as np
from numba import prange

from .. import _blas, _pool
from .._cblas import matmul, transposed
from .._jit import dual, jit
from ._math import _wide, fsigmoid, ftanh
from .rnn import (_add_into, _c, _chunk_weight_grads, _col_blocks, _col_sum, _matmul_into, _proj,
                  _sum_chunks, _transposed, _use_blas, _weight_grads)


# --- the fused element-wise parts, one row (one batch element) at a time ------------------
@jit(inline="always")
def _lstm_act_row(xw, hw, b, cprev, gates, c, h):
    """Gates, new cell and hidden state for one row.

    xw, hw, b, gates: (4H,); cprev, c, h: (H,). gates receives σ(z_i), σ(z_f), tanh(z_g),
    σ(z_o) for z = xw + hw + b; c = i·g + f·cprev; h = o·tanh(c).
    The gate blocks are sliced views indexed from 0: an index like ``3*H + j`` is not
    known to be >= 0, so Numba's negative-index wraparound stayed in the loop and kept
    LLVM from vectorising it (those loops ran 4-7x slower per element).
    """
    _wide()
    H = c.shape[0]
    gi, gf, gg, go = gates[:H], gates[H:2 * H], gates[2 * H:3 * H], gates[3 * H:]
    for j in range(2 * H):                           # i and f
        gates[j] = fsigmoid(xw[j] + hw[j] + b[j])
    xg, hg, bg = xw[2 * H:3 * H], hw[2 * H:3 * H], b[2 * H:3 * H]
    for j in range(H):                               # g, and the new cell
        g = ftanh(xg[j] + hg[j] + bg[j])
        gg[j] = g
        c[j] = gi[j] * g + gf[j] * cprev[j]
    xo, ho, bo = xw[3 * H:], hw[3 * H:], b[3 * H:]
    for j in range(H):                               # o, and the new hidden state
        o = fsigmoid(xo[j] + ho[j] + bo[j])
        go[j] = o
        h[j] = o * ftanh(c[j])


@jit(inline="always")
def _lstm_grad_row(gates, cprev, c, gh, gc, dz):
    """Pre-activation gradients for one row; gc is updated in place to the gradient at cprev.

    gates, dz: (4H,); cprev, c, gh, gc: (H,). See the module docstring for the formulas.
    (Sliced gate blocks, as in ``_lstm_act_row``.)
    """
    _wide()
    H = c.shape[0]
    one = c.dtype.type(1)
    gi, gf, gg, go = gates[:H], gates[H:2 * H], gates[2 * H:3 * H], gates[3 * H:]
    di, df, dg, do = dz[:H], dz[H:2 * H], dz[2 * H:3 * H], dz[3 * H:]
    for j in range(H):                   # dz_o, and gc becomes dc
        tc = ftanh(c[j])
        o = go[j]
        dh = gh[j]
        do[j] = dh * tc * o * (one - o)
        gc[j] += dh * o * (one - tc * tc)
    for j in range(H):
        i = gi[j]
        g = gg[j]
        di[j] = gc[j] * g * i * (one - i)
        dg[j] = gc[j] * i * (one - g * g)
    for j in range(H):
        f = gf[j]
        df[j] = gc[j] * cprev[j] * f * (one - f)
        gc[j] *= f


# --- one time step ---------------------------------------------------------------------
@jit
def _lstm_cell_forward(x, h, c, Wx, Wh, b):
    _wide()
    N, H = h.shape
    xw = matmul(x, Wx)
    hw = matmul(h, Wh)
    gates = np.empty((N, 4 * H), dtype=h.dtype)
    c_new = np.empty((N, H), dtype=h.dtype)
    h_new = np.empty((N, H), dtype=h.dtype)
    for n in range(N):
        _lstm_act_row(xw[n], hw[n], b, c[n], gates[n], c_new[n], h_new[n])
    return h_new, c_new, gates


@jit
def _lstm_cell_backward(x, h, c, c_new, gates, Wx, Wh, dh_new, dc_new):
    _wide()
    N, H = h.shape
    dz = np.empty((N, 4 * H), dtype=h.dtype)
    dc = dc_new.copy()
    for n in range(N):
        _lstm_grad_row(gates[n], c[n], c_new[n], dh_new[n], dc[n], dz[n])
    dx = matmul(dz, Wx.T)
    dh = matmul(dz, Wh.T)
    dWx = matmul(x.T, dz)
    dWh = matmul(h.T, dz)
    return dx, dh, dc, dWx, dWh, _col_sum(dz)


def lstm_cell_forward(x, h, c, Wx, Wh, b):
    """One LSTM step (gates i, f, g, o): ``z = x Wx + h Wh + b``, ``c_new = σ(z_i)⊙tanh(z_g)
    + σ(z_f)⊙c``, ``h_new = σ(z_o)⊙tanh(c_new)``.

    x (N, D), h (N, H), c (N, H) the previous states, Wx (D, 4H), Wh (H, 4H), b (4H,).
    Returns (h_new (N, H), c_new (N, H), gates (N, 4H) = the activated i, f, g, o).
    For backward keep x, h, c, c_new and gates.
    """
    return _lstm_cell_forward(*_c(x, h, c, Wx, Wh, b))


def lstm_cell_backward(x, h, c, c_new, gates, Wx, Wh, dh_new, dc_new):
    """Backward of one LSTM step.

    x (N, D), h (N, H), c (N, H): the step's inputs; c_new (N, H), gates (N, 4H): from
    lstm_cell_forward; Wx (D, 4H), Wh (H, 4H); dh_new, dc_new (N, H): gradients at the new
    states (zeros when c_new is not used further). With dz (N, 4H) as in the module
    docstring, returns (dx = dz Wxᵀ (N, D), dh = dz Whᵀ (N, H), dc = dc_total ⊙ f (N, H),
    dWx = xᵀ dz (D, 4H), dWh = hᵀ dz (H, 4H), db = Σ_n dz (4H,)).
    """
    return _lstm_cell_backward(*_c(x, h, c, c_new, gates, Wx, Wh, dh_new, dc_new))


# --- a whole sequence ------------------------------------------------------------------
@dual("lstm")
def _lstm_forward(x, h0, c0, Wx, Wh, b):
    _wide()
    T, N, D = x.shape
    H = h0.shape[1]
    G = 4 * H
    xw = matmul(x.reshape(T * N, D), Wx).reshape(T, N, G)   # all input projections at once
    gates = np.empty((T, N, G), dtype=x.dtype)
    cs = np.empty((T, N, H), dtype=x.dtype)
    hs = np.empty((T, N, H), dtype=x.dtype)
    hw = np.empty((N, G), dtype=x.dtype)
    Whb = _col_blocks(Wh, N)
    tmp = np.empty((Whb.shape[0], N, Whb.shape[2]), dtype=x.dtype)
    for t in range(T):
        hprev = h0 if t == 0 else hs[t - 1]
        cprev = c0 if t == 0 else cs[t - 1]
        _matmul_into(hprev, Wh, Whb, tmp, hw)
        xwt, gt, ct, ht = xw[t], gates[t], cs[t], hs[t]
        for n in prange(N):
            _lstm_act_row(xwt[n], hw[n], b, cprev[n], gt[n], ct[n], ht[n])
    return gates, cs, hs


@dual("lstm")
def _lstm_backward(x, h0, c0, gates, cs, hs, Wx, Wh, dhs, dhT, dcT, input_grad):
    _wide()
    T, N, D = x.shape
    H = h0.shape[1]
    G = 4 * H
    WhT = transposed(Wh)
    WhTb = _col_blocks(WhT, N)
    tmp = np.empty((WhTb.shape[0], N, WhTb.shape[2]), dtype=x.dtype)
    dz = np.empty((T, N, G), dtype=x.dtype)
    gh = dhT.copy()                      # gradient arriving at h_t
    gc = dcT.copy()                      # gradient arriving at c_t
    per_step = dhs.shape[0] == T
    for t in range(T - 1, -1, -1):
        cprev = c0 if t == 0 else cs[t - 1]
        gt, ct, dzt = gates[t], cs[t], dz[t]
        if per_step:
            dht = dhs[t]
            for n in prange(N):
                for j in range(H):
                    gh[n, j] += dht[n, j]
        for n in prange(N):
            _lstm_grad_row(gt[n], cprev[n], ct[n], gh[n], gc[n], dzt[n])
        _matmul_into(dzt, WhT, WhTb, tmp, gh)    # gh_{t-1} = dz_t Whᵀ
    dx, dWx, dWh, db = _weight_grads(x, h0, hs, dz, input_grad, Wx)
    return dx, gh, gc, dWx, dWh, db


# --- the batch split (see fastbp/_pool.py): rows n0:n1 of the recurrence, on one thread ---
@jit
def _lstm_forward_rows(x, h0, c0, Wx, Wh, b, gates, cs, hs, n0, n1):
    """The forward recurrence for rows n0:n1 only, writing gates/cs/hs[:, n0:n1].
    x (T, N, D), h0, c0 (N, H), Wx (D, 4H), Wh (H, 4H), b (4H,); outputs shared. The
    chunk's input projection is done here too, so no threaded BLAS runs beside the chunks."""
    _wide()
    H = h0.shape[1]
    M = n1 - n0
    xw = _proj(np.ascontiguousarray(x[:, n0:n1]), Wx)
    T = xw.shape[0]
    hw = np.empty((M, 4 * H), dtype=xw.dtype)
    Whb = _col_blocks(Wh, M)
    tmp = np.empty((Whb.shape[0], M, Whb.shape[2]), dtype=xw.dtype)
    for t in range(T):
        hprev = h0[n0:n1] if t == 0 else hs[t - 1, n0:n1]
        cprev = c0 if t == 0 else cs[t - 1]
        _matmul_into(hprev, Wh, Whb, tmp, hw)
        for n in range(M):
            r = n0 + n
            _lstm_act_row(xw[t, n], hw[n], b, cprev[r], gates[t, r], cs[t, r], hs[t, r])


@jit
def _lstm_backward_rows(x, h0, c0, gates, cs, hs, Wx, WhT, dhs, dhT, dcT, input_grad, dx,
                        dh0, dc0, n0, n1):
    """BPTT for rows n0:n1 only, writing dh0, dc0[n0:n1] and dx[:, n0:n1] (shared outputs)
    and returning the chunk's partial (dWx, dWh, db). gates (T, N, 4H), cs, hs (T, N, H),
    WhT (4H, H) = Whᵀ, dhs (T or 0, N, H), dhT, dcT (N, H)."""
    _wide()
    T, N, H = cs.shape
    M = n1 - n0
    dz = np.empty((T, M, 4 * H), dtype=cs.dtype)
    WhTb = _col_blocks(WhT, M)
    tmp = np.empty((WhTb.shape[0], M, WhTb.shape[2]), dtype=cs.dtype)
    gh = dhT[n0:n1].copy()
    gc = dcT[n0:n1].copy()
    per_step = dhs.shape[0] == T
    for t in range(T - 1, -1, -1):
        cprev = c0 if t == 0 else cs[t - 1]
        if per_step:
            _add_into(gh, dhs[t, n0:n1])
        for n in range(M):
            r = n0 + n
            _lstm_grad_row(gates[t, r], cprev[r], cs[t, r], gh[n], gc[n], dz[t, n])
        _matmul_into(dz[t], WhT, WhTb, tmp, gh)
    dh0[n0:n1] = gh
    dc0[n0:n1] = gc
    return _chunk_weight_grads(x, h0, hs, dz, input_grad, Wx, dx, n0, n1)


def _work(N, H):
    # A parallel region is launched per time step, so one step's work is what must outweigh
    # the launch cost: its N·H elements are compared with the family threshold (default
    # 65536, e.g. N = H = 256). Below that the serial build measured faster (par/ser 1.3-2.7
    # for N = 32..128, H = 128 on the loaded 2-vCPU machine).
    return N * H


def lstm_forward(x, h0, c0, Wx, Wh, b):
    """LSTM over a whole sequence (see the module docstring for the formulas).

    x (T, N, D), h0, c0 (N, H) the initial states (zeros for none), Wx (D, 4H), Wh (H, 4H),
    b (4H,). Returns (gates (T, N, 4H), cs (T, N, H), hs (T, N, H)): the activated gates and
    every c_t and h_t (hs[-1], cs[-1] are the final states). This is the cache backward needs
    besides x, h0, c0 and the weights.
    """
    x, h0, c0, Wx, Wh, b = _c(x, h0, c0, Wx, Wh, b)
    T, N, D = x.shape
    H = h0.shape[1]
    chunks = _pool.row_chunks(N, T * N * H * 4 * H)
    if chunks is None:
        with _use_blas(T, N, D, 0, 4 * H):
            return _lstm_forward(x, h0, c0, Wx, Wh, b, work=_work(N, H))
    gates = np.empty((T, N, 4 * H), dtype=x.dtype)
    cs = np.empty((T, N, H), dtype=x.dtype)
    hs = np.empty((T, N, H), dtype=x.dtype)

    def rows(n0, n1):
        with _blas.use_for(0):       # one BLAS thread each: the chunks run side by side
            _lstm_forward_rows(x, h0, c0, Wx, Wh, b, gates, cs, hs, n0, n1)
    _pool.run(rows, chunks)
    return gates, cs, hs


def lstm_backward(x, h0, c0, gates, cs, hs, Wx, Wh, dhs, dhT, dcT, input_grad=True):
    """Backprop through time for ``lstm_forward``.

    x (T, N, D), h0, c0 (N, H), gates (T, N, 4H), cs, hs (T, N, H) from lstm_forward,
    Wx (D, 4H), Wh (H, 4H). dhs (T, N, H): gradient at every h_t, or shape (0, N, H) when only
    the final state is used; dhT, dcT (N, H): gradients at the final states from outside the
    sequence (zeros for none; dhT is added to dhs[-1]). Returns (dx (T, N, D) or (0, 0, 0)
    when not ``input_grad``, dh0 (N, H), dc0 (N, H), dWx (D, 4H), dWh (H, 4H), db (4H,)).
    """
    args = _c(x, h0, c0, gates, cs, hs, Wx, Wh, dhs, dhT, dcT)
    x, h0, c0, gates, cs, hs, Wx, Wh, dhs, dhT, dcT = args
    T, N, D = x.shape
    H = h0.shape[1]
    chunks = _pool.row_chunks(N, T * N * H * 4 * H)
    if chunks is None:
        with _use_blas(T, N, D, H, 4 * H):
            return _lstm_backward(*args, bool(input_grad), work=_work(N, H))
    WhT = _transposed(Wh)
    dh0 = np.empty((N, H), dtype=x.dtype)
    dc0 = np.empty((N, H), dtype=x.dtype)
    dx = np.empty((T, N, D) if input_grad else (0, 0, 0), dtype=x.dtype)

    def rows(n0, n1):
        with _blas.use_for(0):       # one BLAS thread each: the chunks run side by side
            return _lstm_backward_rows(x, h0, c0, gates, cs, hs, Wx, WhT, dhs, dhT, dcT,
                                       bool(input_grad), dx, dh0, dc0, n0, n1)
    dx, dWx, dWh, db = _sum_chunks(_pool.run(rows, chunks), x, input_grad, dx)
    return dx, dh0, dc0, dWx, dWh, db
