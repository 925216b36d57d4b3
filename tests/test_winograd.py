"""Winograd F(2×2, 3×3) convolution (fastbp.kernels.winograd) against plain loops,
finite differences, PyTorch (where installed) and the per-tap path; its dispatch and
determinism."""
import numpy as np
import pytest

from fastbp import config
from fastbp.kernels import conv as K
from fastbp.kernels import winograd as Wg
from fastbp.layers import Conv2D

import naive
from fd import central_diff, central_diff_at

pytestmark = pytest.mark.skipif(not K._cblas.available,
                                reason="SciPy's BLAS has no scipy_cblas_*gemm")

# N, C, F, H, W, ph, pw: odd and even outputs, every padding 0..2, one pixel of output
CASES = [(2, 3, 4, 5, 5, 1, 1), (3, 2, 5, 7, 6, 0, 0), (1, 4, 2, 4, 9, 2, 0),
         (2, 5, 3, 7, 4, 0, 2), (1, 1, 1, 3, 3, 0, 0), (2, 17, 18, 9, 8, 1, 2),
         (1, 2, 3, 1, 1, 1, 1)]


def _data(case, rng, dtype=np.float64):
    N, C, F, H, Wd, ph, pw = case
    x = rng.standard_normal((N, C, H, Wd)).astype(dtype)
    W = rng.standard_normal((F, C, 3, 3)).astype(dtype)
    b = rng.standard_normal(F).astype(dtype)
    return x, W, b, (ph, pw)


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("relu", [False, True])
def test_matches_naive(case, relu, rng):
    x, W, b, p = _data(case, rng)
    y = K.conv2d_forward(x, W, b, 1, p, relu, "winograd")
    ref = naive.conv2d(x, W, b, 1, p)
    if relu:
        ref = np.maximum(ref, 0)
    np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-12)
    dy = rng.standard_normal(y.shape)
    dz = dy * (ref > 0) if relu else dy
    dx, dW, db = K.conv2d_backward(x, W, dy, 1, p, True, True, y if relu else None,
                                   "winograd")
    rdx, rdW, rdb = naive.conv2d_backward_direct(x, W, dz, 1, p)
    for got, want in ((dx, rdx), (dW, rdW), (db, rdb)):
        np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("case", CASES[:4] + CASES[5:6], ids=str)
def test_finite_differences(case, rng):
    x, W, b, p = _data(case, rng)
    if x.shape[1] > 8:                          # keep the float64 differences quick
        x, W = x[:, :3].copy(), W[:, :3].copy()
        W = W[:4].copy()
        b = b[:4].copy()
    y = K.conv2d_forward(x, W, b, 1, p, False, "winograd")
    g = rng.standard_normal(y.shape)

    def loss():
        return float(np.sum(g * K.conv2d_forward(x, W, b, 1, p, False, "winograd")))

    dx, dW, db = K.conv2d_backward(x, W, g, 1, p, True, True, None, "winograd")
    for analytic, arr in ((dx, x), (dW, W), (db, b)):
        np.testing.assert_allclose(analytic, central_diff(loss, arr), rtol=1e-6, atol=1e-7)


def test_transform_weights_is_g_w_gt(rng):
    W = rng.standard_normal((3, 2, 3, 3))
    U = Wg.transform_weights(W)
    G = np.array(Wg._G)
    for f in range(3):
        for c in range(2):
            np.testing.assert_allclose(U[:, f, c].reshape(4, 4), G @ W[f, c] @ G.T,
                                       rtol=1e-14)
    dU = rng.standard_normal((16, 3, 2))
    dW = Wg.weight_gradient(dU)
    np.testing.assert_allclose(dW[1, 0], G.T @ dU[:, 1, 0].reshape(4, 4) @ G, rtol=1e-14)


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("pool", [2, (3, 2)])
def test_fused_pool_matches_separate(relu, pool, rng):
    x, W, b, p = _data((3, 16, 16, 10, 9, 1, 1), rng)
    yp, idx = K.conv2d_maxpool_forward(x, W, b, 1, p, relu, pool, None, "winograd")
    y = naive.conv2d(x, W, b, 1, p)
    if relu:
        y = np.maximum(y, 0)
    ryp, ridx = naive.maxpool2d(y, pool)
    np.testing.assert_allclose(yp, ryp, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(idx.reshape(ridx.shape), ridx)
    dyp = rng.standard_normal(yp.shape)
    got = K.conv2d_maxpool_backward(x, W, dyp, idx, yp, 1, p, pool, None, True, True, relu,
                                    "winograd")
    dz = naive.maxpool2d_backward(dyp * (ryp > 0) if relu else dyp, ridx, y.shape)
    want = naive.conv2d_backward_direct(x, W, dz, 1, p)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-11, atol=1e-11)


def test_float32_stays_float32_and_agrees(rng):
    x, W, b, p = _data((4, 16, 16, 12, 12, 1, 1), rng, np.float32)
    y = K.conv2d_forward(x, W, b, 1, p, True, "winograd")
    y64 = K.conv2d_forward(x.astype(np.float64), W.astype(np.float64), b.astype(np.float64),
                           1, p, True, "direct")
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, y64, rtol=1e-4, atol=1e-4 * np.abs(y64).max())
    dy = rng.standard_normal(y.shape).astype(np.float32)
    grads = K.conv2d_backward(x, W, dy, 1, p, True, True, y, "winograd")
    ref = K.conv2d_backward(x.astype(np.float64), W.astype(np.float64),
                            dy.astype(np.float64), 1, p, True, True, y64, "direct")
    for g, r in zip(grads, ref):
        assert g.dtype == np.float32
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4 * np.abs(r).max())


def test_same_bits_on_one_and_two_threads(rng, monkeypatch):
    x, W, b, p = _data((6, 16, 16, 8, 8, 1, 1), rng, np.float32)
    dy = rng.standard_normal((6, 16, 8, 8)).astype(np.float32)
    monkeypatch.setattr(K, "SPLIT_MACS", 0)     # split every call over the threads
    out = []
    for n in (1, 2):
        config.set_num_threads(n)
        try:
            y = K.conv2d_forward(x, W, b, 1, p, True, "winograd")
            out.append((y,) + K.conv2d_backward(x, W, dy, 1, p, True, True, y, "winograd"))
        finally:
            config.set_num_threads(2)
    for a, c in zip(*out):
        np.testing.assert_array_equal(a, c)


def test_inputs_not_mutated(rng):
    x, W, b, p = _data((2, 16, 16, 6, 6, 1, 1), rng, np.float32)
    copies = [a.copy() for a in (x, W, b)]
    y = K.conv2d_forward(x, W, b, 1, p, True, "winograd")
    dy = rng.standard_normal(y.shape).astype(np.float32)
    dyc, yc = dy.copy(), y.copy()
    K.conv2d_backward(x, W, dy, 1, p, True, True, y, "winograd")
    for a, c in zip((x, W, b, dy, y), copies + [dyc, yc]):
        np.testing.assert_array_equal(a, c)


def test_dispatch(monkeypatch):
    ok = (3, 3, (1, 1), (1, 1), 32, 32)         # kernel, stride, padding, output plane
    assert K.wino_chosen(32, 32, *ok)
    assert K.wino_chosen(16, 32, *ok) and K.wino_chosen(32, 16, *ok)
    assert not K.wino_chosen(16, 16, *ok)                          # C·F too small
    assert not K.wino_chosen(8, 64, *ok)                           # thin GEMMs
    assert not K.wino_chosen(32, 32, 3, 3, (1, 1), (1, 1), 12, 12)  # small planes
    assert K.wino_chosen(32, 32, 3, 3, (1, 1), (2, 0), 16, 16)
    assert not K.wino_chosen(32, 32, 5, 5, (1, 1), (1, 1), 32, 32)  # not 3×3
    assert not K.wino_chosen(32, 32, 3, 3, (2, 2), (1, 1), 32, 32)  # not stride 1
    assert not K.wino_chosen(32, 32, 3, 3, (1, 1), (3, 1), 32, 32)  # dx would pad by −1
    # auto runs Winograd where chosen (the kernel entry is replaced to observe it)
    calls = []
    real = K._wino_forward
    monkeypatch.setattr(K, "_wino_forward", lambda *a, **k: (calls.append(1), real(*a, **k)))
    x = np.zeros((2, 32, 16, 16), np.float32)
    W = np.zeros((32, 32, 3, 3), np.float32)
    K.conv2d_forward(x, W, np.zeros(32, np.float32), 1, 1)
    assert calls
    calls.clear()
    K.conv2d_forward(x, W[:, :, :2, :2].copy(), np.zeros(32, np.float32), 1, 1)
    assert not calls
    # a shape Winograd cannot run falls back to the taps even when asked by name
    y = K.conv2d_forward(x[:, :, :6, :6], W, np.zeros(32, np.float32), 1, 3, False,
                         "winograd")
    assert y.shape == (2, 32, 10, 10) and not calls


def test_layer_gradcheck_on_winograd_shape(rng):
    """A Conv2D that "auto" runs on Winograd (16 channels in, 32 out, 16×16 planes),
    checked end to end by finite differences on a few weights and inputs."""
    layer = Conv2D(16, 32, 3, padding=1)
    params = layer.init(rng, np.float64)
    x = rng.standard_normal((1, 16, 16, 16))
    assert K.wino_chosen(16, 32, 3, 3, (1, 1), (1, 1), 16, 16)
    y, cache = layer.forward(params, x)
    g = rng.standard_normal(y.shape)
    dx, grads = layer.backward(params, cache, g)
    pos = [(0, 3, 2, 2), (0, 15, 0, 15), (0, 0, 15, 0)]
    wpos = [(0, 0, 0, 0), (7, 3, 1, 2), (31, 15, 2, 2)]

    def loss():
        return float(np.sum(g * layer.forward(params, x)[0]))
    for arr, grad, where in ((x, dx, pos), (params["W"], grads["W"], wpos)):
        for i in where:
            assert abs(central_diff_at(loss, arr, i) - grad[i]) < 1e-6 * max(1, abs(grad[i]))


def test_matches_torch(rng):
    torch = pytest.importorskip("torch")
    x, W, b, p = _data((2, 16, 32, 16, 17, 1, 1), rng, np.float32)
    assert K.wino_chosen(16, 32, 3, 3, (1, 1), p, 16, 17)
    xt = torch.tensor(x, requires_grad=True)
    Wt = torch.tensor(W, requires_grad=True)
    bt = torch.tensor(b, requires_grad=True)
    yt = torch.relu(torch.nn.functional.conv2d(xt, Wt, bt, padding=p))
    y = K.conv2d_forward(x, W, b, 1, p, True)          # auto: Winograd
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-4, atol=1e-4)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    yt.backward(torch.tensor(dy))
    dx, dW, db = K.conv2d_backward(x, W, dy, 1, p, True, True, y)
    for got, t in ((dx, xt), (dW, Wt), (db, bt)):
        np.testing.assert_allclose(got, t.grad.numpy(), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("relu", [False, True])
def test_fused_pool_nan_and_ties_as_pytorch(relu, rng):
    """A NaN reaches the windows it touches and wins there (the exact pass); ReLU's zeros
    tie, and the first of the row-major window order takes the gradient."""
    x, W, b, p = _data((2, 16, 16, 8, 8, 1, 1), rng)
    x[1, 3, 4, 5] = np.nan
    W[:, :, :, :] = np.abs(W)                   # some windows all-zero after ReLU: ties
    b[:] = -50.0
    yp, idx = K.conv2d_maxpool_forward(x, W, b, 1, p, relu, 2, None, "winograd")
    y = naive.conv2d(x, W, b, 1, p)
    if relu:
        y = np.where(np.isnan(y), y, np.maximum(y, 0))
    ryp, ridx = naive.maxpool2d(y, 2)
    assert np.isnan(yp).any()
    np.testing.assert_allclose(yp, ryp, rtol=1e-12, atol=1e-12)   # NaNs compare equal
    np.testing.assert_array_equal(idx, ridx)


hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies


@hypothesis.given(N=st.integers(1, 3), C=st.integers(1, 5), F=st.integers(1, 5),
                  H=st.integers(1, 9), Wd=st.integers(1, 9), ph=st.integers(0, 2),
                  pw=st.integers(0, 2), relu=st.booleans(), bias=st.booleans(),
                  f32=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_property_any_shape_matches_plain_loops(N, C, F, H, Wd, ph, pw, relu, bias, f32,
                                                seed):
    """Random shapes (every padding, odd and even outputs), dtypes, bias and ReLU: the
    Winograd forward and backward give the plain-loop numbers, in the input's dtype."""
    hypothesis.assume(H + 2 * ph >= 3 and Wd + 2 * pw >= 3)
    rng = np.random.default_rng(seed)
    dt = np.float32 if f32 else np.float64
    x = rng.standard_normal((N, C, H, Wd)).astype(dt)
    W = rng.standard_normal((F, C, 3, 3)).astype(dt)
    b = rng.standard_normal(F).astype(dt) if bias else np.zeros(0, dt)
    tol = dict(rtol=2e-4, atol=2e-4) if f32 else dict(rtol=1e-11, atol=1e-11)
    y = K.conv2d_forward(x, W, b, 1, (ph, pw), relu, "winograd")
    x64, W64 = x.astype(np.float64), W.astype(np.float64)
    ref = naive.conv2d(x64, W64, b.astype(np.float64) if bias else None, 1, (ph, pw))
    if relu:
        ref = np.maximum(ref, 0)
    assert y.dtype == dt
    np.testing.assert_allclose(y, ref, **tol)
    dy = rng.standard_normal(y.shape).astype(dt)
    dx, dW, db = K.conv2d_backward(x, W, dy, 1, (ph, pw), bias, True, y if relu else None,
                                   "winograd")
    dz = dy.astype(np.float64) * (y > 0) if relu else dy.astype(np.float64)
    rdx, rdW, rdb = naive.conv2d_backward_direct(x64, W64, dz, 1, (ph, pw))
    for got, want in ((dx, rdx), (dW, rdW)) + (((db, rdb),) if bias else ()):
        assert got.dtype == dt
        np.testing.assert_allclose(got, want, **tol)
    assert db.shape == ((F,) if bias else (0,))


@pytest.mark.parametrize("groups,limit", [(1, 1 << 24), (4, 1 << 24), (16, 1 << 24),
                                          (16, 16 * 16 * 16 * 2)])
def test_weight_gradient_groups(groups, limit, rng, monkeypatch):
    """The weight-gradient partials (groups of consecutive samples, an empty last group
    included: 5 samples in 4 groups of 2) give the plain-loop gradient, and their number
    follows the shape-only rule."""
    monkeypatch.setattr(Wg, "DW_GROUPS", groups)
    monkeypatch.setattr(Wg, "DW_PARTIAL_ENTRIES", limit)
    x, W, b, p = _data((5, 16, 16, 6, 7, 1, 1), rng)
    assert Wg.dw_groups(5, 16, 16) == min(5, groups, limit // (16 * 16 * 16))
    dy = rng.standard_normal((5, 16, 6, 7))
    dx, dW, db = K.conv2d_backward(x, W, dy, 1, p, True, True, None, "winograd")
    rdx, rdW, rdb = naive.conv2d_backward_direct(x, W, dy, 1, p)
    for got, want in ((dx, rdx), (dW, rdW), (db, rdb)):
        np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-11)


def test_unknown_method_is_a_clear_error(rng):
    x, W, b, p = _data((1, 2, 2, 5, 5, 1, 1), rng)
    dy = np.zeros((1, 2, 5, 5))
    for call in (lambda: K.conv2d_forward(x, W, b, 1, p, False, "winogard"),
                 lambda: K.conv2d_backward(x, W, dy, 1, p, True, True, None, "Winograd"),
                 lambda: K.conv2d_maxpool_forward(x, W, b, 1, p, False, 2, None, "fft"),
                 lambda: K.conv2d_maxpool_backward(x, W, dy[:, :, :2, :2], np.zeros(
                     (1, 2, 2, 2), np.int32), dy[:, :, :2, :2], 1, p, 2, None, True, True,
                     False, "im2col")):
        with pytest.raises(ValueError, match=r"conv2d_\w+: method must be one of auto, "
                                             r"direct, gemm, tap, winograd; got '\w+'"):
            call()
