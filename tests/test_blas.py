"""The kernels' BLAS: which bundled OpenBLAS is chosen, ``_cblas.dot``/``matmul`` against
NumPy, and the same gradients whichever library runs them."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import fastbp
from fastbp import _blas, _cblas, config
from fastbp._jit import jit

both_libs = pytest.mark.skipif(_blas.numpy_lib is None or _blas.scipy_lib is None,
                               reason="needs the OpenBLAS of both NumPy's and SciPy's wheels")


def run_py(code, **env):
    full = dict(os.environ)
    for k in ("FASTBP_BLAS", "OPENBLAS_THREAD_TIMEOUT", "FASTBP_MKL"):
        full.pop(k, None)
    full.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=full, timeout=600)


CHOICE = "import fastbp._blas as b; print(b.name, b.thread_timeout())"


@both_libs
def test_numpy_blas_when_fastbp_comes_first():
    p = run_py(CHOICE)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split()[-2:] == ["numpy", "20"]


@both_libs
def test_scipy_blas_when_numpy_loaded_first_with_long_spin():
    """NumPy imported first keeps OpenBLAS's 2^28-cycle spin; SciPy's then has 2^20."""
    p = run_py("import numpy; " + CHOICE)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split()[-2:] == ["scipy", "20"]
    # the user's own OPENBLAS_THREAD_TIMEOUT reaches both libraries: NumPy's is used
    p = run_py("import numpy; " + CHOICE, OPENBLAS_THREAD_TIMEOUT="18")
    assert p.stdout.split()[-2:] == ["numpy", "18"], p.stderr


@both_libs
@pytest.mark.parametrize("lib", ["numpy", "scipy"])
def test_forced_choice(lib):
    p = run_py("import numpy; " + CHOICE, FASTBP_BLAS=lib)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split()[-2] == lib


def test_bad_choice_is_a_clear_error():
    p = run_py("import fastbp", FASTBP_BLAS="mkl")
    assert p.returncode != 0
    assert "FASTBP_BLAS" in p.stderr and "'mkl'" in p.stderr


# --------------------------------------------------------------------------- dot / matmul
@jit
def _dot_c(a, b, out):
    _cblas.dot(a, b, out)


@jit
def _dot_tn(a, b, out):                 # a passed as (K, M): the kernel sees aᵀ, F-layout
    _cblas.dot(a.T, b, out)


@jit
def _dot_nt(a, b, out):
    _cblas.dot(a, b.T, out)


@jit
def _dot_tt(a, b, out):
    _cblas.dot(a.T, b.T, out)


@jit
def _matmul(a, b):
    return _cblas.matmul(a, b)


@jit
def _dot_strided(a, b, out):            # every other column: 'A' layout, np.dot fallback
    _cblas.dot(a[:, ::2], b, out)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("M,K,N", [(1, 1, 1), (3, 5, 4), (17, 64, 33), (128, 7, 2)])
def test_dot_all_transposes_match_numpy(rng, dtype, M, K, N):
    a = rng.standard_normal((M, K)).astype(dtype)
    b = rng.standard_normal((K, N)).astype(dtype)
    want = a.astype(np.float64) @ b.astype(np.float64)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    for fn, aa, bb in ((_dot_c, a, b), (_dot_tn, a.T.copy(), b), (_dot_nt, a, b.T.copy()),
                       (_dot_tt, a.T.copy(), b.T.copy())):
        out = np.full((M, N), np.nan, dtype)
        fn(aa, bb, out)
        np.testing.assert_allclose(out, want, rtol=tol, atol=tol * np.abs(want).max())
    got = _matmul(a, b)
    assert got.dtype == dtype and got.shape == (M, N)
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())


def test_dot_empty_and_strided(rng):
    out = np.full((3, 4), np.nan)
    _dot_c(np.zeros((3, 0)), np.zeros((0, 4)), out)          # K = 0: a zero product
    assert (out == 0).all()
    _dot_c(np.zeros((0, 5)), np.zeros((5, 4)), np.zeros((0, 4)))
    a = rng.standard_normal((6, 10))
    b = rng.standard_normal((5, 3))
    out = np.empty((6, 3))
    _dot_strided(a, b, out)
    np.testing.assert_allclose(out, a[:, ::2] @ b, rtol=1e-12)


@jit
def _transpose_window(rows, cols, a, ia, lda, b, ib, ldb):
    _cblas.transpose(rows, cols, a, ia, lda, b, ib, ldb)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_transpose_windows_match_numpy(rng, dtype):
    """B = Aᵀ on windows (offsets, leading dimensions); nothing outside B's window moves."""
    a = rng.standard_normal((7, 11)).astype(dtype)
    a0 = a.copy()
    b = np.full((9, 8), np.nan, dtype)
    _transpose_window(5, 7, a.ravel(), 1 * 11 + 2, 11, b.ravel(), 1 * 8 + 2, 8)
    np.testing.assert_array_equal(b[1:8, 2:7], a[1:6, 2:9].T)
    b[1:8, 2:7] = 0
    assert np.isnan(b).sum() == b.size - 35
    np.testing.assert_array_equal(a, a0)
    _transpose_window(0, 7, a.ravel(), 0, 11, b.ravel(), 0, 8)     # empty: a no-op
    _transpose_window(3, 4, a.ravel(), 0, 11, b.ravel(), 0, 8)
    np.testing.assert_array_equal(b[:4, :3], a[:3, :4].T)


@jit
def _transposed(a):
    return _cblas.transposed(a)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_transposed_copy(rng, dtype):
    """A new C-contiguous aᵀ: by omatcopy for C-contiguous a, by NumPy's copy otherwise."""
    a = rng.standard_normal((5, 9)).astype(dtype)
    for src in (a, a[:, ::2], np.asfortranarray(a)):
        got = _transposed(src)
        assert got.dtype == dtype and got.flags.c_contiguous
        np.testing.assert_array_equal(got, src.T)
    a0 = a.copy()
    _transposed(a)[:] = 0                                  # a copy, not a view
    np.testing.assert_array_equal(a, a0)


def test_transpose_fallback_loop(rng):
    """The loop bound in place of cblas_?omatcopy when a library lacks it."""
    import ctypes
    from numba import cfunc, types
    fn = cfunc(_cblas._tsig(types.float64, types.int64))(_cblas._t_fallback)
    a = rng.standard_normal((4, 6))
    b = np.full((5, 4), np.nan)
    ptr = ctypes.POINTER(ctypes.c_double)
    fn.ctypes(101, 112, 3, 5, 2.0, a.ctypes.data_as(ptr), 6, b.ctypes.data_as(ptr), 4)
    np.testing.assert_array_equal(b[:, :3], 2.0 * a[:3, :5].T)
    assert np.isnan(b[:, 3]).all()


def test_dot_shape_mismatch_raises():
    with pytest.raises(ValueError, match="incompatible shapes"):
        _dot_c(np.ones((2, 3)), np.ones((4, 5)), np.ones((2, 5)))


def _has_mkl_wheel():
    import glob
    return bool(glob.glob(os.path.join(sys.prefix, "lib", "libmkl_rt.so*")))


# --------------------------------------------------------------------------- both libraries
GRADS = """
import json, numpy as np, fastbp
rng = np.random.default_rng(3)
models = {
    "mlp": (fastbp.Sequential(fastbp.Dense(12, 16), fastbp.ReLU(), fastbp.Dense(16, 5)), (9, 12)),
    "cnn": (fastbp.Sequential(fastbp.Conv2D(3, 6, 3, padding=1), fastbp.ReLU(),
                              fastbp.Conv2D(6, 4, (3, 2)), fastbp.MaxPool2D(2), fastbp.Flatten(),
                              fastbp.Dense(4 * 3 * 3, 5)), (5, 3, 8, 7)),
    "lstm": (fastbp.Sequential(fastbp.LSTM(4, 8, return_sequences=False), fastbp.Dense(8, 5)),
             (6, 3, 4)),
    "rnn": (fastbp.Sequential(fastbp.RNN(4, 8), fastbp.Dense(8, 5)), (6, 3, 4)),
}
out = {}
for name, (model, shape) in models.items():
    params = fastbp.init(model, seed=1, dtype=np.float64)
    x = rng.standard_normal(shape)
    y, cache = fastbp.forward(model, params, x)
    dx, grads = fastbp.backward(model, params, cache, np.cos(y))
    out[name] = [y.ravel().tolist(), dx.ravel().tolist()] + \\
        [g.ravel().tolist() for d in grads for g in d.values()]
print(json.dumps({"lib": fastbp._blas.name, "out": out}))
"""


@both_libs
def test_same_gradients_on_either_library():
    """Dense chains, stride-1 conv (the windowed CBLAS calls), RNN and LSTM give the same
    float64 outputs and gradients on NumPy's and on SciPy's OpenBLAS."""
    res = {}
    for lib in ("numpy", "scipy"):
        p = run_py(GRADS, FASTBP_BLAS=lib)
        assert p.returncode == 0, p.stderr
        got = json.loads(p.stdout.strip().splitlines()[-1])
        assert got["lib"] == lib
        res[lib] = got["out"]
    for name in res["numpy"]:
        for a, b in zip(res["numpy"][name], res["scipy"][name], strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12, err_msg=name)


@pytest.mark.skipif(not _has_mkl_wheel() or _blas.numpy_lib is None,
                    reason="needs the mkl wheel (pip install 'fastbp[mkl]')")
def test_mkl_threaded_gemms_give_the_openblas_numbers():
    """With MKL the threaded GEMMs (dense chains, recurrent cells, and a chain big enough
    for two threads) run on it: the same float64 outputs and gradients as on OpenBLAS."""
    big = GRADS.replace("out = {}\n", 'models["big"] = (fastbp.Sequential(fastbp.Dense(300, 400), '
                        'fastbp.ReLU(), fastbp.Dense(400, 7)), (64, 300))\nout = {}\n')
    res = {}
    for key, env in (("openblas", {"FASTBP_MKL_DENSE": "0"}), ("mkl", {"FASTBP_MKL_DENSE": "1"})):
        p = run_py(big + "print(fastbp._blas.dense_mkl)", **env)
        assert p.returncode == 0, p.stderr
        lines = p.stdout.strip().splitlines()
        assert lines[-1] == str(key == "mkl")
        res[key] = json.loads(lines[-2])["out"]
    assert "big" in res["mkl"]
    for name in res["mkl"]:
        for a, b in zip(res["mkl"][name], res["openblas"][name], strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12, err_msg=name)


# --------------------------------------------------------------------------- optional MKL
MKL_CONV = """
import json, numpy as np, fastbp
from fastbp import _blas
from fastbp.kernels import conv as K
rng = np.random.default_rng(5)
out = {"mkl": None if _blas.mkl is None else _blas.mkl.version}
for dt in (np.float32, np.float64):
    res = []
    # thin GEMMs (F = 6: OpenBLAS) and GEMMs with every dimension >= MKL_MIN_DIM (MKL)
    for C, F in ((7, 6), (12, 33)):
        x = rng.standard_normal((5, C, 9, 8)).astype(dt)
        W = rng.standard_normal((F, C, 3, 3)).astype(dt)
        b = rng.standard_normal(F).astype(dt)
        y = K.conv2d_forward(x, W, b, 1, 1, True, "tap")
        dy = rng.standard_normal(y.shape).astype(dt)
        dx, dW, db = K.conv2d_backward(x, W, dy, 1, 1, True, True, y, "tap")
        res += [a.astype(np.float64).ravel().tolist() for a in (y, dx, dW, db)]
    out[np.dtype(dt).name] = res
print(json.dumps(out))
"""


def test_mkl_dense_by_default_only_on_intel(tmp_path, monkeypatch):
    """MKL's threaded (and split) GEMMs are used unasked on Intel CPUs and where the vendor
    is unknown; on others (measured slower on an AMD EPYC) only with FASTBP_MKL_DENSE=1."""
    cpuinfo = tmp_path / "cpuinfo"
    for vendor, expected in (("GenuineIntel", True), ("AuthenticAMD", False),
                             ("HygonGenuine", False)):
        cpuinfo.write_text(f"processor\t: 0\nvendor_id\t: {vendor}\ncpu family\t: 25\n")
        assert config.cpu_vendor(str(cpuinfo)) == vendor
        assert config.mkl_dense_by_default(vendor) is expected
    cpuinfo.write_text("processor\t: 0\n")
    assert config.cpu_vendor(str(cpuinfo)) is None
    assert config.cpu_vendor(str(tmp_path / "missing")) is None
    assert config.mkl_dense_by_default(None) is True
    for flag, expected in (("0", False), ("1", True), ("", config.mkl_dense_by_default())):
        monkeypatch.setenv("FASTBP_MKL_DENSE", flag)
        assert config.mkl_dense_wanted() is expected
    monkeypatch.setenv("FASTBP_MKL_DENSE", "yes")
    with pytest.raises(ValueError, match="FASTBP_MKL_DENSE.*'yes'"):
        config.mkl_dense_wanted()


def test_mkl_is_on_when_installed_and_its_errors_are_clear():
    probe = "import fastbp._blas as b; print(b.mkl is not None, b.dense_mkl)"
    p = run_py(probe)
    assert p.returncode == 0, p.stderr
    usable = _has_mkl_wheel() and _blas.numpy_lib is not None
    # on when the wheel is there; its threaded GEMMs on Intel CPUs
    assert p.stdout.split()[-2:] == [str(usable), str(usable and config.mkl_dense_by_default())]
    if usable:
        for flag in ("0", "1"):                            # FASTBP_MKL_DENSE decides
            p = run_py(probe, FASTBP_MKL_DENSE=flag)
            assert p.returncode == 0, p.stderr
            assert p.stdout.split()[-2:] == ["True", str(flag == "1")]
    p = run_py("import fastbp._blas as b; print(b.mkl is not None)", FASTBP_MKL="0")
    assert p.returncode == 0, p.stderr
    assert p.stdout.split()[-1] == "False"                 # FASTBP_MKL=0 switches it off
    p = run_py("import fastbp", FASTBP_MKL="yes")
    assert p.returncode != 0 and "FASTBP_MKL" in p.stderr and "'yes'" in p.stderr
    if not _has_mkl_wheel():
        p = run_py("import fastbp", FASTBP_MKL="1")
        assert p.returncode != 0 and "libmkl_rt" in p.stderr


MKL_THREADS = """
import ctypes, json
import numpy as np
import fastbp
from fastbp import _blas
from fastbp.kernels import conv as K
get = _blas.mkl._lib.MKL_Get_Max_Threads
get.restype = ctypes.c_int
_blas.mkl._lib.MKL_Set_Num_Threads(2)
before = get()
with _blas.mkl_one_thread():
    inside = get()
x = np.random.default_rng(0).standard_normal((4, 3, 12, 12)).astype(np.float32)
W = np.random.default_rng(1).standard_normal((5, 3, 3, 3)).astype(np.float32)
K.conv2d_forward(x, W, np.zeros(5, np.float32), 1, 1, method="tap")
after_conv = get()
# dense layers, a Dense/ReLU chain and an LSTM: big GEMMs (threads set per GEMM size)
rng = np.random.default_rng(2)
net = fastbp.Sequential(fastbp.Dense(256, 512), fastbp.ReLU(), fastbp.Dense(512, 10))
p = fastbp.init(net, dtype=np.float32)
xd = rng.standard_normal((256, 256)).astype(np.float32)
y, c = fastbp.forward(net, p, xd)
fastbp.backward(net, p, c, np.ones_like(y))
layer = fastbp.Dense(256, 512)
y2, c2 = layer.forward(layer.init(rng, np.float32), xd, train=False, rng=None)
lstm = fastbp.LSTM(64, 128)
xs = rng.standard_normal((20, 64, 64)).astype(np.float32)
pl = lstm.init(rng, np.float32)
h, cl = lstm.forward(pl, xs, train=True, rng=None)
lstm.backward(pl, cl, np.ones_like(h))
print(json.dumps({"layer": _blas.mkl.layer, "before": before, "inside": inside,
                  "after": after_conv, "after_dense": get()}))
"""


@pytest.mark.skipif(not _has_mkl_wheel() or _blas.numpy_lib is None,
                    reason="needs the mkl wheel (pip install 'fastbp[mkl]')")
def test_mkl_one_thread_is_local_and_restored():
    """fastbp's one-thread MKL GEMMs run on one thread, and after any fastbp call (conv
    taps, dense layers and chains, LSTM) the calling thread's MKL thread count (which a
    PyTorch in the same process may share) is what it was before."""
    p = run_py(MKL_THREADS, FASTBP_MKL_DENSE="1")  # threaded GEMMs on MKL on any CPU
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r["layer"] in ("gnu", "sequential")
    assert r["inside"] == 1
    if r["layer"] == "gnu":
        assert r["before"] == 2
    assert r["after"] == r["before"]
    assert r["after_dense"] == r["before"]      # MKL's threaded GEMMs restore it too


@pytest.mark.skipif(not _has_mkl_wheel() or _blas.numpy_lib is None or not _cblas.available,
                    reason="needs the mkl wheel (pip install 'fastbp[mkl]') and OpenBLAS CBLAS")
def test_mkl_taps_give_the_openblas_numbers():
    """With MKL the conv taps' GEMMs run on it: same y, dx, dW, db as OpenBLAS
    (float64 to 1e-12, float32 to 1e-5), with NumPy imported first or not."""
    res = {}
    for key, env, pre in (("openblas", {"FASTBP_MKL": "0"}, ""), ("mkl", {"FASTBP_MKL": "1"}, ""),
                          ("mkl-numpy-first", {"FASTBP_MKL": "1"}, "import numpy\n")):
        p = run_py(pre + MKL_CONV, **env)
        assert p.returncode == 0, p.stderr
        res[key] = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["openblas"]["mkl"] is None
    assert "Math Kernel Library" in res["mkl"]["mkl"]
    assert "Math Kernel Library" in res["mkl-numpy-first"]["mkl"]
    for key in ("mkl", "mkl-numpy-first"):
        for dt, tol in (("float64", 1e-12), ("float32", 1e-5)):
            for a, b in zip(res[key][dt], res["openblas"][dt], strict=True):
                np.testing.assert_allclose(a, b, rtol=tol, atol=tol, err_msg=f"{key} {dt}")


def test_info_names_the_kernels_blas():
    p = subprocess.run([sys.executable, "-m", "fastbp", "info"], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    line = next(ln for ln in p.stdout.splitlines() if ln.startswith("BLAS (kernels)"))
    assert (_blas.name or "none") in line
    assert fastbp.__version__


def test_no_cblas_fallback_computes_windowed_gemm(rng):
    """The shim bound when neither wheel has CBLAS (copies + Numba's np.dot) honours the
    transposes, leading dimensions, offsets and beta the conv kernels use."""
    import ctypes
    from numba import cfunc, types
    fb = cfunc(_cblas._sig(types.float64, types.int64))(_cblas._fallback)
    P = ctypes.POINTER(ctypes.c_double)
    fn = ctypes.CFUNCTYPE(None, *([ctypes.c_int64] * 6), ctypes.c_double, P, ctypes.c_int64,
                          P, ctypes.c_int64, ctypes.c_double, P, ctypes.c_int64)(fb.address)
    M, N, K, lda, ldb, ldc = 3, 4, 5, 9, 7, 6
    for ta in (False, True):
        for tb in (False, True):
            for beta in (0.0, 1.0):
                A = rng.standard_normal(((K if ta else M) * lda))
                B = rng.standard_normal(((N if tb else K) * ldb))
                C = rng.standard_normal(M * ldc)
                a = A.reshape(-1, lda)[:, :M if ta else K]
                b = B.reshape(-1, ldb)[:, :K if tb else N]
                want = C.reshape(M, ldc).copy()
                want[:, :N] = (a.T if ta else a) @ (b.T if tb else b) + beta * want[:, :N]
                fn(_cblas.ROW_MAJOR, _cblas.TRANS if ta else _cblas.NO_TRANS,
                   _cblas.TRANS if tb else _cblas.NO_TRANS, M, N, K, 1.0,
                   A.ctypes.data_as(P), lda, B.ctypes.data_as(P), ldb, beta,
                   C.ctypes.data_as(P), ldc)
                np.testing.assert_allclose(C.reshape(M, ldc), want, rtol=1e-12, atol=1e-12)


def test_compiled_mkl_thread_count_is_set_and_restored():
    """``_cblas.mkl_threads_enter(n)`` sets the calling thread's MKL count to n (returning
    the previous one) and ``mkl_threads_exit`` restores it; n <= 0 leaves MKL alone.
    Without MKL the symbol is a no-op that returns 0."""
    import numba

    @numba.njit
    def probe(n):
        prev = _cblas.mkl_threads_enter(n)
        now = _cblas.mkl_threads_enter(n)      # the count the first call set
        _cblas.mkl_threads_exit(now)
        _cblas.mkl_threads_exit(prev)
        return prev, now

    assert probe(0) == (-1, -1)
    if _blas.mkl is not None:
        before = _blas.mkl.set_local(0)
        _blas.mkl.set_local(before)
        assert probe(3) == (before, 3)
        assert _blas.mkl.set_local(before) == before        # restored
        with _blas.mkl_one_thread():                        # inside a with block too
            assert probe(2) == (1, 2)
    else:
        assert probe(3) == (0, 0)
    assert _blas.mkl_threads_for(1) == (1 if _blas.dense_mkl else 0)
    assert _blas.mkl_one_thread_count() == (0 if _blas.mkl is None else 1)
