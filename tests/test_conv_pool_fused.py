"""Conv2D (+ ReLU) → MaxPool2D fused: kernels and Sequential against the layers run one by
one (same bits), finite differences, PyTorch, thread counts, errors."""
import numpy as np
import pytest

import fastbp
from fastbp import gradcheck, losses, network
from fastbp.kernels import conv as K
from fastbp.kernels import pool as P
from fastbp.layers import Conv2D, Dense, Flatten, MaxPool2D, ReLU

import naive

# (pool size, pool stride): the 2×2 kernel, overlapping windows, a remainder row/column
# that no window covers, non-square windows
POOLS = [(2, None), (3, 2), (3, 3), ((2, 3), (1, 2))]


def _data(rng, N, C, H, F, k, dtype, nan=False):
    x = rng.standard_normal((N, C, H, H + 1)).astype(dtype)
    if nan:
        x[0, 0, 2, 3] = np.nan
    W = (rng.standard_normal((F, C, k, k)) * 0.4).astype(dtype)
    b = (rng.standard_normal(F) * 0.1).astype(dtype)
    b[0] = -5                              # a channel whose windows are mostly all <= 0
    return x, W, b


@pytest.mark.parametrize("method", ["tap", "gemm", "direct", "auto", "tap-stacked"])
@pytest.mark.parametrize("pool", POOLS, ids=str)
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_kernels_same_bits_as_separate(method, pool, relu, dtype, rng, monkeypatch):
    if method == "tap-stacked":         # all kernel rows in one forward GEMM
        monkeypatch.setattr(K, "TAP_STACK_MIN_K", 0)
        method = "tap"
    x, W, b = _data(rng, 5, 3, 11, 4, 3, dtype)
    size, stride = pool
    y = K.conv2d_forward(x, W, b, 1, 1, relu, method)
    yp_ref, idx_ref = P.maxpool2d_forward(y, size, stride)
    yp, idx = K.conv2d_maxpool_forward(x, W, b, 1, 1, relu, size, stride, method)
    assert yp.dtype == dtype and idx.dtype == np.int32
    np.testing.assert_array_equal(yp, yp_ref)
    np.testing.assert_array_equal(idx, idx_ref)
    dyp = rng.standard_normal(yp.shape).astype(dtype)
    dy = P.maxpool2d_backward(dyp, idx, y.shape)
    ref = K.conv2d_backward(x, W, dy, 1, 1, True, True, y if relu else None, method)
    got = K.conv2d_maxpool_backward(x, W, dyp, idx, yp, 1, 1, size, stride, True, True, relu,
                                    method)
    for a, r in zip(got, ref):
        assert a.dtype == dtype
        np.testing.assert_array_equal(a, r)
    if relu:        # the mask mattered: some pooled outputs are 0, some positive
        assert np.any(yp == 0) and np.any(yp > 0)


@pytest.mark.parametrize("conv", [dict(), dict(stride=2), dict(padding=1), dict(bias=False)],
                         ids=str)
@pytest.mark.parametrize("pool", POOLS, ids=str)
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sequential_fuses_and_matches_layer_by_layer(conv, pool, relu, dtype, rng):
    layers = [Conv2D(2, 3, 3, **conv)] + ([ReLU()] if relu else []) + [MaxPool2D(*pool)]
    model = fastbp.Sequential(*layers, Conv2D(3, 2, 1), ReLU(), MaxPool2D(1))
    params = fastbp.init(model, seed=1, dtype=dtype)
    for p in params:
        if "b" in p:
            p["b"][:] = rng.standard_normal(p["b"].shape) * 0.1
    x = rng.standard_normal((4, 2, 14, 13)).astype(dtype)
    x[1, 0, 3, 4] = np.nan                 # NaN windows take the exact pooling pass
    y, cache = fastbp.forward(model, params, x)
    j = len(layers)
    assert all(c is network._FUSED for c in cache[1:j])               # fusion did happen
    assert all(c is network._FUSED for c in cache[j + 1:])
    dy = rng.standard_normal(y.shape).astype(dtype)
    dx, grads = fastbp.backward(model, params, cache, dy)
    y_ref, dx_ref, g_ref = naive.layer_by_layer(model, params, x, dy)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(dx, dx_ref)
    for a, b in zip(fastbp._tree.leaves(grads), fastbp._tree.leaves(g_ref)):
        assert a.dtype == dtype
        np.testing.assert_array_equal(a, b)
    assert np.isnan(y).any() and not np.isnan(y).all()
    none, grads2 = fastbp.backward(model, params, cache, dy, input_grad=False)
    assert none is None
    for a, b in zip(fastbp._tree.leaves(grads2), fastbp._tree.leaves(g_ref)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("pool", POOLS, ids=str)
def test_fused_model_gradcheck(pool, rng):
    model = fastbp.Sequential(Conv2D(2, 3, 3, padding=1), ReLU(), MaxPool2D(*pool), Flatten())
    params = fastbp.init(model, seed=0, dtype=np.float64)
    x = rng.standard_normal((3, 2, 9, 8))
    out = fastbp.forward(model, params, x)[0]
    model = fastbp.Sequential(*model.layers, Dense(out.shape[1], 3))
    params = fastbp.init(model, seed=0, dtype=np.float64)
    assert fastbp.forward(model, params, x)[1][2] is network._FUSED
    rep = gradcheck(model, params, x, np.array([0, 2, 1]), losses.softmax_cross_entropy)
    assert rep.passed(1e-6), str(rep)


@pytest.mark.parametrize("group", [6000, 1 << 17])
def test_tap_pooled_same_bits_on_one_and_two_threads(group, rng, monkeypatch):
    """The pooling and unpooling run inside the split conv loops, group by group: the same
    bits on one and two threads, with several groups and a short last one."""
    monkeypatch.setattr(K, "TAP_GROUP_ELEMENTS", group)
    x, W, b = _data(rng, 11, 2, 12, 5, 3, np.float32)
    y = K.conv2d_forward(x, W, b, 1, 0, True, "tap")
    yp, idx = P.maxpool2d_forward(y, 2)
    dyp = rng.standard_normal(yp.shape).astype(np.float32)
    ref = (yp, idx) + K.conv2d_backward(x, W, P.maxpool2d_backward(dyp, idx, y.shape), 1, 0,
                                        True, True, y, "tap")
    prev = fastbp.get_num_threads()
    try:
        for threads, split in ((1, 1 << 62), (2, 0)):
            fastbp.set_num_threads(threads)
            monkeypatch.setattr(K, "SPLIT_MACS", split)
            run = K.conv2d_maxpool_forward(x, W, b, 1, 0, True, 2, None, "tap")
            run += K.conv2d_maxpool_backward(x, W, dyp, idx, yp, 1, 0, 2, None, True, True,
                                             True, "tap")
            for a, r in zip(run, ref):
                np.testing.assert_array_equal(a, r)
    finally:
        fastbp.set_num_threads(prev)


def test_inputs_not_mutated(rng):
    x, W, b = _data(rng, 3, 2, 9, 4, 3, np.float64)
    copies = [a.copy() for a in (x, W, b)]
    yp, idx = K.conv2d_maxpool_forward(x, W, b, 1, 0, True, 2, None, "tap")
    dyp = rng.standard_normal(yp.shape)
    more = [a.copy() for a in (yp, idx, dyp)]
    K.conv2d_maxpool_backward(x, W, dyp, idx, yp, 1, 0, 2, None, True, True, True, "tap")
    for a, c in zip((x, W, b, yp, idx, dyp), copies + more):
        np.testing.assert_array_equal(a, c)


def test_errors_name_the_pool_layer(rng):
    conv = Conv2D(1, 2, 3)
    params = conv.init(rng)
    x = rng.standard_normal((2, 1, 5, 5)).astype(np.float32)      # conv output 3×3
    with pytest.raises(ValueError, match=r"MaxPool2D\(4\).*window \(4, 4\).*\(3, 3\)"):
        conv.forward(params, x, relu=True, pool=MaxPool2D(4))
    model = fastbp.Sequential(conv, ReLU(), MaxPool2D(4))
    with pytest.raises(ValueError, match=r"MaxPool2D\(4\)"):
        fastbp.forward(model, [params, {}, {}], x)
    yp, cache = conv.forward(params, x, relu=True, pool=MaxPool2D(2))
    assert yp.shape == (2, 2, 1, 1)
    with pytest.raises(ValueError, match=r"MaxPool2D\(2\).*\(2, 2, 1, 1\).*\(2, 2, 3, 3\)"):
        conv.backward(params, cache, np.zeros((2, 2, 3, 3), np.float32))
    with pytest.raises(TypeError, match="float32"):
        conv.backward(params, cache, np.zeros((2, 2, 1, 1), np.float64))
    with pytest.raises(TypeError, match="MaxPool2D"):
        conv.forward(params, x, pool=ReLU())


def test_matches_torch(rng):
    torch = pytest.importorskip("torch")
    model = fastbp.Sequential(Conv2D(1, 4, 5), ReLU(), MaxPool2D(2), Conv2D(4, 6, 3),
                              ReLU(), MaxPool2D(3, 2), Flatten())
    params = fastbp.init(model, seed=3, dtype=np.float64)
    x = rng.standard_normal((5, 1, 20, 19))
    y, cache = fastbp.forward(model, params, x)
    assert cache[1] is network._FUSED and cache[5] is network._FUSED
    dy = rng.standard_normal(y.shape)
    dx, grads = fastbp.backward(model, params, cache, dy)

    t = {k: torch.tensor(v, requires_grad=True) for k, v in
         (("W0", params[0]["W"]), ("b0", params[0]["b"]), ("W3", params[3]["W"]),
          ("b3", params[3]["b"]))}
    tx = torch.tensor(x, requires_grad=True)
    F = torch.nn.functional
    h = F.max_pool2d(F.relu(F.conv2d(tx, t["W0"], t["b0"])), 2)
    h = F.max_pool2d(F.relu(F.conv2d(h, t["W3"], t["b3"])), 3, 2).flatten(1)
    h.backward(torch.tensor(dy))
    np.testing.assert_allclose(y, h.detach().numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-10, atol=1e-12)
    for got, name in ((grads[0]["W"], "W0"), (grads[0]["b"], "b0"), (grads[3]["W"], "W3"),
                      (grads[3]["b"], "b3")):
        np.testing.assert_allclose(got, t[name].grad.numpy(), rtol=1e-10, atol=1e-12)


def test_tap_kernels_take_non_contiguous_gradients(rng):
    """The tap backward flattens gradient planes: a Fortran-ordered dy (or pooled dyp)
    gives the same result as a C-ordered one."""
    x, W, b = _data(rng, 4, 2, 9, 3, 3, np.float64)
    y = K.conv2d_forward(x, W, b, 1, 0, True, "tap")
    dy = rng.standard_normal(y.shape)
    ref = K.conv2d_backward(x, W, dy, 1, 0, True, True, y, "tap")
    got = K.conv2d_backward(x, W, np.asfortranarray(dy), 1, 0, True, True,
                            np.asfortranarray(y), "tap")
    for a, r in zip(got, ref):
        np.testing.assert_array_equal(a, r)
    yp, idx = K.conv2d_maxpool_forward(x, W, b, 1, 0, True, 2, None, "tap")
    dyp = rng.standard_normal(yp.shape)
    ref = K.conv2d_maxpool_backward(x, W, dyp, idx, yp, 1, 0, 2, None, True, True, True, "tap")
    got = K.conv2d_maxpool_backward(x, W, np.asfortranarray(dyp), np.asfortranarray(idx),
                                    np.asfortranarray(yp), 1, 0, 2, None, True, True, True,
                                    "tap")
    for a, r in zip(got, ref):
        np.testing.assert_array_equal(a, r)
