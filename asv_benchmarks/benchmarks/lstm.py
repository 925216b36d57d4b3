"""LSTM sequence kernels (fastbp.kernels.lstm), forward and backward through time.

Sizes: ``tiny`` is the lstm_tiny workload (D=8, H=32, T=100, N=1: per-step overhead and
transcendental speed); ``seq`` is lstm_seq (D=32, H=128, T=50, N=32: the per-step GEMM).
The ``*_serial`` / ``*_parallel`` methods call one build directly, to check the dispatch.
"""
import numpy as np

from fastbp.kernels import lstm as K
from . import smoke

SIZES = {"tiny": (100, 1, 8, 32), "small": (50, 8, 32, 32), "seq": (50, 32, 32, 128)}


class LSTMSequence:
    params = smoke((list(SIZES), ["float32", "float64"]))
    param_names = ["size", "dtype"]

    def setup(self, size, dtype):
        T, N, D, H = SIZES[size]
        rng = np.random.default_rng(0)
        f = lambda *s: (0.3 * rng.standard_normal(s)).astype(dtype)  # noqa: E731
        self.x, self.h0, self.c0 = f(T, N, D), f(N, H), f(N, H)
        self.Wx, self.Wh, self.b = f(D, 4 * H), f(H, 4 * H), f(4 * H)
        self.dhs, self.dhT, self.dcT = np.zeros((0, N, H), dtype), f(N, H), f(N, H)
        self.fargs = (self.x, self.h0, self.c0, self.Wx, self.Wh, self.b)
        self.cache = K.lstm_forward(*self.fargs)          # warms the JIT (or loads the cache)
        self.bargs = (self.x, self.h0, self.c0, *self.cache, self.Wx, self.Wh, self.dhs,
                      self.dhT, self.dcT, False)
        K.lstm_backward(*self.bargs)
        for k, a in ((K._lstm_forward, self.fargs), (K._lstm_backward, self.bargs)):
            k.serial(*a)
            k.parallel(*a)

    def time_forward(self, size, dtype):
        K.lstm_forward(*self.fargs)

    def time_backward(self, size, dtype):
        K.lstm_backward(*self.bargs)

    def time_forward_serial(self, size, dtype):
        K._lstm_forward.serial(*self.fargs)

    def time_forward_parallel(self, size, dtype):
        K._lstm_forward.parallel(*self.fargs)

    def time_backward_serial(self, size, dtype):
        K._lstm_backward.serial(*self.bargs)

    def time_backward_parallel(self, size, dtype):
        K._lstm_backward.parallel(*self.bargs)

    def peakmem_forward(self, size, dtype):
        K.lstm_forward(*self.fargs)


class LSTMCell:
    params = smoke((["float32", "float64"],))
    param_names = ["dtype"]

    def setup(self, dtype):
        rng = np.random.default_rng(0)
        f = lambda *s: (0.3 * rng.standard_normal(s)).astype(dtype)  # noqa: E731
        N, D, H = 32, 32, 128
        self.args = (f(N, D), f(N, H), f(N, H), f(D, 4 * H), f(H, 4 * H), f(4 * H))
        h, c, g = K.lstm_cell_forward(*self.args)
        x, h0, c0, Wx, Wh, _ = self.args
        self.bargs = (x, h0, c0, c, g, Wx, Wh, f(N, H), f(N, H))
        K.lstm_cell_backward(*self.bargs)

    def time_cell_forward(self, dtype):
        K.lstm_cell_forward(*self.args)

    def time_cell_backward(self, dtype):
        K.lstm_cell_backward(*self.bargs)
