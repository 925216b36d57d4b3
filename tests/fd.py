"""Central finite differences, the float64 reference every gradient test compares with."""
import numpy as np


def central_diff(f, a, eps=1e-6):
    """dL/da[i] = (f(a + eps e_i) − f(a − eps e_i)) / 2eps for every i, independently.

    ``a`` (any shape, float64) is perturbed in place and restored; ``f()`` reads it and
    returns the scalar loss. Returns an array shaped like ``a``."""
    g = np.zeros_like(a)
    for i in np.ndindex(a.shape):
        g[i] = central_diff_at(f, a, i, eps)
    return g


def central_diffs(f, arrays, eps=1e-6):
    """``central_diff`` of ``f()`` w.r.t. each array of ``arrays``, as a list."""
    return [central_diff(f, a, eps) for a in arrays]


def central_diff_at(f, a, index, eps=1e-6):
    """``central_diff`` for the single entry ``a[index]``: (f(a + eps e) − f(a − eps e)) / 2eps."""
    old = a[index]
    a[index] = old + eps
    lp = f()
    a[index] = old - eps
    lm = f()
    a[index] = old
    return (lp - lm) / (2 * eps)
