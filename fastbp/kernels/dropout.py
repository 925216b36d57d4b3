"""Inverted-dropout kernels.

The caller draws the uniforms ``u`` from a seeded ``np.random.Generator`` (so the mask is
reproducible); the kernel fuses the keep test, the scaling and the mask store.
"""
from numba import prange

from .._jit import dual


@dual("dropout")
def dropout_forward(x, u, keep, out, mask):
    """out = x·m/keep with m = [u < keep]; mask = (u < keep).

    Multiplying (rather than selecting 0) keeps NaN/inf visible in dropped units, as in
    torch: NaN·0 = NaN.

    x, u, out: (n,) of one float dtype; keep: scalar p = 1 − rate in (0, 1]; mask: (n,) bool.
    """
    scale = x.dtype.type(1) / keep
    zero = x.dtype.type(0)
    for i in prange(x.shape[0]):
        k = u[i] < keep
        mask[i] = k
        out[i] = x[i] * (scale if k else zero)


@dual("dropout")
def dropout_backward(dy, mask, keep, dx):
    """dx = dy·mask/keep (a product, so NaN in dy propagates).   dy, dx: (n,); mask: (n,) bool"""
    scale = dy.dtype.type(1) / keep
    zero = dy.dtype.type(0)
    for i in prange(dy.shape[0]):
        dx[i] = dy[i] * (scale if mask[i] else zero)
