"""Convolution and pooling layers (NCHW): Conv2D, MaxPool2D, AvgPool2D.

Conv2D: x (N, C, H, W) → y (N, F, OH, OW), W (F, C, KH, KW), b (F,),
``OH = (H + 2·ph − KH)//sh + 1``. Forward is a cross-correlation; the input gradient is
the cross-correlation of the stride-dilated, (K−1−p)-padded output gradient with the
flipped kernel (see ``fastbp.kernels.conv``). Pooling layers have no padding.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import initializers
from .._validate import as_float_array, check_dtype, check_param
from ..kernels import conv as K
from ..kernels import pool as PK
from .core import Layer, _dtype

__all__ = ["Conv2D", "MaxPool2D", "AvgPool2D"]


def _pair(where, name, v, minimum):
    """An int or a pair of ints, each >= minimum, as a tuple (h, w)."""
    def ok(a):
        return isinstance(a, (int, np.integer)) and not isinstance(a, (bool, np.bool_)) \
            and a >= minimum
    if ok(v):
        return (int(v), int(v))
    if isinstance(v, (tuple, list)) and len(v) == 2 and ok(v[0]) and ok(v[1]):
        return (int(v[0]), int(v[1]))
    kind = "positive" if minimum >= 1 else "non-negative"
    raise ValueError(f"{where}: {name} must be a {kind} int or a pair of them, got {v!r}")


def _fmt(p):
    return str(p[0]) if p[0] == p[1] else str(p)


def _check_nchw(where, x, C, what="(N, C, H, W)"):
    x = as_float_array(where, x)
    if x.ndim != 4 or (C is not None and x.shape[1] != C):
        exp = f"(N, {C}, H, W)" if C is not None else what
        raise ValueError(f"{where}: expected input {exp}, got {x.shape}")
    return np.ascontiguousarray(x)


# ---------------------------------------------------------------------------- Conv2D
@dataclass(frozen=True, init=False)
class Conv2D(Layer):
    """2-D convolution (cross-correlation) over NCHW input.

    x (N, C, H, W) → y (N, F, OH, OW), ``OH = (H + 2·ph − KH)//sh + 1`` (likewise OW);
    params W (F, C, KH, KW), b (F,) (no ``"b"`` when ``bias=False``).
    ``y[n,f,i,j] = b[f] + Σ_c,p,q W[f,c,p,q]·xp[n,c,i·sh+p,j·sw+q]``, xp = x zero-padded.
    Backward: ``dW`` = cross-correlation of xp with dy; ``db = Σ_n,i,j dy``;
    ``dx`` = cross-correlation of dy (dilated by the stride, padded by K−1−p) with the
    flipped kernel ``W[f,c,KH−1−p,KW−1−q]`` (channel axes swapped).
    kernel_size, stride, padding: int or (h, w). ``init``: initializer name or callable
    (fan_in = C·KH·KW, fan_out = F·KH·KW); the bias starts at zero.
    """
    in_channels: int
    out_channels: int
    kernel_size: tuple
    stride: tuple = (1, 1)
    padding: tuple = (0, 0)
    bias: bool = True
    weight_init: object = "he_normal"

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True,
                 init="he_normal"):
        where = f"Conv2D({in_channels}, {out_channels}, {kernel_size!r})"
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels)):
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{where}: {name} must be a positive int, got {v!r}")
        object.__setattr__(self, "in_channels", int(in_channels))
        object.__setattr__(self, "out_channels", int(out_channels))
        object.__setattr__(self, "kernel_size", _pair(where, "kernel_size", kernel_size, 1))
        object.__setattr__(self, "stride", _pair(where, "stride", stride, 1))
        object.__setattr__(self, "padding", _pair(where, "padding", padding, 0))
        object.__setattr__(self, "bias", bool(bias))
        initializers.get(init)  # fail early on an unknown name
        object.__setattr__(self, "weight_init", init)

    def __str__(self):
        s = f"Conv2D({self.in_channels}, {self.out_channels}, {_fmt(self.kernel_size)}"
        if self.stride != (1, 1):
            s += f", stride={_fmt(self.stride)}"
        if self.padding != (0, 0):
            s += f", padding={_fmt(self.padding)}"
        return s + ")"

    @property
    def weight_shape(self):
        return (self.out_channels, self.in_channels) + self.kernel_size

    def init(self, rng, dtype=np.float32):
        dtype = _dtype(dtype)
        F, C, KH, KW = self.weight_shape
        params = {"W": initializers.get(self.weight_init)(rng, (F, C, KH, KW), dtype,
                                                          C * KH * KW, F * KH * KW)}
        if self.bias:
            params["b"] = np.zeros(F, dtype=dtype)
        return params

    def _params(self, params):
        W = np.ascontiguousarray(check_param(self, params, "W", self.weight_shape))
        if self.bias:
            b = check_param(self, params, "b", (self.out_channels,))
            check_dtype(self, b, W.dtype, name="parameter 'b'", other="parameter 'W'")
            b = np.ascontiguousarray(b)
        else:
            b = np.zeros(0, dtype=W.dtype)
        return W, b

    def output_shape(self, x_shape):
        """(N, F, OH, OW) for an input of shape ``x_shape`` (checked)."""
        if len(x_shape) != 4 or x_shape[1] != self.in_channels:
            raise ValueError(f"{self}: expected input (N, {self.in_channels}, H, W), "
                             f"got {tuple(x_shape)}")
        (KH, KW), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        H, Wd = x_shape[2] + 2 * ph, x_shape[3] + 2 * pw
        if KH > H or KW > Wd:
            raise ValueError(f"{self}: kernel {self.kernel_size} is larger than the padded "
                             f"input ({H}, {Wd}) (input {tuple(x_shape)}, padding {self.padding})")
        return (x_shape[0], self.out_channels) + K.out_size(x_shape[2], x_shape[3], KH, KW,
                                                            sh, sw, ph, pw)

    def forward(self, params, x, *, train=False, rng=None, relu=False, pool=None):
        """y = conv(x, W) + b (then max(y, 0) when ``relu``, fused). Returns (y, cache).

        ``pool``: a ``MaxPool2D`` layer applied to that output in the same pass (what a
        ``Sequential`` does for Conv2D → [ReLU] → MaxPool2D); y is then the pooled output
        (N, F, POH, POW), exactly ``pool.forward`` of the unpooled one, and ``backward``
        takes the gradient of the pooled output.
        """
        W, b = self._params(params)
        x = _check_nchw(self, x, self.in_channels)
        check_dtype(self, x, W.dtype)
        yshape = self.output_shape(x.shape)
        if pool is not None:
            if not isinstance(pool, MaxPool2D):
                raise TypeError(f"{self}: pool must be a MaxPool2D layer, got {pool!r}")
            pool.output_shape(yshape)           # the pool's own checks and messages
            yp, idx = K.conv2d_maxpool_forward(x, W, b, self.stride, self.padding, relu,
                                               pool.size, pool.stride)
            return yp, (x, yp, idx, pool, relu)
        y = K.conv2d_forward(x, W, b, self.stride, self.padding, relu)
        return y, (x, y if relu else None)

    def backward(self, params, cache, dy, *, input_grad=True):
        """(dx, {"W": dW, "b": db}) for the output gradient dy (N, F, OH, OW), or the pooled
        output's gradient (N, F, POH, POW) after ``forward(..., pool=...)``."""
        W, b = self._params(params)
        if len(cache) == 5:                     # forward(..., pool=MaxPool2D(...))
            x, yp, idx, pool, relu = cache
            dy = pool._check_dy(dy, yp.shape, W.dtype)
            dx, dW, db = K.conv2d_maxpool_backward(
                x, W, np.ascontiguousarray(dy), idx, yp, self.stride, self.padding,
                pool.size, pool.stride, self.bias, input_grad, relu)
        else:
            x, y = cache
            dy = self._check_dy(dy, self.output_shape(x.shape), W.dtype)
            dx, dW, db = K.conv2d_backward(x, W, np.ascontiguousarray(dy), self.stride,
                                           self.padding, self.bias, input_grad, y)
        grads = {"W": dW, "b": db} if self.bias else {"W": dW}
        return dx, grads


# ---------------------------------------------------------------------------- pooling
class _Pool2D(Layer):
    def _setup(self, size, stride):
        where = f"{type(self).__name__}({size!r})"
        object.__setattr__(self, "size", _pair(where, "size", size, 1))
        object.__setattr__(self, "stride", self.size if stride is None
                           else _pair(where, "stride", stride, 1))

    def __str__(self):
        s = f"{type(self).__name__}({_fmt(self.size)}"
        if self.stride != self.size:
            s += f", stride={_fmt(self.stride)}"
        return s + ")"

    def output_shape(self, x_shape):
        """(N, C, OH, OW), OH = (H − KH)//sh + 1, for an input of shape ``x_shape`` (checked)."""
        if len(x_shape) != 4:
            raise ValueError(f"{self}: expected input (N, C, H, W), got {tuple(x_shape)}")
        (KH, KW), (sh, sw) = self.size, self.stride
        if KH > x_shape[2] or KW > x_shape[3]:
            raise ValueError(f"{self}: window {self.size} is larger than the input "
                             f"({x_shape[2]}, {x_shape[3]}) (input {tuple(x_shape)})")
        return tuple(x_shape[:2]) + PK.out_size(x_shape[2], x_shape[3], KH, KW, sh, sw)


@dataclass(frozen=True, init=False)
class MaxPool2D(_Pool2D):
    """Max pooling: x (N, C, H, W) → y (N, C, OH, OW), ``OH = (H − KH)//sh + 1``.

    ``y[n,c,i,j] = max_{p,q} x[n,c,i·sh+p,j·sw+q]``. Backward sends dy to the arg-max of
    each window (exactly one position; on ties the first in row-major order, as PyTorch).
    size, stride: int or (h, w); stride defaults to size.
    """
    size: tuple
    stride: tuple

    def __init__(self, size, stride=None):
        self._setup(size, stride)

    def forward(self, params, x, *, train=False, rng=None):
        x = _check_nchw(self, x, None)
        self.output_shape(x.shape)
        y, idx = PK.maxpool2d_forward(x, self.size, self.stride)
        return y, (idx, x.shape, x.dtype)

    def backward(self, params, cache, dy, *, input_grad=True):
        idx, shape, dtype = cache
        if not input_grad:
            return None, {}
        dy = self._check_dy(dy, idx.shape, dtype)
        return PK.maxpool2d_backward(np.ascontiguousarray(dy), idx, shape), {}


@dataclass(frozen=True, init=False)
class AvgPool2D(_Pool2D):
    """Average pooling: x (N, C, H, W) → y (N, C, OH, OW), ``OH = (H − KH)//sh + 1``.

    ``y[n,c,i,j] = mean_{p,q} x[n,c,i·sh+p,j·sw+q]``; backward spreads dy/(KH·KW) over
    each window. size, stride: int or (h, w); stride defaults to size.
    """
    size: tuple
    stride: tuple

    def __init__(self, size, stride=None):
        self._setup(size, stride)

    def forward(self, params, x, *, train=False, rng=None):
        x = _check_nchw(self, x, None)
        yshape = self.output_shape(x.shape)
        y = PK.avgpool2d_forward(x, self.size, self.stride)
        return y, (x.shape, yshape, x.dtype)

    def backward(self, params, cache, dy, *, input_grad=True):
        shape, yshape, dtype = cache
        if not input_grad:
            return None, {}
        dy = self._check_dy(dy, yshape, dtype)
        return PK.avgpool2d_backward(np.ascontiguousarray(dy), shape, self.size, self.stride), {}
