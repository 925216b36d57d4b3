"""Run-time configuration: threading layer, thread hygiene, compile cache, serial/parallel
thresholds.

This module sits at the bottom of the import graph. It must run before Numba starts
its thread pool, so ``fastbp/__init__.py`` imports it first.

Environment variables (all optional):

``FASTBP_PARALLEL_THRESHOLD``
    Either one integer, applied to every kernel family, or a comma list such as
    ``dense=20000,activations=100000``. A kernel call runs its ``parallel=True``
    compilation when its work (roughly, scalar operations) is at least the threshold
    of its family and more than one thread is available. ``0`` always runs parallel;
    a huge number always runs serial.
``FASTBP_MALLOC``
    ``default`` leaves glibc's malloc settings alone (see ``fastbp/_malloc.py``).
``OMP_WAIT_POLICY`` / ``GOMP_SPINCOUNT`` / ``OPENBLAS_THREAD_TIMEOUT`` / ``NUMBA_THREADING_LAYER`` / ``NUMBA_CACHE_DIR`` / ``NUMBA_NUM_THREADS``
    Respected when set. fastbp only fills in defaults for the ones left unset: PASSIVE
    without MKL, ``GOMP_SPINCOUNT=SPIN_COUNT`` with MKL's threaded GEMMs (see below).
``FASTBP_ENV_DEFAULTS``
    ``0`` leaves the wait policy and ``OPENBLAS_THREAD_TIMEOUT`` unset (the libraries'
    own defaults). ``fastbp bench`` runs its PyTorch and JAX processes this way: under
    fastbp's PASSIVE policy PyTorch's OpenMP threads sleep between regions, and its steps
    measured slower (cnn_cifar 26-27 against 21-25 ms, mlp_mnist 2.2-2.8 against 1.8-2.2).
``FASTBP_MKL``
    ``0`` keeps every GEMM on OpenBLAS even when the ``mkl`` extra is installed; ``1``
    requires MKL (an ImportError without it). Unset: MKL runs the one-thread GEMMs of at
    least 32 rows (the conv taps) when installed, and on Intel CPUs the threaded ones too
    (see ``FASTBP_MKL_DENSE`` and ``fastbp/_blas.py``).
``FASTBP_MKL_DENSE``
    With MKL in use: ``0`` keeps the threaded GEMMs (dense layers and chains, recurrent
    cells) and the split GEMMs of large Dense chains on OpenBLAS, ``1`` puts them on MKL.
    Unset: on MKL on Intel CPUs, on OpenBLAS on others, where it measured faster (an AMD
    EPYC: ``mkl_dense_by_default``).
``FASTBP_MKL_SPLIT_MACS``
    Multiply-adds from which a Dense/ReLU chain splits a GEMM over the threads on MKL
    (default 2^28; see ``fastbp/_mlp.py``).
"""
from __future__ import annotations

import os
import tempfile

# --- thread-pool hygiene -------------------------------------------------------------
# Idle OpenMP workers that spin steal the cores OpenBLAS needs for the GEMM that follows
# a parallel Numba region (and vice versa). PASSIVE makes idle workers sleep instead.
# It must be in the environment before libgomp is loaded (first parallel launch).
# Measured (asv_benchmarks/benchmarks/threads.py; a parallel ReLU over 65k floats then a
# 256^3 float32 GEMM, alternating, 2 vCPUs): ACTIVE ~50 ms per pair, libgomp's default
# spin ~20-50 ms, PASSIVE ~0.4 ms (the GEMM alone takes ~0.35 ms).
USER_SET_WAIT_POLICY = "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ
ENV_DEFAULTS = os.environ.get("FASTBP_ENV_DEFAULTS", "1").strip() != "0"
SET_BY_FASTBP = []      # the environment variables fastbp filled in (bench's peers drop them)


def mkl_rt_paths() -> list:
    """The ``mkl`` extra's ``libmkl_rt`` files in this environment (sys.prefix/lib)."""
    import glob
    import sys
    return sorted(glob.glob(os.path.join(sys.prefix, "lib", "libmkl_rt.so*")))


def cpu_vendor(path="/proc/cpuinfo"):
    """The CPU's vendor string (``GenuineIntel``, ``AuthenticAMD``...), or None where the
    file is missing (not Linux) or names none."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip() or None
    except OSError:
        pass
    return None


def mkl_dense_by_default(vendor="auto") -> bool:
    """Whether an installed ``mkl`` extra also runs the threaded GEMMs (dense layers and
    chains, recurrent cells) and the split ones of large Dense chains when
    FASTBP_MKL_DENSE is unset: on Intel CPUs (and where the vendor is unknown), not on
    others. On a 2-vCPU AMD EPYC (Zen 4, AVX-512), 2026-12-04, float32, two threads,
    GFLOP/s, MKL 2026.2 against OpenBLAS 0.3.31 (two processes each): 256×2048×2048 139/79
    against 151/170, its weight gradient (2048×256)ᵀ·(256×2048) 119/95 against 155/179;
    the mlp_large step took 73-80 ms with MKL for all GEMMs and 76-80 with MKL for the
    split ones only, against 56-65 on OpenBLAS (three alternating process triples). The
    one-thread GEMMs of the conv taps stay on MKL there: cifar conv2's shapes ran 85-96
    GFLOP/s against 82-92 on one OpenBLAS thread."""
    if vendor == "auto":
        vendor = cpu_vendor()
    return vendor is None or vendor == "GenuineIntel"


def mkl_dense_flag() -> str:
    """FASTBP_MKL_DENSE as given ('' when unset); anything but '', '0' or '1' is an error."""
    flag = os.environ.get("FASTBP_MKL_DENSE", "").strip()
    if flag not in ("", "0", "1"):
        raise ValueError(f"FASTBP_MKL_DENSE: expected '0' or '1', got {flag!r}")
    return flag


def mkl_dense_wanted() -> bool:
    """The threaded GEMMs go to MKL (when fastbp uses it): FASTBP_MKL_DENSE=1, or unset on
    a CPU where ``mkl_dense_by_default``."""
    flag = mkl_dense_flag()
    return flag == "1" or (flag == "" and mkl_dense_by_default())


def _mkl_threads_expected() -> bool:
    """True when the ``mkl`` extra is installed and its threaded GEMMs are wanted
    (FASTBP_MKL, FASTBP_MKL_DENSE, the CPU's vendor): fastbp._blas will then run them on
    MKL's GNU OpenMP layer. Read from the files alone, before NumPy or MKL load."""
    if os.environ.get("FASTBP_MKL", "").strip() == "0" or not mkl_dense_wanted():
        return False
    return bool(mkl_rt_paths())


# With MKL's threaded GEMMs, Numba's parallel regions and MKL share libgomp's workers, and
# waking a sleeping worker costs a GEMM tens of µs on these VMs: under PASSIVE, two MKL
# threads ran mlp_mnist's GEMMs 1.1-2x slower than OpenBLAS's, and 32×128×128 took 116 µs
# against 15 with spinning workers. So the workers spin briefly instead (GOMP_SPINCOUNT
# rounds): libgomp's default, 300000, spins for milliseconds and slowed cnn_lenet's
# Python-thread conv splits by a third. Training steps, 2 threads, median of 3 interleaved processes, ms, PASSIVE
# with OpenBLAS against 10000 / 30000 rounds with MKL: mlp_mnist 1.36 / 1.28 / 1.17,
# cnn_lenet 4.62 / 4.10 / 4.48, cnn_cifar 19.8 / 17.2 / 19.2, lstm_seq 7.0 / 6.3 / 5.8,
# rnn_seq 2.08 / 1.92 / 1.91, mlp_large 41.3 / 41.0 / 41.2, mlp_small 0.174 / 0.170 / 0.177.
SPIN_COUNT = 10000
MKL_THREADS = _mkl_threads_expected()
if not USER_SET_WAIT_POLICY and ENV_DEFAULTS:
    if MKL_THREADS:
        os.environ["GOMP_SPINCOUNT"] = str(SPIN_COUNT)
        SET_BY_FASTBP.append("GOMP_SPINCOUNT")
    else:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        SET_BY_FASTBP.append("OMP_WAIT_POLICY")


def settle_wait_policy(mkl_threads: bool) -> None:
    """Called by fastbp._blas once it knows whether MKL runs the threaded GEMMs: when the
    files promised MKL (``MKL_THREADS``) but it is not used (NumPy not on its bundled
    OpenBLAS, or MKL without libgomp), fastbp's short spin becomes PASSIVE, as without
    MKL. Only what fastbp itself set is changed, and libgomp reads it when it loads
    (fastbp loads it later, at the first parallel region)."""
    global MKL_THREADS
    if mkl_threads or not MKL_THREADS or "GOMP_SPINCOUNT" not in SET_BY_FASTBP:
        return
    MKL_THREADS = False
    os.environ.pop("GOMP_SPINCOUNT", None)
    SET_BY_FASTBP.remove("GOMP_SPINCOUNT")
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    SET_BY_FASTBP.insert(0, "OMP_WAIT_POLICY")
    for family, value in SPIN_THRESHOLDS.items():
        if family not in ENV_THRESHOLDS and thresholds.get(family) == value:  # not the user's
            thresholds[family] = DEFAULT_THRESHOLDS[family]


# OpenBLAS's own idle workers spin for 2^OPENBLAS_THREAD_TIMEOUT cycles after a threaded
# GEMM (default 2^28, about 0.1 s) before they sleep. Meanwhile they take the cores that
# fastbp's Python-thread batch splits (conv, RNN/LSTM) run on. Whole steps, 3 interleaved
# runs each (ms): cnn_cifar, whose dense head runs a 2-thread GEMM, 38-46 at 28, 25-30 at
# 24, 24-26 at 20, 23-26 at 16; mlp_mnist 1.4-1.5 at 28, 1.3-1.4 at 24, 1.3-2.5 at 20,
# 1.5-3.0 at 16 (short spins put the workers to sleep between steps); mlp_large level.
# 20 (~0.4 ms of spin) is the compromise. OpenBLAS reads the variable when it loads, so
# this only reaches a library loaded after this line: SciPy's (fastbp loads it itself)
# and NumPy's only when fastbp is imported before NumPy. fastbp._blas runs the kernels on
# NumPy's OpenBLAS only when its spin is that short (``fastbp info`` shows both).
USER_SET_BLAS_TIMEOUT = "OPENBLAS_THREAD_TIMEOUT" in os.environ
if not USER_SET_BLAS_TIMEOUT and ENV_DEFAULTS:
    os.environ["OPENBLAS_THREAD_TIMEOUT"] = "20"
    SET_BY_FASTBP.append("OPENBLAS_THREAD_TIMEOUT")

import numba  # noqa: E402  (after the environment is prepared)

# Freed arrays stay in the heap for the next kernel call instead of being unmapped and
# page-faulted back in (see fastbp/_malloc.py; FASTBP_MALLOC=default opts out).
from . import _malloc  # noqa: E402
_malloc.keep_large_blocks()

# The 'workqueue' layer aborts when two Python threads launch parallel regions at once.
# 'threadsafe' picks omp or tbb, both safe for concurrent callers.
if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "threadsafe"

# --- compile cache ---------------------------------------------------------------------
# Kernels use cache=True. Numba writes next to the source (fastbp/kernels/__pycache__).
# When that is read-only (a system-wide install) fastbp points Numba's cache at a
# user-writable directory instead; NUMBA_CACHE_DIR, when set, always wins. When nothing
# is writable, caching is switched off (kernels still compile, once per process).
_KERNEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels")


def _writable(path: str) -> bool:
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
        return True
    except OSError:
        return False


def _fallback_cache_dirs():
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    yield os.path.join(base, "fastbp", "numba")
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    yield os.path.join(tempfile.gettempdir(), f"fastbp-numba-cache-{uid}")


def _choose_cache():
    """(directory, source): where compiled kernels are cached, and why there."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return os.environ["NUMBA_CACHE_DIR"], "NUMBA_CACHE_DIR"
    in_tree = os.path.join(_KERNEL_DIR, "__pycache__")
    if _writable(in_tree):
        return in_tree, "in-tree"
    for path in _fallback_cache_dirs():
        if _writable(path):
            numba.config.CACHE_DIR = path       # read by Numba's cache locator per function
            return path, "fallback (package directory is read-only)"
    return None, "disabled (no writable cache directory)"


CACHE_DIR, CACHE_SOURCE = _choose_cache()
CACHE_ENABLED = CACHE_DIR is not None

# Numba checks a cached kernel against its own source file only. A kernel that calls or
# inlines compiled code from another file (conv.py's split loops call pool.py's kernels
# and _pool.claim, every GEMM goes through _cblas.py's overloads) would keep the old
# callee after that file changed. So the cache carries a stamp: a hash of every file that
# holds compiled code, and when it differs fastbp drops its own cached kernels (they
# recompile on first use).
_PKG_DIR = os.path.dirname(os.path.abspath(__file__))
COMPILED_SOURCES = ["_cblas.py", "_jit.py", "_pool.py", "kernels"]   # a directory: its *.py
STAMP_NAME = "fastbp-sources.stamp"


def sources_fingerprint(pkg_dir=_PKG_DIR, names=None) -> str:
    """SHA-1 over the names and contents of the files that hold compiled code."""
    import hashlib
    h = hashlib.sha1()
    for name in names if names is not None else COMPILED_SOURCES:
        path = os.path.join(pkg_dir, name)
        files = sorted(f for f in os.listdir(path) if f.endswith(".py")) \
            if os.path.isdir(path) else [""]
        for f in files:
            full = os.path.join(path, f) if f else path
            h.update(os.path.relpath(full, pkg_dir).encode())
            with open(full, "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()


def cache_dirs(cache_dir=None, source=None) -> list:
    """The directories where Numba keeps fastbp's cached kernels: the package's
    ``__pycache__`` folders in-tree, else the subfolders Numba names after the package's
    source folders under the cache directory."""
    cache_dir = CACHE_DIR if cache_dir is None else cache_dir
    source = CACHE_SOURCE if source is None else source
    if cache_dir is None:
        return []
    if source == "in-tree":
        return [os.path.join(_PKG_DIR, "__pycache__"), os.path.join(_KERNEL_DIR, "__pycache__")]
    from numba.core.caching import _CacheLocator
    return [os.path.join(cache_dir, _CacheLocator.get_suitable_cache_subpath(
        os.path.join(d, "x.py"))) for d in (_PKG_DIR, _KERNEL_DIR)]


def drop_stale_cache(dirs=None, fingerprint=None) -> int:
    """Delete fastbp's cached kernels (``*.nbi``/``*.nbc`` in ``dirs``) when the stamp in
    the last of them differs from ``fingerprint``; then write the stamp. Returns the
    number of files deleted (0 when the stamp matched). Never raises for I/O problems: a
    cache that cannot be cleaned is left as it is."""
    dirs = cache_dirs() if dirs is None else dirs
    if not dirs:
        return 0
    try:
        fingerprint = fingerprint or sources_fingerprint()
        stamp = os.path.join(dirs[-1], STAMP_NAME)
        try:
            with open(stamp) as fh:
                if fh.read().strip() == fingerprint:
                    return 0
        except OSError:
            pass
        removed = 0
        for d in dirs:
            if not os.path.isdir(d):
                continue
            for f in os.listdir(d):
                if f.endswith((".nbi", ".nbc")):
                    try:
                        os.remove(os.path.join(d, f))
                        removed += 1
                    except OSError:
                        pass
        os.makedirs(dirs[-1], exist_ok=True)
        tmp = f"{stamp}.{os.getpid()}"
        with open(tmp, "w") as fh:
            fh.write(fingerprint + "\n")
        os.replace(tmp, stamp)
        return removed
    except OSError:
        return 0


STALE_KERNELS_DROPPED = drop_stale_cache() if CACHE_ENABLED else 0

# --- serial / parallel dispatch --------------------------------------------------------
# Work thresholds, in the work units each kernel passes to ``work=`` (roughly scalar
# operations), at or above which a kernel family runs its parallel compilation.
# Measured with ``python -m fastbp.tune`` (representative public calls with one family
# forced serial, then parallel; medians of interleaved repeats) on 2026-12-01, 2 vCPUs
# (AVX-512), omp layer, OMP_WAIT_POLICY=PASSIVE, a quiet moment on the shared machine.
# Each value is tune's suggestion: the geometric median of the calls' crossovers, rounded
# to a power of two. Dense makes no serial/parallel choice of its own (its GEMMs are BLAS;
# bias and ReLU are fused into the compiled chain), so it keeps 1 << 16. Element-wise
# families are memory-bound on 2 cores and only pay from ~0.5-1M elements. Re-run tune
# on another machine and override with the env var above or set_parallel_threshold.
# optim: on the second Xeon (2026-12-03) a parallel region under PASSIVE cost 76-85 µs (a
# sleeping worker's wake-up), and tune put the optimizer's crossover at 1.5-4M elements.
DEFAULT_THRESHOLDS = {
    "dense": 1 << 16,
    "activations": 1 << 20,
    "dropout": 1 << 19,
    "losses": 1 << 16,
    "optim": 1 << 21,
    "conv": 1 << 20,
    "pool": 1 << 18,
    "rnn": 1 << 17,
    "lstm": 1 << 16,
}
# With the mkl extra, libgomp's workers spin briefly (SPIN_COUNT) instead of sleeping at
# once, and a region that starts while they spin costs 2-3 µs (second Xeon; 40-50 µs once
# they sleep). Families measured again under that policy; the rest keep the values above.
# optim: tune's crossover ~93k elements (adam and sgd with momentum); whole mlp_mnist steps
# (W1 has 200k elements), 4 interleaved pairs, median 1.17 ms at 1 << 18 against 1.00 at
# 1 << 17. At 1 << 16 cnn_cifar's dense head (82k) went parallel too and its step was
# slower (median 15.9 against 15.0 ms, 4 pairs), so 1 << 17.
SPIN_THRESHOLDS = {"optim": 1 << 17}


def default_thresholds() -> dict:
    """The thresholds fastbp picks for the wait policy in force (see SPIN_THRESHOLDS)."""
    spin = MKL_THREADS and "GOMP_SPINCOUNT" in SET_BY_FASTBP
    return dict(DEFAULT_THRESHOLDS, **(SPIN_THRESHOLDS if spin else {}))


thresholds = default_thresholds()


def _parse_threshold_env(value: str) -> dict:
    value = value.strip()
    if not value:
        return {}
    if "=" not in value:
        try:
            n = int(value)
        except ValueError:
            raise ValueError(f"FASTBP_PARALLEL_THRESHOLD: expected an integer or "
                             f"'family=int,...', got {value!r}") from None
        if n < 0:
            raise ValueError(f"FASTBP_PARALLEL_THRESHOLD: must be >= 0, got {n}")
        return {k: n for k in DEFAULT_THRESHOLDS}
    out = {}
    for item in value.split(","):
        if not item.strip():
            continue
        name, _, num = item.partition("=")
        name = name.strip()
        if name not in DEFAULT_THRESHOLDS:
            raise ValueError(
                f"FASTBP_PARALLEL_THRESHOLD: unknown kernel family {name!r}; "
                f"expected one of {sorted(DEFAULT_THRESHOLDS)}")
        try:
            n = int(num)
        except ValueError:
            raise ValueError(f"FASTBP_PARALLEL_THRESHOLD: {name}: expected an integer, "
                             f"got {num.strip()!r}") from None
        if n < 0:
            raise ValueError(f"FASTBP_PARALLEL_THRESHOLD: {name}: must be >= 0, got {n}")
        out[name] = n
    return out


ENV_THRESHOLDS = _parse_threshold_env(os.environ.get("FASTBP_PARALLEL_THRESHOLD", ""))
thresholds.update(ENV_THRESHOLDS)


def set_parallel_threshold(family: str, work: int) -> None:
    """Set the work size at which kernels of ``family`` switch to their parallel build.

    Process-wide. ``work = 0`` always runs parallel (with more than one thread).
    """
    if family not in thresholds:
        raise ValueError(f"set_parallel_threshold: unknown kernel family {family!r}; "
                         f"expected one of {sorted(thresholds)}")
    if isinstance(work, bool) or int(work) != work or int(work) < 0:
        raise ValueError(f"set_parallel_threshold: work must be an int >= 0, got {work!r}")
    thresholds[family] = int(work)


def set_num_threads(n: int) -> None:
    """Set the number of threads fastbp's parallel kernels use (Numba's thread count).

    ``n = 1`` makes every kernel run its serial build. Like Numba's own setting, this
    applies to the calling Python thread. The maximum is ``NUMBA_NUM_THREADS`` (by
    default the CPU count), fixed when the process starts.
    """
    if isinstance(n, bool) or int(n) != n:
        raise ValueError(f"set_num_threads: n must be an int, got {n!r}")
    n = int(n)
    if not 1 <= n <= numba.config.NUMBA_NUM_THREADS:
        raise ValueError(f"set_num_threads: n must be in [1, {numba.config.NUMBA_NUM_THREADS}], got {n}")
    numba.set_num_threads(n)


def get_num_threads() -> int:
    """The number of threads parallel kernels use in the calling Python thread."""
    return numba.get_num_threads()


def use_parallel(family: str, work: int) -> bool:
    """True when a call of ``family`` with ``work`` scalar operations should run parallel."""
    return work >= thresholds[family] and numba.get_num_threads() > 1
