"""Run-time configuration: threading layer, thread hygiene, serial/parallel thresholds.

This module sits at the bottom of the import graph. It must run before Numba starts
its thread pool, so ``fastbp/__init__.py`` imports it first.

Environment variables (all optional):

``FASTBP_PARALLEL_THRESHOLD``
    Either one integer, applied to every kernel family, or a comma list such as
    ``dense=20000,activations=100000``. A kernel call runs its ``parallel=True``
    compilation when its work (roughly, scalar operations) is at least the threshold
    of its family and more than one thread is available. ``0`` always runs parallel;
    a huge number always runs serial.
``OMP_WAIT_POLICY`` / ``NUMBA_THREADING_LAYER`` / ``NUMBA_CACHE_DIR``
    Respected when set. fastbp only fills in defaults for the ones left unset.
"""
from __future__ import annotations

import os

# --- thread-pool hygiene -------------------------------------------------------------
# Idle OpenMP workers that spin steal the cores OpenBLAS needs for the GEMM that follows
# a parallel Numba region (and vice versa). PASSIVE makes idle workers sleep instead.
# It must be in the environment before libgomp is loaded (first parallel launch).
# See asv_benchmarks/benchmarks/threads.py for the before/after measurement.
USER_SET_WAIT_POLICY = "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ
if not USER_SET_WAIT_POLICY:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

import numba  # noqa: E402  (after the environment is prepared)

# The 'workqueue' layer aborts when two Python threads launch parallel regions at once.
# 'threadsafe' picks omp or tbb, both safe for concurrent callers.
if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "threadsafe"

# --- serial / parallel dispatch --------------------------------------------------------
# Work thresholds, in scalar operations, above which a kernel family runs its parallel
# compilation. Measured on a 2-vCPU AVX-512 machine with the omp layer
# (see ``python -m fastbp.bench --thresholds``); override with the env var above.
DEFAULT_THRESHOLDS = {
    "dense": 1 << 16,
    "activations": 1 << 16,
    "dropout": 1 << 16,
    "losses": 1 << 16,
    "optim": 1 << 16,
    "conv": 1 << 16,
    "pool": 1 << 16,
    "rnn": 1 << 16,
    "lstm": 1 << 16,
}
thresholds = dict(DEFAULT_THRESHOLDS)


def _parse_threshold_env(value: str) -> dict:
    value = value.strip()
    if not value:
        return {}
    if "=" not in value:
        n = int(value)
        return {k: n for k in DEFAULT_THRESHOLDS}
    out = {}
    for item in value.split(","):
        name, _, num = item.partition("=")
        name = name.strip()
        if name not in DEFAULT_THRESHOLDS:
            raise ValueError(
                f"FASTBP_PARALLEL_THRESHOLD: unknown kernel family {name!r}; "
                f"expected one of {sorted(DEFAULT_THRESHOLDS)}")
        out[name] = int(num)
    return out


thresholds.update(_parse_threshold_env(os.environ.get("FASTBP_PARALLEL_THRESHOLD", "")))


def set_parallel_threshold(family: str, work: int) -> None:
    """Set the work size at which kernels of ``family`` switch to their parallel build."""
    if family not in thresholds:
        raise ValueError(f"set_parallel_threshold: unknown kernel family {family!r}; "
                         f"expected one of {sorted(thresholds)}")
    if int(work) < 0:
        raise ValueError(f"set_parallel_threshold: work must be >= 0, got {work}")
    thresholds[family] = int(work)


def set_num_threads(n: int) -> None:
    """Set the number of threads fastbp's parallel kernels use (Numba's thread count).

    ``n = 1`` makes every kernel run its serial build. Like Numba's own setting, this
    applies to the calling Python thread.
    """
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
