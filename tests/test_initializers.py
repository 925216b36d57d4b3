"""Initializers: shapes, dtypes, statistics, orthogonality, lookup by name or callable."""
import numpy as np
import pytest

import fastbp as F
from fastbp import initializers as I

NAMED = ["zeros", "normal", "uniform", "glorot_uniform", "xavier_uniform", "glorot_normal",
         "xavier_normal", "he_normal", "kaiming_normal", "he_uniform", "kaiming_uniform",
         "orthogonal"]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(7, 5), (5, 7), (4, 3, 2, 2)], ids=lambda s: f"{s}")
@pytest.mark.parametrize("name", NAMED)
def test_shape_dtype_reproducible(name, shape, dtype):
    init = I.get(name)
    fan_in, fan_out = shape[0], shape[1]
    a = init(np.random.default_rng(0), shape, dtype, fan_in, fan_out)
    b = init(np.random.default_rng(0), shape, dtype, fan_in, fan_out)
    assert a.shape == shape and a.dtype == dtype and a.flags.c_contiguous
    assert np.all(np.isfinite(a))
    np.testing.assert_array_equal(a, b)
    if name != "zeros":
        c = init(np.random.default_rng(1), shape, dtype, fan_in, fan_out)
        assert not np.array_equal(a, c)
        assert len(np.unique(a)) > a.size // 2


def _draw(init, fan_in, fan_out, n=400_000):
    return init(np.random.default_rng(3), (n // fan_out, fan_out), np.float64, fan_in, fan_out)


@pytest.mark.parametrize("fan_in,fan_out", [(100, 50), (784, 256), (3, 10)])
def test_statistics(fan_in, fan_out):
    tol = 0.01   # relative; 400k samples give a std estimate to ~0.2%
    w = _draw(I.he_normal, fan_in, fan_out)
    assert abs(w.mean()) < 5 * np.sqrt(2 / fan_in) / np.sqrt(w.size)
    assert w.std() == pytest.approx(np.sqrt(2 / fan_in), rel=tol)

    w = _draw(I.glorot_normal, fan_in, fan_out)
    assert w.std() == pytest.approx(np.sqrt(2 / (fan_in + fan_out)), rel=tol)

    a = np.sqrt(6 / (fan_in + fan_out))
    w = _draw(I.glorot_uniform, fan_in, fan_out)
    assert w.min() >= -a and w.max() <= a
    assert w.min() < -0.999 * a and w.max() > 0.999 * a      # the bound is reached, not just respected
    assert w.std() == pytest.approx(a / np.sqrt(3), rel=tol)

    a = np.sqrt(6 / fan_in)
    w = _draw(I.he_uniform, fan_in, fan_out)
    assert w.min() >= -a and w.max() <= a and w.max() > 0.999 * a
    assert w.std() == pytest.approx(a / np.sqrt(3), rel=tol)


def test_factories():
    w = I.normal(0.3)(np.random.default_rng(0), (500, 400), np.float64)
    assert w.std() == pytest.approx(0.3, rel=0.01)
    w = I.uniform(0.2)(np.random.default_rng(0), (500, 400), np.float32)
    assert w.dtype == np.float32 and -0.2 <= w.min() and w.max() <= 0.2 and w.max() > 0.199
    assert np.all(I.zeros(None, (3, 2), np.float32) == 0)
    with pytest.raises(ValueError, match="normal: std must be >= 0"):
        I.normal(-1)
    with pytest.raises(ValueError, match="uniform: limit must be >= 0"):
        I.uniform(-1)


@pytest.mark.parametrize("shape", [(8, 8), (12, 5), (5, 12), (6, 2, 3, 3), (1, 4), (4, 1)],
                         ids=lambda s: f"{s}")
def test_orthogonal(shape):
    q = I.orthogonal(np.random.default_rng(0), shape, np.float64)
    assert q.shape == shape
    m = q.reshape(shape[0], -1)
    rows, cols = m.shape
    if rows >= cols:
        np.testing.assert_allclose(m.T @ m, np.eye(cols), atol=1e-12)    # QᵀQ = I
    else:
        np.testing.assert_allclose(m @ m.T, np.eye(rows), atol=1e-12)    # rows orthonormal
    q2 = I.orthogonal(np.random.default_rng(0), shape, np.float64, gain=2.0)
    np.testing.assert_allclose(q2, 2 * q, rtol=1e-14)
    q32 = I.orthogonal(np.random.default_rng(0), shape, np.float32)
    assert q32.dtype == np.float32
    np.testing.assert_allclose(q32, q, rtol=1e-6, atol=1e-7)


def test_lookup():
    assert I.get("he_normal") is I.he_normal
    assert I.get("kaiming_normal") is I.he_normal
    assert I.get("xavier_uniform") is I.glorot_uniform
    assert I.get(I.orthogonal) is I.orthogonal
    custom = I.normal(0.5)
    assert I.get(custom) is custom
    for bad in ("he", "Glorot_Uniform", "", 3, None):
        with pytest.raises(ValueError, match="unknown initializer"):
            I.get(bad)


def test_layers_use_the_named_initializer():
    rng = np.random.default_rng
    W = F.Dense(300, 200, init="he_normal").init(rng(0), np.float64)["W"]
    np.testing.assert_array_equal(W, I.he_normal(rng(0), (300, 200), np.float64, 300, 200))
    W = F.Dense(30, 20, init="orthogonal").init(rng(0), np.float32)["W"]
    np.testing.assert_allclose(W.T @ W, np.eye(20), atol=1e-5)
    W = F.Dense(300, 200).init(rng(0), np.float64)["W"]      # default: glorot_uniform
    a = np.sqrt(6 / 500)
    assert W.max() <= a and W.min() >= -a and W.std() == pytest.approx(a / np.sqrt(3), rel=0.02)
    p = F.Maxout(10, 4, pieces=3, init="zeros").init(rng(0), np.float32)
    assert p["W"].shape == (10, 12) and np.all(p["W"] == 0) and p["b"].shape == (12,)
