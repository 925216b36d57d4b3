"""Sequential and the functional API: fusion, input_grad, predict, init, count_params,
grad_norms, and gradcheck itself."""
import re

import numpy as np
import pytest

import fastbp as F
from fastbp import _tree, network

import naive


def wloss(y, w):
    return float(np.sum(y * w)), w.copy()


def mse(y, t):
    """Local squared error: L = mean((y − t)²), dL/dy = 2(y − t)/n."""
    d = y - t
    return float(np.mean(d * d)), (2.0 / d.size) * d


def randomize(params, rng):
    return _tree.tree_map(lambda a: (0.5 * rng.standard_normal(a.shape)).astype(a.dtype), params)


def mlp(*sizes, act=F.ReLU):
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [F.Dense(a, b), act()]
    return F.Sequential(*layers[:-1])


# ---------------------------------------------------------------- count_params
def test_count_params_60600():
    # 100-unit input, 5 hidden layers of 100, 100-unit output: 6 Dense layers of 100·100 + 100
    model = mlp(100, 100, 100, 100, 100, 100, 100)
    assert sum(isinstance(layer, F.Dense) for layer in model.layers) == 6
    assert F.count_params(F.init(model)) == 60_600


def test_count_params_other_trees():
    assert F.count_params([]) == 0
    assert F.count_params({"W": np.zeros((3, 4))}) == 12
    nested = F.Sequential(F.Dense(2, 3, bias=False), F.Sequential(F.Dense(3, 4), F.Tanh()))
    assert F.count_params(F.init(nested)) == 6 + 12 + 4


# ---------------------------------------------------------------- init
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_init_reproducible_and_dtype(dtype):
    model = F.Sequential(F.Dense(5, 4), F.ReLU(), F.Maxout(4, 3, 2),
                         F.Sequential(F.Dense(3, 2), F.Tanh()))
    p1 = F.init(model, seed=7, dtype=dtype)
    p2 = F.init(model, seed=7, dtype=dtype)
    p3 = F.init(model, seed=8, dtype=dtype)
    assert isinstance(p1, list) and len(p1) == 4 and isinstance(p1[3], list)
    assert p1[1] == {} and set(p1[0]) == {"W", "b"} and p1[0]["W"].shape == (5, 4)
    assert _tree.same_structure(p1, p3)
    for a, b, c in zip(_tree.leaves(p1), _tree.leaves(p2), _tree.leaves(p3)):
        assert a.dtype == dtype and a.flags.c_contiguous
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(p1[0]["W"], p3[0]["W"])
    # the default is float32
    assert all(a.dtype == np.float32 for a in _tree.leaves(F.init(model)))


def test_init_errors():
    with pytest.raises(TypeError, match="float32 or float64"):
        F.init(F.Dense(2, 3), dtype=np.int64)
    with pytest.raises(TypeError, match="init: model must implement"):
        F.init(object())


# ---------------------------------------------------------------- Sequential structure
def test_sequential_structure():
    layers = [F.Dense(3, 4), F.ReLU(), F.Dense(4, 2)]
    model = F.Sequential(*layers)
    assert F.Sequential(layers) == model and hash(F.Sequential(layers)) == hash(model)
    assert len(model) == 3 and model[2] == F.Dense(4, 2)
    with pytest.raises(AttributeError, match="immutable"):
        model.layers = ()
    with pytest.raises(TypeError, match="Sequential: item 1"):
        F.Sequential(F.Dense(3, 4), "relu")
    assert "Dense(in_features=3" in repr(model)


def test_sequential_param_and_cache_errors(rng):
    model = mlp(3, 4, 2)
    params = F.init(model, dtype=np.float64)
    x = rng.standard_normal((2, 3))
    with pytest.raises(ValueError, match="expected params as a list of 3 entries"):
        F.forward(model, params[:2], x)
    with pytest.raises(ValueError, match="expected params as a list of 3 entries.*dict"):
        F.forward(model, params[0], x)
    y, cache = F.forward(model, params, x)
    with pytest.raises(ValueError, match="cache does not come from this model"):
        F.backward(model, params, cache[:2], np.ones_like(y))
    with pytest.raises(ValueError, match=re.escape("Dense(4, 2): expected output gradient of shape (2, 2), got (2, 3)")):
        F.backward(model, params, cache, np.ones((2, 3)))
    with pytest.raises(ValueError, match=re.escape("Dense(3, 4): expected input (..., 3), got (2, 4)")):
        F.forward(model, params, np.ones((2, 4)))
    with pytest.raises(TypeError, match="does not match"):
        F.forward(model, params, x.astype(np.float32))


# ---------------------------------------------------------------- fusion
_layer_by_layer = naive.layer_by_layer   # no fusion: the reference


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(9, 6), (2, 5, 6), (6,)], ids=lambda s: f"x{s}")
def test_fused_dense_relu_identical_to_layer_by_layer(shape, dtype, rng):
    model = F.Sequential(F.Dense(6, 8), F.ReLU(), F.Dense(8, 5), F.ReLU(), F.Dense(5, 3))
    params = randomize(F.init(model, dtype=dtype), rng)
    x = rng.standard_normal(shape).astype(dtype)
    dy = rng.standard_normal(shape[:-1] + (3,)).astype(dtype)
    y, cache = F.forward(model, params, x)
    assert cache[1] is network._FUSED and cache[3] is network._FUSED   # fusion did happen
    assert np.any(y != 0)
    dx, grads = F.backward(model, params, cache, dy)
    y_ref, dx_ref, g_ref = _layer_by_layer(model, params, x, dy)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(dx, dx_ref)
    assert _tree.same_structure(grads, g_ref)
    for a, b in zip(_tree.leaves(grads), _tree.leaves(g_ref)):
        assert a.dtype == dtype
        np.testing.assert_array_equal(a, b)
    # the intermediate ReLU outputs really were negative somewhere (the mask matters)
    h = model.layers[0].forward(params[0], x)[0]
    assert np.any(h < 0) and np.any(h > 0)


def test_no_fusion_across_other_layers(rng):
    model = F.Sequential(F.Dense(4, 4), F.Identity(), F.ReLU())
    params = randomize(F.init(model, dtype=np.float64), rng)
    x = rng.standard_normal((3, 4))
    y, cache = F.forward(model, params, x)
    assert network._FUSED not in cache
    fused = F.Sequential(F.Dense(4, 4), F.ReLU())
    np.testing.assert_array_equal(y, F.forward(fused, [params[0], {}], x)[0])


# ---------------------------------------------------------------- input_grad=False
class Spy(F.Layer):
    """Identity layer that records backward calls (and, optionally, lacks the input_grad kw)."""

    def __init__(self, log):
        self.log = log

    def forward(self, params, x, *, train=False, rng=None):
        return x, None

    def backward(self, params, cache, dy):
        self.log.append("backward")
        return dy, {}


def test_input_grad_false_skips_leading_layers(rng):
    log = []
    model = F.Sequential(Spy(log), F.Flatten(), F.Dropout(0.3), F.Dense(12, 5), F.ReLU(),
                         F.Sequential(F.Dense(5, 4), F.Tanh()), Spy(log), F.Dense(4, 2))
    params = randomize(F.init(model, dtype=np.float64), rng)
    x = rng.standard_normal((3, 2, 3, 2))
    y, cache = F.forward(model, params, x, train=True, seed=1)
    dy = rng.standard_normal(y.shape)
    dx1, g1 = F.backward(model, params, cache, dy, input_grad=True)
    assert log == ["backward", "backward"] and dx1.shape == x.shape
    log.clear()
    dx0, g0 = F.backward(model, params, cache, dy, input_grad=False)
    assert dx0 is None
    assert log == ["backward"]                      # the leading Spy did not run
    assert _tree.same_structure(g0, g1)
    for a, b in zip(_tree.leaves(g0), _tree.leaves(g1)):
        np.testing.assert_array_equal(a, b)


class RecordingDense(F.Dense):
    """A Dense that records the input_grad flag each backward call receives."""

    def __init__(self, log, *args):
        super().__init__(*args)
        object.__setattr__(self, "log", log)

    def backward(self, params, cache, dy, *, input_grad=True):
        self.log.append(input_grad)
        return super().backward(params, cache, dy, input_grad=input_grad)


def test_input_grad_false_skips_first_layers_dx(rng):
    """Only the first layer with params is told to skip its dx; the later ones need theirs."""
    log = []
    model = F.Sequential(F.Tanh(), RecordingDense(log, 3, 4), F.Sigmoid(), RecordingDense(log, 4, 2))
    params = randomize(F.init(model, dtype=np.float64), rng)
    y, cache = F.forward(model, params, rng.standard_normal((5, 3)))
    F.backward(model, params, cache, np.ones_like(y), input_grad=False)
    assert log == [True, False]          # backward order: last Dense first
    log.clear()
    F.backward(model, params, cache, np.ones_like(y), input_grad=True)
    assert log == [True, True]


def test_input_grad_false_model_without_params(rng):
    model = F.Sequential(F.Tanh(), F.Sequential(F.Sigmoid()))
    x = rng.standard_normal((2, 3))
    y, cache = F.forward(model, F.init(model), x)
    dx, grads = F.backward(model, F.init(model), cache, np.ones_like(y), input_grad=False)
    assert dx is None and _tree.leaves(grads) == []


def test_layer_without_input_grad_keyword(rng):
    """A user layer whose backward has no input_grad keyword still works, both ways."""
    log = []
    x = rng.standard_normal((2, 3))
    y, cache = F.forward(Spy(log), {}, x)
    dx, g = F.backward(Spy(log), {}, cache, x, input_grad=False)
    assert dx is None and g == {}
    dx, g = F.backward(Spy(log), {}, cache, x)
    np.testing.assert_array_equal(dx, x)


# ---------------------------------------------------------------- forward/backward API
def test_forward_seed_reproducible(rng):
    model = F.Sequential(F.Dense(6, 6), F.Dropout(0.5), F.NoisyReLU(0.3), F.Dense(6, 2))
    params = F.init(model, dtype=np.float64)
    x = rng.standard_normal((4, 6))
    a = F.forward(model, params, x, train=True, seed=5)[0]
    b = F.forward(model, params, x, train=True, seed=5)[0]
    c = F.forward(model, params, x, train=True, seed=6)[0]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    e1 = F.forward(model, params, x, train=False, seed=5)[0]
    e2 = F.forward(model, params, x, train=False, seed=6)[0]
    np.testing.assert_array_equal(e1, e2)


def test_backward_is_deterministic_and_pure(rng):
    model = mlp(5, 7, 7, 3, act=F.Tanh)
    params = randomize(F.init(model, dtype=np.float64), rng)
    before = [a.copy() for a in _tree.leaves(params)]
    x = rng.standard_normal((4, 5))
    x0 = x.copy()
    y, cache = F.forward(model, params, x)
    dy = rng.standard_normal(y.shape)
    dy0 = dy.copy()
    r1 = F.backward(model, params, cache, dy)
    r2 = F.backward(model, params, cache, dy)
    np.testing.assert_array_equal(r1[0], r2[0])
    for a, b in zip(_tree.leaves(r1[1]), _tree.leaves(r2[1])):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(dy, dy0)
    for a, b in zip(_tree.leaves(params), before):
        np.testing.assert_array_equal(a, b)


def test_functional_api_on_single_layer(rng):
    layer = F.Dense(3, 2)
    params = F.init(layer, dtype=np.float64)
    assert set(params) == {"W", "b"}
    x = rng.standard_normal((4, 3))
    y, cache = F.forward(layer, params, x)
    np.testing.assert_allclose(y, x @ params["W"])
    dx, g = F.backward(layer, params, cache, np.ones_like(y), input_grad=False)
    assert dx is None and set(g) == {"W", "b"}


def test_gradients_through_network_squared_error(rng):
    model = F.Sequential(F.Dense(4, 6), F.Tanh(), F.Dense(6, 6), F.ReLU(), F.Dense(6, 2))
    params = randomize(F.init(model, dtype=np.float64), rng)
    x = rng.standard_normal((5, 4))
    report = F.gradcheck(model, params, x, rng.standard_normal((5, 2)), mse)
    assert report.passed(1e-6), str(report)


# ---------------------------------------------------------------- predict
@pytest.mark.parametrize("batch_size", [1, 7, 25, 26, 1000])
def test_predict_batches_equal_all_at_once(batch_size, rng):
    model = F.Sequential(F.Dense(6, 8), F.ReLU(), F.Dropout(0.5), F.Dense(8, 3), F.Softmax())
    params = F.init(model, seed=3, dtype=np.float64)
    x = rng.standard_normal((25, 6))
    all_at_once = F.predict(model, params, x)
    np.testing.assert_array_equal(all_at_once, F.forward(model, params, x, train=False)[0])
    batched = F.predict(model, params, x, batch_size=batch_size)
    assert batched.shape == (25, 3)
    np.testing.assert_allclose(batched, all_at_once, rtol=1e-13, atol=1e-15)


def test_predict_converts_data_to_params_dtype(rng):
    model = mlp(4, 5, 3)
    params = F.init(model, seed=1, dtype=np.float32)
    x64 = rng.standard_normal((6, 4))
    y = F.predict(model, params, x64)
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, F.predict(model, params, x64.astype(np.float32)))
    xi = rng.integers(0, 5, size=(6, 4))
    np.testing.assert_array_equal(F.predict(model, params, xi, batch_size=4),
                                  F.predict(model, params, xi.astype(np.float32)))
    # the caller's data is untouched
    assert x64.dtype == np.float64


@pytest.mark.parametrize("return_sequences", [True, False])
def test_predict_time_major_batches(return_sequences, rng):
    """batch_axis=1 splits (T, N, D) sequences by sample, not by time step."""
    model = F.Sequential(F.LSTM(3, 5, return_sequences=return_sequences), F.Dense(5, 2))
    params = F.init(model, seed=0, dtype=np.float64)
    x = rng.standard_normal((7, 10, 3))
    ref = F.forward(model, params, x)[0]
    got = F.predict(model, params, x, batch_size=3, batch_axis=1)
    assert got.shape == ref.shape == ((7, 10, 2) if return_sequences else (10, 2))
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="predict: batch_axis must be 0 or 1"):
        F.predict(model, params, x, batch_size=3, batch_axis=2)


def test_predict_errors(rng):
    model = mlp(4, 3)
    params = F.init(model)
    with pytest.raises(ValueError, match="predict: batch_size must be >= 1, got 0"):
        F.predict(model, params, np.ones((5, 4)), batch_size=0)
    with pytest.raises(TypeError, match="predict"):
        F.predict(model, params, np.array([["a"] * 4]))


# ---------------------------------------------------------------- grad_norms
def test_grad_norms(rng):
    model = F.Sequential(F.Dense(3, 4), F.ReLU(), F.Dense(4, 2),
                         F.Sequential(F.Dense(2, 2, bias=False), F.Tanh()))
    params = randomize(F.init(model, dtype=np.float64), rng)
    x = rng.standard_normal((5, 3))
    y, cache = F.forward(model, params, x)
    _, grads = F.backward(model, params, cache, rng.standard_normal(y.shape))
    norms = F.grad_norms(grads)
    assert list(norms) == ["0", "2", "3.0"]

    def l2(*arrays):
        return np.sqrt(sum(np.sum(a.astype(np.float64) ** 2) for a in arrays))

    np.testing.assert_allclose(norms["0"], l2(grads[0]["W"], grads[0]["b"]), rtol=1e-12)
    np.testing.assert_allclose(norms["2"], l2(grads[2]["W"], grads[2]["b"]), rtol=1e-12)
    np.testing.assert_allclose(norms["3.0"], l2(grads[3][0]["W"]), rtol=1e-12)
    assert all(isinstance(v, float) and v > 0 for v in norms.values())
    per = F.grad_norms(grads, per_array=True)
    assert set(per) == {"0.W", "0.b", "2.W", "2.b", "3.0.W"}
    np.testing.assert_allclose(per["2.b"], l2(grads[2]["b"]), rtol=1e-12)
    # a single layer's grads (a dict) is "layer 0", as a bare array is
    assert list(F.grad_norms(grads[0])) == ["0"]
    assert F.grad_norms({"W": np.full((2, 2), 3.0, np.float32)}) == {"0": 6.0}


def test_grad_norms_float32_no_overflow():
    g = [{"W": np.full(4, 1e30, np.float32)}]
    assert F.grad_norms(g)["0"] == pytest.approx(2e30)


# ---------------------------------------------------------------- gradcheck itself
class BadDense(F.Dense):
    """A Dense whose weight gradient is 1% off (gradcheck must notice)."""

    def backward(self, params, cache, dy, *, input_grad=True):
        dx, g = super().backward(params, cache, dy, input_grad=input_grad)
        return dx, dict(g, W=g["W"] * 1.01)


def test_gradcheck_detects_wrong_gradient(rng):
    model = F.Sequential(BadDense(3, 2), F.Tanh())
    params = randomize(F.init(model, dtype=np.float64), rng)
    x = rng.standard_normal((4, 3))
    report = F.gradcheck(model, params, x, rng.standard_normal((4, 2)), wloss)
    assert set(report.errors) == {"0.W", "0.b", "x"}
    assert report.errors["0.W"] == pytest.approx(0.01 / 1.01, rel=1e-3)
    assert report.errors["0.b"] < 1e-8 and report.errors["x"] < 1e-8
    assert not report.passed() and report.max_error == report.errors["0.W"]
    assert "0.W" in str(report)


def test_gradcheck_options(rng):
    model = F.Sequential(F.Dense(6, 5), F.Sigmoid())
    params = randomize(F.init(model, dtype=np.float32), rng)        # float32 in: checked in float64
    x = rng.standard_normal((4, 6)).astype(np.float32)
    w = rng.standard_normal((4, 5))
    report = F.gradcheck(model, params, x, w, wloss, max_checks=7, check_input=False)
    assert set(report.errors) == {"0.W", "0.b"}
    assert report.checked == {"0.W": 7, "0.b": 5}
    assert report.passed(1e-6), str(report)
    assert params[0]["W"].dtype == np.float32


def test_gradcheck_non_contiguous_arrays(rng):
    """Transposed (Fortran-ordered) params and inputs, as exported from torch (W = weight.T)."""
    model = F.Dense(4, 3)
    params = {"W": np.asfortranarray(rng.standard_normal((4, 3))), "b": rng.standard_normal(3)}
    x = np.asfortranarray(rng.standard_normal((5, 4)))
    report = F.gradcheck(model, params, x, rng.standard_normal((5, 3)), wloss)
    assert report.passed(1e-6), str(report)


def test_gradcheck_rejects_grads_of_the_wrong_structure(rng):
    class NoBiasGrad(F.Dense):
        def backward(self, params, cache, dy, *, input_grad=True):
            dx, g = super().backward(params, cache, dy, input_grad=input_grad)
            return dx, {"W": g["W"]}

    params = F.init(NoBiasGrad(3, 2), dtype=np.float64)
    with pytest.raises(ValueError, match="gradcheck: the grads"):
        F.gradcheck(NoBiasGrad(3, 2), params, np.ones((2, 3)), np.ones((2, 2)), wloss)
