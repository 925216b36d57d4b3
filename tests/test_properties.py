"""Property-based tests (hypothesis): random shapes and values for Dense, Maxout and every
activation; gradients against central differences, and the documented errors for random
mismatched shapes and dtypes. The number of examples comes from the profile in conftest.py."""
import re

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

import fastbp as F  # noqa: E402
from fd import central_diff


def check_grads(layer, params, x, w):
    """backward(dy = w) against central differences of L = Σ forward(x)·w."""
    def L():
        return float(np.sum(layer.forward(params, x)[0] * w))

    y, cache = layer.forward(params, x)
    dx, grads = layer.backward(params, cache, w.copy())
    assert dx.shape == x.shape and set(grads) == set(params)
    np.testing.assert_allclose(dx, central_diff(L, x), rtol=1e-5, atol=1e-7)
    for k in params:
        np.testing.assert_allclose(grads[k], central_diff(L, params[k]), rtol=1e-5, atol=1e-7)


def floats(lo=-3.0, hi=3.0, gap=0.0, width=64):
    """Finite floats in [lo, hi], at least ``gap`` away from 0 when gap > 0."""
    s = st.floats(lo, hi, allow_nan=False, allow_infinity=False, width=width)
    return s.filter(lambda v: abs(v) >= gap) if gap else s


lead_shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=1, max_side=3)


# ---------------------------------------------------------------- gradients
@given(data=st.data(), lead=lead_shapes, D=st.integers(1, 4), M=st.integers(1, 4),
       bias=st.booleans())
def test_dense_gradients(data, lead, D, M, bias):
    layer = F.Dense(D, M, bias=bias)
    params = {"W": data.draw(hnp.arrays(np.float64, (D, M), elements=floats()))}
    if bias:
        params["b"] = data.draw(hnp.arrays(np.float64, (M,), elements=floats()))
    x = data.draw(hnp.arrays(np.float64, lead + (D,), elements=floats()))
    w = data.draw(hnp.arrays(np.float64, lead + (M,), elements=floats()))
    check_grads(layer, params, x, w)


@given(data=st.data(), N=st.integers(1, 4), D=st.integers(1, 4), M=st.integers(1, 3),
       pieces=st.integers(1, 3))
def test_maxout_gradients(data, N, D, M, pieces):
    layer = F.Maxout(D, M, pieces=pieces)
    params = {"W": data.draw(hnp.arrays(np.float64, (D, M * pieces), elements=floats())),
              "b": data.draw(hnp.arrays(np.float64, (M * pieces,), elements=floats()))}
    x = data.draw(hnp.arrays(np.float64, (N, D), elements=floats()))
    z = (x @ params["W"] + params["b"]).reshape(N, M, pieces)
    zs = np.sort(z, axis=-1)
    # the arg-max must be unique by a margin, or the max is not differentiable there
    hypothesis.assume(pieces == 1 or np.all(zs[..., -1] - zs[..., -2] > 1e-4))
    w = data.draw(hnp.arrays(np.float64, (N, M), elements=floats()))
    check_grads(layer, params, x, w)


def activation(draw_alpha):
    return st.one_of(
        st.just(F.Identity()), st.just(F.Sigmoid()), st.just(F.Tanh()), st.just(F.ReLU()),
        st.just(F.GELU()), st.just(F.Softmax()),
        draw_alpha.map(F.LeakyReLU), draw_alpha.map(F.ELU))


@given(data=st.data(), layer=activation(st.floats(0.0, 2.0)),
       shape=hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=4))
def test_activation_gradients(data, layer, shape):
    # 1e-3 away from 0 keeps the ±1e-6 steps on one side of ReLU-like kinks
    x = data.draw(hnp.arrays(np.float64, shape, elements=floats(-6, 6, gap=1e-3)))
    w = data.draw(hnp.arrays(np.float64, shape, elements=floats()))
    check_grads(layer, {}, x, w)


@given(data=st.data(), layer=activation(st.floats(0.0, 2.0)),
       shape=hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=5),
       dtype=st.sampled_from([np.float32, np.float64]))
def test_activation_dtype_and_shape(data, layer, shape, dtype):
    x = data.draw(hnp.arrays(dtype, shape, elements=st.floats(-1e4, 1e4, width=32)))
    y, cache = layer.forward({}, x)
    dx, grads = layer.backward({}, cache, np.ones_like(y))
    assert y.dtype == dtype and dx.dtype == dtype
    assert y.shape == shape and dx.shape == shape and grads == {}
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(dx))


@given(data=st.data(), lead=hnp.array_shapes(min_dims=1, max_dims=2, min_side=1, max_side=4),
       D=st.integers(1, 5), M=st.integers(1, 5), dtype=st.sampled_from([np.float32, np.float64]))
def test_fused_dense_relu_equals_separate_layers(data, lead, D, M, dtype):
    dense = F.Dense(D, M)
    f32 = floats(width=32)
    params = {"W": data.draw(hnp.arrays(dtype, (D, M), elements=f32)),
              "b": data.draw(hnp.arrays(dtype, (M,), elements=f32))}
    x = data.draw(hnp.arrays(dtype, lead + (D,), elements=f32))
    dy = data.draw(hnp.arrays(dtype, lead + (M,), elements=f32))
    model = F.Sequential(dense, F.ReLU())
    y, cache = model.forward([params, {}], x)
    dx, grads = model.backward([params, {}], cache, dy)
    z, c1 = dense.forward(params, x)
    r, c2 = F.ReLU().forward({}, z)
    dz, _ = F.ReLU().backward({}, c2, dy)
    dx_ref, g_ref = dense.backward(params, c1, dz)
    np.testing.assert_array_equal(y, r)
    np.testing.assert_array_equal(dx, dx_ref)
    np.testing.assert_array_equal(grads[0]["W"], g_ref["W"])
    np.testing.assert_array_equal(grads[0]["b"], g_ref["b"])


# ---------------------------------------------------------------- errors
@given(lead=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=3),
       D=st.integers(1, 6), M=st.integers(1, 6), wrong=st.integers(0, 7),
       maxout=st.booleans())
def test_dense_wrong_input_shape(lead, D, M, wrong, maxout):
    hypothesis.assume(wrong != D)
    layer = F.Maxout(D, M, pieces=2) if maxout else F.Dense(D, M)
    params = layer.init(np.random.default_rng(0), np.float64)
    shape = lead + (wrong,)
    msg = f"{layer}: expected input (..., {D}), got {shape}"
    with pytest.raises(ValueError, match="^" + re.escape(msg) + "$"):
        layer.forward(params, np.zeros(shape))


@given(D=st.integers(1, 5), M=st.integers(1, 5), shape=st.tuples(st.integers(1, 6), st.integers(1, 6)))
def test_dense_wrong_weight_shape(D, M, shape):
    hypothesis.assume(shape != (D, M))
    layer = F.Dense(D, M)
    params = {"W": np.zeros(shape), "b": np.zeros(M)}
    msg = f"Dense({D}, {M}): expected parameter W of shape {(D, M)}, got {shape}"
    with pytest.raises(ValueError, match=re.escape(msg)):
        layer.forward(params, np.zeros((2, D)))


@given(layer=activation(st.floats(0.0, 2.0)) | st.just(F.Dropout(0.3)) | st.just(F.NoisyReLU()),
       shape=hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=4),
       bad=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))
def test_activation_wrong_dy_shape(layer, shape, bad):
    hypothesis.assume(bad != shape)
    y, cache = layer.forward({}, np.zeros(shape), train=True, rng=np.random.default_rng(0))
    msg = f"{layer}: expected output gradient of shape {shape}, got {bad}"
    with pytest.raises(ValueError, match="^" + re.escape(msg) + "$"):
        layer.backward({}, cache, np.zeros(bad))


@given(data=st.data(), shape=hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=4),
       layer=activation(st.floats(0.0, 2.0)) | st.builds(F.Dense, st.just(4), st.integers(1, 3)),
       x_dtype=st.sampled_from([np.float32, np.float64]))
def test_mixed_dtypes_raise(data, shape, layer, x_dtype):
    other = np.float64 if x_dtype == np.float32 else np.float32
    shape = shape[:-1] + (4,)
    params = layer.init(np.random.default_rng(0), x_dtype)
    y, cache = layer.forward(params, np.ones(shape, x_dtype))
    with pytest.raises(TypeError, match=re.escape(str(layer))):
        layer.backward(params, cache, np.ones(y.shape, other))
    if params:
        with pytest.raises(TypeError, match=re.escape(str(layer)) + ".*does not match"):
            layer.forward(params, np.ones(shape, other))
