"""Max and average pooling kernels, forward and backward, on the DESIGN.md CNN shapes.

``PoolDispatch`` times the serial and parallel builds at growing work sizes (the ``pool``
family threshold in ``fastbp/config.py``).
"""
import numpy as np

from fastbp.kernels import pool as PK
from . import smoke

# name: (N, C, H, W, size, stride)
SHAPES = {
    "lenet_pool1": (64, 8, 24, 24, 2, None),
    "lenet_pool2": (64, 16, 8, 8, 2, None),
    "cifar_pool": (32, 32, 32, 32, 2, None),
    "overlap_3s2": (32, 32, 32, 32, 3, 2),
}


class Pool2D:
    params = smoke((list(SHAPES), ["float32", "float64"], ["max", "avg"]))
    param_names = ["shape", "dtype", "kind"]

    def setup(self, shape, dtype, kind):
        N, C, H, W, self.size, self.stride = SHAPES[shape]
        self.x = np.random.default_rng(0).standard_normal((N, C, H, W)).astype(dtype)
        self.kind = kind
        y = self.forward()                      # warm the JIT
        self.dy = np.ones_like(y)
        self.backward()

    def forward(self):
        if self.kind == "max":
            y, self.idx = PK.maxpool2d_forward(self.x, self.size, self.stride)
            return y
        return PK.avgpool2d_forward(self.x, self.size, self.stride)

    def backward(self):
        if self.kind == "max":
            return PK.maxpool2d_backward(self.dy, self.idx, self.x.shape)
        return PK.avgpool2d_backward(self.dy, self.x.shape, self.size, self.stride)

    def time_forward(self, shape, dtype, kind):
        self.forward()

    def time_backward(self, shape, dtype, kind):
        self.backward()

    def peakmem_forward(self, shape, dtype, kind):
        self.forward()


class PoolDispatch:
    """Serial vs parallel build of max pooling (2x2) by work size, work = N·C·OH·OW·4."""
    params = smoke(([1_000, 10_000, 30_000, 100_000, 300_000, 1_000_000], ["float32"]))
    param_names = ["work", "dtype"]

    def setup(self, work, dtype):
        N = max(1, work // (8 * 8 * 8 * 4))
        self.x = np.random.default_rng(0).standard_normal((N, 8, 16, 16)).astype(dtype)
        self.y = np.empty((N, 8, 8, 8), dtype=dtype)
        self.idx = np.empty((N, 8, 8, 8), dtype=np.int32)
        self.dx = np.empty_like(self.x)
        for k in (PK.max_forward_2x2.serial, PK.max_forward_2x2.parallel):
            k(self.x, self.y, self.idx)
        # the backward kernel works on flattened planes (N·C, OH·OW) → (N·C, H·W)
        self.y2 = self.y.reshape(N * 8, 64)
        self.idx2 = self.idx.reshape(N * 8, 64)
        self.dx2 = self.dx.reshape(N * 8, 256)
        for k in (PK.max_backward.serial, PK.max_backward.parallel):
            k(self.y2, self.idx2, self.dx2)

    def time_max_forward_serial(self, work, dtype):
        PK.max_forward_2x2.serial(self.x, self.y, self.idx)

    def time_max_forward_parallel(self, work, dtype):
        PK.max_forward_2x2.parallel(self.x, self.y, self.idx)

    def time_max_backward_serial(self, work, dtype):
        PK.max_backward.serial(self.y2, self.idx2, self.dx2)

    def time_max_backward_parallel(self, work, dtype):
        PK.max_backward.parallel(self.y2, self.idx2, self.dx2)
