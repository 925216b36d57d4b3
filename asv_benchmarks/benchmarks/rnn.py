"""Simple RNN sequence kernels (fastbp.kernels.rnn), forward and backward through time.

``seq`` is the rnn_seq workload (D=32, H=128, T=50, N=32); ``tiny`` is N=1, H=32, T=100.
The ``*_serial`` / ``*_parallel`` methods call one build directly, to check the dispatch.
"""
import numpy as np

from fastbp.kernels import rnn as K
from . import smoke

SIZES = {"tiny": (100, 1, 8, 32), "small": (50, 8, 32, 32), "seq": (50, 32, 32, 128)}


class RNNSequence:
    params = smoke((list(SIZES), ["float32", "float64"], ["tanh", "relu"]))
    param_names = ["size", "dtype", "nonlinearity"]

    def setup(self, size, dtype, nonlinearity):
        T, N, D, H = SIZES[size]
        rng = np.random.default_rng(0)
        f = lambda *s: (0.3 * rng.standard_normal(s)).astype(dtype)  # noqa: E731
        relu = nonlinearity == "relu"
        self.x, self.h0 = f(T, N, D), f(N, H)
        self.Wx, self.Wh, self.b = f(D, H), f(H, H), f(H)
        self.fargs = (self.x, self.h0, self.Wx, self.Wh, self.b, relu)
        hs = K.rnn_forward(*self.fargs)                   # warms the JIT (or loads the cache)
        self.bargs = (self.x, self.h0, hs, self.Wx, self.Wh, np.zeros((0, N, H), dtype),
                      f(N, H), relu, False)
        K.rnn_backward(*self.bargs)
        for k, a in ((K._rnn_forward, self.fargs), (K._rnn_backward, self.bargs)):
            k.serial(*a)
            k.parallel(*a)

    def time_forward(self, size, dtype, nonlinearity):
        K.rnn_forward(*self.fargs)

    def time_backward(self, size, dtype, nonlinearity):
        K.rnn_backward(*self.bargs)

    def time_forward_serial(self, size, dtype, nonlinearity):
        K._rnn_forward.serial(*self.fargs)

    def time_forward_parallel(self, size, dtype, nonlinearity):
        K._rnn_forward.parallel(*self.fargs)

    def time_backward_serial(self, size, dtype, nonlinearity):
        K._rnn_backward.serial(*self.bargs)

    def time_backward_parallel(self, size, dtype, nonlinearity):
        K._rnn_backward.parallel(*self.bargs)

    def peakmem_forward(self, size, dtype, nonlinearity):
        K.rnn_forward(*self.fargs)
