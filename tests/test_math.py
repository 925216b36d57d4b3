"""Accuracy, special values, dtypes and vectorisation of fastbp.kernels._math.

Relative error is |got - ref| / max(|ref|, smallest normal of the dtype), so subnormal
outputs are judged by absolute error. References: float64 NumPy for float32 results,
80-bit long double (checked against mpmath below) or mpmath for float64 results.
"""
import platform
import re

import numba
import numpy as np
import pytest

from fastbp.kernels import _math as m
from fastbp.kernels._math import fexp, fsigmoid, ftanh

TOL = {np.float32: 1e-6, np.float64: 1e-14}
DTYPES = [np.float32, np.float64]
LONG_OK = np.finfo(np.longdouble).nmant >= 63    # x87 80-bit long double


# --- references ------------------------------------------------------------------------
def _ref_exp(x):
    return np.exp(x)


def _ref_tanh(x):
    return np.tanh(x)


def _ref_sigmoid(x):
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e))


REFS = {"exp": _ref_exp, "tanh": _ref_tanh, "sigmoid": _ref_sigmoid}
WRAPPERS = {"exp": m.exp, "tanh": m.tanh, "sigmoid": m.sigmoid}
SCALARS = {"exp": fexp, "tanh": ftanh, "sigmoid": fsigmoid}


def _mp_ref(name, x):
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 40
    f = {"exp": mpmath.exp, "tanh": mpmath.tanh,
         "sigmoid": lambda v: 1 / (1 + mpmath.exp(-v))}[name]
    # through a 25-digit string, so long double keeps more than float64 precision
    return np.array([np.longdouble(mpmath.nstr(f(mpmath.mpf(float(v))), 25)) for v in x])


def reference(name, x):
    """Reference values of ``name`` at ``x`` (float32 or float64 array), wider precision."""
    with np.errstate(all="ignore"):
        if x.dtype == np.float32:
            return REFS[name](x.astype(np.float64))
        if LONG_OK:
            return REFS[name](x.astype(np.longdouble))
    return _mp_ref(name, x).astype(np.float64)   # (float64: a tolerance of 1e-14 allows it)


def max_rel_err(name, x, got):
    """Largest relative error (and where), after checking overflow gives +inf."""
    ref = reference(name, x)
    fmax = np.finfo(x.dtype).max
    over = ref > fmax
    assert np.all(got[over] == np.inf), f"{name}: overflow must give +inf"
    nan = np.isnan(x)
    assert np.all(np.isnan(got[nan])), f"{name}: NaN must propagate"
    ok = ~over & ~nan
    bad = x[ok][np.isnan(got[ok])]
    assert bad.size == 0, f"{name}: NaN from non-NaN inputs {bad[:3]}"
    tiny = np.finfo(x.dtype).tiny
    with np.errstate(all="ignore"):
        err = np.abs(got[ok].astype(ref.dtype) - ref[ok]) / np.maximum(np.abs(ref[ok]), tiny)
    if err.size == 0:
        return 0.0, None
    i = int(np.argmax(err))
    return float(err[i]), x[ok][i]


# --- input sets --------------------------------------------------------------------------
def _limits(dtype):
    fi = np.finfo(dtype)
    maxlog = float(np.log(np.float64(fi.max)))
    # smallest x with e^x >= the smallest subnormal / 2
    minlog = float(np.log(np.float64(fi.smallest_subnormal))) - 0.7
    return maxlog, minlog


def _around(v, dtype, k=200):
    """2k+1 consecutive floats of ``dtype`` centred on v."""
    c = np.array(v, dtype=dtype)
    it = np.int32 if dtype == np.float32 else np.int64
    bits = c.view(it) + np.arange(-k, k + 1, dtype=it)
    return bits.view(dtype)


def inputs(dtype, n_dense=200_001, n_random=200_000, seed=0):
    rng = np.random.default_rng(seed)
    maxlog, minlog = _limits(dtype)
    fi = np.finfo(dtype)
    dense = np.linspace(-100, 100, n_dense, dtype=np.float64)
    logs = 10.0 ** np.linspace(np.log10(float(fi.smallest_subnormal)),
                               np.log10(float(fi.max)) - 1e-9, 20_001)
    sweep_exp = np.linspace(minlog - 5, maxlog + 5, 50_001)
    it, ut = (np.int32, np.uint32) if dtype == np.float32 else (np.int64, np.uint64)
    bits = rng.integers(0, np.iinfo(ut).max, size=n_random, dtype=ut, endpoint=True).view(dtype)
    bits = bits[np.isfinite(bits)]
    edges = [_around(v, dtype) for v in (maxlog, minlog, np.log(float(fi.tiny)), 0.625,
                                         -0.625, 0.0, 9.1, -9.1, 20.0, 1.0, -1.0)]
    parts = [dense, logs, -logs, sweep_exp]
    x = np.concatenate([p.astype(dtype) for p in parts] + [bits] + edges)
    return x


@pytest.fixture(scope="module", params=DTYPES, ids=["float32", "float64"])
def sample(request):
    dtype = request.param
    return dtype, inputs(dtype)


# --- accuracy ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["exp", "tanh", "sigmoid"])
def test_accuracy_full_range(sample, name):
    dtype, x = sample
    got = WRAPPERS[name](x)
    assert got.dtype == dtype
    err, where = max_rel_err(name, x, got)
    assert err <= TOL[dtype], f"{name} {dtype.__name__}: max rel err {err:.3g} at x={where!r}"


@pytest.mark.parametrize("name", ["exp", "tanh", "sigmoid"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_serial_and_parallel_builds_agree(name, dtype):
    x = inputs(dtype, n_dense=20_001, n_random=20_000, seed=1)
    kernel = {"exp": m.exp_kernel, "tanh": m.tanh_kernel, "sigmoid": m.sigmoid_kernel}[name]
    a, b = np.empty_like(x), np.empty_like(x)
    kernel.serial(x, a)
    kernel.parallel(x, b)
    np.testing.assert_array_equal(a, b)


@pytest.mark.skipif(not LONG_OK, reason="long double is not extended precision here")
@pytest.mark.parametrize("name", ["exp", "tanh", "sigmoid"])
def test_long_double_reference_matches_mpmath(name):
    # The float64 tests trust long double; check that trust on a spread of points.
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.uniform(-50, 50, 150), rng.uniform(-745, 709, 50),
                        np.array([0.3, -0.6, 1e-300, -1e-10, 700.0, -740.0])])
    ld = REFS[name](x.astype(np.longdouble))
    mp = _mp_ref(name, x)
    tiny = np.finfo(np.float64).tiny
    err = np.abs(ld - mp) / np.maximum(np.abs(mp), tiny)
    assert np.max(err) < 1e-17


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["exp", "tanh", "sigmoid"])
def test_python_fallback_accuracy_and_dtype(name, dtype):
    # The plain-Python versions are the non-FMA variant of the same formulas.
    rng = np.random.default_rng(4)
    maxlog, minlog = _limits(dtype)
    x = np.concatenate([rng.uniform(-20, 20, 600), rng.uniform(minlog - 2, maxlog + 2, 300),
                        np.array([0.0, -0.0, 0.6, 0.65, -0.7, 9.05, 30.0, np.inf, -np.inf])])
    x = x.astype(dtype)
    f = SCALARS[name]
    got = np.array([f(v) for v in x])
    assert all(type(f(v)) is dtype for v in x[:5])
    assert got.dtype == dtype
    err, where = max_rel_err(name, x, got)
    assert err <= TOL[dtype], f"{name} fallback: max rel err {err:.3g} at x={where!r}"
    # and the compiled version agrees to within a few ulp
    comp = WRAPPERS[name](x)
    np.testing.assert_allclose(got, comp, rtol=8 * np.finfo(dtype).eps,
                               atol=4 * np.finfo(dtype).smallest_subnormal)


def test_python_fallback_accepts_python_numbers_and_rejects_others():
    assert type(fexp(1.0)) is np.float64 and abs(fexp(1.0) - np.e) < 1e-15
    assert type(ftanh(2)) is np.float64
    with pytest.raises(TypeError, match=r"fexp: expected a float32 or float64 scalar, got ndarray"):
        fexp(np.ones(3))
    with pytest.raises(TypeError, match=r"fsigmoid: .* got str"):
        fsigmoid("1")


# --- special values -----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_special_values(dtype):
    inf, nan = np.inf, np.nan
    x = np.array([inf, -inf, nan, 0.0, -0.0, 1e5, -1e5, 100.0, -100.0], dtype=dtype)
    e, t, s = m.exp(x), m.tanh(x), m.sigmoid(x)
    for y in (e, t, s):
        assert y.dtype == dtype
    assert e[0] == inf and e[1] == 0 and np.isnan(e[2]) and e[3] == 1 and e[4] == 1
    assert e[5] == inf and e[6] == 0
    assert t[0] == 1 and t[1] == -1 and np.isnan(t[2])
    assert t[3] == 0 and not np.signbit(t[3]) and t[4] == 0 and np.signbit(t[4])
    assert t[5] == 1 and t[6] == -1 and t[7] == 1 and t[8] == -1          # exactly ±1
    assert s[0] == 1 and s[1] == 0 and np.isnan(s[2]) and s[3] == 0.5 and s[4] == 0.5
    assert s[5] == 1 and s[6] == 0
    # sigmoid(-100) is small and positive (float32: subnormal 3.7e-44)
    assert 0 < s[8] < 1e-43 and np.isfinite(s[8])
    with np.errstate(all="ignore"):
        for y in (e, t, s):
            assert not np.any(np.isnan(y[~np.isnan(x)]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_exp_subnormal_range_and_symmetries(dtype):
    maxlog, minlog = _limits(dtype)
    x = np.linspace(minlog, minlog + 30, 10_001).astype(dtype)     # subnormal outputs
    y = m.exp(x)
    assert np.all(y >= 0) and np.all(np.diff(y) >= 0)                 # monotone there
    assert np.any((y > 0) & (y < np.finfo(dtype).tiny))
    z = np.linspace(-30, 30, 10_001).astype(dtype)
    np.testing.assert_array_equal(m.tanh(-z), -m.tanh(z))
    s = m.sigmoid(z) + m.sigmoid(-z)
    np.testing.assert_allclose(s, 1, rtol=4 * np.finfo(dtype).eps)
    assert np.all(np.abs(m.tanh(z)) <= 1) and np.all((m.sigmoid(z) >= 0) & (m.sigmoid(z) <= 1))


# --- use from njit code -----------------------------------------------------------------------
def test_scalar_functions_in_njit_keep_dtype():
    @numba.njit
    def f(x):     # default error_model="python": still no ZeroDivision checks needed
        return fexp(x), ftanh(x), fsigmoid(x)

    for dtype in DTYPES:
        out = f(dtype(0.75))     # (numba boxes float32 scalars as Python floats)
        np.testing.assert_allclose(out, [np.exp(0.75), np.tanh(0.75), 1 / (1 + np.exp(-0.75))],
                                   rtol=TOL[dtype])
    for nb in (numba.float32, numba.float64):
        res = f.overloads[(nb,)].signature.return_type
        assert res == numba.types.UniTuple(nb, 3)


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86 asm check")
@pytest.mark.parametrize("which", ["exp", "tanh", "sigmoid"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_loop_using_them_vectorises(which, dtype):
    # A fresh (uncached) njit loop, so its assembly can be inspected.
    fn = SCALARS[which]

    @numba.njit(error_model="numpy")
    def loop(x, out):
        for i in range(x.shape[0]):
            out[i] = fn(x[i])

    x = np.linspace(-3, 3, 64).astype(dtype)
    out = np.empty_like(x)
    loop(x, out)
    np.testing.assert_allclose(out, reference(which, x).astype(np.float64), rtol=TOL[dtype])
    asm = loop.inspect_asm(loop.signatures[0])
    suffix = "ps" if dtype == np.float32 else "pd"
    packed = re.findall(rf"\bv\w+{suffix}\s[^\n]*%[yz]mm", asm)
    assert len(packed) > 10, f"{which} {dtype.__name__}: loop did not vectorise"
    assert not re.search(r"call\w*\s+\S*(exp|tanh)", asm), "libm call left in the loop"
    import llvmlite.binding as ll
    if ll.get_host_cpu_features().get("avx512f", False):
        assert "%zmm" in asm, "expected 512-bit vectors on an AVX-512 host"


# --- array wrappers ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["exp", "tanh", "sigmoid"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_wrappers_shapes_and_no_mutation(name, dtype):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 4, 5)).astype(dtype)
    keep = x.copy()
    y = WRAPPERS[name](x)
    assert y.shape == x.shape and y.dtype == dtype and y is not x
    np.testing.assert_array_equal(x, keep)
    ref = reference(name, x.ravel()).reshape(x.shape).astype(np.float64)
    np.testing.assert_allclose(y, ref, rtol=TOL[dtype])
    # non-contiguous view and 0-d / empty arrays
    v = x[:, ::2, 1:]
    np.testing.assert_array_equal(WRAPPERS[name](v), WRAPPERS[name](np.ascontiguousarray(v)))
    assert WRAPPERS[name](np.array(0.5, dtype)).shape == ()
    assert WRAPPERS[name](np.empty((0, 3), dtype)).shape == (0, 3)


@pytest.mark.parametrize("name", ["exp", "tanh", "sigmoid"])
def test_wrappers_reject_other_dtypes(name):
    for bad in (np.arange(4), np.ones(3, np.float16), np.ones(2, np.complex128)):
        with pytest.raises(TypeError, match=rf"{name}: expected a float32 or float64 input, "
                                            rf"got dtype {bad.dtype}"):
            WRAPPERS[name](bad)


@pytest.mark.parametrize("dtype", DTYPES)
def test_tanh_near_saturation_is_correctly_rounded(dtype):
    # Gradients use 1 - tanh²: as tanh nears 1 its absolute error must stay near 0.5 ulp.
    if dtype == np.float64 and not LONG_OK:
        pytest.skip("needs an extended-precision reference")
    a = np.linspace(2, 25, 200_001).astype(dtype)
    a = np.concatenate([a, -a])
    ref = np.tanh(a.astype(np.longdouble if dtype == np.float64 else np.float64))
    err = np.abs(m.tanh(a) - ref) / (np.finfo(dtype).eps / 2)     # ulps of [0.5, 1)
    assert float(np.max(err)) <= 0.6
