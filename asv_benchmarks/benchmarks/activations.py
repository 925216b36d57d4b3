"""Element-wise activation layers and Softmax: forward and backward."""
import fastbp as F

from . import rng, smoke

LAYERS = {"ReLU": F.ReLU, "Tanh": F.Tanh, "GELU": F.GELU, "Softmax": F.Softmax}


class Activation:
    params = smoke((list(LAYERS), [10_000, 1_000_000], ["float32", "float64"]))
    param_names = ["layer", "n", "dtype"]

    def setup(self, name, n, dtype):
        self.layer = LAYERS[name]()
        self.x = (3 * rng().standard_normal((n // 100, 100))).astype(dtype)
        y, self.cache = self.layer.forward({}, self.x)
        self.dy = rng().standard_normal(y.shape).astype(dtype)
        self.layer.backward({}, self.cache, self.dy)     # warm the JIT

    def time_forward(self, name, n, dtype):
        self.layer.forward({}, self.x)

    def time_backward(self, name, n, dtype):
        self.layer.backward({}, self.cache, self.dy)

    def peakmem_forward_backward(self, name, n, dtype):
        y, cache = self.layer.forward({}, self.x)
        self.layer.backward({}, cache, self.dy)


class DropoutLayer:
    params = smoke(([10_000, 1_000_000], ["float32", "float64"]))
    param_names = ["n", "dtype"]

    def setup(self, n, dtype):
        self.layer = F.Dropout(0.5)
        self.rng = rng()
        self.x = rng().standard_normal(n).astype(dtype)
        y, self.cache = self.layer.forward({}, self.x, train=True, rng=self.rng)
        self.dy = rng().standard_normal(n).astype(dtype)
        self.layer.backward({}, self.cache, self.dy)

    def time_forward(self, n, dtype):
        self.layer.forward({}, self.x, train=True, rng=self.rng)

    def time_backward(self, n, dtype):
        self.layer.backward({}, self.cache, self.dy)

    def peakmem_forward_backward(self, n, dtype):
        y, cache = self.layer.forward({}, self.x, train=True, rng=self.rng)
        self.layer.backward({}, cache, self.dy)
