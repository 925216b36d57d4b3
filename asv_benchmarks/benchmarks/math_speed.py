"""Element-wise exp / tanh / sigmoid: fastbp's vectorised kernels against NumPy.

Every method allocates its result, like the NumPy ufunc it is compared with. The
``*_serial`` / ``*_parallel`` methods call one build of the kernel directly (into a
preallocated output), so the dispatch threshold can be checked against them.
"""
import numpy as np

try:
    from scipy.special import expit as _expit
except ImportError:  # pragma: no cover
    _expit = None

from fastbp.kernels import _math as fm
from . import smoke


class ElementwiseMath:
    params = smoke((["float32", "float64"], [1_000, 100_000, 1_000_000]))
    param_names = ["dtype", "n"]

    def setup(self, dtype, n):
        rng = np.random.default_rng(0)
        self.x = (4 * rng.standard_normal(n)).astype(dtype)
        self.out = np.empty_like(self.x)
        # warm the JIT: compile (or load from cache) every build used below
        for k in (fm.exp_kernel, fm.tanh_kernel, fm.sigmoid_kernel):
            k.serial(self.x, self.out)
            k.parallel(self.x, self.out)
        fm.exp(self.x), fm.tanh(self.x), fm.sigmoid(self.x)

    # fastbp, public wrappers (dispatch serial/parallel by size)
    def time_fastbp_exp(self, dtype, n):
        fm.exp(self.x)

    def time_fastbp_tanh(self, dtype, n):
        fm.tanh(self.x)

    def time_fastbp_sigmoid(self, dtype, n):
        fm.sigmoid(self.x)

    # NumPy / SciPy
    def time_numpy_exp(self, dtype, n):
        np.exp(self.x)

    def time_numpy_tanh(self, dtype, n):
        np.tanh(self.x)

    def time_numpy_sigmoid(self, dtype, n):
        1 / (1 + np.exp(-self.x))

    def time_scipy_expit(self, dtype, n):
        if _expit is None:
            raise NotImplementedError("scipy not installed")
        _expit(self.x)

    # the two builds of each kernel, output preallocated
    def time_exp_serial(self, dtype, n):
        fm.exp_kernel.serial(self.x, self.out)

    def time_exp_parallel(self, dtype, n):
        fm.exp_kernel.parallel(self.x, self.out)

    def time_tanh_serial(self, dtype, n):
        fm.tanh_kernel.serial(self.x, self.out)

    def time_tanh_parallel(self, dtype, n):
        fm.tanh_kernel.parallel(self.x, self.out)

    def time_sigmoid_serial(self, dtype, n):
        fm.sigmoid_kernel.serial(self.x, self.out)

    def time_sigmoid_parallel(self, dtype, n):
        fm.sigmoid_kernel.parallel(self.x, self.out)
