"""Which BLAS the kernels' GEMMs run on, and its thread count per GEMM size.

NumPy's and SciPy's wheels each bundle an OpenBLAS (``numpy.libs/libscipy_openblas64_*``,
ILP64; ``scipy.libs/libscipy_openblas*``, LP64). Numba's own ``np.dot`` always calls
SciPy's. fastbp's kernels call ``fastbp._cblas.gemm``/``dot`` instead, which run on the
library chosen here:

- NumPy's, when it is there and its idle workers spin no longer than SciPy's (see
  ``thread_timeout``). On the 2-vCPU AVX-512 dev machine NumPy's OpenBLAS 0.3.31 ran the
  kernels' shapes faster than SciPy's 0.3.30: one thread, 32×1120×96 (a conv kernel row)
  83 against 58 GFLOP/s, 256×1024×2048 87 against 78; two threads, 784×256×128 180
  against 77 (SciPy's kept it on one thread).
- SciPy's otherwise. NumPy's library reads ``OPENBLAS_THREAD_TIMEOUT`` when NumPy is
  imported, so when NumPy came first its workers spin for OpenBLAS's default 2^28 cycles
  (~0.1 s) after every threaded GEMM and take the cores of fastbp's thread splits, while
  SciPy's loads after fastbp set 2^20.

``FASTBP_BLAS=numpy`` or ``FASTBP_BLAS=scipy`` forces the choice (when that library has
CBLAS). ``name`` and ``library`` say what is in use; ``fastbp info`` prints them.

MKL (optional, ``pip install "fastbp[mkl]"``). When present it also runs the threaded
GEMMs (``dense_mkl``; ``FASTBP_MKL_DENSE=0`` keeps them on OpenBLAS), and fastbp.config
then lets libgomp's idle workers spin briefly instead of sleeping (see there).

One-thread GEMMs on MKL. The per-tap conv
kernels run many small GEMMs, each on one BLAS thread of its own Python thread. On those
shapes OpenBLAS is weak: on the Intel AVX-512/AMX dev machine, one thread, GFLOP/s,
OpenBLAS against MKL 2026.2 sequential: (32×96)·(96×1088) 58 against 102, (96×1088)·
(1088×32) 82 against 114, (96×32)·(32×1088) 77 against 103 (a cifar conv2 kernel row, its
weight and input gradients). When the ``mkl`` wheel's ``libmkl_rt`` is in the environment
(and NumPy's BLAS is the bundled OpenBLAS, so no one else's MKL is changed), ``mkl`` holds
it and ``fastbp._cblas.gemm1`` (the one-thread GEMM of the conv taps and of the split
dense GEMMs, ``gemm_split``) calls its ILP64 ``cblas_?gemm_64``; everything else stays on
OpenBLAS. ``FASTBP_MKL=0`` switches it off, ``FASTBP_MKL=1`` makes it required.

MKL and PyTorch in one process: PyTorch's ``libtorch_cpu`` exports the MKL it links
statically, and ``libmkl_rt`` loads its parts globally, so whichever comes first serves
the other's MKL calls. MKL is therefore put on its GNU OpenMP layer (PyTorch's own), not
on its sequential one, and each thread runs its ``gemm1`` calls inside
``with mkl_one_thread():`` (MKL's thread-local count 1, restored afterwards). Measured,
512² ``torch.mm`` with 2 threads: 1.4-1.7 ms with fastbp's MKL loaded before or after
PyTorch, against 1.1-2.2 without it (a noisy machine); on the sequential layer it took
2.5-3.0 ms (PyTorch's GEMMs ran on one thread). Without a loadable ``libgomp.so.1`` the
sequential layer is used. Isolating MKL with ``dlmopen``
does not work: ``libmkl_rt`` loads its parts with ``RTLD_GLOBAL``, which glibc 2.36
rejects in a new namespace (a segfault in ``add_to_global_resize``).

Thread count: OpenBLAS threads any GEMM with at least 2^18 multiply-adds, and on a
2-core machine waking its second thread for a small GEMM costs more than the product: a
32×128×128 product ran 1.3-2× slower with 2 threads than with 1, and on a busy machine
the spinning handshake made some calls 1000× slower. So before a kernel runs its GEMMs,
the caller calls ``use_for(macs)``: products below ``threshold`` multiply-adds run on one
BLAS thread, larger ones on ``max_threads``. The count is set with
``openblas_set_num_threads_local`` (OpenBLAS ≥ 0.3.27), which only affects the calling
Python thread, and only when it changes.
"""
from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import threading

from . import config

# Multiply-adds (m·k·n) from which a GEMM gets all BLAS threads. Measured on the 2-vCPU
# reference machine: 1 thread wins up to ~0.5M, 2 threads from ~8M (see asv threads bench).
threshold = 1 << 21
_state = threading.local()


def _address(lib, symbol):
    """The address of ``symbol`` in ``lib``, or None when it does not export it."""
    try:
        return ctypes.cast(getattr(lib, symbol), ctypes.c_void_p).value
    except AttributeError:
        return None


class Lib:
    """One bundled OpenBLAS: its path, CBLAS gemm addresses and thread controls."""

    def __init__(self, name, path, suffix):
        self.name, self.path = name, path
        self.ilp64 = suffix == "64_"
        lib = ctypes.CDLL(path)
        self._lib = lib
        self.sgemm = ctypes.cast(getattr(lib, f"scipy_cblas_sgemm{suffix}"), ctypes.c_void_p).value
        self.dgemm = ctypes.cast(getattr(lib, f"scipy_cblas_dgemm{suffix}"), ctypes.c_void_p).value
        # OpenBLAS's transposing copies (``fastbp._cblas.transpose``), where exported
        self.somatcopy = _address(lib, f"scipy_cblas_somatcopy{suffix}")
        self.domatcopy = _address(lib, f"scipy_cblas_domatcopy{suffix}")
        self.set_local = lib.openblas_set_num_threads_local
        self.set_local.argtypes, self.set_local.restype = [ctypes.c_int], ctypes.c_int
        getter = getattr(lib, f"scipy_openblas_get_num_threads{suffix}")
        getter.argtypes, getter.restype = [], ctypes.c_int
        self.threads = max(1, int(getter()))

    def thread_timeout(self):
        """log2 of the cycles idle workers spin (as read when the library loaded)."""
        try:
            fn = self._lib.openblas_thread_timeout
        except AttributeError:  # pragma: no cover - other OpenBLAS builds
            return None
        fn.argtypes, fn.restype = [], ctypes.c_int
        n = int(fn())                  # the variable as read; 0 = unset (OpenBLAS uses 28)
        return 28 if n <= 0 else min(30, max(4, n))


def _find(module, pattern, suffix, name):
    try:
        mod = __import__(module)
    except ImportError:  # pragma: no cover
        return None
    libdir = os.path.dirname(mod.__file__) + ".libs"
    for path in sorted(glob.glob(os.path.join(libdir, pattern))):
        try:
            return Lib(name, path, suffix)
        except (OSError, AttributeError):
            continue
    return None


numpy_lib = _find("numpy", "libscipy_openblas64_*.so*", "64_", "numpy")
scipy_lib = _find("scipy", "libscipy_openblas*.so*", "", "scipy")


def _choose():
    forced = os.environ.get("FASTBP_BLAS", "").strip().lower()
    if forced not in ("", "numpy", "scipy"):
        raise ValueError(f"FASTBP_BLAS: expected 'numpy' or 'scipy', got {forced!r}")
    if forced == "numpy" and numpy_lib is not None:
        return numpy_lib
    if forced == "scipy" and scipy_lib is not None:
        return scipy_lib
    if numpy_lib is None or scipy_lib is None:
        return numpy_lib or scipy_lib
    tn, ts = numpy_lib.thread_timeout(), scipy_lib.thread_timeout()
    return numpy_lib if tn is None or ts is None or tn <= ts else scipy_lib


chosen = _choose()
name = chosen.name if chosen is not None else None
library = chosen.path if chosen is not None else None
max_threads = chosen.threads if chosen is not None else 1
# libraries whose thread count use_for sets: the kernels' and SciPy's (Numba's np.dot)
_setters = [lib.set_local for lib in {id(x): x for x in (chosen, scipy_lib) if x}.values()]


MKL_SEQUENTIAL, MKL_GNU = 1, 3        # MKL_THREADING_* values of mkl_service.h


class MKL:
    """The ``mkl`` wheel's single dynamic library, on the GNU OpenMP threading layer (or
    the sequential one without libgomp); ``set_local(1)`` makes the calling thread's
    GEMMs run on that thread alone."""

    def __init__(self, path):
        self.name, self.path = "mkl", path
        lib = ctypes.CDLL(path)
        layer = MKL_GNU
        try:
            ctypes.CDLL("libgomp.so.1")     # the layer's dependency, loadable or not
        except OSError:
            layer = MKL_SEQUENTIAL
        if lib.MKL_Set_Threading_Layer(layer) != layer:
            raise OSError(f"{path}: could not select MKL's threading layer {layer}")
        self.layer = "gnu" if layer == MKL_GNU else "sequential"
        self.set_local = lib.MKL_Set_Num_Threads_Local
        self.set_local.argtypes, self.set_local.restype = [ctypes.c_int], ctypes.c_int
        self.set_local_addr = ctypes.cast(self.set_local, ctypes.c_void_p).value
        self.sgemm = ctypes.cast(lib.cblas_sgemm_64, ctypes.c_void_p).value
        self.dgemm = ctypes.cast(lib.cblas_dgemm_64, ctypes.c_void_p).value
        buf = ctypes.create_string_buffer(256)
        lib.MKL_Get_Version_String(buf, 256)
        self.version = buf.value.decode(errors="replace").strip()
        self._lib = lib


def _find_mkl():
    flag = os.environ.get("FASTBP_MKL", "").strip().lower()
    if flag not in ("", "0", "1"):
        raise ValueError(f"FASTBP_MKL: expected '0' or '1', got {flag!r}")
    if flag == "0":
        return None
    import sys
    paths = config.mkl_rt_paths()
    # NumPy linked to MKL (conda) shares libmkl_rt: leave its threading alone
    if paths and numpy_lib is not None:
        for path in paths:
            try:
                return MKL(path)
            except (OSError, AttributeError):
                continue
    if flag == "1":
        raise ImportError("FASTBP_MKL=1 but no usable libmkl_rt beside NumPy's OpenBLAS "
                          f"(looked in {os.path.join(sys.prefix, 'lib')}; "
                          "pip install \"fastbp[mkl]\")")
    return None


mkl = _find_mkl()
# With MKL, the threaded GEMMs (``fastbp._cblas.gemm``: dense layers, the recurrent cells'
# per-step products, the conv im2col path) and the split GEMMs of large Dense chains run
# on it too, with MKL's thread count set by ``use_for`` like OpenBLAS's: by default on
# Intel CPUs only (``config.mkl_dense_wanted``; FASTBP_MKL_DENSE=0/1 decides).
dense_mkl = mkl is not None and mkl.layer == "gnu" and config.mkl_dense_wanted()
config.settle_wait_policy(dense_mkl)


class _MKLThreads:
    """``with _MKLThreads(n):`` MKL's GEMMs called from this thread use n threads (MKL's
    thread-local count); on exit the thread's previous count is restored, so a PyTorch
    sharing the library runs its own GEMMs on its threads again. No-op without MKL."""
    __slots__ = ("n", "prev")

    def __init__(self, n):
        self.n = n

    def __enter__(self):
        self.prev = mkl.set_local(self.n) if mkl is not None else 0
        return self

    def __exit__(self, *exc):
        if mkl is not None:
            mkl.set_local(self.prev)
        return False


def mkl_one_thread_count() -> int:
    """For kernels that set MKL's count themselves around one-thread GEMMs
    (``fastbp._cblas.mkl_threads_enter``): 1 when fastbp found MKL, else 0."""
    return 1 if mkl is not None else 0


def mkl_one_thread():
    """``with mkl_one_thread():`` MKL's GEMMs called from this thread run on it alone, and
    the thread's previous MKL thread count is restored afterwards (no-op without MKL)."""
    return _MKLThreads(1)


def thread_timeout():
    """log2 of the cycles the kernels' OpenBLAS workers spin before sleeping (the
    OPENBLAS_THREAD_TIMEOUT in force when that library loaded), or None if unknown."""
    return chosen.thread_timeout() if chosen is not None else None


def set_max_threads(n: int) -> None:
    """BLAS threads for large GEMMs (default: OpenBLAS's own count at import)."""
    global max_threads
    max_threads = max(1, int(n))
    _state.current = None


_NO_MKL = contextlib.nullcontext()


def threads_for(macs: int) -> int:
    """The BLAS thread count for a GEMM of ``macs`` multiply-adds; sets OpenBLAS's count
    (fastbp's own library) to it for the calling thread, where it stays."""
    n = 1 if macs < threshold else max_threads
    if getattr(_state, "current", None) != n:
        for setter in _setters:
            setter(n)
        _state.current = n
    return n


def use_for(macs: int):
    """Set the calling thread's BLAS thread count for a GEMM of ``macs`` multiply-adds.

    Use it as ``with use_for(macs): kernel(...)``. OpenBLAS's count (fastbp's own library)
    is set at once and stays; with MKL's threaded GEMMs (``dense_mkl``) MKL's thread-local
    count is set for the ``with`` block and restored after it, because a PyTorch in the
    same process shares that MKL. (Kernels that take an ``mkl_threads`` argument do the
    MKL part themselves: see ``mkl_threads_for``.)"""
    n = threads_for(macs)
    return _MKLThreads(n) if dense_mkl else _NO_MKL


def mkl_threads_for(macs: int) -> int:
    """``threads_for(macs)`` for a kernel that sets MKL's thread-local count itself
    (``fastbp._cblas.mkl_threads_enter``/``exit``): the count with MKL's threaded GEMMs,
    else 0 (leave MKL alone)."""
    n = threads_for(macs)
    return n if dense_mkl else 0


def gemm_macs(m: int, k: int, n: int) -> int:
    return int(m) * int(k) * int(n)


__all__ = ["use_for", "mkl_one_thread", "set_max_threads", "threshold", "max_threads",
           "library", "name", "gemm_macs", "thread_timeout", "mkl"]
