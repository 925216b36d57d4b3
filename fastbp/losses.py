"""Loss functions: ``loss, dpred = loss_fn(pred, target)``.

Each loss returns ``(loss, grad)``: ``loss`` is a Python float, the MEAN over every
leading dimension, and ``grad`` is the gradient of that mean with respect to the
predictions, with the predictions' shape and dtype. For logits ``z (..., K)`` the rows
are the ``M = prod(z.shape[:-1])`` leading positions, so ``(T, N, K)`` logits with
``(T, N)`` labels is a per-time-step classification averaged over T*N rows.

- ``softmax_cross_entropy(z, y)``, with ``p = softmax(z)`` per row:
  ``loss = (1/M) sum_i -sum_k t_ik log p_ik``, ``dz = (p - t) / M``, where ``t`` is the
  one-hot of integer labels ``y (...)`` or given probability targets ``t (..., K)``.
  Computed as ``logsumexp(z_i) - z_iy`` with the row max subtracted.
- ``mse(pred, target)``: ``loss = mean((pred - target)^2)`` over all ``n`` elements,
  ``dpred = 2 (pred - target) / n``.
- ``binary_cross_entropy(z, t)`` on logits: ``loss = mean(max(z,0) - z t + log1p(exp(-|z|)))``,
  ``dz = (sigmoid(z) - t) / n``; stable for any finite ``z``.
- ``hinge(s, y)``, multiclass SVM (cs231n): ``loss = (1/M) sum_i sum_{j != y_i}
  max(0, s_ij - s_iy + 1)``; subgradient ``1/M`` for each ``j`` with positive margin and
  ``-count/M`` at ``y_i``.

Inputs are validated here, before any compiled code runs: a bad shape, label or target
value raises ``ValueError``; a wrong or mixed dtype raises ``TypeError``. float32 stays
float32 (no silent upcast). NaN in the predictions propagates to the loss; NaN in the
targets is an error. The inputs are never modified.
"""
from __future__ import annotations

import math

import numpy as np

from .kernels import losses as _k

__all__ = ["softmax_cross_entropy", "mse", "binary_cross_entropy", "hinge"]

_FLOATS = (np.float32, np.float64)


def _float_array(name, what, a):
    """``a`` as an array of float32/float64, else TypeError."""
    if type(a) is not np.ndarray:
        a = np.asarray(a)
    if a.dtype.type not in _FLOATS:
        raise TypeError(f"{name}: expected {what} of dtype float32 or float64, got {a.dtype}")
    if a.ndim == 0 or a.size == 0:
        raise ValueError(f"{name}: expected a non-empty {what} array, got shape {a.shape}")
    return a


def _minmax(a):
    """(min, max) of all elements as NumPy scalars (ufunc reduce: less overhead than .min())."""
    return np.minimum.reduce(a, axis=None), np.maximum.reduce(a, axis=None)


def _check_targets(name, what, a, t, lo=None, hi=None):
    """Targets ``t`` shaped and typed like ``a``, with no NaN/inf and within [lo, hi]."""
    t = np.asarray(t)
    if t.shape != a.shape:
        raise ValueError(f"{name}: expected {what} of shape {a.shape} (same as the input), "
                         f"got {t.shape}")
    if t.dtype != a.dtype:
        raise TypeError(f"{name}: expected {what} of dtype {a.dtype} (same as the input), "
                        f"got {t.dtype}; mixed dtypes are not upcast, convert with .astype")
    tmin, tmax = _minmax(t)  # NaN propagates through min/max
    verb = "contain" if what.endswith("s") else "contains"
    if math.isnan(tmin) or math.isnan(tmax):
        raise ValueError(f"{name}: {what} {verb} NaN")
    if math.isinf(tmin) or math.isinf(tmax):
        raise ValueError(f"{name}: {what} {verb} inf")
    if lo is not None and (tmin < lo or (hi is not None and tmax > hi)):
        allowed = "non-negative" if hi is None else f"in [{lo}, {hi}]"
        bad = tmin if tmin < lo else tmax
        raise ValueError(f"{name}: {what} must be {allowed}, got {bad}")
    return np.ascontiguousarray(t)


def _check_labels(name, z, y):
    """Integer class indices ``y`` of shape ``z.shape[:-1]`` in [0, K), as int64 (M,)."""
    K = z.shape[-1]
    if y.dtype.kind not in "iu":
        hint = ""
        if y.dtype.kind == "f":
            hint = (" (cast with labels.astype(np.int64) if they hold class indices, or "
                    f"pass probability targets of shape {z.shape})")
        raise TypeError(f"{name}: expected integer class labels of shape {z.shape[:-1]}, "
                        f"got dtype {y.dtype}{hint}")
    n = y.size
    if n <= _LIST_CHECK:
        # a batch's labels as Python ints: in a training step, right after the model's
        # kernels have filled the caches, this took about half the time of a NumPy
        # reduction (10.8 against 22.3 µs in a lenet step)
        labels = y.ravel().tolist()
        out = n > 0 and (min(labels) < 0 or max(labels) >= K)
    else:
        # one reduction: viewed as unsigned, negative labels become huge
        out = np.maximum.reduce(y.view(_UNSIGNED[y.dtype.itemsize]), axis=None) >= K
    if out:
        bad = y[(y < 0) | (y >= K)].flat[0]
        raise ValueError(f"{name}: label {bad} out of range [0, {K})")
    if y.ndim == 1 and y.dtype == _I64 and y.flags.c_contiguous:
        return y
    return np.ascontiguousarray(y, dtype=np.int64).reshape(-1)


_UNSIGNED = {n: np.dtype(f"u{n}") for n in (1, 2, 4, 8)}
_LIST_CHECK = 1024      # labels checked as a Python list up to this many
_I64 = np.dtype(np.int64)


def _rows(z):
    """``z (..., K)`` as a C-contiguous ``(M, K)`` array (a view when possible)."""
    if z.ndim == 2 and z.flags.c_contiguous:
        return z
    return np.ascontiguousarray(z).reshape(-1, z.shape[-1])


def softmax_cross_entropy(logits, labels):
    """Mean softmax cross-entropy and its gradient with respect to the logits.

    logits: ``(..., K)`` float32/float64, e.g. ``(N, K)`` or ``(T, N, K)``.
    labels: either integer class indices of shape ``logits.shape[:-1]`` (any integer
    dtype, values in ``[0, K)``), or probability / one-hot targets ``t`` of shape
    ``logits.shape`` and the logits' dtype (non-negative, rows normally sum to 1).

    With ``M = prod(logits.shape[:-1])`` rows and ``p = softmax(logits)`` along the last
    axis (computed with the row max subtracted):
        loss = (1/M) sum_i (logsumexp(z_i) - sum_k t_ik z_ik)  (= -(1/M) sum_i sum_k t_ik log p_ik)
        dlogits = (p * sum_k t_ik - t) / M                     (= (p - t)/M for distributions)

    Returns ``(loss, dlogits)``: ``loss`` a Python float, ``dlogits`` shaped and typed
    like ``logits``. NaN in the logits propagates to the loss.
    """
    name = "softmax_cross_entropy"
    z = _float_array(name, "logits", logits)
    y = labels if type(labels) is np.ndarray else np.asarray(labels)
    z2 = _rows(z)
    inv_m = z.dtype.type(1.0 / z2.shape[0])
    if y.shape == z.shape[:-1]:
        y1 = _check_labels(name, z, y)
        dz = np.empty_like(z2)
        total = _k.softmax_ce_index(z2, y1, dz, inv_m, work=z.size)
    elif y.shape == z.shape:
        if y.dtype.kind in "iub":
            raise TypeError(f"{name}: probability targets of shape {z.shape} must have the "
                            f"logits' dtype {z.dtype}, got {y.dtype} (for class indices pass "
                            f"labels of shape {z.shape[:-1]})")
        t = _check_targets(name, "probability targets", z, y, lo=0)
        dz = np.empty_like(z2)
        total = _k.softmax_ce_prob(z2, t.reshape(z2.shape), dz, inv_m, work=z.size)
    else:
        raise ValueError(f"{name}: for logits of shape {z.shape}, expected labels of shape "
                         f"{z.shape[:-1]} (class indices) or {z.shape} (probabilities), "
                         f"got {y.shape}")
    return float(total) / z2.shape[0], dz.reshape(z.shape)


def mse(pred, target):
    """Mean squared error over all elements, and its gradient.

    pred, target: any same shape, same dtype (float32/float64), ``n = pred.size``.
        loss  = (1/n) sum (pred - target)^2
        dpred = 2 (pred - target) / n
    Returns ``(loss, dpred)``: a Python float and an array shaped and typed like ``pred``.
    """
    name = "mse"
    p = _float_array(name, "pred", pred)
    t = _check_targets(name, "target", p, target)
    p1 = np.ascontiguousarray(p).reshape(-1)
    dp = np.empty_like(p1)
    total = _k.mse(p1, t.reshape(-1), dp, p.dtype.type(2.0 / p.size), work=p.size)
    return float(total) / p.size, dp.reshape(p.shape)


def binary_cross_entropy(logits, targets):
    """Mean binary cross-entropy on logits (sigmoid folded in), and its gradient.

    logits: any shape, float32/float64 (logits, NOT probabilities).
    targets: same shape and dtype, values in [0, 1]. With ``n = logits.size``:
        loss = (1/n) sum (max(z, 0) - z t + log1p(exp(-|z|)))
             = -(1/n) sum (t log sigmoid(z) + (1 - t) log(1 - sigmoid(z)))
        dlogits = (sigmoid(z) - t) / n
    Stable for any finite z (e.g. z = +-1000). Returns ``(loss, dlogits)``: a Python
    float and an array shaped and typed like ``logits``.
    """
    name = "binary_cross_entropy"
    z = _float_array(name, "logits", logits)
    t = _check_targets(name, "targets", z, targets, lo=0, hi=1)
    z1 = np.ascontiguousarray(z).reshape(-1)
    dz = np.empty_like(z1)
    total = _k.binary_cross_entropy(z1, t.reshape(-1), dz, z.dtype.type(1.0 / z.size),
                                    work=z.size)
    return float(total) / z.size, dz.reshape(z.shape)


def hinge(scores, labels):
    """Mean multiclass SVM (hinge) loss, cs231n form with margin 1, and its subgradient.

    scores: ``(..., K)`` float32/float64, e.g. ``(N, K)``; labels: integer class indices
    of shape ``scores.shape[:-1]`` in ``[0, K)``. With ``M`` rows and
    ``margin_ij = s_ij - s_iy + 1``:
        loss = (1/M) sum_i sum_{j != y_i} max(0, margin_ij)
        dscores_ij  = 1/M if margin_ij > 0 else 0            (j != y_i)
        dscores_iy  = -(number of j != y_i with margin_ij > 0) / M
    Returns ``(loss, dscores)``: a Python float and an array shaped and typed like ``scores``.
    """
    name = "hinge"
    s = _float_array(name, "scores", scores)
    y = np.asarray(labels)
    if y.shape != s.shape[:-1]:
        raise ValueError(f"{name}: for scores of shape {s.shape}, expected labels of shape "
                         f"{s.shape[:-1]}, got {y.shape}")
    y1 = _check_labels(name, s, y)
    s2 = _rows(s)
    ds = np.empty_like(s2)
    total = _k.hinge(s2, y1, ds, s.dtype.type(1.0 / s2.shape[0]), work=s.size)
    return float(total) / s2.shape[0], ds.reshape(s.shape)
