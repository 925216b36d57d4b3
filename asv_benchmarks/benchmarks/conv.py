"""Conv2D kernels: forward and backward on the DESIGN.md CNN layer shapes.

``Conv2D`` times the public kernels (algorithm picked by shape, or forced to ``direct`` /
``gemm`` / ``tap`` / ``winograd`` to measure the crossovers; ``tap`` runs ``gemm`` for
stride > 1, ``winograd`` runs ``tap`` for kernels other than 3×3 at stride 1). ``track_gflops_*`` report the achieved GFLOP/s
(2·N·F·OH·OW·C·KH·KW per pass; backward = dW + dx = twice that). ``ConvDispatch`` times
the serial and the parallel build of the packing/direct kernels at growing work sizes,
which is how the ``conv`` family threshold in ``fastbp/config.py`` is measured.
"""
import time

import numpy as np

from fastbp.kernels import conv as K
from . import smoke

# name: (N, C, F, H, W, K, stride, padding)
SHAPES = {
    "lenet_conv1": (64, 1, 8, 28, 28, 5, 1, 0),
    "lenet_conv2": (64, 8, 16, 12, 12, 5, 1, 0),
    "cifar_conv1": (32, 3, 32, 32, 32, 3, 1, 1),
    "cifar_conv2": (32, 32, 32, 32, 32, 3, 1, 1),
    "conv3x3_16ch": (32, 16, 16, 32, 32, 3, 1, 1),     # the Winograd crossover's region
    "strided": (16, 16, 32, 32, 32, 3, 2, 1),
}


def _setup(shape, dtype, seed=0):
    N, C, F, H, W, k, s, p = SHAPES[shape]
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    Wt = (rng.standard_normal((F, C, k, k)) * np.sqrt(2 / (C * k * k))).astype(dtype)
    b = np.zeros(F, dtype=dtype)
    return x, Wt, b, s, p


def _flops(shape):
    N, C, F, H, W, k, s, p = SHAPES[shape]
    OH, OW = K.out_size(H, W, k, k, s, s, p, p)
    return 2.0 * N * F * OH * OW * C * k * k


def _median_time(f, repeat=7):
    f()
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


class Conv2D:
    params = smoke((list(SHAPES), ["float32", "float64"], ["auto", "direct", "gemm", "tap",
                                                            "winograd"]))
    param_names = ["shape", "dtype", "method"]
    timeout = 300

    def setup(self, shape, dtype, method):
        self.method = method
        self.x, self.W, self.b, self.s, self.p = _setup(shape, dtype)
        # warm the JIT (compile, or load from the on-disk cache)
        self.y = self.forward()
        self.dy = np.ones_like(self.y)
        self.backward()

    def forward(self):
        return K.conv2d_forward(self.x, self.W, self.b, self.s, self.p, True, self.method)

    def backward(self):
        return K.conv2d_backward(self.x, self.W, self.dy, self.s, self.p, True, True, self.y,
                                 self.method)

    def time_forward(self, shape, dtype, method):
        self.forward()

    def time_backward(self, shape, dtype, method):
        self.backward()

    def time_backward_weights_only(self, shape, dtype, method):
        K.conv2d_backward(self.x, self.W, self.dy, self.s, self.p, True, False, self.y, method)

    def peakmem_forward(self, shape, dtype, method):
        self.forward()

    def track_gflops_forward(self, shape, dtype, method):
        return _flops(shape) / _median_time(self.forward) / 1e9

    def track_gflops_backward(self, shape, dtype, method):
        return 2 * _flops(shape) / _median_time(self.backward) / 1e9

    track_gflops_forward.unit = "GFLOP/s"
    track_gflops_backward.unit = "GFLOP/s"


class ConvDispatch:
    """Serial vs parallel build of the conv kernels by work size (for the threshold)."""
    params = smoke(([1_000, 10_000, 30_000, 100_000, 300_000, 1_000_000], ["float32"]))
    param_names = ["work", "dtype"]

    def setup(self, work, dtype):
        # a C=4 → F=4, 3x3 problem whose direct forward costs about ``work`` scalar ops
        per_sample = 2 * 4 * 4 * 9 * 8 * 8
        N = max(1, work // per_sample)
        rng = np.random.default_rng(0)
        self.x = rng.standard_normal((N, 4, 8, 8)).astype(dtype)
        self.W = rng.standard_normal((4, 4, 3, 3)).astype(dtype)
        self.b = np.zeros(4, dtype=dtype)
        self.y = np.empty((N, 4, 8, 8), dtype=dtype)
        self.cols = np.empty((36, N * 64), dtype=dtype)
        for k in (K.direct_forward.serial, K.direct_forward.parallel):
            k(self.x, self.W, self.b, 1, 1, 1, 1, False, self.y)
        for k in (K.im2col.serial, K.im2col.parallel):
            k(self.x, 0, 3, 3, 1, 1, 1, 1, 8, 8, self.cols)

    def time_direct_serial(self, work, dtype):
        K.direct_forward.serial(self.x, self.W, self.b, 1, 1, 1, 1, False, self.y)

    def time_direct_parallel(self, work, dtype):
        K.direct_forward.parallel(self.x, self.W, self.b, 1, 1, 1, 1, False, self.y)

    def time_im2col_serial(self, work, dtype):
        K.im2col.serial(self.x, 0, 3, 3, 1, 1, 1, 1, 8, 8, self.cols)

    def time_im2col_parallel(self, work, dtype):
        K.im2col.parallel(self.x, 0, 3, 3, 1, 1, 1, 1, 8, 8, self.cols)


class ConvReluMaxPool:
    """Conv2D → ReLU → MaxPool2D(2) on the CNN shapes: fused (``conv2d_maxpool_forward/
    _backward``, what a ``Sequential`` runs) against the three kernels one after another
    (conv with ReLU, max pool; max-pool backward, conv backward with the ReLU mask)."""
    params = smoke((["lenet_conv1", "lenet_conv2", "cifar_conv2"], ["fused", "separate"]))
    param_names = ["shape", "path"]
    timeout = 300

    def setup(self, shape, path):
        from fastbp.kernels import pool as P
        self.P = P
        self.x, self.W, self.b, self.s, self.p = _setup(shape, "float32")
        y = K.conv2d_forward(self.x, self.W, self.b, self.s, self.p, True)
        self.yshape = y.shape
        self.yp, self.idx = P.maxpool2d_forward(y, 2)
        self.y = y
        self.dyp = np.ones_like(self.yp)
        self.forward = self._fused_fwd if path == "fused" else self._separate_fwd
        self.backward = self._fused_bwd if path == "fused" else self._separate_bwd
        self.forward()                      # warm the JIT
        self.backward()

    def _fused_fwd(self):
        return K.conv2d_maxpool_forward(self.x, self.W, self.b, self.s, self.p, True, 2)

    def _separate_fwd(self):
        y = K.conv2d_forward(self.x, self.W, self.b, self.s, self.p, True)
        return self.P.maxpool2d_forward(y, 2)

    def _fused_bwd(self):
        return K.conv2d_maxpool_backward(self.x, self.W, self.dyp, self.idx, self.yp, self.s,
                                         self.p, 2, None, True, True, True)

    def _separate_bwd(self):
        dy = self.P.maxpool2d_backward(self.dyp, self.idx, self.yshape)
        return K.conv2d_backward(self.x, self.W, dy, self.s, self.p, True, True, self.y)

    def time_forward(self, shape, path):
        self.forward()

    def time_backward(self, shape, path):
        self.backward()
