"""MaxPool2D / AvgPool2D: plain-loop reference, finite differences, ties, NaN, errors."""
import numpy as np
import pytest

from fastbp import gradcheck, losses
from fastbp.kernels import pool as PK
from fastbp.layers import AvgPool2D, MaxPool2D

import naive

CASES = [(2, None), (3, None), (2, 1), (3, 2), ((2, 3), None), ((2, 3), (1, 2)), (1, None),
         (4, 3)]


def _ids(c):
    return f"size{c[0]}-stride{c[1]}"


@pytest.mark.parametrize("size,stride", CASES, ids=[_ids(c) for c in CASES])
@pytest.mark.parametrize("shape", [(1, 1, 4, 4), (2, 3, 7, 9), (3, 2, 8, 5)])
def test_pool_matches_naive(size, stride, shape, rng):
    x = rng.standard_normal(shape)
    y, idx = PK.maxpool2d_forward(x, size, stride)
    yr, ir = naive.maxpool2d(x, size, stride)
    np.testing.assert_array_equal(y, yr)
    np.testing.assert_array_equal(idx, ir)
    dy = rng.standard_normal(y.shape)
    np.testing.assert_allclose(PK.maxpool2d_backward(dy, idx, shape),
                               naive.maxpool2d_backward(dy, ir, shape), rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(PK.avgpool2d_forward(x, size, stride), naive.avgpool2d(x, size, stride),
                               rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(PK.avgpool2d_backward(dy, shape, size, stride),
                               naive.avgpool2d_backward(dy, shape, size, stride),
                               rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("layer", [MaxPool2D(2), MaxPool2D(3, 2), MaxPool2D((2, 3), 1),
                                   AvgPool2D(2), AvgPool2D(3, 2), AvgPool2D((2, 3), (1, 2))],
                         ids=str)
def test_pool_gradcheck(layer, rng):
    # distinct values far apart: no ties, so max pooling is differentiable everywhere here
    x = rng.permutation(2 * 2 * 7 * 6).reshape(2, 2, 7, 6) * 0.1
    y, _ = layer.forward({}, x)
    target = rng.standard_normal(y.shape)
    rep = gradcheck(layer, {}, x, target, losses.mse, eps=1e-4)
    assert rep.passed(1e-7), str(rep)


def test_max_ties_exactly_one_position_first_in_row_major_order():
    x = np.zeros((1, 1, 4, 4))
    x[0, 0, 2:, 2:] = [[1, 1], [1, 0]]
    layer = MaxPool2D(2)
    y, cache = layer.forward({}, x)
    dx, _ = layer.backward({}, cache, np.full(y.shape, 3.0))
    expected = np.zeros((4, 4))
    expected[0, 0] = 3.0          # all-zero window: the first position
    expected[0, 2] = 3.0
    expected[2, 0] = 3.0
    expected[2, 2] = 3.0          # three tied ones: the first
    np.testing.assert_array_equal(dx[0, 0], expected)


def test_max_overlapping_windows_accumulate():
    x = np.zeros((1, 1, 3, 3))
    x[0, 0, 1, 1] = 5.0           # the max of all four 2x2 windows with stride 1
    layer = MaxPool2D(2, 1)
    y, cache = layer.forward({}, x)
    np.testing.assert_array_equal(y, np.full((1, 1, 2, 2), 5.0))
    dx, _ = layer.backward({}, cache, np.ones_like(y))
    assert dx[0, 0, 1, 1] == 4.0 and dx.sum() == 4.0


def test_max_nan_propagates():
    x = np.arange(16.0).reshape(1, 1, 4, 4)
    x[0, 0, 0, 1] = np.nan
    y, idx = PK.maxpool2d_forward(x, 2)
    assert np.isnan(y[0, 0, 0, 0]) and idx[0, 0, 0, 0] == 1
    assert not np.isnan(y[0, 0, 1, 1])


def test_max_all_negative_inf():
    x = np.full((1, 1, 2, 2), -np.inf)
    y, idx = PK.maxpool2d_forward(x, 2)
    assert y[0, 0, 0, 0] == -np.inf and idx[0, 0, 0, 0] == 0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("Layer", [MaxPool2D, AvgPool2D])
def test_pool_dtype_and_float32_agrees(Layer, dtype, rng):
    x = rng.standard_normal((2, 3, 6, 6))
    layer = Layer(2)
    y64, c64 = layer.forward({}, x)
    dy = rng.standard_normal(y64.shape)
    dx64, _ = layer.backward({}, c64, dy)
    y, c = layer.forward({}, x.astype(dtype))
    dx, _ = layer.backward({}, c, dy.astype(dtype))
    assert y.dtype == dx.dtype == dtype
    np.testing.assert_allclose(y, y64, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(dx, dx64, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("size,stride", [(2, None), (3, 1)])
def test_pool_serial_parallel_identical(size, stride, rng, parallel_mode):
    x = rng.standard_normal((4, 5, 12, 10)).astype(np.float32)
    dy = None
    out = []
    for par in (False, True):
        parallel_mode(par, families=("pool",))
        y, idx = PK.maxpool2d_forward(x, size, stride)
        if dy is None:
            dy = rng.standard_normal(y.shape).astype(np.float32)
        a = PK.avgpool2d_forward(x, size, stride)
        out.append((y, idx, a, PK.maxpool2d_backward(dy, idx, x.shape),
                    PK.avgpool2d_backward(dy, x.shape, size, stride)))
    for a, r in zip(out[1], out[0]):
        np.testing.assert_array_equal(a, r)


def test_pool_input_grad_false_and_no_mutation(rng):
    x = rng.standard_normal((2, 2, 4, 4))
    x0 = x.copy()
    for layer in (MaxPool2D(2), AvgPool2D(2)):
        y, cache = layer.forward({}, x)
        assert layer.backward({}, cache, np.ones_like(y), input_grad=False) == (None, {})
    np.testing.assert_array_equal(x, x0)


def test_pool_repr_and_defaults():
    assert MaxPool2D(2).stride == (2, 2) and str(MaxPool2D(2)) == "MaxPool2D(2)"
    assert str(AvgPool2D((2, 3), 1)) == "AvgPool2D((2, 3), stride=1)"
    assert MaxPool2D(3, 2).output_shape((1, 4, 7, 8)) == (1, 4, 3, 3)


@pytest.mark.parametrize("Layer", [MaxPool2D, AvgPool2D])
def test_pool_errors(Layer):
    name = Layer.__name__
    with pytest.raises(ValueError, match=rf"{name}\(2\): expected input \(N, C, H, W\), got \(4, 4\)"):
        Layer(2).forward({}, np.zeros((4, 4)))
    with pytest.raises(ValueError, match=rf"{name}\(3\): window \(3, 3\) is larger than the input \(2, 5\)"):
        Layer(3).forward({}, np.zeros((1, 1, 2, 5)))
    with pytest.raises(TypeError, match=name):
        Layer(2).forward({}, np.zeros((1, 1, 2, 2), np.int32))
    y, cache = Layer(2).forward({}, np.zeros((1, 1, 4, 4), np.float32))
    with pytest.raises(ValueError, match=rf"{name}\(2\): expected output gradient of shape \(1, 1, 2, 2\)"):
        Layer(2).backward({}, cache, np.zeros((1, 1, 3, 3), np.float32))
    with pytest.raises(TypeError, match="output gradient dtype float64"):
        Layer(2).backward({}, cache, np.zeros((1, 1, 2, 2)))
    for bad in (0, (2, 0), 1.5, (2,)):
        with pytest.raises(ValueError, match=name):
            Layer(bad)
    with pytest.raises(ValueError, match="stride"):
        Layer(2, 0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("size, stride", [(2, 2), (3, 2), ((2, 3), (1, 2)), (3, 3)])
def test_max_special_values_match_reference(size, stride, dtype, rng):
    """The forward compares without NaN tests and redoes planes whose sum is NaN: NaN
    anywhere (several per window too), +inf next to -inf (an inf − inf sum), ties, and
    clean planes beside them all give the reference's values and arg-max positions."""
    x = rng.integers(-3, 4, size=(2, 4, 7, 8)).astype(dtype)   # many ties
    x[0, 0, 1, 1] = np.nan
    x[0, 1, 0, 0] = x[0, 1, 0, 1] = x[0, 1, 1, 0] = np.nan     # several NaNs in one window
    x[0, 2, 2, 2], x[0, 2, 5, 6] = np.inf, -np.inf             # plane sum inf − inf
    x[1, 3, :, :] = -np.inf
    x[1, 0, 3, :] = np.inf
    y, idx = PK.maxpool2d_forward(x, size, stride)
    y_ref, idx_ref = naive.maxpool2d(x, size, stride)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(idx, idx_ref)


def test_max_serial_and_parallel_builds_agree(rng):
    x = rng.standard_normal((3, 5, 10, 10)).astype(np.float32)
    x[1, 2, 4, 4] = np.nan
    for kernel, args in ((PK.max_forward_2x2, ()), (PK.max_forward, (3, 3, 2, 2))):
        OH = 5 if not args else 4
        outs = []
        for build in (kernel.serial, kernel.parallel):
            y = np.empty((3, 5, OH, OH), np.float32)
            idx = np.empty((3, 5, OH, OH), np.int32)
            build(x, *args, y, idx)
            outs.append((y, idx))
        np.testing.assert_array_equal(outs[0][0], outs[1][0])
        np.testing.assert_array_equal(outs[0][1], outs[1][1])
