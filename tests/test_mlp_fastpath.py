"""Sequential's one-call path for Dense/ReLU chains equals the layer-by-layer path."""
import numpy as np
import pytest

import fastbp as F
from fastbp import _mlp


def layer_by_layer(model, params, x):
    caches, h = [], x
    for layer, p in zip(model.layers, params):
        h, c = layer.forward(p, h)
        caches.append(c)
    return h, caches


def layer_backward(model, params, caches, dy):
    grads = [None] * len(model.layers)
    for i in range(len(model.layers) - 1, -1, -1):
        dy, grads[i] = model.layers[i].backward(params[i], caches[i], dy)
    return dy, grads


MODELS = [
    lambda: F.Sequential(F.Dense(6, 7), F.ReLU(), F.Dense(7, 5), F.ReLU(), F.Dense(5, 3)),
    lambda: F.Sequential(F.Dense(6, 4, bias=False), F.Dense(4, 5), F.ReLU(), F.Dense(5, 3, bias=False)),
    lambda: F.Sequential(F.Dense(6, 3), F.ReLU()),
    lambda: F.Sequential(F.Dense(6, 3)),
]


@pytest.mark.parametrize("make", MODELS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("lead", [(4,), (1,), (3, 2)])
def test_fast_path_matches_layers(make, dtype, lead):
    model = make()
    assert model._mlp is not None
    params = F.init(model, seed=1, dtype=dtype)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(lead + (6,)).astype(dtype)
    y, cache = F.forward(model, params, x)
    y_ref, cache_ref = layer_by_layer(model, params, x)
    assert y.dtype == dtype and y.shape == y_ref.shape
    np.testing.assert_allclose(y, y_ref, rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-6)
    dy = rng.standard_normal(y.shape).astype(dtype)
    dx, grads = F.backward(model, params, cache, dy)
    dx_ref, grads_ref = layer_backward(model, params, cache_ref, dy)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx, dx_ref, **tol)
    assert dx.shape == x.shape and dx.dtype == dtype
    for g, gr in zip(grads, grads_ref):
        assert g.keys() == gr.keys()
        for k in g:
            assert g[k].dtype == dtype
            np.testing.assert_allclose(g[k], gr[k], **tol)
    _, grads2 = F.backward(model, params, cache, dy, input_grad=False)
    for g, gr in zip(grads2, grads):
        for k in g:
            np.testing.assert_array_equal(g[k], gr[k])


def test_fast_path_used_and_inputs_untouched():
    model = MODELS[0]()
    params = F.init(model, seed=0)
    x = np.random.default_rng(1).standard_normal((5, 6)).astype(np.float32)
    before = [dict((k, v.copy()) for k, v in p.items()) for p in params]
    x0 = x.copy()
    out = _mlp.forward(model._mlp, len(model.layers), params, x)
    assert out is not None                      # the fast path ran
    y, cache = out
    dy = np.ones_like(y)
    dy0 = dy.copy()
    assert _mlp.backward(model._mlp, len(model.layers), params, cache, dy, True) is not None
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(dy, dy0)
    for p, b in zip(params, before):
        for k in p:
            np.testing.assert_array_equal(p[k], b[k])


def test_irregular_inputs_fall_back_with_layer_errors():
    model = MODELS[0]()
    params = F.init(model, seed=0)
    with pytest.raises(ValueError, match=r"Dense\(6, 7\): expected input \(\.\.\., 6\), got \(2, 5\)"):
        F.forward(model, params, np.zeros((2, 5), np.float32))
    with pytest.raises(TypeError, match="float64 does not match"):
        F.forward(model, params, np.zeros((2, 6)))
    bad = [dict(p) for p in params]
    bad[2] = {"W": np.zeros((7, 4), np.float32), "b": np.zeros(5, np.float32)}
    with pytest.raises(ValueError, match=r"expected parameter W of shape \(7, 5\), got \(7, 4\)"):
        F.forward(model, bad, np.zeros((2, 6), np.float32))
    y, cache = F.forward(model, params, np.zeros((2, 6), np.float32))
    with pytest.raises(ValueError, match="output gradient"):
        F.backward(model, params, cache, np.zeros((2, 4), np.float32))
    # a list input (float64 params) and a read-only input take the general path and work
    p64 = F.init(model, seed=0, dtype=np.float64)
    y0, _ = F.forward(model, p64, [[0.5] * 6] * 2)
    np.testing.assert_allclose(y0, F.forward(model, p64, np.full((2, 6), 0.5))[0])
    y1, _ = F.forward(model, params, np.zeros((2, 6), np.float32))
    ro = np.zeros((2, 6), np.float32)
    ro.flags.writeable = False
    y2, c2 = F.forward(model, params, ro)
    np.testing.assert_array_equal(y1, y2)
    F.backward(model, params, c2, np.ones_like(y2))


SPLIT_MODELS = [
    lambda: F.Sequential(F.Dense(40, 100), F.ReLU(), F.Dense(100, 70), F.ReLU(),
                         F.Dense(70, 3)),
    lambda: F.Sequential(F.Dense(33, 96, bias=False), F.Dense(96, 80), F.ReLU(),
                         F.Dense(80, 65, bias=False)),
]


@pytest.mark.skipif(F._blas.mkl is None, reason="needs MKL (pip install 'fastbp[mkl]')")
@pytest.mark.parametrize("make", SPLIT_MODELS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("input_grad", [True, False])
def test_mkl_split_path_matches_compiled_chain(monkeypatch, make, dtype, input_grad):
    """With every GEMM split in column blocks over two threads on MKL (threshold 0), the
    chain gives the compiled chain's outputs, caches and gradients; and it did split."""
    model = make()
    params = F.init(model, seed=2, dtype=dtype)
    rng = np.random.default_rng(3)
    # 40 rows: some column blocks have every GEMM dimension >= MKL_MIN_DIM (MKL), others not
    x = rng.standard_normal((40, model.layers[0].in_features)).astype(dtype)
    x0 = x.copy()
    y_ref, c_ref = F.forward(model, params, x)
    dy = rng.standard_normal(y_ref.shape).astype(dtype)
    dx_ref, g_ref = F.backward(model, params, c_ref, dy, input_grad=input_grad)
    calls = []
    monkeypatch.setattr(_mlp, "SPLIT_MACS", 0)
    monkeypatch.setattr(F._blas, "dense_mkl", True)     # the split's default is Intel only
    monkeypatch.setattr(F.config, "get_num_threads", lambda: 2)
    block = _mlp.D.gemm_block
    monkeypatch.setattr(_mlp.D, "gemm_block",
                        lambda *a: (calls.append((a[5], a[6], a[7])), block(*a))[1])
    y, c = F.forward(model, params, x)
    dx, g = F.backward(model, params, c, dy, input_grad=input_grad)
    split = [(c0, c1) for c0, c1, one in calls if one]
    assert split and all(c0 % 16 == 0 for c0, _ in split)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
    assert y.dtype == dtype
    np.testing.assert_allclose(y, y_ref, **tol)
    for a, b in zip(c, c_ref):
        if isinstance(a, tuple):
            np.testing.assert_allclose(a[1], b[1], **tol)
    if input_grad:
        assert dx.dtype == dtype and dx.shape == x.shape
        np.testing.assert_allclose(dx, dx_ref, **tol)
    else:
        assert dx is None
    for a, b in zip(g, g_ref):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == dtype
            np.testing.assert_allclose(a[k], b[k], **tol)
    np.testing.assert_array_equal(x, x0)
