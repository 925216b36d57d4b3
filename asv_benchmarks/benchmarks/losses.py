"""Losses. Each fastbp loss computes the value and the gradient in one fused pass, so
``time_forward`` is that pass (there is no separate backward to time); ``time_numpy``
is the same value + gradient written in plain NumPy, for reference."""
import numpy as np

import fastbp as F

from . import rng, smoke


def _numpy_softmax_ce(z, y):
    m = z.max(-1, keepdims=True)
    e = np.exp(z - m)
    s = e.sum(-1, keepdims=True)
    loss = np.mean(np.log(s[:, 0]) + m[:, 0] - z[np.arange(len(y)), y])
    d = e / s
    d[np.arange(len(y)), y] -= 1
    return loss, d / len(y)


def _numpy_mse(p, t):
    d = p - t
    return np.mean(d * d), 2 * d / d.size


def _numpy_bce(z, t):
    loss = np.mean(np.maximum(z, 0) - z * t + np.log1p(np.exp(-np.abs(z))))
    return loss, (1 / (1 + np.exp(-z)) - t) / z.size


def _numpy_hinge(s, y):
    n = len(y)
    margin = s - s[np.arange(n), y][:, None] + 1
    margin[np.arange(n), y] = 0
    pos = margin > 0
    d = pos.astype(s.dtype)
    d[np.arange(n), y] = -pos.sum(1)
    return np.maximum(margin, 0).sum() / n, d / n


class Loss:
    params = smoke((["softmax_cross_entropy", "mse", "binary_cross_entropy", "hinge"],
              [128, 16_384], ["float32", "float64"]))
    param_names = ["loss", "rows (x 10 classes)", "dtype"]

    def setup(self, name, rows, dtype):
        r = rng()
        self.f = getattr(F.losses, name)
        self.ref = {"softmax_cross_entropy": _numpy_softmax_ce, "mse": _numpy_mse,
                    "binary_cross_entropy": _numpy_bce, "hinge": _numpy_hinge}[name]
        self.z = (3 * r.standard_normal((rows, 10))).astype(dtype)
        if name in ("softmax_cross_entropy", "hinge"):
            self.t = r.integers(0, 10, rows)
        else:
            self.t = r.uniform(0, 1, (rows, 10)).astype(dtype)
        self.f(self.z, self.t)                           # warm the JIT

    def time_forward(self, name, rows, dtype):
        self.f(self.z, self.t)

    def time_numpy(self, name, rows, dtype):
        self.ref(self.z, self.t)

    def peakmem_forward(self, name, rows, dtype):
        self.f(self.z, self.t)
