"""Dense layer (and Dense+ReLU fused, as Sequential runs it): forward and backward."""
import numpy as np

import fastbp as F

from . import rng, smoke


class DenseLayer:
    params = smoke((["32x64x128", "256x1024x2048"], ["float32", "float64"], [False, True]))
    param_names = ["batch x in x out", "dtype", "relu"]

    def setup(self, size, dtype, relu):
        n, d, m = map(int, size.split("x"))
        self.layer = F.Dense(d, m)
        self.params = self.layer.init(rng(), dtype)
        self.x = rng().standard_normal((n, d)).astype(dtype)
        self.kw = {"relu": True} if relu else {}
        y, self.cache = self.layer.forward(self.params, self.x, **self.kw)
        self.dy = rng().standard_normal(y.shape).astype(dtype)
        self.time_backward(size, dtype, relu)         # warm the JIT
        self.time_backward_no_input_grad(size, dtype, relu)

    def time_forward(self, size, dtype, relu):
        self.layer.forward(self.params, self.x, **self.kw)

    def time_backward(self, size, dtype, relu):
        self.layer.backward(self.params, self.cache, self.dy)

    def time_backward_no_input_grad(self, size, dtype, relu):
        self.layer.backward(self.params, self.cache, self.dy, input_grad=False)

    def peakmem_forward_backward(self, size, dtype, relu):
        y, cache = self.layer.forward(self.params, self.x, **self.kw)
        self.layer.backward(self.params, cache, self.dy)


class NumpyDenseReference:
    """The same forward/backward in plain NumPy (x @ W + b; dx = dy Wᵀ, dW = xᵀ dy, db = Σ dy)."""
    params = smoke((["32x64x128", "256x1024x2048"], ["float32", "float64"]))
    param_names = ["batch x in x out", "dtype"]

    def setup(self, size, dtype):
        n, d, m = map(int, size.split("x"))
        r = rng()
        self.x = r.standard_normal((n, d)).astype(dtype)
        self.W = r.standard_normal((d, m)).astype(dtype)
        self.b = np.zeros(m, dtype)
        self.dy = r.standard_normal((n, m)).astype(dtype)

    def time_forward(self, size, dtype):
        self.x @ self.W + self.b

    def time_backward(self, size, dtype):
        self.dy @ self.W.T, self.x.T @ self.dy, self.dy.sum(0)
