"""Optimizer updates (fused kernels over every parameter array)."""
import fastbp as F

from . import rng, smoke

OPTIMIZERS = {"sgd": lambda: F.optim.sgd(1e-2), "sgd_momentum": lambda: F.optim.sgd(1e-2, 0.9),
              "adam": lambda: F.optim.adam(1e-3), "rmsprop": lambda: F.optim.rmsprop(1e-3)}


class Update:
    params = smoke((list(OPTIMIZERS), [10_000, 3_000_000], ["float32", "float64"]))
    param_names = ["optimizer", "parameters", "dtype"]

    def setup(self, name, n, dtype):
        r = rng()
        # a bias-and-weights split like a Dense layer's
        self.params = [{"W": r.standard_normal((n // 100, 99)).astype(dtype),
                        "b": r.standard_normal(n // 100).astype(dtype)}]
        self.grads = [{k: r.standard_normal(v.shape).astype(dtype) for k, v in p.items()}
                      for p in self.params]
        self.opt = OPTIMIZERS[name]()
        self.state = self.opt.init(self.params)
        self.state = self.opt.update(self.params, self.grads, self.state)[1]   # warm the JIT

    def time_update(self, name, n, dtype):
        self.opt.update(self.params, self.grads, self.state)

    def peakmem_update(self, name, n, dtype):
        self.opt.update(self.params, self.grads, self.state)
