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

import numpy as np

from . import _blas
from .kernels import dense as D
from .layers import Dense, ReLU

FUSED = "fused into the previous layer"
_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
_EMPTY = {dt: np.zeros(0, dt) for dt in _FLOATS}


class Plan:
    """What a Dense [ReLU] chain needs per call, computed once per ``Sequential``.

    pos[k]: index in ``layers`` of the k-th Dense; dense, relus, has_bias: per Dense;
    wshapes[k] = (in, out), bshapes[k] = (out,); max_io: the largest in·out (GEMM size
    for the BLAS thread choice = rows · max_io)."""
    __slots__ = ("pos", "dense", "relus", "has_bias", "wshapes", "bshapes", "max_io", "rows")

    def __init__(self, pos, dense, relus):
        self.pos, self.dense, self.relus = tuple(pos), tuple(dense), tuple(relus)
        self.has_bias = tuple(layer.bias for layer in dense)
        self.wshapes = tuple((layer.in_features, layer.out_features) for layer in dense)
        self.bshapes = tuple((layer.out_features,) for layer in dense)
        self.max_io = max(a * b for a, b in self.wshapes)
        self.rows = tuple(zip(self.pos, self.wshapes, self.has_bias, self.bshapes))


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
    _blas.use_for(M * plan_.max_io)
    D.mlp_forward(x2, Ws, bs, relus, ys)
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
    dWs = tuple([np.empty(shape, dt) for shape in plan_.wshapes])
    empty = _EMPTY[dt]
    dbs = tuple([np.empty(shape, dt) if has_b else empty
                 for has_b, shape in zip(plan_.has_bias, plan_.bshapes)])
    _blas.use_for(x2.shape[0] * plan_.max_io)
    dx2 = D.mlp_backward(x2, Ws, tuple(ys), dy2, relus, plan_.has_bias, bool(input_grad),
                         dWs, dbs)
    grads = [{} for _ in range(n_layers)]
    for k, i in enumerate(pos):
        grads[i] = {"W": dWs[k], "b": dbs[k]} if plan_.has_bias[k] else {"W": dWs[k]}
    dx = dx2.reshape(first[3]) if input_grad else None
    return dx, grads
