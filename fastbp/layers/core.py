"""Layers: immutable hyper-parameter holders implementing the layer protocol.

The protocol (see DESIGN.md)::

    layer.init(rng, dtype) -> params                      # dict[str, ndarray]; {} if none
    layer.forward(params, x, *, train, rng) -> (y, cache)
    layer.backward(params, cache, dy, *, input_grad=True) -> (dx, grads)

``grads`` has the same keys and shapes as ``params``. With ``input_grad=False`` the
input gradient is not computed and ``dx`` is ``None``. Layers hold no state: everything
a backward pass needs travels in ``cache``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .. import _blas, initializers
from .._validate import (as_float_array, check_dtype, check_param, check_same_shape, flat)
from ..kernels import activations as A
from ..kernels import dense as D
from ..kernels import dropout as DR

__all__ = ["Layer", "Dense", "Maxout", "Identity", "Sigmoid", "Tanh", "ReLU", "LeakyReLU",
           "ELU", "GELU", "Softmax", "NoisyReLU", "Dropout", "Flatten"]


class Layer:
    """Base class: a layer without parameters. Subclasses override what they need."""

    def init(self, rng, dtype=np.float32):
        """No parameters: returns ``{}``."""
        return {}

    def _check_dy(self, dy, y_shape, dtype):
        dy = as_float_array(self, dy, "output gradient")
        check_same_shape(self, dy, y_shape)
        check_dtype(self, dy, dtype, name="output gradient", other="input")
        return dy

    def __str__(self):
        return repr(self)


def _dtype(dtype):
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise TypeError(f"dtype must be float32 or float64, got {dtype}")
    return dtype


def _positive_int(where, name, v):
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"{where}: {name} must be a positive int, got {v!r}")
    return int(v)


# ---------------------------------------------------------------------------- Dense
@dataclass(frozen=True, init=False)
class Dense(Layer):
    """Fully connected layer: ``y = x W + b``.

    x (..., D) → y (..., M); W (D, M); b (M,). Any leading dimensions are allowed, so a
    Dense layer applies at every time step of a ``(T, N, D)`` sequence.
    Backward: ``dx = dy Wᵀ``, ``dW = xᵀ dy``, ``db = Σ dy`` (summed over all leading dims).
    ``init`` is an initializer name or callable (see ``fastbp.initializers``); the bias
    starts at zero.
    """
    in_features: int
    out_features: int
    bias: bool = True
    weight_init: object = "glorot_uniform"

    def __init__(self, in_features, out_features, bias=True, init="glorot_uniform"):
        where = f"Dense({in_features}, {out_features})"
        object.__setattr__(self, "in_features", _positive_int(where, "in_features", in_features))
        object.__setattr__(self, "out_features", _positive_int(where, "out_features", out_features))
        object.__setattr__(self, "bias", bool(bias))
        initializers.get(init)  # fail early on an unknown name
        object.__setattr__(self, "weight_init", init)

    def __str__(self):
        return f"Dense({self.in_features}, {self.out_features})"

    def init(self, rng, dtype=np.float32):
        dtype = _dtype(dtype)
        Din, M = self.in_features, self.out_features
        params = {"W": initializers.get(self.weight_init)(rng, (Din, M), dtype, Din, M)}
        if self.bias:
            params["b"] = np.zeros(M, dtype=dtype)
        return params

    def _params(self, params):
        W = check_param(self, params, "W", (self.in_features, self.out_features))
        W = np.ascontiguousarray(W)
        if self.bias:
            b = check_param(self, params, "b", (self.out_features,))
            check_dtype(self, b, W.dtype, name="parameter 'b'", other="parameter 'W'")
        else:
            b = np.zeros(0, dtype=W.dtype)
        return W, b

    def _check_x(self, x, dtype):
        x = as_float_array(self, x)
        if x.ndim < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"{self}: expected input (..., {self.in_features}), got {x.shape}")
        check_dtype(self, x, dtype)
        return x

    def forward(self, params, x, *, train=False, rng=None, relu=False):
        W, b = self._params(params)
        x = self._check_x(x, W.dtype)
        x2 = np.ascontiguousarray(x).reshape(-1, self.in_features)
        with _blas.use_for(x2.shape[0] * W.size):
            y2 = D.dense_forward(x2, W, b, relu)
        y = y2.reshape(x.shape[:-1] + (self.out_features,))
        return y, (x2, y2, relu, x.shape)

    def backward(self, params, cache, dy, *, input_grad=True):
        W, b = self._params(params)
        x2, y2, relu, xshape = cache
        dy = self._check_dy(dy, xshape[:-1] + (self.out_features,), W.dtype)
        dy2 = np.ascontiguousarray(dy).reshape(-1, self.out_features)
        with _blas.use_for(x2.shape[0] * W.size):
            dx2, dW, db = D.dense_backward(x2, W, dy2, y2, relu, self.bias, input_grad)
        grads = {"W": dW, "b": db} if self.bias else {"W": dW}
        dx = dx2.reshape(xshape) if input_grad else None
        return dx, grads


# ---------------------------------------------------------------------------- Maxout
@dataclass(frozen=True, init=False)
class Maxout(Layer):
    """Maxout (Goodfellow et al. 2013): ``pieces`` linear units per output, max taken.

    x (..., D) → y (..., M), ``y[..., o] = max_p (x W + b)[..., o·P + p]``;
    W (D, M·P), b (M·P,) with the P pieces of output o contiguous. The gradient flows to
    the arg-max piece only (the first one on ties).
    """
    in_features: int
    out_features: int
    pieces: int = 2
    weight_init: object = "glorot_uniform"

    def __init__(self, in_features, out_features, pieces=2, init="glorot_uniform"):
        where = f"Maxout({in_features}, {out_features}, pieces={pieces})"
        object.__setattr__(self, "in_features", _positive_int(where, "in_features", in_features))
        object.__setattr__(self, "out_features", _positive_int(where, "out_features", out_features))
        object.__setattr__(self, "pieces", _positive_int(where, "pieces", pieces))
        initializers.get(init)
        object.__setattr__(self, "weight_init", init)

    def __str__(self):
        return f"Maxout({self.in_features}, {self.out_features}, pieces={self.pieces})"

    def _dense(self):
        return Dense(self.in_features, self.out_features * self.pieces, True, self.weight_init)

    def init(self, rng, dtype=np.float32):
        dtype = _dtype(dtype)
        Din, MP = self.in_features, self.out_features * self.pieces
        W = initializers.get(self.weight_init)(rng, (Din, MP), dtype, Din, self.out_features)
        return {"W": W, "b": np.zeros(MP, dtype=dtype)}

    def forward(self, params, x, *, train=False, rng=None):
        dense = self._dense()
        try:
            z, dcache = dense.forward(params, x)
        except (ValueError, TypeError) as e:
            raise type(e)(str(e).replace(str(dense), str(self))) from None
        z2 = dcache[1]
        y2, idx = D.maxout_reduce(z2, self.pieces)
        y = y2.reshape(z.shape[:-1] + (self.out_features,))
        return y, (dcache, idx)

    def backward(self, params, cache, dy, *, input_grad=True):
        dcache, idx = cache
        x2, z2, _, xshape = dcache
        dense = self._dense()
        try:
            W, _ = dense._params(params)
        except (ValueError, TypeError) as e:
            raise type(e)(str(e).replace(str(dense), str(self))) from None
        dy = self._check_dy(dy, xshape[:-1] + (self.out_features,), W.dtype)
        dz = D.maxout_scatter(np.ascontiguousarray(dy).reshape(idx.shape), idx, self.pieces)
        return self._dense().backward(params, dcache, dz.reshape(xshape[:-1] + (dz.shape[1],)),
                                      input_grad=input_grad)


# ---------------------------------------------------------------------------- activations
class _Elementwise(Layer):
    """Shared forward/backward for element-wise activations (subclasses set the kernels)."""

    def _fwd(self, xf, out):
        raise NotImplementedError

    def _bwd(self, xf, yf, dyf, dx):
        raise NotImplementedError

    def forward(self, params, x, *, train=False, rng=None):
        x = as_float_array(self, x)
        xf = flat(x)
        out = np.empty_like(xf)
        self._fwd(xf, out)
        return out.reshape(x.shape), (xf, out, x.shape)

    def backward(self, params, cache, dy, *, input_grad=True):
        xf, yf, shape = cache
        if not input_grad:
            return None, {}
        dy = self._check_dy(dy, shape, xf.dtype)
        dx = np.empty_like(xf)
        self._bwd(xf, yf, flat(dy), dx)
        return dx.reshape(shape), {}


@dataclass(frozen=True)
class Identity(_Elementwise):
    """y = x; dx = dy."""

    def forward(self, params, x, *, train=False, rng=None):
        x = as_float_array(self, x)
        return x, (x.shape, x.dtype)

    def backward(self, params, cache, dy, *, input_grad=True):
        shape, dtype = cache
        if not input_grad:
            return None, {}
        return self._check_dy(dy, shape, dtype), {}


@dataclass(frozen=True)
class Sigmoid(_Elementwise):
    """y = σ(x) = 1 / (1 + e^−x); dx = dy·y·(1 − y)."""

    def _fwd(self, xf, out):
        A.sigmoid_forward(xf, out, work=xf.size * 8)

    def _bwd(self, xf, yf, dyf, dx):
        A.sigmoid_backward(yf, dyf, dx, work=xf.size)


@dataclass(frozen=True)
class Tanh(_Elementwise):
    """y = tanh(x); dx = dy·(1 − y²)."""

    def _fwd(self, xf, out):
        A.tanh_forward(xf, out, work=xf.size * 8)

    def _bwd(self, xf, yf, dyf, dx):
        A.tanh_backward(yf, dyf, dx, work=xf.size)


@dataclass(frozen=True)
class ReLU(_Elementwise):
    """y = max(x, 0); dx = dy·[x > 0]."""

    def _fwd(self, xf, out):
        A.relu_forward(xf, out, work=xf.size)

    def _bwd(self, xf, yf, dyf, dx):
        A.relu_backward(xf, dyf, dx, work=xf.size)


@dataclass(frozen=True)
class LeakyReLU(_Elementwise):
    """y = x if x > 0 else alpha·x; dx = dy if x > 0 else alpha·dy."""
    alpha: float = 0.01

    def _fwd(self, xf, out):
        A.leaky_relu_forward(xf, xf.dtype.type(self.alpha), out, work=xf.size)

    def _bwd(self, xf, yf, dyf, dx):
        A.leaky_relu_backward(xf, xf.dtype.type(self.alpha), dyf, dx, work=xf.size)


@dataclass(frozen=True)
class ELU(_Elementwise):
    """y = x if x > 0 else alpha·(e^x − 1); dx = dy if x > 0 else dy·(y + alpha)."""
    alpha: float = 1.0

    def _fwd(self, xf, out):
        A.elu_forward(xf, xf.dtype.type(self.alpha), out, work=xf.size * 8)

    def _bwd(self, xf, yf, dyf, dx):
        A.elu_backward(xf, yf, xf.dtype.type(self.alpha), dyf, dx, work=xf.size)


@dataclass(frozen=True)
class GELU(_Elementwise):
    """GELU, tanh form: y = ½·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))."""

    def _fwd(self, xf, out):
        A.gelu_forward(xf, out, work=xf.size * 10)

    def _bwd(self, xf, yf, dyf, dx):
        A.gelu_backward(xf, dyf, dx, work=xf.size * 12)


@dataclass(frozen=True)
class Softmax(Layer):
    """Softmax over the last axis: y = exp(x − max x) / Σ exp(x − max x).

    x (..., K) → y (..., K); dx = y ⊙ (dy − Σ_k dy·y). For classification, prefer feeding
    logits straight to ``losses.softmax_cross_entropy`` (it is fused and more stable).
    """

    def forward(self, params, x, *, train=False, rng=None):
        x = as_float_array(self, x)
        if x.ndim < 1 or x.shape[-1] < 1:
            raise ValueError(f"{self}: expected input (..., K) with K >= 1, got {x.shape}")
        x2 = np.ascontiguousarray(x).reshape(-1, x.shape[-1])
        y2 = np.empty_like(x2)
        A.softmax_forward(x2, y2, work=x2.size * 8)
        return y2.reshape(x.shape), (y2, x.shape)

    def backward(self, params, cache, dy, *, input_grad=True):
        y2, shape = cache
        if not input_grad:
            return None, {}
        dy = self._check_dy(dy, shape, y2.dtype)
        dx = np.empty_like(y2)
        A.softmax_backward(y2, np.ascontiguousarray(dy).reshape(y2.shape), dx, work=y2.size * 2)
        return dx.reshape(shape), {}


def _rng(rng):
    return rng if rng is not None else np.random.default_rng()


@dataclass(frozen=True)
class NoisyReLU(Layer):
    """Noisy ReLU (Nair & Hinton 2010): y = max(0, x + ε), ε ~ N(0, std²) at train time;
    plain ReLU at test time. dx = dy·[x + ε > 0]. The noise comes from the ``rng`` passed
    to ``forward`` (``fastbp.forward(..., seed=s)`` makes it reproducible)."""
    std: float = 1.0

    def __post_init__(self):
        if not self.std >= 0:
            raise ValueError(f"NoisyReLU: std must be >= 0, got {self.std}")

    def forward(self, params, x, *, train=False, rng=None):
        x = as_float_array(self, x)
        xf = flat(x)
        if train and self.std > 0:
            noise = _rng(rng).standard_normal(xf.size, dtype=xf.dtype)
            noise *= xf.dtype.type(self.std)
            xf = xf + noise
        out = np.empty_like(xf)
        A.relu_forward(xf, out, work=xf.size)
        return out.reshape(x.shape), (out, x.shape)

    def backward(self, params, cache, dy, *, input_grad=True):
        out, shape = cache
        if not input_grad:
            return None, {}
        dy = self._check_dy(dy, shape, out.dtype)
        dx = np.empty_like(out)
        A.relu_backward(out, flat(dy), dx, work=out.size)
        return dx.reshape(shape), {}


@dataclass(frozen=True)
class Dropout(Layer):
    """Inverted dropout: each unit is kept with probability p = 1 − rate and kept units
    are scaled by 1/p at train time; at test time (``train=False``) the layer is the identity.

    In expectation this equals the classic formulation that drops units at train time and
    multiplies the weights by p at test time; scaling at train time leaves inference free.
    dx = dy·mask/p. The mask comes from the ``rng`` passed to ``forward``, so a seed
    reproduces it.
    """
    rate: float = 0.5

    def __post_init__(self):
        if not 0.0 <= self.rate < 1.0:
            raise ValueError(f"Dropout: rate must be in [0, 1), got {self.rate}")

    def forward(self, params, x, *, train=False, rng=None):
        x = as_float_array(self, x)
        if not train or self.rate == 0.0:
            return x, (None, x.shape, x.dtype)
        xf = flat(x)
        u = _rng(rng).random(xf.size, dtype=xf.dtype)
        keep = xf.dtype.type(1.0 - self.rate)
        out = np.empty_like(xf)
        mask = np.empty(xf.size, dtype=np.bool_)
        DR.dropout_forward(xf, u, keep, out, mask, work=xf.size)
        return out.reshape(x.shape), (mask, x.shape, x.dtype)

    def backward(self, params, cache, dy, *, input_grad=True):
        mask, shape, dtype = cache
        if not input_grad:
            return None, {}
        dy = self._check_dy(dy, shape, dtype)
        if mask is None:
            return dy, {}
        dx = np.empty(mask.size, dtype=dtype)
        DR.dropout_backward(flat(dy), mask, dtype.type(1.0 - self.rate), dx, work=mask.size)
        return dx.reshape(shape), {}


@dataclass(frozen=True)
class Flatten(Layer):
    """(N, d1, d2, ...) → (N, d1·d2·...); backward reshapes back. Needs ndim >= 2."""

    def forward(self, params, x, *, train=False, rng=None):
        x = as_float_array(self, x)
        if x.ndim < 2:
            raise ValueError(f"{self}: expected input (N, ...) with ndim >= 2, got {x.shape}")
        # explicit size: reshape(N, -1) fails when N == 0
        return x.reshape(x.shape[0], math.prod(x.shape[1:])), (x.shape, x.dtype)

    def backward(self, params, cache, dy, *, input_grad=True):
        shape, dtype = cache
        if not input_grad:
            return None, {}
        dy = self._check_dy(dy, (shape[0], math.prod(shape[1:])), dtype)
        return dy.reshape(shape), {}
