"""Conv2D: kernels and layer against finite differences, the plain-loop reference
(tests/naive.py) and the flipped-kernel identity; dtypes, determinism, errors."""
import itertools

import numpy as np
import pytest

import fastbp
from fastbp import gradcheck, losses
from fastbp.kernels import conv as K
from fastbp.layers import AvgPool2D, Conv2D, Dense, Flatten, MaxPool2D, ReLU

import naive
from fd import central_diff

METHODS = ["direct", "gemm", "tap", "winograd"]  # "tap" falls back to "gemm" for stride > 1,
# "winograd" to "tap" for kernels other than 3×3 at stride 1

# (stride, padding, kernel) grid; C, F, N and the input size vary along it so that every
# channel count 1..5, batch 1 and > 1, square and non-square inputs all appear.
GRID = [(s, p, k) for s, p, k in itertools.product([1, 2, (2, 1)], [0, 1, 2, (0, 2)],
                                                   [(1, 1), (3, 3), (2, 3), (3, 1)])]


def _case(i, rng, dtype=np.float64):
    s, p, k = GRID[i]
    C, F = 1 + i % 5, 1 + (3 * i + 2) % 5
    N = 1 if i % 3 == 0 else 3
    H, W = (5, 7) if i % 2 else (6, 6)
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    Wt = rng.standard_normal((F, C) + k).astype(dtype)
    b = rng.standard_normal(F).astype(dtype)
    return x, Wt, b, s, p


def _ids(i):
    s, p, k = GRID[i]
    return f"s{s}-p{p}-k{k[0]}x{k[1]}"


# ---------------------------------------------------------------- finite differences
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("i", range(len(GRID)), ids=_ids)
def test_conv_kernels_finite_differences(i, method, rng):
    x, Wt, b, s, p = _case(i, rng)
    y = K.conv2d_forward(x, Wt, b, s, p, False, method)
    g = rng.standard_normal(y.shape)                       # L = Σ g·y, so dL/dy = g

    def loss():
        return float(np.sum(g * K.conv2d_forward(x, Wt, b, s, p, False, method)))

    dx, dW, db = K.conv2d_backward(x, Wt, g, s, p, True, True, None, method)
    for analytic, arr in ((dx, x), (dW, Wt), (db, b)):
        numeric = central_diff(loss, arr)
        np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("stride,padding", [(1, 0), (2, 1), ((1, 2), (2, 0))])
def test_conv_layer_gradcheck(stride, padding, rng):
    layer = Conv2D(3, 4, (3, 2), stride=stride, padding=padding)
    params = layer.init(rng, np.float64)
    params["b"] = rng.standard_normal(4)
    x = rng.standard_normal((2, 3, 7, 6))
    y, _ = layer.forward(params, x)
    target = rng.standard_normal(y.shape)
    rep = gradcheck(layer, params, x, target, losses.mse)
    assert rep.passed(1e-6), str(rep)


def test_small_cnn_with_flatten_gradcheck(rng):
    model = fastbp.Sequential(Conv2D(1, 3, 3, padding=1), ReLU(), MaxPool2D(2),
                              Conv2D(3, 4, 2), ReLU(), AvgPool2D(2, 1), Flatten(), Dense(4, 3))
    params = fastbp.init(model, seed=1, dtype=np.float64)
    x = rng.standard_normal((3, 1, 6, 6))
    labels = np.array([0, 2, 1])
    rep = gradcheck(model, params, x, labels, losses.softmax_cross_entropy)
    assert rep.passed(1e-5), str(rep)


# ---------------------------------------------------------------- plain-loop reference
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("i", range(0, len(GRID), 2), ids=lambda i: _ids(i))
def test_conv_matches_naive(i, method, rng):
    x, Wt, b, s, p = _case(i, rng)
    yr = naive.conv2d(x, Wt, b, s, p)
    dy = rng.standard_normal(yr.shape)
    np.testing.assert_allclose(K.conv2d_forward(x, Wt, b, s, p, False, method), yr,
                               rtol=1e-12, atol=1e-12)
    dxr, dWr, dbr = naive.conv2d_backward_direct(x, Wt, dy, s, p)
    dx, dW, db = K.conv2d_backward(x, Wt, dy, s, p, True, True, None, method)
    np.testing.assert_allclose(dx, dxr, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dW, dWr, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(db, dbr, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("i", range(len(GRID)), ids=_ids)
def test_flipped_kernel_identity(i, rng):
    """dx = correlation of the dilated, (K−1−p)-padded dy with the flipped kernel
    equals the direct derivative, and both equal what the kernels return."""
    x, Wt, b, s, p = _case(i, rng)
    dy = rng.standard_normal(naive.conv2d(x, Wt, b, s, p).shape)
    flipped = naive.conv2d_dx_flipped(dy, Wt, x.shape, s, p)
    direct, _, _ = naive.conv2d_backward_direct(x, Wt, dy, s, p)
    np.testing.assert_allclose(flipped, direct, rtol=1e-12, atol=1e-12)
    for method in METHODS:
        dx, _, _ = K.conv2d_backward(x, Wt, dy, s, p, True, True, None, method)
        np.testing.assert_allclose(dx, flipped, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_fused_relu(method, rng):
    x, Wt, b, s, p = _case(5, rng)
    yr = naive.conv2d(x, Wt, b, s, p)
    y = K.conv2d_forward(x, Wt, b, s, p, True, method)
    np.testing.assert_allclose(y, np.maximum(yr, 0), rtol=1e-12, atol=1e-12)
    dy = rng.standard_normal(y.shape)
    dxr, dWr, dbr = naive.conv2d_backward_direct(x, Wt, dy * (yr > 0), s, p)
    dx, dW, db = K.conv2d_backward(x, Wt, dy, s, p, True, True, y, method)
    for a, r in ((dx, dxr), (dW, dWr), (db, dbr)):
        np.testing.assert_allclose(a, r, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_input_grad_false_and_no_bias(method, rng):
    x, Wt, b, s, p = _case(7, rng)
    dy = rng.standard_normal(naive.conv2d(x, Wt, None, s, p).shape)
    dx, dW, db = K.conv2d_backward(x, Wt, dy, s, p, False, False, None, method)
    assert dx is None and db.shape == (0,)
    np.testing.assert_allclose(dW, naive.conv2d_backward_direct(x, Wt, dy, s, p)[1], rtol=1e-12)
    layer = Conv2D(x.shape[1], Wt.shape[0], Wt.shape[2:], stride=s, padding=p, bias=False)
    params = {"W": Wt}
    y, cache = layer.forward(params, x)
    np.testing.assert_allclose(y, naive.conv2d(x, Wt, None, s, p), rtol=1e-12)
    dx, grads = layer.backward(params, cache, dy, input_grad=False)
    assert dx is None and set(grads) == {"W"}


def test_gemm_chunks_match_one_chunk(rng, monkeypatch):
    x = rng.standard_normal((5, 4, 6, 7))
    Wt = rng.standard_normal((3, 4, 3, 3))
    b = rng.standard_normal(3)
    dy = rng.standard_normal((5, 3, 6, 7))
    y1 = K.conv2d_forward(x, Wt, b, 1, 1, True, "gemm")
    g1 = K.conv2d_backward(x, Wt, dy, 1, 1, True, True, y1, "gemm")
    monkeypatch.setattr(K, "CHUNK_ELEMENTS", 36 * 42 * 2)          # two samples per chunk
    y2 = K.conv2d_forward(x, Wt, b, 1, 1, True, "gemm")
    g2 = K.conv2d_backward(x, Wt, dy, 1, 1, True, True, y2, "gemm")
    np.testing.assert_allclose(y2, y1, rtol=1e-13, atol=1e-13)
    for a, r in zip(g2, g1):
        np.testing.assert_allclose(a, r, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- dtypes, threads, determinism
@pytest.mark.parametrize("method", METHODS)
def test_float32_agrees_with_float64(method, rng):
    x, Wt, b, s, p = _case(9, rng)
    y64 = K.conv2d_forward(x, Wt, b, s, p, True, method)
    dy = rng.standard_normal(y64.shape)
    g64 = K.conv2d_backward(x, Wt, dy, s, p, True, True, y64, method)
    f = np.float32
    y32 = K.conv2d_forward(x.astype(f), Wt.astype(f), b.astype(f), s, p, True, method)
    g32 = K.conv2d_backward(x.astype(f), Wt.astype(f), dy.astype(f), s, p, True, True, y32, method)
    assert y32.dtype == f and all(g.dtype == f for g in g32)
    np.testing.assert_allclose(y32, y64, rtol=1e-4, atol=1e-4)
    for a, r in zip(g32, g64):
        np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_layer_keeps_dtype(dtype, rng):
    layer = Conv2D(2, 3, 3, padding=1)
    params = layer.init(rng, dtype)
    assert params["W"].dtype == dtype and params["W"].shape == (3, 2, 3, 3)
    x = rng.standard_normal((2, 2, 5, 5)).astype(dtype)
    y, cache = layer.forward(params, x)
    dx, grads = layer.backward(params, cache, np.ones_like(y))
    assert y.dtype == dx.dtype == grads["W"].dtype == grads["b"].dtype == dtype


@pytest.mark.parametrize("stride", [1, (2, 1)])
@pytest.mark.parametrize("method", METHODS)
def test_serial_parallel_identical_and_deterministic(method, stride, rng, parallel_mode):
    x = rng.standard_normal((6, 4, 9, 8)).astype(np.float32)
    Wt = rng.standard_normal((5, 4, 3, 2)).astype(np.float32)
    b = rng.standard_normal(5).astype(np.float32)
    OH = 9 if stride == 1 else 5
    dy = rng.standard_normal((6, 5, OH, 9)).astype(np.float32)
    out = []
    for par in (False, True, True):
        parallel_mode(par, families=("conv",))
        y = K.conv2d_forward(x, Wt, b, stride, 1, True, method)
        out.append((y,) + K.conv2d_backward(x, Wt, dy, stride, 1, True, True, y, method))
    for other in out[1:]:
        for a, r in zip(other, out[0]):
            np.testing.assert_array_equal(a, r)


@pytest.mark.parametrize("KW", [1, 3, 4, 5, 9])
def test_flat_dw_kernel_rows_of_any_width(KW, rng, parallel_mode):
    """The flat direct dW takes the taps of a kernel row four at a time, then one by one:
    every width matches the plain-loop derivative (float64), and in float32 the serial and
    parallel builds give the same bits."""
    x = rng.standard_normal((3, 2, 7, KW + 5))
    Wt = rng.standard_normal((4, 2, 3, KW))
    dy = rng.standard_normal((3, 4, 7, 6))                  # padding (1, 0): OH 7, OW 6
    _, dW_ref, db_ref = naive.conv2d_backward_direct(x, Wt, dy, 1, (1, 0))
    xp = K._padded(x, 1, 0)
    for build in (K.flat_backward_dw.serial, K.flat_backward_dw.parallel):
        dW, db = np.zeros_like(Wt), np.zeros(4)
        build(xp, dy, dW, db)
        np.testing.assert_allclose(dW, dW_ref, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(db, db_ref, rtol=1e-12, atol=1e-12)
    f = np.float32
    out = []
    for build in (K.flat_backward_dw.serial, K.flat_backward_dw.parallel):
        dW, db = np.zeros(Wt.shape, f), np.zeros(4, f)
        build(xp.astype(f), dy.astype(f), dW, db)
        out.append((dW, db))
    for a, r in zip(*out):
        np.testing.assert_array_equal(a, r)
    np.testing.assert_allclose(out[0][0], dW_ref, rtol=1e-4, atol=1e-4)


def test_auto_mixes_direct_dw_and_gemm_dx(rng, monkeypatch):
    """auto with one input channel and no CBLAS: flat direct forward and dW, GEMM dx — same
    numbers."""
    monkeypatch.setattr(K._cblas, "available", False)
    x = rng.standard_normal((4, 1, 12, 11))
    Wt = rng.standard_normal((6, 1, 3, 3))
    b = rng.standard_normal(6)
    assert K.choose_backward(1, (1, 1), 10 ** 9) == ("direct", "gemm")
    y = K.conv2d_forward(x, Wt, b, 1, 1, True)
    dy = rng.standard_normal(y.shape)
    yr = naive.conv2d(x, Wt, b, 1, 1)
    np.testing.assert_allclose(y, np.maximum(yr, 0), rtol=1e-12, atol=1e-12)
    ref = naive.conv2d_backward_direct(x, Wt, dy * (yr > 0), 1, 1)
    for a, r in zip(K.conv2d_backward(x, Wt, dy, 1, 1, True, True, y), ref):
        np.testing.assert_allclose(a, r, rtol=1e-12, atol=1e-12)


def test_inputs_not_mutated(rng):
    layer = Conv2D(3, 2, 3, padding=1)
    params = layer.init(rng, np.float64)
    x = rng.standard_normal((2, 3, 5, 5))
    keep = [x.copy(), params["W"].copy(), params["b"].copy()]
    y, cache = layer.forward(params, x)
    dy = rng.standard_normal(y.shape)
    dy0 = dy.copy()
    layer.backward(params, cache, dy)
    for a, r in zip([x, params["W"], params["b"], dy], keep + [dy0]):
        np.testing.assert_array_equal(a, r)


def test_non_contiguous_input(rng):
    layer = Conv2D(2, 3, 2)
    params = layer.init(rng, np.float64)
    x = rng.standard_normal((5, 5, 2, 3)).transpose(2, 3, 0, 1)       # (2, 3, 5, 5) view
    x = x[:, :2]
    y, _ = layer.forward(params, x)
    np.testing.assert_allclose(y, naive.conv2d(x, params["W"], params["b"]), rtol=1e-12)


def test_choose_method(monkeypatch):
    big = 10 * K.DIRECT_MAX_WORK
    assert K.choose_method(64, (2, 2), K.DIRECT_MAX_WORK - 1) == "direct"
    assert K.choose_method(64, (1, 1), big) == ("tap" if K._cblas.available else "gemm")
    assert K.choose_method(64, (2, 1), big) == "gemm"
    assert K.choose_method(2, (1, 1), big) == ("tap" if K._cblas.available else "direct")
    assert K.choose_method(1, (2, 1), big) == "gemm"
    # one input channel without AVX-512: direct forward and dW alone; with dx wanted, taps
    monkeypatch.setattr(K, "TAP_MIN_CHANNELS", 2)
    assert K.choose_method(1, (1, 1), big) == "direct"
    assert K.choose_backward(1, (1, 1), big, input_grad=False) == ("direct", "gemm")
    assert K.choose_backward(1, (1, 1), big, input_grad=True) == \
        (("tap", "tap") if K._cblas.available else ("direct", "gemm"))
    # with AVX-512 (OpenBLAS's 512-bit GEMM kernels) one channel runs on taps too
    monkeypatch.setattr(K, "TAP_MIN_CHANNELS", 1)
    tap = "tap" if K._cblas.available else "direct"
    assert K.choose_method(1, (1, 1), big) == tap
    assert K.choose_backward(1, (1, 1), big, input_grad=False) == \
        (("tap", "tap") if K._cblas.available else ("direct", "gemm"))
    monkeypatch.setattr(K._cblas, "available", False)        # SciPy without OpenBLAS CBLAS
    assert K.choose_method(64, (1, 1), big) == "gemm"
    assert K.choose_method(1, (1, 1), big) == "direct"
    assert K.choose_backward(64, (1, 1), big) == ("gemm", "gemm")


# ---------------------------------------------------------------- per-tap GEMMs
TAP_CASES = [  # N, C, H, W, F, KH, KW, ph, pw
    (3, 4, 7, 6, 5, 3, 2, 1, 0), (5, 2, 5, 5, 3, 3, 3, 2, 2), (1, 1, 4, 4, 1, 1, 1, 0, 0),
    (7, 3, 9, 8, 4, 5, 3, 0, 1), (4, 6, 6, 6, 3, 3, 3, 4, 3), (2, 3, 3, 8, 2, 3, 8, 0, 0)]


@pytest.mark.skipif(not K._cblas.available, reason="SciPy's BLAS has no scipy_cblas_*gemm")
@pytest.mark.parametrize("case", TAP_CASES, ids=str)
@pytest.mark.parametrize("group", [1, 1 << 17], ids=["one-sample-groups", "big-groups"])
@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("mode", [0, 1, 2], ids=["F-by-pixels", "pixels-by-F", "stacked"])
def test_tap_matches_naive(case, group, split, mode, rng, monkeypatch):
    """Per-tap GEMMs (also with padding >= kernel, groups of samples, the batch split
    over threads and each forward GEMM layout) give the plain-loop numbers: y, fused
    ReLU, dx, dW, db, and y without a bias."""
    N, C, H, Wd, F, KH, KW, ph, pw = case
    monkeypatch.setattr(K, "TAP_T_MIN_K", 0 if mode == 1 else 1 << 30)
    monkeypatch.setattr(K, "TAP_STACK_MIN_K", 0 if mode == 2 else 1 << 30)
    assert K.tap_mode(KW * C) == mode
    monkeypatch.setattr(K, "TAP_GROUP_ELEMENTS", group)
    monkeypatch.setattr(K, "SPLIT_MACS", 0 if split else 1 << 62)
    x = rng.standard_normal((N, C, H, Wd))
    Wt = rng.standard_normal((F, C, KH, KW))
    b = rng.standard_normal(F)
    yr = naive.conv2d(x, Wt, b, 1, (ph, pw))
    dy = rng.standard_normal(yr.shape)
    y = K.conv2d_forward(x, Wt, b, 1, (ph, pw), True, "tap")
    np.testing.assert_allclose(y, np.maximum(yr, 0), rtol=1e-12, atol=1e-12)
    y0 = K.conv2d_forward(x, Wt, np.zeros(0), 1, (ph, pw), False, "tap")
    np.testing.assert_allclose(y0, yr - b[:, None, None], rtol=1e-12, atol=1e-12)
    ref = naive.conv2d_backward_direct(x, Wt, dy * (yr > 0), 1, (ph, pw))
    got = K.conv2d_backward(x, Wt, dy, 1, (ph, pw), True, True, y, "tap")
    for a, r in zip(got, ref):
        np.testing.assert_allclose(a, r, rtol=1e-12, atol=1e-12)
    dx, dW, db = K.conv2d_backward(x, Wt, dy, 1, (ph, pw), False, False, None, "tap")
    assert dx is None and db.shape == (0,)
    np.testing.assert_allclose(dW, naive.conv2d_backward_direct(x, Wt, dy, 1, (ph, pw))[1],
                               rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(not K._cblas.available, reason="SciPy's BLAS has no scipy_cblas_*gemm")
@pytest.mark.parametrize("group", [1, 1 << 12], ids=["one-sample-groups", "small-groups"])
def test_tap_same_bits_on_one_or_two_threads(group, rng, monkeypatch):
    """The threads claim groups of samples as they go, and the weight gradient is summed
    per group in group order: one thread and the split give bitwise the same float32."""
    monkeypatch.setattr(K, "TAP_GROUP_ELEMENTS", group)
    f = np.float32
    x = rng.standard_normal((13, 4, 9, 8)).astype(f)
    Wt = rng.standard_normal((6, 4, 3, 2)).astype(f)
    b = rng.standard_normal(6).astype(f)
    dy = rng.standard_normal((13, 6, 9, 9)).astype(f)
    out = []
    for split in (1 << 62, 0):
        monkeypatch.setattr(K, "SPLIT_MACS", split)
        y = K.conv2d_forward(x, Wt, b, 1, (1, 1), True, "tap")
        out.append((y,) + K.conv2d_backward(x, Wt, dy, 1, (1, 1), True, True, y, "tap"))
    for a, r in zip(*out):
        np.testing.assert_array_equal(a, r)


def test_pool_run_items_runs_each_item_once_and_reraises():
    from fastbp import _pool
    seen = []
    _pool.run_items(seen.append, 50, 2)
    assert sorted(seen) == list(range(50))

    def boom(i):
        if i == 7:
            raise RuntimeError("item 7")
    with pytest.raises(RuntimeError, match="item 7"):
        _pool.run_items(boom, 20, 2)


@pytest.mark.skipif(not K._cblas.available, reason="SciPy's BLAS has no scipy_cblas_*gemm")
def test_tap_split_deterministic_and_float32(rng, monkeypatch):
    """With the batch split over threads, repeated calls are bitwise identical, float32
    stays float32 and agrees with float64."""
    monkeypatch.setattr(K, "SPLIT_MACS", 0)
    x = rng.standard_normal((6, 8, 10, 9))
    Wt = rng.standard_normal((5, 8, 3, 3))
    b = rng.standard_normal(5)
    dy = rng.standard_normal((6, 5, 10, 9))
    f = np.float32
    x32, W32, b32, dy32 = x.astype(f), Wt.astype(f), b.astype(f), dy.astype(f)
    runs = []
    for _ in range(3):
        y = K.conv2d_forward(x32, W32, b32, 1, 1, True, "tap")
        runs.append((y,) + K.conv2d_backward(x32, W32, dy32, 1, 1, True, True, y, "tap"))
    for other in runs[1:]:
        for a, r in zip(other, runs[0]):
            np.testing.assert_array_equal(a, r)
    assert all(a.dtype == f for a in runs[0])
    y64 = K.conv2d_forward(x, Wt, b, 1, 1, True, "tap")
    g64 = K.conv2d_backward(x, Wt, dy, 1, 1, True, True, y64, "tap")
    for a, r in zip(runs[0], (y64,) + g64):
        np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not K._cblas.available, reason="SciPy's BLAS has no scipy_cblas_*gemm")
def test_tap_split_same_bits_on_one_and_two_threads(rng, monkeypatch):
    """The split's threads claim groups of samples in compiled code; each group's weight
    gradient partial is summed in group order, so one and two threads give the same bits
    (forward, dx, dW, db; several groups, the last one short)."""
    monkeypatch.setattr(K, "SPLIT_MACS", 0)
    monkeypatch.setattr(K, "TAP_GROUP_ELEMENTS", 6000)      # groups of 3 samples
    x = rng.standard_normal((11, 3, 9, 8)).astype(np.float32)
    Wt = rng.standard_normal((4, 3, 3, 2)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    dy = rng.standard_normal((11, 4, 9, 9)).astype(np.float32)
    S, g = K._tap_plan(x.shape, 4, 3, 2, 1, 1)
    assert g == 3
    runs = []
    for threads in (1, 2, 1, 2):
        with _num_threads(threads):
            y = K.conv2d_forward(x, Wt, b, 1, 1, True, "tap")
            runs.append((y,) + K.conv2d_backward(x, Wt, dy, 1, 1, True, True, y, "tap"))
    for other in runs[1:]:
        for a, r in zip(other, runs[0]):
            np.testing.assert_array_equal(a, r)


class _num_threads:
    def __init__(self, n):
        self.n = n

    def __enter__(self):
        self.prev = fastbp.get_num_threads()
        fastbp.set_num_threads(self.n)

    def __exit__(self, *exc):
        fastbp.set_num_threads(self.prev)


def test_sequential_fuses_conv_relu(rng):
    """Conv2D + ReLU in a Sequential run as one fused kernel, with the same numbers."""
    model = fastbp.Sequential(Conv2D(2, 3, 3, padding=1), ReLU(), Flatten(), Dense(48, 2))
    params = fastbp.init(model, seed=0, dtype=np.float64)
    x = rng.standard_normal((2, 2, 4, 4))
    out, cache = fastbp.forward(model, params, x)
    assert cache[1] is fastbp.network._FUSED
    h, _ = model.layers[0].forward(params[0], x)
    h, _ = model.layers[1].forward(params[1], h)
    ref, _ = model.layers[3].forward(params[3], h.reshape(2, -1))
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)
    rep = gradcheck(model, params, x, np.array([0, 1]), losses.softmax_cross_entropy)
    assert rep.passed(1e-6), str(rep)


def test_scratch_reuse_across_shapes_and_dtypes(rng):
    """The GEMM path reuses per-thread scratch buffers: calls with other shapes and dtypes in
    between must not change any result."""
    cases = []
    for dtype, (N, C, F, H) in [(np.float64, (3, 4, 5, 7)), (np.float32, (2, 6, 3, 9)),
                                (np.float64, (1, 2, 2, 5))]:
        x = rng.standard_normal((N, C, H, H)).astype(dtype)
        Wt = rng.standard_normal((F, C, 3, 3)).astype(dtype)
        b = rng.standard_normal(F).astype(dtype)
        dy = rng.standard_normal((N, F, H, H)).astype(dtype)
        cases.append((x, Wt, b, dy))
    first = [(K.conv2d_forward(x, Wt, b, 1, 1, False, "gemm"),)
             + K.conv2d_backward(x, Wt, dy, 1, 1, True, True, None, "gemm")
             for x, Wt, b, dy in cases]
    for (x, Wt, b, dy), ref in zip(cases[::-1], first[::-1]):
        got = (K.conv2d_forward(x, Wt, b, 1, 1, False, "gemm"),) \
            + K.conv2d_backward(x, Wt, dy, 1, 1, True, True, None, "gemm")
        for a, r in zip(got, ref):
            np.testing.assert_array_equal(a, r)


def test_concurrent_threads_same_results(rng):
    from concurrent.futures import ThreadPoolExecutor
    x = rng.standard_normal((8, 6, 10, 10)).astype(np.float32)
    Wt = rng.standard_normal((7, 6, 3, 3)).astype(np.float32)
    b = rng.standard_normal(7).astype(np.float32)
    dy = rng.standard_normal((8, 7, 10, 10)).astype(np.float32)

    def run(_):
        y = K.conv2d_forward(x, Wt, b, 1, 1, True, "gemm")
        return (y,) + K.conv2d_backward(x, Wt, dy, 1, 1, True, True, y, "gemm")
    ref = run(0)
    with ThreadPoolExecutor(4) as ex:
        for got in ex.map(run, range(8)):
            for a, r in zip(got, ref):
                np.testing.assert_array_equal(a, r)


@pytest.mark.skipif(not K._cblas.available, reason="SciPy's BLAS has no scipy_cblas_*gemm")
@pytest.mark.timeout(300)
def test_concurrent_threads_share_the_split_tap_path(rng, monkeypatch):
    """Several Python threads running split tap calls at once (every call split over the
    shared pool: SPLIT_MACS 0), with fused pooling, forward and backward, all get the
    single-caller results bit for bit (run_split: each caller's scratch is its own)."""
    monkeypatch.setattr(K, "SPLIT_MACS", 0)
    from concurrent.futures import ThreadPoolExecutor
    x = rng.standard_normal((33, 3, 20, 20)).astype(np.float32)
    Wt = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    b = rng.standard_normal(8).astype(np.float32)

    def run(_):
        yp, idx = K.conv2d_maxpool_forward(x, Wt, b, 1, 1, True, 2, None, "tap")
        dyp = np.linspace(-1, 1, yp.size, dtype=np.float32).reshape(yp.shape)
        return (yp, idx) + K.conv2d_maxpool_backward(x, Wt, dyp, idx, yp, 1, 1, 2, None,
                                                     True, True, True, "tap")
    ref = run(0)
    with ThreadPoolExecutor(4) as ex:
        for got in ex.map(run, range(40)):
            for a, r in zip(got, ref):
                np.testing.assert_array_equal(a, r)


# ---------------------------------------------------------------- validation
def test_output_shape_and_repr():
    layer = Conv2D(3, 8, (5, 3), stride=(2, 1), padding=1)
    assert layer.output_shape((4, 3, 32, 30)) == (4, 8, 15, 30)
    assert str(layer) == "Conv2D(3, 8, (5, 3), stride=(2, 1), padding=1)"
    assert layer == Conv2D(3, 8, (5, 3), (2, 1), (1, 1))


@pytest.mark.parametrize("shape,match", [
    ((4, 2, 8, 8), r"Conv2D\(1, 8, 5\): expected input \(N, 1, H, W\), got \(4, 2, 8, 8\)"),
    ((4, 8, 8), r"Conv2D\(1, 8, 5\): expected input \(N, 1, H, W\), got \(4, 8, 8\)"),
    ((4, 1, 3, 8), r"Conv2D\(1, 8, 5\): kernel \(5, 5\) is larger than the padded input \(3, 8\)"),
])
def test_bad_input_shapes(shape, match, rng):
    layer = Conv2D(1, 8, 5)
    params = layer.init(rng)
    with pytest.raises(ValueError, match=match):
        layer.forward(params, np.zeros(shape, np.float32))


def test_padding_makes_small_input_valid(rng):
    layer = Conv2D(1, 2, 5, padding=2)
    y, _ = layer.forward(layer.init(rng), np.zeros((1, 1, 1, 1), np.float32))
    assert y.shape == (1, 2, 1, 1)


def test_bad_dtypes_and_params(rng):
    layer = Conv2D(2, 3, 3)
    p32 = layer.init(rng, np.float32)
    with pytest.raises(TypeError, match=r"Conv2D\(2, 3, 3\): input dtype float64"):
        layer.forward(p32, np.zeros((1, 2, 4, 4)))
    with pytest.raises(TypeError, match="Conv2D"):
        layer.forward(p32, np.zeros((1, 2, 4, 4), np.int64))
    with pytest.raises(ValueError, match=r"expected parameter W of shape \(3, 2, 3, 3\)"):
        layer.forward({"W": np.zeros((3, 2, 2, 2), np.float32), "b": p32["b"]},
                      np.zeros((1, 2, 4, 4), np.float32))
    y, cache = layer.forward(p32, np.zeros((1, 2, 4, 4), np.float32))
    with pytest.raises(ValueError, match=r"expected output gradient of shape \(1, 3, 2, 2\)"):
        layer.backward(p32, cache, np.zeros((1, 3, 3, 3), np.float32))
    with pytest.raises(TypeError, match="output gradient dtype float64"):
        layer.backward(p32, cache, np.zeros((1, 3, 2, 2)))


@pytest.mark.parametrize("kwargs", [dict(kernel_size=0), dict(kernel_size=(3,)),
                                    dict(stride=0), dict(padding=-1), dict(kernel_size=2.5),
                                    dict(init="nope")])
def test_bad_hyper_parameters(kwargs):
    args = dict(in_channels=2, out_channels=3, kernel_size=3)
    args.update(kwargs)
    with pytest.raises(ValueError):
        Conv2D(**args)


def test_tap_plan_group_size_rules(monkeypatch):
    """The samples per group: within the scratch budget and, for thin kernel rows, at most
    one small OpenBLAS GEMM (SMALL_GEMM_MACS) per kernel row; then balanced (_balanced)."""
    shape = (64, 8, 12, 12)                 # lenet conv2: 144 entries per plane
    assert K._tap_plan(shape, 16, 5, 5, 0, 0) == (144, 8)          # 9 by the budget
    per = (2 * 5 * 8 + 16) * 144
    monkeypatch.setattr(K, "TAP_GROUP_ELEMENTS", 40 * per)
    g = K._tap_plan(shape, 16, 5, 5, 0, 0)[1]
    assert g == 16 and 40 * 16 * 8 * 12 * g <= K.SMALL_GEMM_MACS < 40 * 16 * 8 * 12 * 17
    assert K._tap_plan((10,) + shape[1:], 16, 5, 5, 0, 0)[1] == 10      # the whole batch
    # wide kernel rows are not capped (not measured there): 14 by the budget, 5 groups,
    # made 6 groups of at most 11
    wide = (64, 32, 12, 12)
    assert 40 * per // ((6 * 32 + 80) * 144) == 14
    assert K._tap_plan(wide, 80, 3, 3, 0, 0)[1] == 11


@pytest.mark.parametrize("N,g,want", [(64, 9, 8), (64, 8, 8), (64, 10, 8), (64, 64, 64),
                                      (64, 100, 64), (10, 9, 5), (11, 3, 3), (5, 2, 2),
                                      (9, 2, 2), (1, 1, 1), (3, 1, 1), (7, 6, 4)])
def test_balanced_group_sizes(N, g, want):
    """Groups of at most g samples, an even number of them when there are several, sizes
    as equal as one size allows (no group of 1 left behind 7 groups of 9)."""
    got = K._balanced(N, g)
    assert got == want
    G = -(-N // got)
    assert 1 <= got <= g and G <= -(-N // g) + 1
    if G > 1 and N % 2 == 0 and N // 2 >= -(-N // g):
        assert G % 2 == 0


@pytest.mark.parametrize("T,itemsize,pitch", [(128, 4, 144), (129, 4, 129), (1152, 4, 1168),
                                              (1296, 4, 1296), (64, 8, 80), (96, 8, 96)])
def test_packed_rows_pitch(T, itemsize, pitch):
    """Packed rows whose byte length is a multiple of 512 get PITCH_PAD entries more."""
    assert K._pitch(T, itemsize) == pitch
    assert (pitch * itemsize) % 512 != 0


@pytest.mark.skipif(not K._cblas.available, reason="SciPy's BLAS has no scipy_cblas_*gemm")
@pytest.mark.parametrize("mode", [0, 1, 2], ids=["F-by-pixels", "pixels-by-F", "stacked"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tap_with_padded_row_pitch_matches_naive(mode, dtype, rng, monkeypatch):
    """8×8 unpadded planes in groups of 2: the packed rows (2·64 entries) get the pitch
    pad; forward (each GEMM layout), dx, dW and db still give the plain-loop numbers."""
    monkeypatch.setattr(K, "TAP_T_MIN_K", 0 if mode == 1 else 1 << 30)
    monkeypatch.setattr(K, "TAP_STACK_MIN_K", 0 if mode == 2 else 1 << 30)
    N, C, H, F, KS = 5, 3, 8, 4, 3
    monkeypatch.setattr(K, "TAP_GROUP_ELEMENTS", 2 * (2 * KS * C + F) * H * H)
    assert K._tap_plan((N, C, H, H), F, KS, KS, 0, 0)[1] == 2
    assert K._pitch(2 * H * H, np.dtype(dtype).itemsize) == 2 * H * H + K.PITCH_PAD
    x = rng.standard_normal((N, C, H, H)).astype(dtype)
    Wt = rng.standard_normal((F, C, KS, KS)).astype(dtype)
    b = rng.standard_normal(F).astype(dtype)
    yr = naive.conv2d(x.astype(np.float64), Wt.astype(np.float64), b.astype(np.float64), 1, 0)
    dy = rng.standard_normal(yr.shape).astype(dtype)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
    y = K.conv2d_forward(x, Wt, b, 1, 0, True, "tap")
    assert y.dtype == dtype
    np.testing.assert_allclose(y, np.maximum(yr, 0), **tol)
    ref = naive.conv2d_backward_direct(x.astype(np.float64), Wt.astype(np.float64),
                                       dy * (yr > 0), 1, 0)
    for a, r in zip(K.conv2d_backward(x, Wt, dy, 1, 0, True, True, y, "tap"), ref):
        np.testing.assert_allclose(a, r, **tol)
