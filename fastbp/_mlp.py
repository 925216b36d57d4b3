"""The fast path of ``Sequential`` for chains of Dense layers (each optionally + ReLU).

A model such as ``Sequential(Dense(64, 128), ReLU(), Dense(128, 10))`` is run by one
compiled call per pass (``kernels.dense.mlp_forward``/``mlp_backward``) instead of one
Python layer call and one kernel call per layer. The caches have exactly the format the
layer-by-layer path makes, so the two paths mix freely. Any irregular input (a list
instead of an array, a wrong shape or dtype, a missing key, an empty batch) makes these
functions return ``None``: the caller then runs the general path, which raises the
layer's own error message.
"""
from __future__ import annotations

import os

import numpy as np

from . import _blas, _pack, _pool, config
from .kernels import dense as D
from .layers import Dense, ReLU

FUSED = "fused into the previous layer"
# Large chains with MKL (fastbp[mkl]): each GEMM of at least SPLIT_MACS multiply-adds runs
# in column blocks, one per fastbp thread, each block on a one-thread MKL GEMM; smaller
# GEMMs and the element-wise passes stay as in the compiled chain. FASTBP_MKL_SPLIT_MACS
# overrides the threshold (a huge value never splits). Time of two MKL blocks over
# OpenBLAS's own two threads (NN, TN, NT, one run, Xeon): 128×784×256 1.50, 0.83, 1.24;
# 256×512×1024 1.34, 1.27, 1.37; 256×1024×1024 0.71, 0.61, 0.98; 256×1024×2048 0.57, 0.87,
# 0.39; 256×2048×2048 0.75, 0.75, 0.62. The mlp_large step: 69-73 ms → 57-59 (two pairs).
SPLIT_MACS = int(os.environ.get("FASTBP_MKL_SPLIT_MACS", 1 << 28))
_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
_EMPTY = {dt: np.zeros(0, dt) for dt in _FLOATS}


class Plan:
    """What a Dense [ReLU] chain needs per call, computed once per ``Sequential``.

    pos[k]: index in ``layers`` of the k-th Dense; dense, relus, has_bias: per Dense;
    wshapes[k] = (in, out), bshapes[k] = (out,); max_io: the largest in·out (GEMM size
    for the BLAS thread choice = rows · max_io); grad_layout: the gradients' pack layout
    (``fastbp._pack``: W, then b when there is one, layer by layer, the order of the
    params' dicts), so an optimizer update can run over them in one piece."""
    __slots__ = ("pos", "dense", "relus", "has_bias", "wshapes", "bshapes", "max_io", "rows",
                 "grad_layout")

    def __init__(self, pos, dense, relus):
        self.pos, self.dense, self.relus = tuple(pos), tuple(dense), tuple(relus)
        self.has_bias = tuple(layer.bias for layer in dense)
        self.wshapes = tuple((layer.in_features, layer.out_features) for layer in dense)
        self.bshapes = tuple((layer.out_features,) for layer in dense)
        self.max_io = max(a * b for a, b in self.wshapes)
        self.rows = tuple(zip(self.pos, self.wshapes, self.has_bias, self.bshapes))
        shapes = []
        for w, has_b, b in zip(self.wshapes, self.has_bias, self.bshapes):
            shapes += [w, b] if has_b else [w]
        self.grad_layout = _pack.layout(shapes)


def plan(layers):
    """A ``Plan`` when ``layers`` is Dense [ReLU] Dense [ReLU]..., else None."""
    pos, dense, relus = [], [], []
    i, n = 0, len(layers)
    while i < n:
        if type(layers[i]) is not Dense:
            return None
        relu = i + 1 < n and type(layers[i + 1]) is ReLU
        pos.append(i)
        dense.append(layers[i])
        relus.append(relu)
        i += 2 if relu else 1
    if not dense:
        return None
    return Plan(pos, dense, relus)


def _usable(a, dt, shape):
    """``a`` as a C-contiguous writeable ndarray of dtype ``dt`` and ``shape``, or None."""
    if type(a) is not np.ndarray or (a.dtype is not dt and a.dtype != dt) or a.shape != shape:
        return None
    f = a.flags
    if not f.c_contiguous:
        a = np.ascontiguousarray(a)
    elif not f.writeable:              # read-only arrays are another numba type
        return None
    return a


def _weights(plan_, params, dt):
    Ws, bs = [], []
    empty = _EMPTY[dt]
    for i, wshape, has_b, bshape in plan_.rows:
        p = params[i]
        if type(p) is not dict:
            return None
        W = _usable(p.get("W"), dt, wshape)
        if W is None:
            return None
        if has_b:
            b = _usable(p.get("b"), dt, bshape)
            if b is None:
                return None
        else:
            b = empty
        Ws.append(W)
        bs.append(b)
    return tuple(Ws), tuple(bs)


def forward(plan_, n_layers, params, x):
    """``(y, caches)`` like the layer-by-layer path, or None (take the general path)."""
    if type(x) is not np.ndarray:
        return None
    pos, dense, relus = plan_.pos, plan_.dense, plan_.relus
    dt = x.dtype
    if dt not in _FLOATS or x.ndim < 1 or x.shape[-1] != dense[0].in_features or x.size == 0:
        return None
    w = _weights(plan_, params, dt)
    if w is None:
        return None
    Ws, bs = w
    lead = x.shape[:-1]
    x2 = np.ascontiguousarray(x).reshape(-1, dense[0].in_features)
    if not x2.flags.writeable:
        return None
    M = x2.shape[0]
    ys = tuple([np.empty((M, b[0]), dt) for b in plan_.bshapes])
    k = _split_threads(M * plan_.max_io)
    if k:
        h = x2
        for W, b, relu, y in zip(Ws, bs, relus, ys):
            gemm(False, False, h, W, y, k)
            D.bias_relu(y, b, relu)
            h = y
    else:
        D.mlp_forward(x2, Ws, bs, relus, ys, _blas.mkl_threads_for(M * plan_.max_io))
    caches = [FUSED] * n_layers
    h = x2
    for k, i in enumerate(pos):
        caches[i] = (h, ys[k], relus[k], lead + (dense[k].in_features,))
        h = ys[k]
    return ys[-1].reshape(lead + (dense[-1].out_features,)), caches


def backward(plan_, n_layers, params, cache, dy, input_grad):
    """``(dx, grads)`` like the layer-by-layer path, or None (take the general path)."""
    pos, dense, relus = plan_.pos, plan_.dense, plan_.relus
    if type(dy) is not np.ndarray or type(cache) is not list or len(cache) != n_layers:
        return None
    first = cache[pos[0]]
    if type(first) is not tuple or len(first) != 4:
        return None
    x2 = first[0]
    dt = x2.dtype
    if dy.dtype != dt:
        return None
    ys = []
    for k, i in enumerate(pos):
        c = cache[i]
        if type(c) is not tuple or len(c) != 4 or c[2] != relus[k] or \
                type(c[1]) is not np.ndarray or c[1].dtype != dt or \
                c[1].shape != (x2.shape[0], dense[k].out_features):
            return None
        ys.append(c[1])
        if k + 1 < len(pos) and cache[i + 1] is not FUSED and relus[k]:
            return None
    lead = first[3][:-1]
    if dy.shape != lead + (dense[-1].out_features,):
        return None
    w = _weights(plan_, params, dt)
    if w is None:
        return None
    Ws, _ = w
    dy2 = np.ascontiguousarray(dy).reshape(-1, dense[-1].out_features)
    if not (dy2.flags.writeable and x2.flags.writeable and x2.flags.c_contiguous):
        return None
    views = iter(_pack.new(plan_.grad_layout, dt)[1])
    empty = _EMPTY[dt]
    dWs, dbs = [], []
    for has_b in plan_.has_bias:
        dWs.append(next(views))
        dbs.append(next(views) if has_b else empty)
    dWs, dbs = tuple(dWs), tuple(dbs)
    k = _split_threads(x2.shape[0] * plan_.max_io)
    if k:
        dx2 = _backward_split(x2, Ws, ys, dy2, relus, plan_.has_bias, bool(input_grad),
                              dWs, dbs, k)
    else:
        dx2 = D.mlp_backward(x2, Ws, tuple(ys), dy2, relus, plan_.has_bias, bool(input_grad),
                             dWs, dbs, _blas.mkl_threads_for(x2.shape[0] * plan_.max_io))
    grads = [{} for _ in range(n_layers)]
    for k, i in enumerate(pos):
        grads[i] = {"W": dWs[k], "b": dbs[k]} if plan_.has_bias[k] else {"W": dWs[k]}
    dx = dx2.reshape(first[3]) if input_grad else None
    return dx, grads


# ---------------------------------------------------------------- large chains on MKL
def _split_threads(macs):
    """The thread count for the split path (0: run the compiled chain)."""
    if not _blas.dense_mkl or macs < SPLIT_MACS:
        return 0
    k = config.get_num_threads()
    return k if k >= 2 else 0


def gemm(ta, tb, a, b, out, k):
    """out = op(a) · op(b) (op(m) = mᵀ when its flag is set; a, b, out C-contiguous):
    from SPLIT_MACS multiply-adds in k column blocks of out, side by side on the calling
    thread and pool threads, each a one-thread MKL GEMM; below, one OpenBLAS call."""
    M, N = out.shape
    K = a.shape[0] if ta else a.shape[1]
    macs = M * N * K
    if k >= 2 and macs >= SPLIT_MACS and N >= 32 * k:
        step = -(-N // k)
        step = -(-step // 16) * 16          # blocks start on 64-byte boundaries
        blocks = [(c, min(N, c + step)) for c in range(0, N, step)]

        def job(i):
            with _blas.mkl_one_thread():
                D.gemm_block(ta, tb, a, b, out, blocks[i][0], blocks[i][1], True)
        _pool.run_items(job, len(blocks), k)
    else:
        with _blas.use_for(macs):
            D.gemm_block(ta, tb, a, b, out, 0, N, False)


def _backward_split(x2, Ws, ys, dy2, relus, has_bias, input_grad, dWs, dbs, k):
    """``D.mlp_backward`` with its GEMMs run by ``gemm``."""
    d = dy2
    dx = np.zeros((0, 0), dtype=dy2.dtype)
    for i in range(len(Ws) - 1, -1, -1):
        dz = D.mask_colsum(d, ys[i], relus[i], has_bias[i], dbs[i])
        gemm(True, False, x2 if i == 0 else ys[i - 1], dz, dWs[i], k)
        if i > 0 or input_grad:
            d = np.empty((dz.shape[0], Ws[i].shape[0]), dtype=dz.dtype)
            gemm(False, True, dz, Ws[i], d, k)
            if i == 0:
                dx = d
    return dx
