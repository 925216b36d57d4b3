"""Input checks shared by layers and functions. They run in Python, before compiled code.

``where`` names the caller in error messages: a string, or a layer object (formatted with
``str`` only when an error is raised, so the checks stay cheap on the fast path).
"""
from __future__ import annotations

import numpy as np

FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def as_float_array(where: str, x, name: str = "input") -> np.ndarray:
    """``x`` as an ndarray of float32/float64, or a TypeError naming ``where``."""
    if not isinstance(x, np.ndarray):
        x = np.asarray(x)
    if x.dtype not in FLOATS:
        raise TypeError(f"{where}: expected a float32 or float64 {name}, got dtype {x.dtype}")
    return x


def check_dtype(where: str, x: np.ndarray, dtype, name: str = "input", other: str = "parameters"):
    """TypeError when ``x.dtype`` differs from ``dtype`` (no silent up/down-casting)."""
    if x.dtype != dtype:
        raise TypeError(f"{where}: {name} dtype {x.dtype} does not match {other} dtype "
                        f"{np.dtype(dtype)}; convert one of them explicitly (mixing float32 and "
                        "float64 is not allowed)")


def check_param(where: str, params: dict, key: str, shape: tuple, dtype=None) -> np.ndarray:
    """The parameter ``params[key]``, checked for presence, shape and float dtype."""
    if not isinstance(params, dict) or key not in params:
        got = sorted(params) if isinstance(params, dict) else type(params).__name__
        raise ValueError(f"{where}: missing parameter {key!r} (got {got})")
    p = params[key]
    if not isinstance(p, np.ndarray) or p.dtype not in FLOATS:
        raise TypeError(f"{where}: parameter {key!r} must be a float32 or float64 ndarray, "
                        f"got {getattr(p, 'dtype', type(p).__name__)}")
    if p.shape != tuple(shape):
        raise ValueError(f"{where}: expected parameter {key} of shape {tuple(shape)}, got {p.shape}")
    if dtype is not None:
        check_dtype(where, p, dtype, name=f"parameter {key!r}", other=f"parameter "
                    f"{'W' if key != 'W' else 'b'!r}")
    return p


def check_same_shape(where: str, dy: np.ndarray, shape: tuple, name: str = "output gradient"):
    if dy.shape != tuple(shape):
        raise ValueError(f"{where}: expected {name} of shape {tuple(shape)}, got {dy.shape}")


def flat(x: np.ndarray) -> np.ndarray:
    """A 1-D C-contiguous view (or copy, when ``x`` is not contiguous) of ``x``."""
    return np.ascontiguousarray(x).reshape(-1)
