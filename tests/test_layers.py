"""Layers: finite differences, plain-loop references, dtypes, errors, purity, dropout, stability."""
import dataclasses
import re

import numba
import numpy as np
import pytest

import fastbp as F
from fastbp import _tree, config
from fd import central_diff


# ---------------------------------------------------------------- helpers
def wloss(y, w):
    """L = Σ y·w (a weighted sum: every output element gets its own weight); dL/dy = w."""
    return float(np.sum(y * w)), w.copy()


def off_kinks(x, margin=0.1):
    """Push values away from 0 (the kink of ReLU-like functions) so finite differences are valid."""
    return np.where(x >= 0, x + margin, x - margin)


def randomize(params, rng, scale=0.5):
    """Random values in every parameter array (init leaves biases at zero, which hides bugs)."""
    return {k: (scale * rng.standard_normal(v.shape)).astype(v.dtype) for k, v in params.items()}


# Every layer, with an input shape it accepts (used by the generic tests below).
LAYERS = {
    "dense": (F.Dense(4, 3), (5, 4)),
    "dense_nobias": (F.Dense(4, 3, bias=False), (2, 5, 4)),
    "maxout": (F.Maxout(4, 3, pieces=2), (5, 4)),
    "identity": (F.Identity(), (3, 4)),
    "sigmoid": (F.Sigmoid(), (3, 4)),
    "tanh": (F.Tanh(), (3, 4)),
    "relu": (F.ReLU(), (3, 4)),
    "leaky_relu": (F.LeakyReLU(0.2), (3, 4)),
    "elu": (F.ELU(0.7), (3, 4)),
    "gelu": (F.GELU(), (2, 3, 4)),
    "softmax": (F.Softmax(), (3, 5)),
    "noisy_relu": (F.NoisyReLU(0.5), (3, 4)),
    "dropout": (F.Dropout(0.4), (3, 4)),
    "flatten": (F.Flatten(), (2, 3, 2, 2)),
}
LAYER_IDS = list(LAYERS)
ACTIVATIONS = ["identity", "sigmoid", "tanh", "relu", "leaky_relu", "elu", "gelu", "softmax",
               "noisy_relu", "dropout"]
DTYPES = [np.float32, np.float64]


def setup(name, dtype, rng):
    layer, shape = LAYERS[name]
    params = randomize(layer.init(np.random.default_rng(0), dtype), rng)
    x = off_kinks(rng.standard_normal(shape)).astype(dtype)
    return layer, params, x


def fwd_bwd(layer, params, x, dy=None, seed=3, train=True, input_grad=True):
    y, cache = layer.forward(params, x, train=train, rng=np.random.default_rng(seed))
    if dy is None:
        dy = np.random.default_rng(seed + 1).standard_normal(y.shape).astype(y.dtype)
    dx, grads = layer.backward(params, cache, dy, input_grad=input_grad)
    return y, dy, dx, grads


# ---------------------------------------------------------------- finite differences (gradcheck)
GRADCHECK_CASES = [
    ("dense_0lead", F.Dense(3, 2), (3,)),
    ("dense_1lead", F.Dense(4, 3), (5, 4)),
    ("dense_2lead", F.Dense(4, 3), (2, 3, 4)),
    ("dense_3lead", F.Dense(3, 2), (2, 2, 3, 3)),
    ("dense_nobias", F.Dense(4, 3, bias=False), (5, 4)),
    ("dense_nobias_2lead", F.Dense(4, 3, bias=False), (2, 3, 4)),
    ("maxout_p1", F.Maxout(4, 3, pieces=1), (5, 4)),
    ("maxout_p2", F.Maxout(4, 3, pieces=2), (5, 4)),
    ("maxout_p3", F.Maxout(4, 3, pieces=3), (2, 3, 4)),
    ("identity", F.Identity(), (4, 5)),
    ("sigmoid", F.Sigmoid(), (4, 5)),
    ("tanh", F.Tanh(), (2, 3, 4)),
    ("relu", F.ReLU(), (4, 5)),
    ("leaky_relu_default", F.LeakyReLU(), (4, 5)),
    ("leaky_relu_0.3", F.LeakyReLU(0.3), (2, 3, 4)),
    ("elu_default", F.ELU(), (4, 5)),
    ("elu_0.5", F.ELU(0.5), (2, 3, 4)),
    ("gelu", F.GELU(), (4, 5)),
    ("gelu_3d", F.GELU(), (2, 3, 4)),
    ("softmax_NK", F.Softmax(), (4, 5)),
    ("softmax_TNK", F.Softmax(), (2, 3, 4)),
    ("softmax_K1", F.Softmax(), (3, 1)),
    ("flatten_dense", F.Sequential(F.Flatten(), F.Dense(12, 3)), (2, 3, 2, 2)),
    ("nested", F.Sequential(F.Sequential(F.Dense(4, 5), F.Tanh()),
                            F.Sequential(F.Dense(5, 6), F.ReLU(), F.Dense(6, 3)),
                            F.Sigmoid()), (5, 4)),
    ("mixed_mlp", F.Sequential(F.Dense(4, 6), F.ReLU(), F.Maxout(6, 5, 2), F.ELU(),
                               F.Dense(5, 5), F.GELU(), F.Dense(5, 3), F.Softmax()), (2, 3, 4)),
]


def _rand_params(model, rng):
    params = F.init(model, seed=1, dtype=np.float64)
    if isinstance(params, dict):
        return randomize(params, rng)
    return _rand_tree(params, rng)


def _rand_tree(p, rng):
    if isinstance(p, dict):
        return randomize(p, rng)
    return [_rand_tree(q, rng) for q in p]


@pytest.mark.parametrize("name,model,shape", GRADCHECK_CASES, ids=[c[0] for c in GRADCHECK_CASES])
def test_gradcheck(name, model, shape, rng):
    params = _rand_params(model, rng)
    x = off_kinks(rng.standard_normal(shape))
    x_before, p_before = x.copy(), [a.copy() for a in _tree.leaves(params)]
    y = F.forward(model, params, x)[0]
    w = rng.standard_normal(y.shape)
    report = F.gradcheck(model, params, x, w, wloss)
    assert report.passed(1e-6), f"{name}\n{report}"
    # every parameter array and the input were checked, element by element
    n_params = len(_tree.leaves(params))
    assert len(report.errors) == n_params + 1 and "x" in report.errors
    assert report.checked["x"] == x.size
    # and nothing was modified
    assert np.array_equal(x, x_before)
    assert all(np.array_equal(a, b) for a, b in zip(_tree.leaves(params), p_before))


@pytest.mark.parametrize("layer,shape", [(F.Dropout(0.4), (4, 5)), (F.Dropout(0.25), (2, 3, 4)),
                                         (F.NoisyReLU(0.5), (4, 5)), (F.NoisyReLU(2.0), (2, 3, 4))],
                         ids=["dropout", "dropout_3d", "noisy_relu", "noisy_relu_3d"])
def test_gradcheck_train_mode(layer, shape, rng):
    """Stochastic layers in train mode with a fixed seed: gradcheck reuses the seed in every
    forward, so the mask / noise is the same in each evaluation."""
    seed = 11
    x = off_kinks(rng.standard_normal(shape))
    if isinstance(layer, F.NoisyReLU):
        # the layer draws noise = std·N(0,1) from default_rng(seed); shift x so x + noise is
        # away from ReLU's kink
        noise = np.random.default_rng(seed).standard_normal(x.size).reshape(shape) * layer.std
        x = x - noise
    model = F.Sequential(F.Dense(shape[-1], shape[-1]), layer)
    params = _rand_params(model, rng)
    params[0]["W"] = np.eye(shape[-1])          # the Dense passes x through unchanged at first
    params[0]["b"] = np.zeros(shape[-1])
    y_train = F.forward(model, params, x, train=True, seed=seed)[0]
    y_test = F.forward(model, params, x, train=False)[0]
    assert not np.allclose(y_train, y_test)    # train mode really is stochastic here
    report = F.gradcheck(model, params, x, rng.standard_normal(y_train.shape), wloss,
                         train=True, seed=seed)
    assert report.passed(1e-6), str(report)


# ---------------------------------------------------------------- independent central differences
@pytest.mark.parametrize("shape", [(4,), (5, 4), (2, 3, 4), (2, 1, 3, 4)], ids=lambda s: f"x{s}")
@pytest.mark.parametrize("bias", [True, False])
def test_dense_central_differences(shape, bias, rng):
    layer = F.Dense(4, 3, bias=bias)
    params = randomize(layer.init(rng, np.float64), rng)
    x = rng.standard_normal(shape)
    w = rng.standard_normal(shape[:-1] + (3,))

    def L():
        return float(np.sum(layer.forward(params, x)[0] * w))

    y, cache = layer.forward(params, x)
    dx, grads = layer.backward(params, cache, w)
    assert set(grads) == set(params)
    np.testing.assert_allclose(dx, central_diff(L, x), rtol=1e-6, atol=1e-9)
    for k in params:
        np.testing.assert_allclose(grads[k], central_diff(L, params[k]), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("pieces", [1, 2, 3])
def test_maxout_central_differences(pieces, rng):
    layer = F.Maxout(3, 2, pieces=pieces)
    params = randomize(layer.init(rng, np.float64), rng)
    x = rng.standard_normal((4, 3))
    w = rng.standard_normal((4, 2))

    def L():
        return float(np.sum(layer.forward(params, x)[0] * w))

    dx, grads = layer.backward(params, layer.forward(params, x)[1], w)
    np.testing.assert_allclose(dx, central_diff(L, x), rtol=1e-6, atol=1e-9)
    for k in params:
        np.testing.assert_allclose(grads[k], central_diff(L, params[k]), rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------- plain-loop references
def dense_loops(x, W, b, dy):
    """y = x W + b, dx = dy Wᵀ, dW = xᵀ dy, db = Σ dy, one scalar at a time."""
    D, M = W.shape
    lead = x.shape[:-1]
    y = np.zeros(lead + (M,))
    dx = np.zeros(x.shape)
    dW = np.zeros((D, M))
    db = np.zeros(M)
    for n in np.ndindex(lead):
        for m in range(M):
            s = b[m] if b is not None else 0.0
            for d in range(D):
                s += x[n + (d,)] * W[d, m]
            y[n + (m,)] = s
        for d in range(D):
            for m in range(M):
                dx[n + (d,)] += dy[n + (m,)] * W[d, m]
                dW[d, m] += x[n + (d,)] * dy[n + (m,)]
        for m in range(M):
            db[m] += dy[n + (m,)]
    return y, dx, dW, db


@pytest.mark.parametrize("shape", [(3,), (6, 3), (2, 4, 3), (2, 2, 2, 3)], ids=lambda s: f"x{s}")
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_matches_loops(shape, bias, dtype, rng):
    layer = F.Dense(3, 5, bias=bias)
    params = randomize(layer.init(rng, dtype), rng)
    x = rng.standard_normal(shape).astype(dtype)
    dy = rng.standard_normal(shape[:-1] + (5,)).astype(dtype)
    y, cache = layer.forward(params, x)
    dx, grads = layer.backward(params, cache, dy)
    b = params["b"].astype(np.float64) if bias else None
    ry, rdx, rdW, rdb = dense_loops(x.astype(np.float64), params["W"].astype(np.float64), b,
                                    dy.astype(np.float64))
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(y, ry, **tol)
    np.testing.assert_allclose(dx, rdx, **tol)
    np.testing.assert_allclose(grads["W"], rdW, **tol)
    if bias:
        np.testing.assert_allclose(grads["b"], rdb, **tol)
    else:
        assert set(grads) == {"W"}


def maxout_loops(x, W, b, dy, P):
    """Maxout by loops: z = x W + b; y[n, o] = max_p z[n, o·P + p]; gradient to the arg-max."""
    N, D = x.shape
    M = W.shape[1] // P
    z = x @ W + b
    y = np.zeros((N, M))
    dz = np.zeros_like(z)
    for n in range(N):
        for o in range(M):
            best, arg = z[n, o * P], 0
            for p in range(1, P):
                if z[n, o * P + p] > best:
                    best, arg = z[n, o * P + p], p
            y[n, o] = best
            dz[n, o * P + arg] = dy[n, o]
    _, dx, dW, db = dense_loops(x, W, b, dz)
    return y, dx, dW, db


@pytest.mark.parametrize("pieces", [1, 2, 3])
def test_maxout_matches_loops(pieces, rng):
    layer = F.Maxout(4, 3, pieces=pieces)
    params = randomize(layer.init(rng, np.float64), rng)
    assert params["W"].shape == (4, 3 * pieces) and params["b"].shape == (3 * pieces,)
    x = rng.standard_normal((6, 4))
    dy = rng.standard_normal((6, 3))
    y, cache = layer.forward(params, x)
    dx, grads = layer.backward(params, cache, dy)
    ry, rdx, rdW, rdb = maxout_loops(x, params["W"], params["b"], dy, pieces)
    for a, r in [(y, ry), (dx, rdx), (grads["W"], rdW), (grads["b"], rdb)]:
        np.testing.assert_allclose(a, r, rtol=1e-12, atol=1e-12)


def test_maxout_leading_dims_match_2d(rng):
    layer = F.Maxout(4, 3, pieces=2)
    params = randomize(layer.init(rng, np.float64), rng)
    x = rng.standard_normal((2, 3, 4))
    dy = rng.standard_normal((2, 3, 3))
    y, dy_, dx, g = fwd_bwd(layer, params, x, dy)
    y2, _, dx2, g2 = fwd_bwd(layer, params, x.reshape(6, 4), dy.reshape(6, 3))
    assert y.shape == (2, 3, 3) and dx.shape == x.shape
    np.testing.assert_array_equal(y.reshape(6, 3), y2)
    np.testing.assert_array_equal(dx.reshape(6, 4), dx2)
    np.testing.assert_array_equal(g["W"], g2["W"])


def test_maxout_ties_go_to_first_piece(rng):
    layer = F.Maxout(3, 2, pieces=3)
    W = np.repeat(rng.standard_normal((3, 2)), 3, axis=1)   # the 3 pieces of each unit equal
    params = {"W": W, "b": np.zeros(6)}
    x = rng.standard_normal((4, 3))
    y, cache = layer.forward(params, x)
    np.testing.assert_allclose(y, x @ W[:, ::3])
    dx, grads = layer.backward(params, cache, np.ones((4, 2)))
    np.testing.assert_allclose(grads["b"], [4, 0, 0, 4, 0, 0])
    assert np.all(grads["W"][:, [1, 2, 4, 5]] == 0)


# ---------------------------------------------------------------- activation values
def _gelu(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def _softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


REFERENCES = {
    "identity": lambda x: x,
    "sigmoid": lambda x: 1 / (1 + np.exp(-x)),
    "tanh": np.tanh,
    "relu": lambda x: np.maximum(x, 0),
    "leaky_relu": lambda x: np.where(x > 0, x, 0.2 * x),
    "elu": lambda x: np.where(x > 0, x, 0.7 * np.expm1(x)),
    "gelu": _gelu,
    "softmax": _softmax,
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(REFERENCES))
def test_activation_values(name, dtype, rng):
    layer = LAYERS[name][0]
    x = (3 * rng.standard_normal((7, 9))).astype(dtype)
    y = layer.forward({}, x)[0]
    ref = REFERENCES[name](x.astype(np.float64))
    tol = dict(rtol=2e-6, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(y, ref, **tol)


def test_softmax_rows_sum_to_one(rng):
    x = 10 * rng.standard_normal((2, 3, 7))
    y = F.Softmax().forward({}, x)[0]
    np.testing.assert_allclose(y.sum(-1), 1.0, rtol=1e-14)
    assert np.all(y > 0)


# ---------------------------------------------------------------- dtypes
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", LAYER_IDS)
def test_dtype_preserved(name, dtype, rng):
    layer, params, x = setup(name, dtype, rng)
    assert all(p.dtype == dtype for p in layer.init(rng, dtype).values())
    y, dy, dx, grads = fwd_bwd(layer, params, x)
    assert y.dtype == dtype
    assert dx.dtype == dtype and dx.shape == x.shape
    assert set(grads) == set(params)
    for k, g in grads.items():
        assert g.dtype == dtype, k
        assert g.shape == params[k].shape, k


@pytest.mark.parametrize("name", ["dense", "dense_nobias", "maxout"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_mixed_dtype_input_is_type_error(name, dtype, rng):
    layer, params, x = setup(name, dtype, rng)
    other = np.float64 if dtype == np.float32 else np.float32
    with pytest.raises(TypeError, match=re.escape(str(layer)) + ".*does not match"):
        layer.forward(params, x.astype(other))


@pytest.mark.parametrize("name", ["dense", "maxout"])
def test_mixed_dtype_params_is_type_error(name, rng):
    layer, params, x = setup(name, np.float32, rng)
    params["b"] = params["b"].astype(np.float64)
    with pytest.raises(TypeError, match=re.escape(str(layer))):
        layer.forward(params, x)


@pytest.mark.parametrize("name", LAYER_IDS)
def test_wrong_dy_dtype_is_type_error(name, rng):
    layer, params, x = setup(name, np.float32, rng)
    y, cache = layer.forward(params, x, train=True, rng=np.random.default_rng(0))
    with pytest.raises(TypeError, match=re.escape(str(layer)) + ".*float64"):
        layer.backward(params, cache, np.ones(y.shape, dtype=np.float64))


@pytest.mark.parametrize("name", LAYER_IDS)
@pytest.mark.parametrize("bad", [np.int64, np.int32, np.bool_, np.complex128])
def test_non_float_input_is_type_error(name, bad, rng):
    layer, params, x = setup(name, np.float64, rng)
    with pytest.raises(TypeError, match=re.escape(str(layer)) + ".*float32 or float64"):
        layer.forward(params, np.ones(x.shape, dtype=bad))


@pytest.mark.parametrize("name", LAYER_IDS)
def test_list_input_is_accepted_as_float64(name, rng):
    layer, params, x = setup(name, np.float64, rng)
    y1 = layer.forward(params, x.tolist(), train=False)[0]
    y2 = layer.forward(params, x, train=False)[0]
    np.testing.assert_array_equal(y1, y2)


# ---------------------------------------------------------------- shape errors
def test_dense_wrong_input_message():
    layer = F.Dense(5, 3)
    params = layer.init(np.random.default_rng(0), np.float32)
    msg = "Dense(5, 3): expected input (..., 5), got (4, 6)"
    with pytest.raises(ValueError, match="^" + re.escape(msg) + "$"):
        layer.forward(params, np.ones((4, 6), np.float32))
    with pytest.raises(ValueError, match=re.escape("Dense(5, 3): expected input (..., 5), got ()")):
        layer.forward(params, np.float32(1.0))


def test_maxout_wrong_input_message():
    layer = F.Maxout(5, 3, pieces=2)
    params = layer.init(np.random.default_rng(0), np.float32)
    msg = "Maxout(5, 3, pieces=2): expected input (..., 5), got (4, 6)"
    with pytest.raises(ValueError, match="^" + re.escape(msg) + "$"):
        layer.forward(params, np.ones((4, 6), np.float32))


@pytest.mark.parametrize("name", LAYER_IDS)
def test_wrong_dy_shape_is_value_error(name, rng):
    layer, params, x = setup(name, np.float64, rng)
    y, cache = layer.forward(params, x, train=True, rng=np.random.default_rng(0))
    bad = y.shape[:-1] + (y.shape[-1] + 1,)
    msg = f"{layer}: expected output gradient of shape {y.shape}, got {bad}"
    with pytest.raises(ValueError, match="^" + re.escape(msg) + "$"):
        layer.backward(params, cache, np.ones(bad))
    with pytest.raises(ValueError, match=re.escape(str(layer))):
        layer.backward(params, cache, np.ones(y.size))        # same size, other shape


def test_softmax_flatten_input_errors():
    with pytest.raises(ValueError, match=re.escape("Softmax(): expected input (..., K) with K >= 1, got (3, 0)")):
        F.Softmax().forward({}, np.ones((3, 0)))
    with pytest.raises(ValueError, match=re.escape("Softmax()") + ".*got \\(\\)"):
        F.Softmax().forward({}, np.float64(1.0))
    with pytest.raises(ValueError, match=re.escape("Flatten(): expected input (N, ...) with ndim >= 2, got (5,)")):
        F.Flatten().forward({}, np.ones(5))


def test_zero_rows(rng):
    """Empty batches flow through every layer (shapes stay consistent)."""
    for name in LAYER_IDS:
        layer, params, x = setup(name, np.float64, rng)
        x0 = np.zeros((0,) + x.shape[1:])
        y, dy, dx, grads = fwd_bwd(layer, params, x0)
        assert y.shape[0] == 0 and dx.shape == x0.shape, name
        for k, g in grads.items():
            np.testing.assert_array_equal(g, 0, err_msg=name)


# ---------------------------------------------------------------- bad params
@pytest.mark.parametrize("name", ["dense", "maxout"])
def test_bad_params(name, rng):
    layer, params, x = setup(name, np.float64, rng)
    where = re.escape(str(layer))
    y, cache = layer.forward(params, x)
    for key in ("W", "b"):
        missing = {k: v for k, v in params.items() if k != key}
        with pytest.raises(ValueError, match=where + f".*missing parameter '{key}'"):
            layer.forward(missing, x)
        with pytest.raises(ValueError, match=where + f".*missing parameter '{key}'"):
            layer.backward(missing, cache, np.ones(y.shape))
        wrong = dict(params, **{key: np.ones(params[key].shape + (1,))})
        msg = f"expected parameter {key} of shape {params[key].shape}, got {wrong[key].shape}"
        with pytest.raises(ValueError, match=where + ".*" + re.escape(msg)):
            layer.forward(wrong, x)
        with pytest.raises(ValueError, match=where):
            layer.backward(wrong, cache, np.ones(y.shape))
    for not_a_dict in (None, [params["W"]], params["W"]):
        with pytest.raises(ValueError, match=where + ".*missing parameter"):
            layer.forward(not_a_dict, x)
    with pytest.raises(TypeError, match=where):
        layer.forward(dict(params, W=params["W"].astype(np.int64)), x)


def test_dense_without_bias_needs_no_b(rng):
    layer = F.Dense(4, 3, bias=False)
    params = layer.init(rng, np.float64)
    assert set(params) == {"W"}
    x = rng.standard_normal((2, 4))
    y, cache = layer.forward(params, x)
    np.testing.assert_allclose(y, x @ params["W"], rtol=1e-14)
    assert set(layer.backward(params, cache, np.ones((2, 3)))[1]) == {"W"}


# ---------------------------------------------------------------- constructors
@pytest.mark.parametrize("make", [
    lambda: F.Dense(0, 3), lambda: F.Dense(3, 0), lambda: F.Dense(-1, 3), lambda: F.Dense(2.5, 3),
    lambda: F.Dense(True, 3), lambda: F.Dense("4", 3), lambda: F.Dense(4, 3, init="nope"),
    lambda: F.Maxout(4, 3, pieces=0), lambda: F.Maxout(0, 3), lambda: F.Maxout(4, 3, init="nope"),
    lambda: F.Dropout(1.0), lambda: F.Dropout(-0.1), lambda: F.Dropout(1.5),
    lambda: F.Dropout(float("nan")), lambda: F.NoisyReLU(-1.0), lambda: F.NoisyReLU(float("nan")),
], ids=["dense_in0", "dense_out0", "dense_neg", "dense_float", "dense_bool", "dense_str",
        "dense_init", "maxout_p0", "maxout_in0", "maxout_init", "dropout_1", "dropout_neg",
        "dropout_1.5", "dropout_nan", "noisy_neg", "noisy_nan"])
def test_bad_constructor_args(make):
    with pytest.raises(ValueError):
        make()


def test_constructor_messages():
    with pytest.raises(ValueError, match=re.escape("Dense(0, 3): in_features must be a positive int, got 0")):
        F.Dense(0, 3)
    with pytest.raises(ValueError, match=re.escape("Dropout: rate must be in [0, 1), got 1.0")):
        F.Dropout(1.0)
    with pytest.raises(ValueError, match="unknown initializer 'nope'"):
        F.Dense(4, 3, init="nope")


def test_layers_are_immutable_and_comparable():
    d = F.Dense(4, 3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.in_features = 5
    with pytest.raises(dataclasses.FrozenInstanceError):
        F.Dropout(0.5).rate = 0.1
    assert d == F.Dense(4, 3) and d != F.Dense(4, 3, bias=False)
    assert hash(F.LeakyReLU(0.2)) == hash(F.LeakyReLU(0.2))
    assert str(d) == "Dense(4, 3)" and str(F.Maxout(4, 3, 2)) == "Maxout(4, 3, pieces=2)"


def test_dense_init_by_name_and_callable(rng):
    calls = []

    def ones(rng, shape, dtype, fan_in, fan_out):
        calls.append((shape, fan_in, fan_out))
        return np.ones(shape, dtype)

    p = F.Dense(4, 3, init=ones).init(rng, np.float64)
    assert calls == [((4, 3), 4, 3)]
    np.testing.assert_array_equal(p["W"], 1.0)
    np.testing.assert_array_equal(p["b"], 0.0)
    assert np.all(F.Dense(4, 3, init="zeros").init(rng, np.float32)["W"] == 0)
    with pytest.raises(TypeError, match="float32 or float64"):
        F.Dense(4, 3).init(rng, np.int32)


# ---------------------------------------------------------------- purity
@pytest.mark.parametrize("name", LAYER_IDS)
def test_no_input_is_modified(name, rng):
    layer, params, x = setup(name, np.float64, rng)
    x0, p0 = x.copy(), {k: v.copy() for k, v in params.items()}
    y, cache = layer.forward(params, x, train=True, rng=np.random.default_rng(1))
    y0 = y.copy()
    dy = rng.standard_normal(y.shape)
    dy0 = dy.copy()
    layer.backward(params, cache, dy)
    layer.backward(params, cache, dy, input_grad=False)
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(dy, dy0)
    np.testing.assert_array_equal(y, y0)          # backward does not write into the output
    assert set(params) == set(p0)
    for k in p0:
        np.testing.assert_array_equal(params[k], p0[k])


@pytest.mark.parametrize("name", LAYER_IDS)
def test_non_contiguous_input(name, rng):
    layer, params, x = setup(name, np.float64, rng)
    xt = np.asfortranarray(x)                      # same values, other memory layout
    y, dy, dx, g = fwd_bwd(layer, params, x)
    yt, _, dxt, gt = fwd_bwd(layer, params, xt, dy=np.asfortranarray(dy))
    np.testing.assert_array_equal(y, yt)
    np.testing.assert_array_equal(dx, dxt)
    for k in g:
        np.testing.assert_array_equal(g[k], gt[k])


# ---------------------------------------------------------------- input_grad=False
@pytest.mark.parametrize("name", LAYER_IDS)
def test_input_grad_false(name, rng):
    layer, params, x = setup(name, np.float64, rng)
    y, cache = layer.forward(params, x, train=True, rng=np.random.default_rng(5))
    dy = rng.standard_normal(y.shape)
    dx1, g1 = layer.backward(params, cache, dy, input_grad=True)
    dx0, g0 = layer.backward(params, cache, dy, input_grad=False)
    assert dx1 is not None and dx0 is None
    assert set(g0) == set(g1) == set(params)
    for k in g1:
        np.testing.assert_array_equal(g0[k], g1[k])


# ---------------------------------------------------------------- serial == parallel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ACTIVATIONS)
def test_serial_and_parallel_builds_agree(name, dtype, parallel_mode, rng):
    if numba.get_num_threads() < 2:
        pytest.skip("one thread: the parallel build is never selected")
    layer = LAYERS[name][0]
    x = off_kinks(3 * rng.standard_normal((37, 113))).astype(dtype)   # odd sizes: uneven chunks
    dy = rng.standard_normal(x.shape).astype(dtype)
    results = []
    for parallel in (False, True):
        parallel_mode(parallel)
        assert config.use_parallel("activations", 1) is parallel
        assert config.use_parallel("dropout", 1) is parallel
        y, _, dx, _ = fwd_bwd(layer, {}, x, dy=dy, seed=9)
        results.append((y, dx))
    (ys, dxs), (yp, dxp) = results
    np.testing.assert_array_equal(ys, yp)
    np.testing.assert_array_equal(dxs, dxp)


# ---------------------------------------------------------------- dropout
@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_eval_is_identity(dtype, rng):
    x = rng.standard_normal((4, 5)).astype(dtype)
    layer = F.Dropout(0.5)
    y, cache = layer.forward({}, x, train=False, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(y, x)
    dy = rng.standard_normal(x.shape).astype(dtype)
    np.testing.assert_array_equal(layer.backward({}, cache, dy)[0], dy)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_rate_zero_is_identity_in_training(dtype, rng):
    x = rng.standard_normal((4, 5)).astype(dtype)
    y, cache = F.Dropout(0.0).forward({}, x, train=True, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(y, x)
    dy = rng.standard_normal(x.shape).astype(dtype)
    np.testing.assert_array_equal(F.Dropout(0.0).backward({}, cache, dy)[0], dy)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_seeds(dtype):
    x = np.ones((50, 40), dtype)
    layer = F.Dropout(0.5)
    y1 = layer.forward({}, x, train=True, rng=np.random.default_rng(7))[0]
    y2 = layer.forward({}, x, train=True, rng=np.random.default_rng(7))[0]
    y3 = layer.forward({}, x, train=True, rng=np.random.default_rng(8))[0]
    np.testing.assert_array_equal(y1, y2)
    assert not np.array_equal(y1 != 0, y3 != 0)
    # functional API: the seed argument reproduces the mask too
    f1 = F.forward(layer, {}, x, train=True, seed=3)[0]
    f2 = F.forward(layer, {}, x, train=True, seed=3)[0]
    np.testing.assert_array_equal(f1, f2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rate", [0.1, 0.3, 0.5, 0.9])
def test_dropout_statistics(rate, dtype):
    n = 200_000
    x = np.ones(n, dtype)
    y, cache = F.Dropout(rate).forward({}, x, train=True, rng=np.random.default_rng(42))
    p = 1.0 - rate
    kept = y != 0
    sigma = np.sqrt(p * (1 - p) / n)
    assert abs(kept.mean() - p) < 5 * sigma                 # kept fraction ≈ 1 − rate
    np.testing.assert_allclose(y[kept], 1 / p, rtol=1e-6)   # kept units scaled by 1/p
    assert abs(y.mean() - 1.0) < 5 * np.sqrt((1 - p) / p / n)   # E[y] = x
    dy = np.full(n, 2.0, dtype)
    dx = F.Dropout(rate).backward({}, cache, dy)[0]
    np.testing.assert_array_equal(dx != 0, kept)
    np.testing.assert_allclose(dx[kept], 2 / p, rtol=1e-6)


def test_dropout_mask_follows_generator():
    """The mask is u < 1 − rate for u = rng.random(n): what lets the torch test rebuild it."""
    x = np.arange(1.0, 25.0).reshape(4, 6)
    y = F.Dropout(0.3).forward({}, x, train=True, rng=np.random.default_rng(5))[0]
    u = np.random.default_rng(5).random(x.size).reshape(x.shape)
    mask = u < 0.7
    np.testing.assert_allclose(y, np.where(mask, x / 0.7, 0.0), rtol=1e-15)


# ---------------------------------------------------------------- noisy relu
def test_noisy_relu(rng):
    x = rng.standard_normal((6, 7))
    layer = F.NoisyReLU(0.5)
    np.testing.assert_array_equal(layer.forward({}, x, train=False)[0], np.maximum(x, 0))
    y, cache = layer.forward({}, x, train=True, rng=np.random.default_rng(4))
    noise = 0.5 * np.random.default_rng(4).standard_normal(x.size).reshape(x.shape)
    np.testing.assert_allclose(y, np.maximum(x + noise, 0), rtol=1e-15)
    dy = rng.standard_normal(x.shape)
    np.testing.assert_array_equal(layer.backward({}, cache, dy)[0], np.where(x + noise > 0, dy, 0))
    y_other = layer.forward({}, x, train=True, rng=np.random.default_rng(5))[0]
    assert not np.array_equal(y, y_other)
    y0 = F.NoisyReLU(0.0).forward({}, x, train=True, rng=np.random.default_rng(4))[0]
    np.testing.assert_array_equal(y0, np.maximum(x, 0))


# ---------------------------------------------------------------- flatten
def test_flatten_roundtrip(rng):
    x = rng.standard_normal((2, 3, 4, 5))
    y, cache = F.Flatten().forward({}, x)
    np.testing.assert_array_equal(y, x.reshape(2, 60))
    dy = rng.standard_normal((2, 60))
    np.testing.assert_array_equal(F.Flatten().backward({}, cache, dy)[0], dy.reshape(x.shape))


# ---------------------------------------------------------------- NaN and large inputs
NAN_LAYERS = ["identity", "sigmoid", "tanh", "relu", "leaky_relu", "elu", "gelu", "noisy_relu",
              "dropout"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", NAN_LAYERS)
def test_nan_propagates(name, dtype):
    layer = LAYERS[name][0]
    x = np.tile(np.array([[np.nan, 1.0, -1.0], [2.0, np.nan, -0.5]], dtype), (4, 4))
    # eval mode, and train mode (dropout: only the kept units are looked at)
    for train in (False, True):
        y = layer.forward({}, x, train=train, rng=np.random.default_rng(0))[0]
        kept = np.ones(x.shape, bool) if not (train and name == "dropout") else y != 0
        assert np.all(np.isnan(y[np.isnan(x) & kept])), (train, y)
        assert not np.any(np.isnan(y[~np.isnan(x)])), (train, y)
        assert (np.isnan(x) & kept).any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_propagates_softmax_dense_maxout(dtype):
    x = np.array([[np.nan, 1.0, -1.0, 0.5], [2.0, 0.1, -0.5, 0.0]], dtype)
    y = F.Softmax().forward({}, x)[0]
    assert np.all(np.isnan(y[0])) and np.all(np.isfinite(y[1]))
    for layer in (F.Dense(4, 3), F.Maxout(4, 3, 3), F.Sequential(F.Dense(4, 3), F.ReLU())):
        params = F.init(layer, seed=0, dtype=dtype)
        y = F.forward(layer, params, x)[0]
        assert np.all(np.isnan(y[0])) and np.all(np.isfinite(y[1])), layer


LARGE = {np.float32: [1e4, -1e4, 1e30, -1e30, 3e38, -3e38],
         np.float64: [1e4, -1e4, 1e30, -1e30, 1e300, -1e300]}
STABLE = ["sigmoid", "tanh", "elu", "gelu", "softmax", "relu", "leaky_relu", "identity"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", STABLE)
def test_large_inputs_stay_finite(name, dtype):
    layer = LAYERS[name][0]
    x = np.array(LARGE[dtype] + [0.5, -0.5], dtype)
    x = np.stack([x, x[::-1]])
    y, cache = layer.forward({}, x)
    dx = layer.backward({}, cache, np.ones_like(x))[0]
    assert np.all(np.isfinite(y)), y
    assert np.all(np.isfinite(dx)), dx


@pytest.mark.parametrize("dtype", DTYPES)
def test_large_input_limits(dtype):
    big = dtype(1e30)
    x = np.array([big, -big], dtype)
    np.testing.assert_array_equal(F.Sigmoid().forward({}, x)[0], [1, 0])
    np.testing.assert_array_equal(F.Tanh().forward({}, x)[0], [1, -1])
    np.testing.assert_array_equal(F.ELU(0.7).forward({}, x)[0], [big, dtype(-0.7)])
    np.testing.assert_array_equal(F.GELU().forward({}, x)[0], [big, 0])
    np.testing.assert_array_equal(F.GELU().backward({}, F.GELU().forward({}, x)[1],
                                                    np.ones_like(x))[0], [1, 0])
    np.testing.assert_array_equal(F.Softmax().forward({}, np.array([[big, -big, 0]], dtype))[0],
                                  [[1, 0, 0]])
    np.testing.assert_array_equal(F.Softmax().forward({}, np.full((1, 4), big, dtype))[0],
                                  np.full((1, 4), 0.25))


def test_dropout_propagates_nan_in_dropped_units():
    x = np.full(1000, np.nan, np.float32)
    y, cache = F.Dropout(0.5).forward({}, x, train=True, rng=np.random.default_rng(0))
    assert np.isnan(y).all() and y.dtype == np.float32
    dx, _ = F.Dropout(0.5).backward({}, cache, np.full(1000, np.nan, np.float32))
    assert np.isnan(dx).all()
    # finite input: dropped units are exactly 0, kept ones x/p
    x = np.ones(1000, np.float32)
    y, (mask, _, _) = F.Dropout(0.25).forward({}, x, train=True, rng=np.random.default_rng(1))
    np.testing.assert_array_equal(y[~mask], 0)
    np.testing.assert_allclose(y[mask], np.float32(1 / 0.75))
