"""Weight initializers.

An initializer is a callable ``init(rng, shape, dtype, fan_in, fan_out) -> ndarray``.
Layers compute the fans (Dense ``(D, M)``: fan_in = D, fan_out = M; Conv2D
``(F, C, KH, KW)``: fan_in = C·KH·KW, fan_out = F·KH·KW) and accept an initializer by name
or as a callable.

| name | distribution |
|---|---|
| ``zeros`` | 0 |
| ``normal(std)`` | N(0, std²) |
| ``uniform(limit)`` | U(−limit, limit) |
| ``glorot_uniform`` (Xavier) | U(−a, a), a = √(6 / (fan_in + fan_out)) |
| ``glorot_normal`` (Xavier) | N(0, 2 / (fan_in + fan_out)) |
| ``he_normal`` | N(0, 2 / fan_in) |
| ``he_uniform`` | U(−a, a), a = √(6 / fan_in) |
| ``orthogonal`` | a (semi-)orthogonal matrix from the QR of a Gaussian, shaped (fan_in-major) |
"""
from __future__ import annotations

import numpy as np

__all__ = ["zeros", "normal", "uniform", "glorot_uniform", "glorot_normal", "he_normal",
           "he_uniform", "orthogonal", "get"]


def _out(a, dtype):
    return np.ascontiguousarray(a, dtype=dtype)


def zeros(rng, shape, dtype, fan_in=None, fan_out=None):
    """All zeros."""
    return np.zeros(shape, dtype=dtype)


def normal(std=0.01):
    """Factory: N(0, std²)."""
    if not std >= 0:
        raise ValueError(f"normal: std must be >= 0, got {std}")

    def init(rng, shape, dtype, fan_in=None, fan_out=None):
        return _out(rng.normal(0.0, std, size=shape), dtype)
    init.__name__ = f"normal({std})"
    return init


def uniform(limit=0.05):
    """Factory: U(−limit, limit)."""
    if not limit >= 0:
        raise ValueError(f"uniform: limit must be >= 0, got {limit}")

    def init(rng, shape, dtype, fan_in=None, fan_out=None):
        return _out(rng.uniform(-limit, limit, size=shape), dtype)
    init.__name__ = f"uniform({limit})"
    return init


def glorot_uniform(rng, shape, dtype, fan_in, fan_out):
    """Xavier/Glorot uniform: U(−a, a), a = √(6 / (fan_in + fan_out))."""
    a = np.sqrt(6.0 / (fan_in + fan_out))
    return _out(rng.uniform(-a, a, size=shape), dtype)


def glorot_normal(rng, shape, dtype, fan_in, fan_out):
    """Xavier/Glorot normal: N(0, 2 / (fan_in + fan_out))."""
    return _out(rng.normal(0.0, np.sqrt(2.0 / (fan_in + fan_out)), size=shape), dtype)


def he_normal(rng, shape, dtype, fan_in, fan_out=None):
    """He (Kaiming) normal: N(0, 2 / fan_in)."""
    return _out(rng.normal(0.0, np.sqrt(2.0 / fan_in), size=shape), dtype)


def he_uniform(rng, shape, dtype, fan_in, fan_out=None):
    """He (Kaiming) uniform: U(−a, a), a = √(6 / fan_in)."""
    a = np.sqrt(6.0 / fan_in)
    return _out(rng.uniform(-a, a, size=shape), dtype)


def orthogonal(rng, shape, dtype, fan_in=None, fan_out=None, gain=1.0):
    """(Semi-)orthogonal: rows = shape[0], cols = prod(shape[1:]); Q from the QR of a
    Gaussian matrix with the signs of R's diagonal folded in (Saxe et al. 2014)."""
    rows = shape[0]
    cols = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    a = rng.normal(size=(max(rows, cols), min(rows, cols)))
    q, r = np.linalg.qr(a)
    q = q * np.sign(np.diag(r))
    if rows < cols:
        q = q.T
    return _out(gain * q.reshape(shape), dtype)


_BY_NAME = {
    "zeros": zeros,
    "normal": normal(),
    "uniform": uniform(),
    "glorot_uniform": glorot_uniform,
    "xavier_uniform": glorot_uniform,
    "glorot_normal": glorot_normal,
    "xavier_normal": glorot_normal,
    "he_normal": he_normal,
    "kaiming_normal": he_normal,
    "he_uniform": he_uniform,
    "kaiming_uniform": he_uniform,
    "orthogonal": orthogonal,
}


def get(init):
    """An initializer from a name (see the table above) or a callable (returned as is)."""
    if callable(init):
        return init
    if isinstance(init, str) and init in _BY_NAME:
        return _BY_NAME[init]
    raise ValueError(f"unknown initializer {init!r}; expected a callable or one of "
                     f"{sorted(_BY_NAME)}")
