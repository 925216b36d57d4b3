"""Losses: finite differences, PyTorch oracle, plain-loop references, stability, errors."""
import math
import re

import numpy as np
import pytest

import fastbp
from fastbp import config, losses as L
from fastbp.kernels import losses as K

LOSSES = ["softmax_cross_entropy", "mse", "binary_cross_entropy", "hinge"]
ROW_SHAPES = [(1, 2), (4, 3), (5, 7), (3, 4, 5), (2, 1, 6), (6,)]   # (..., K)
ANY_SHAPES = [(1,), (5,), (3, 4), (2, 3, 4)]


# ---------------------------------------------------------------- helpers
def labels_for(shape, rng):
    return rng.integers(0, shape[-1], size=shape[:-1])


def probs_for(shape, rng, dtype=np.float64):
    t = rng.random(shape) + 0.05
    return (t / t.sum(axis=-1, keepdims=True)).astype(dtype)


def hinge_scores(shape, rng, y):
    """Random scores with every margin at least 1e-3 away from the kink at 0."""
    while True:
        s = rng.standard_normal(shape)
        sy = np.take_along_axis(s, y[..., None], axis=-1)
        if np.abs(s - sy + 1).min() > 1e-3:
            return s


def numgrad(f, x, h=1e-6):
    """Central differences of the scalar f at x (float64)."""
    g = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        xp = x.copy()
        xp[idx] += h
        xm = x.copy()
        xm[idx] -= h
        g[idx] = (f(xp) - f(xm)) / (2 * h)
    return g


def make_case(name, shape, rng, dtype=np.float64):
    """(pred, target) for loss ``name``."""
    if name == "softmax_cross_entropy":
        return rng.standard_normal(shape).astype(dtype), labels_for(shape, rng)
    if name == "hinge":
        y = labels_for(shape, rng)
        return hinge_scores(shape, rng, y).astype(dtype), y
    if name == "mse":
        return rng.standard_normal(shape).astype(dtype), rng.standard_normal(shape).astype(dtype)
    return 3 * rng.standard_normal(shape).astype(dtype), rng.random(shape).astype(dtype)


# ----------------------------------------------------- plain-loop references
def ref_softmax_ce(z, t):
    """t: integer labels (...) or probabilities (..., K). Returns (loss, grad)."""
    k = z.shape[-1]
    z2 = z.reshape(-1, k)
    t2 = np.eye(k)[np.asarray(t).reshape(-1)] if np.asarray(t).shape == z.shape[:-1] \
        else t.reshape(-1, k)
    m = len(z2)
    loss, g = 0.0, np.zeros_like(z2, dtype=np.float64)
    for i in range(m):
        mx = max(z2[i])
        s = sum(math.exp(v - mx) for v in z2[i])
        for j in range(k):
            logp = z2[i, j] - mx - math.log(s)
            loss -= t2[i, j] * logp
            g[i, j] = (math.exp(logp) * sum(t2[i]) - t2[i, j]) / m
    return loss / m, g.reshape(z.shape)


def ref_mse(p, t):
    p1, t1 = p.ravel(), t.ravel()
    loss = sum((a - b) ** 2 for a, b in zip(p1, t1)) / p1.size
    return loss, (2 * (p - t) / p.size)


def ref_bce(z, t):
    z1, t1 = z.ravel(), t.ravel()
    loss, g = 0.0, np.zeros(z1.size)
    for k in range(z1.size):
        sig = 1 / (1 + math.exp(-z1[k]))
        loss += -(t1[k] * math.log(sig) + (1 - t1[k]) * math.log(1 - sig))
        g[k] = (sig - t1[k]) / z1.size
    return loss / z1.size, g.reshape(z.shape)


def ref_hinge(s, y):
    k = s.shape[-1]
    s2, y1 = s.reshape(-1, k), np.asarray(y).reshape(-1)
    m = len(s2)
    loss, g = 0.0, np.zeros_like(s2, dtype=np.float64)
    for i in range(m):
        for j in range(k):
            if j == y1[i]:
                continue
            margin = s2[i, j] - s2[i, y1[i]] + 1
            if margin > 0:
                loss += margin
                g[i, j] += 1 / m
                g[i, y1[i]] -= 1 / m
    return loss / m, g.reshape(s.shape)


REFS = {"softmax_cross_entropy": ref_softmax_ce, "mse": ref_mse,
        "binary_cross_entropy": ref_bce, "hinge": ref_hinge}


# ---------------------------------------------------------- finite differences
@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("shape", ROW_SHAPES + ANY_SHAPES[2:])
def test_finite_differences(name, shape):
    rng = np.random.default_rng(abs(hash((name, shape))) % 2**32)
    x, t = make_case(name, shape, rng)
    fn = getattr(L, name)
    loss, g = fn(x, t)
    assert isinstance(loss, float)
    num = numgrad(lambda v: fn(v, t)[0], x)
    np.testing.assert_allclose(g, num, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("shape", [(1, 2), (4, 3), (2, 3, 5)])
def test_finite_differences_probability_targets(shape):
    rng = np.random.default_rng(1)
    z = rng.standard_normal(shape)
    for t in (probs_for(shape, rng), rng.random(shape)):   # normalised and not
        loss, g = L.softmax_cross_entropy(z, t)
        num = numgrad(lambda v: L.softmax_cross_entropy(v, t)[0], z)
        np.testing.assert_allclose(g, num, rtol=1e-6, atol=1e-8)


# ---------------------------------------------------------- plain-loop references
@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("shape", ROW_SHAPES)
def test_matches_loop_reference(name, shape):
    rng = np.random.default_rng(7)
    x, t = make_case(name, shape, rng)
    loss, g = getattr(L, name)(x, t)
    rloss, rg = REFS[name](x, t)
    assert loss == pytest.approx(rloss, rel=1e-12, abs=1e-14)
    np.testing.assert_allclose(g, rg, rtol=1e-12, atol=1e-15)


def test_softmax_ce_probability_loop_reference_and_onehot():
    rng = np.random.default_rng(2)
    z = rng.standard_normal((3, 4, 6))
    t = probs_for(z.shape, rng)
    loss, g = L.softmax_cross_entropy(z, t)
    rloss, rg = ref_softmax_ce(z, t)
    assert loss == pytest.approx(rloss, rel=1e-12)
    np.testing.assert_allclose(g, rg, rtol=1e-12, atol=1e-15)
    # one-hot targets give exactly what class indices give (up to rounding)
    y = labels_for(z.shape, rng)
    l1, g1 = L.softmax_cross_entropy(z, y)
    l2, g2 = L.softmax_cross_entropy(z, np.eye(6)[y])
    assert l1 == pytest.approx(l2, rel=1e-14)
    np.testing.assert_allclose(g1, g2, rtol=1e-13, atol=1e-16)


def test_time_major_is_mean_over_every_row():
    # (T, N, K) with (T, N) labels == the flattened (T*N, K) problem
    rng = np.random.default_rng(3)
    z = rng.standard_normal((5, 3, 4)).astype(np.float32)
    y = labels_for(z.shape, rng)
    for name in ("softmax_cross_entropy", "hinge"):
        l3, g3 = getattr(L, name)(z, y)
        l2, g2 = getattr(L, name)(z.reshape(15, 4), y.reshape(15))
        assert l3 == l2
        np.testing.assert_array_equal(g3, g2.reshape(z.shape))


@pytest.mark.parametrize("dt", [np.int8, np.uint8, np.int32, np.uint64, np.int64])
def test_any_integer_label_dtype(dt):
    rng = np.random.default_rng(4)
    z = rng.standard_normal((6, 5))
    y = labels_for(z.shape, rng)
    for fn in (L.softmax_cross_entropy, L.hinge):
        l1, g1 = fn(z, y)
        l2, g2 = fn(z, y.astype(dt))
        assert l1 == l2
        np.testing.assert_array_equal(g1, g2)


@pytest.mark.parametrize("n", [4, L._LIST_CHECK, L._LIST_CHECK + 1, 3000])
@pytest.mark.parametrize("dt", [np.int8, np.int16, np.uint16, np.int32, np.uint64, np.int64])
def test_out_of_range_labels_of_any_integer_dtype(dt, n):
    """The range check (a Python list up to ``_LIST_CHECK`` labels, else one reduction
    over the labels viewed as unsigned) catches labels just above K and, for signed
    dtypes, the most negative ones, on strided labels too, and names the first bad one."""
    z = np.zeros((n, 5))
    info = np.iinfo(dt)
    cases = [5, info.max]
    if info.min < 0:
        cases += [-1, info.min]
    rng = np.random.default_rng(n)
    for bad in cases:
        y = np.zeros((n, 2), dtype=dt)
        y[:, 0] = rng.integers(0, 5, n)
        at = int(rng.integers(0, n))
        y[at, 0] = bad
        if n > 4 and at + 1 < n:
            y[n - 1, 0] = 5                        # a later bad label is not the one named
        y = y[:, 0]                                # not contiguous
        for fn in (L.softmax_cross_entropy, L.hinge):
            with pytest.raises(ValueError, match=re.escape(f"label {bad} out of range [0, 5)")):
                fn(z, y)
    ok = np.array([0, 4, 2, 3] * (n // 4) + [1] * (n % 4), dtype=dt)
    assert np.isfinite(L.softmax_cross_entropy(z, ok)[0])
    y3 = ok.reshape(1, n).repeat(2, axis=0)        # (T, N) labels for (T, N, K) logits
    y3[1, n // 2] = 7
    with pytest.raises(ValueError, match=re.escape("label 7 out of range [0, 5)")):
        L.softmax_cross_entropy(np.zeros((2, n, 5)), y3)


# ---------------------------------------------------------------- PyTorch oracle
def _torch_loss_and_grad(fn, x, *rest):
    torch = pytest.importorskip("torch")
    xt = torch.tensor(x, requires_grad=True)
    out = fn(xt, *rest)
    out.backward()
    return out.item(), xt.grad.numpy()


@pytest.mark.parametrize("dtype,rtol,atol", [(np.float64, 1e-12, 1e-15), (np.float32, 2e-6, 1e-7)])
@pytest.mark.parametrize("shape", [(1, 2), (8, 10), (5, 3, 7)])
def test_torch_cross_entropy(dtype, rtol, atol, shape):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(5)
    z = rng.standard_normal(shape).astype(dtype)
    k = shape[-1]
    z2 = z.reshape(-1, k)            # torch wants classes on dim 1: flatten (T, N, K)
    y = labels_for(shape, rng)
    loss, g = L.softmax_cross_entropy(z, y)
    tl, tg = _torch_loss_and_grad(F.cross_entropy, z2, torch.tensor(y.reshape(-1)))
    assert loss == pytest.approx(tl, rel=rtol)
    np.testing.assert_allclose(g.reshape(-1, k), tg, rtol=rtol, atol=atol)
    assert g.dtype == dtype
    # probability targets, including unnormalised ones (gradient p*sum(t) - t)
    for t in (probs_for(shape, rng, dtype), rng.random(shape).astype(dtype)):
        loss, g = L.softmax_cross_entropy(z, t)
        tl, tg = _torch_loss_and_grad(F.cross_entropy, z2, torch.tensor(t.reshape(-1, k)))
        assert loss == pytest.approx(tl, rel=rtol)
        np.testing.assert_allclose(g.reshape(-1, k), tg, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype,rtol,atol", [(np.float64, 1e-12, 1e-15), (np.float32, 2e-6, 1e-7)])
def test_torch_mse_and_bce(dtype, rtol, atol):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(6)
    for shape in [(1,), (7, 3), (2, 3, 4)]:
        p = rng.standard_normal(shape).astype(dtype)
        t = rng.standard_normal(shape).astype(dtype)
        loss, g = L.mse(p, t)
        tl, tg = _torch_loss_and_grad(F.mse_loss, p, torch.tensor(t))
        assert loss == pytest.approx(tl, rel=rtol)
        np.testing.assert_allclose(g, tg, rtol=rtol, atol=atol)

        z = (4 * rng.standard_normal(shape)).astype(dtype)
        t = rng.random(shape).astype(dtype)
        t[..., 0] = 1.0                                      # hard targets too
        loss, g = L.binary_cross_entropy(z, t)
        tl, tg = _torch_loss_and_grad(F.binary_cross_entropy_with_logits, z, torch.tensor(t))
        assert loss == pytest.approx(tl, rel=rtol)
        np.testing.assert_allclose(g, tg, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype,rtol,atol", [(np.float64, 1e-12, 1e-15), (np.float32, 2e-6, 1e-7)])
@pytest.mark.parametrize("shape", [(1, 2), (9, 10), (4, 3, 5)])
def test_torch_multi_margin(dtype, rtol, atol, shape):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(8)
    y = labels_for(shape, rng)
    s = hinge_scores(shape, rng, y).astype(dtype)
    k = shape[-1]
    loss, g = L.hinge(s, y)
    tl, tg = _torch_loss_and_grad(F.multi_margin_loss, s.reshape(-1, k),
                                  torch.tensor(y.reshape(-1)))
    # torch divides each row's hinge sum by K (the number of classes); cs231n does not.
    assert loss == pytest.approx(tl * k, rel=rtol, abs=1e-12)
    np.testing.assert_allclose(g.reshape(-1, k), tg * k, rtol=rtol, atol=atol)


# ---------------------------------------------------------------- stability, NaN
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("big", [1e4, 1e30, 3e38])
def test_softmax_ce_and_hinge_stable_for_huge_logits(dtype, big):
    z = np.array([[big, -big, 0.0], [-big, -big, big], [big, big, -big]], dtype=dtype)
    y = np.array([0, 1, 2])
    loss, g = L.softmax_cross_entropy(z, y)
    assert math.isfinite(loss) and np.isfinite(g).all()
    b = float(dtype(big))
    # row 0: right and confident (0); row 1: 2*big; row 2: 2*big + log 2
    assert loss == pytest.approx((0 + 2 * b + 2 * b + math.log(2)) / 3, rel=1e-6)
    np.testing.assert_allclose(g, np.array([[0, 0, 0], [0, -1, 1], [.5, .5, -1]]) / 3,
                               atol=1e-7)
    loss, g = L.softmax_cross_entropy(z, np.eye(3, dtype=dtype)[y])
    assert math.isfinite(loss) and np.isfinite(g).all()
    loss, g = L.hinge(z, y)
    assert math.isfinite(loss) and np.isfinite(g).all()
    assert loss == pytest.approx((0 + (2 * b + 2) + (4 * b + 2)) / 3, rel=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax_ce_stable_wherever_the_max_is(dtype):
    # row i holds the huge logit at column i: every lane of the row-max loop is used
    k = 9
    z = np.eye(k, dtype=dtype) * dtype(1e30) - dtype(1e29)
    y = (np.arange(k) + 1) % k                      # always a wrong class
    for t in (y, np.eye(k, dtype=dtype)[y]):
        loss, g = L.softmax_cross_entropy(z, t)
        assert math.isfinite(loss) and np.isfinite(g).all()
        assert loss == pytest.approx(float(dtype(1e30)), rel=1e-6)
        np.testing.assert_allclose(g, (np.eye(k) - np.eye(k)[y]) / k, atol=1e-7)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bce_stable_for_huge_logits(dtype):
    z = np.array([1000, -1000, 1000, -1000, 1e30, -1e30, 0], dtype=dtype)
    t = np.array([0, 1, 1, 0, 0.5, 0.5, 0.5], dtype=dtype)
    loss, g = L.binary_cross_entropy(z, t)
    assert math.isfinite(loss) and np.isfinite(g).all()
    n = z.size
    assert loss == pytest.approx((1000 + 1000 + 0 + 0 + .5e30 + .5e30 + math.log(2)) / n, rel=1e-6)
    np.testing.assert_allclose(g, np.array([1, -1, 0, 0, .5, -.5, 0]) / n, atol=1e-7)


def test_mse_large_values_finite():
    p = np.array([1e30, -3e38], dtype=np.float32)
    loss, g = L.mse(p, np.zeros_like(p))
    assert math.isfinite(loss) and np.isfinite(g).all()     # squares summed in float64
    assert loss == pytest.approx((1e60 + 9e76) / 2, rel=1e-6)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("col", [0, 2, 3])
def test_nan_in_predictions_propagates(name, col):
    rng = np.random.default_rng(9)
    x, t = make_case(name, (3, 4), rng, np.float32)
    x[1, col] = np.nan
    loss, g = getattr(L, name)(x, t)
    assert math.isnan(loss)
    assert np.isnan(g[1]).any() and not np.isnan(g[[0, 2]]).any()   # only the NaN's row


@pytest.mark.parametrize("shape", [(300, 10), (3, 1500), (2, 700, 3)])
def test_large_rows_and_blocks(shape):
    # several row blocks, and rows longer than a block (K > ROW_BLOCK)
    rng = np.random.default_rng(15)
    z = 5 * rng.standard_normal(shape)
    y = labels_for(shape, rng)
    zs = z - z.max(axis=-1, keepdims=True)
    logp = zs - np.log(np.exp(zs).sum(axis=-1, keepdims=True))
    onehot = np.eye(shape[-1])[y]
    m = z.size // shape[-1]
    for t in (y, onehot):
        loss, g = L.softmax_cross_entropy(z, t)
        assert loss == pytest.approx(-(onehot * logp).sum() / m, rel=1e-12)
        np.testing.assert_allclose(g, (np.exp(logp) - onehot) / m, rtol=1e-10, atol=1e-17)
    t = rng.random(shape)
    loss, g = L.binary_cross_entropy(z, t)
    ref = np.maximum(z, 0) - z * t + np.log1p(np.exp(-np.abs(z)))
    assert loss == pytest.approx(ref.mean(), rel=1e-12)
    np.testing.assert_allclose(g, (1 / (1 + np.exp(-z)) - t) / z.size, rtol=1e-10, atol=1e-20)


@pytest.mark.parametrize("dtype,tol", [(np.float32, 2.5e-7), (np.float64, 1e-15)])
def test_log1p_unit_accuracy(dtype, tol):
    numba = pytest.importorskip("numba")

    @numba.njit
    def run(u, out):
        for k in range(u.size):
            out[k] = K.log1p_unit(u[k])

    u = np.concatenate([np.linspace(0, 1, 20001), np.geomspace(1e-300 if dtype == np.float64
                                                               else 1e-44, 1, 2000)])
    u = u.astype(dtype)
    out = np.empty_like(u)
    run(u, out)
    assert out.dtype == dtype and out[0] == 0
    ref = np.log1p(u.astype(np.float64))
    rel = np.abs(out - ref) / np.maximum(ref, np.finfo(dtype).tiny)
    assert rel.max() < tol


# ---------------------------------------------------- dtypes, mutation, determinism
@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtype_preserved_and_inputs_untouched(name, dtype):
    rng = np.random.default_rng(10)
    x, t = make_case(name, (4, 5), rng, dtype)
    x0, t0 = x.copy(), t.copy()
    loss, g = getattr(L, name)(x, t)
    assert type(loss) is float
    assert g.dtype == dtype and g.shape == x.shape
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(t, t0)
    # float32 agrees with float64 to float32 accuracy
    l64, g64 = getattr(L, name)(x.astype(np.float64), t.astype(np.float64) if t.dtype.kind == "f" else t)
    assert loss == pytest.approx(l64, rel=1e-5)
    np.testing.assert_allclose(g, g64, rtol=1e-4, atol=1e-6)


def test_float32_work_stays_float32():
    # every compiled specialisation takes scalars of its arrays' dtype (no float64 constant
    # silently promoting float32 arithmetic)
    rng = np.random.default_rng(14)
    for name in LOSSES:
        getattr(L, name)(*make_case(name, (3, 4), rng, np.float32))
    L.softmax_cross_entropy(*make_case("softmax_cross_entropy", (3, 4), rng, np.float32)[:1],
                            probs_for((3, 4), rng, np.float32))
    for kern in (K.softmax_ce_index, K.softmax_ce_prob, K.mse, K.binary_cross_entropy, K.hinge):
        sigs = [s for s in kern.serial.nopython_signatures if str(s.args[0].dtype) == "float32"]
        assert sigs, kern
        for sig in sigs:
            assert str(sig.args[-1]) == "float32", (kern, sig)
            assert str(sig.args[2].dtype) == "float32", (kern, sig)


@pytest.mark.parametrize("name", LOSSES)
def test_non_contiguous_input(name):
    rng = np.random.default_rng(11)
    x, t = make_case(name, (6, 5), rng)
    xt = np.asfortranarray(x)[:, ::-1][:, ::-1]         # F-ordered view, same values
    tt = np.asfortranarray(t) if t.ndim == 2 else t
    l1, g1 = getattr(L, name)(x, t)
    l2, g2 = getattr(L, name)(xt, tt)
    assert l1 == l2
    np.testing.assert_array_equal(g1, g2)


def _kernel_args(name, dtype, rng):
    """Arguments for the raw kernel, big enough for several rows / chunks per thread."""
    n = 3 * K.CHUNK + 17
    if name in ("softmax_ce_index", "hinge"):
        z = rng.standard_normal((1001, 7)).astype(dtype)
        return z, rng.integers(0, 7, 1001), np.empty_like(z), dtype(1 / 1001)
    if name == "softmax_ce_prob":
        z = rng.standard_normal((1001, 7)).astype(dtype)
        return z, probs_for(z.shape, rng, dtype), np.empty_like(z), dtype(1 / 1001)
    z = rng.standard_normal(n).astype(dtype)
    t = rng.random(n).astype(dtype)
    return z, t, np.empty_like(z), dtype(1 / n)


@pytest.mark.parametrize("name", ["softmax_ce_index", "softmax_ce_prob", "mse",
                                  "binary_cross_entropy", "hinge"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_serial_and_parallel_builds_identical(name, dtype):
    kern = getattr(K, name)
    args = _kernel_args(name, dtype, np.random.default_rng(12))
    out_s, out_p = np.full_like(args[2], -7), np.full_like(args[2], 7)
    tot_s = kern.serial(args[0], args[1], out_s, args[3])
    tot_p = kern.parallel(args[0], args[1], out_p, args[3])
    assert tot_s == tot_p
    np.testing.assert_array_equal(out_s, out_p)


def test_public_path_identical_at_any_threshold():
    rng = np.random.default_rng(13)
    z = rng.standard_normal((257, 10)).astype(np.float32)
    y = labels_for(z.shape, rng)
    saved = config.thresholds["losses"]
    try:
        results = []
        for th in (0, 1 << 40):          # always parallel, never parallel
            fastbp.set_parallel_threshold("losses", th)
            results.append([L.softmax_cross_entropy(z, y), L.hinge(z, y),
                            L.mse(z, z[::-1].copy()), L.binary_cross_entropy(z, np.abs(z) % 1)])
    finally:
        fastbp.set_parallel_threshold("losses", saved)
    for (l1, g1), (l2, g2) in zip(*results):
        assert l1 == l2
        np.testing.assert_array_equal(g1, g2)


# ---------------------------------------------------------------- errors
class _NoKernels:
    """Stands in for the kernel module: validation must fail before any kernel runs."""
    def __getattr__(self, attr):
        raise AssertionError(f"kernel {attr} reached before validation failed")


@pytest.fixture
def no_kernels(monkeypatch):
    monkeypatch.setattr(L, "_k", _NoKernels())


z32 = np.zeros((4, 10), np.float32)
y4 = np.array([1, 2, 3, 4])

ERRORS = [
    # softmax_cross_entropy
    (L.softmax_cross_entropy, (z32, np.array([1, 12, 3, 4])), ValueError,
     re.escape("softmax_cross_entropy: label 12 out of range [0, 10)")),
    (L.softmax_cross_entropy, (z32, np.array([1, -1, 3, 4])), ValueError,
     re.escape("softmax_cross_entropy: label -1 out of range [0, 10)")),
    (L.softmax_cross_entropy, (z32, np.array([1, 2, 3])), ValueError,
     re.escape("(4, 10)") + ".*" + re.escape("(3,)")),
    (L.softmax_cross_entropy, (z32, np.zeros((4, 9), np.float32)), ValueError,
     re.escape("(4, 10)") + ".*" + re.escape("(4, 9)")),
    (L.softmax_cross_entropy, (z32, np.full((4, 10), .1)), TypeError, "float32.*float64"),
    (L.softmax_cross_entropy, (z32.astype(int), y4), TypeError, "logits.*float32 or float64.*int"),
    (L.softmax_cross_entropy, (z32.astype(np.float16), y4), TypeError, "float16"),
    (L.softmax_cross_entropy, (z32, y4.astype(np.float32)), TypeError,
     "integer class labels.*astype"),
    (L.softmax_cross_entropy, (z32, np.eye(10, dtype=np.int64)[y4]), TypeError,
     "probability targets.*int64"),
    (L.softmax_cross_entropy, (z32, np.full((4, 10), -.1, np.float32)), ValueError,
     "probability targets must be non-negative, got -0.1"),
    (L.softmax_cross_entropy, (z32, np.full((4, 10), np.nan, np.float32)), ValueError,
     "probability targets contain NaN"),
    (L.softmax_cross_entropy, (z32, np.full((4, 10), np.inf, np.float32)), ValueError,
     "probability targets contain inf"),
    (L.softmax_cross_entropy, (np.zeros((0, 10), np.float32), np.zeros(0, int)), ValueError,
     "non-empty"),
    (L.softmax_cross_entropy, (np.float32(1), np.int64(0)), ValueError, "non-empty"),
    (L.softmax_cross_entropy, (z32, np.array([True] * 4)), TypeError, "bool"),
    # mse
    (L.mse, (z32, np.zeros((4, 9), np.float32)), ValueError, re.escape("(4, 10)") + ".*"
     + re.escape("(4, 9)")),
    (L.mse, (z32, np.zeros((4, 10))), TypeError, "mse: expected target of dtype float32.*float64"),
    (L.mse, (z32.astype(int), z32.astype(int)), TypeError, "mse: expected pred"),
    (L.mse, (z32, np.full((4, 10), np.nan, np.float32)), ValueError, "mse: target contains NaN"),
    # binary_cross_entropy
    (L.binary_cross_entropy, (z32, np.full((4, 10), 1.5, np.float32)), ValueError,
     re.escape("binary_cross_entropy: targets must be in [0, 1], got 1.5")),
    (L.binary_cross_entropy, (z32, np.full((4, 10), -.5, np.float32)), ValueError,
     re.escape("binary_cross_entropy: targets must be in [0, 1], got -0.5")),
    (L.binary_cross_entropy, (z32, np.full((4, 10), np.nan, np.float32)), ValueError, "NaN"),
    (L.binary_cross_entropy, (z32, np.zeros((4, 10))), TypeError, "float32.*float64"),
    (L.binary_cross_entropy, (z32, np.zeros((10, 4), np.float32)), ValueError,
     re.escape("(4, 10)") + ".*" + re.escape("(10, 4)")),
    (L.binary_cross_entropy, (z32.astype(np.int32), z32), TypeError, "logits.*int32"),
    # hinge
    (L.hinge, (z32, np.array([1, 2, 10, 4])), ValueError,
     re.escape("hinge: label 10 out of range [0, 10)")),
    (L.hinge, (z32, np.array([1, 2])), ValueError, re.escape("(4, 10)") + ".*"
     + re.escape("(2,)")),
    (L.hinge, (z32, y4.astype(float)), TypeError, "integer class labels.*astype"),
    (L.hinge, (z32.astype(int), y4), TypeError, "hinge: expected scores"),
]


@pytest.mark.parametrize("fn,args,exc,match", ERRORS)
def test_errors(no_kernels, fn, args, exc, match):
    with pytest.raises(exc, match=match):
        fn(*args)


def test_valid_inputs_reach_the_kernels(no_kernels):
    # the fixture really blocks kernels, so the error tests above prove "before compiled code"
    with pytest.raises(AssertionError, match="reached before"):
        L.softmax_cross_entropy(z32, y4)


def test_public_api():
    assert sorted(L.__all__) == sorted(LOSSES)
    for name in LOSSES:
        doc = getattr(L, name).__doc__
        assert "Returns" in doc and "loss" in doc
        assert name in L.__doc__
