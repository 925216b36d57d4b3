"""Batch splitting for the recurrent sequence kernels, on a small pool of Python threads.

The rows of a batch are independent through a whole recurrence: h_t[n] needs only
h_{t-1}[n]. So a sequence kernel can run the full time loop for rows n0:n1 on one thread
and rows n1:N on another, with no synchronisation per time step (Numba's parallel build
would instead open a parallel region at every step, and OpenBLAS's threads a hand-off per
per-step GEMM). The chunks run the serial compiled kernels (``nogil``) on Python threads,
each writing its own rows of shared, preallocated outputs; BLAS is called from those
threads, never from inside a ``prange``.

``SPLIT_MACS``: the recurrence's multiply-adds (T·N·H·G) from which the batch is split.
Measured on the 2-vCPU machine: a hand-off to a sleeping pool thread costs 70-95 µs, so
only chunks of about a millisecond pay. The RNN forward recurrence (T=50, H=128) on one
thread vs two chunks: N=32 0.59 → 0.50 ms, N=64 1.39 → 0.89 ms, N=128 2.92 → 1.65 ms; whole
training steps in interleaved runs: rnn_seq 2.12 → 1.78 ms, lstm_seq 11.3 → 7.9 ms when the
machine was quiet, level (±3%) when it was busy. 2^22 puts rnn_seq (26M) and lstm_seq
(105M) on the split path; the exact crossover was not pinned down on this noisy machine.
``MIN_ROWS``: each chunk keeps at least this many rows, so its per-step GEMM stays
efficient. The environment variable ``FASTBP_SPLIT_MACS`` overrides SPLIT_MACS (a huge
value never splits).
"""
from __future__ import annotations

import os
import platform
import threading
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from . import config
from ._jit import jit

SPLIT_MACS = int(os.environ.get("FASTBP_SPLIT_MACS", 1 << 22))
MIN_ROWS = 16

_lock = threading.Lock()
_executor = None

# The caller's wait for its pool threads: spin (GIL released) up to WAIT_SPINS rounds of the
# CPU's pause instruction, then block. A blocked caller is woken through the host on these
# VMs (an idle vCPU halts at once), which cost cnn_lenet's conv splits 90-210 µs per call
# (wall time against half the items' summed time; FASTBP_POOL_SPINS overrides, 0 blocks).
WAIT_SPINS = int(os.environ.get("FASTBP_POOL_SPINS", 1 << 16))
_X86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")


@intrinsic
def _load_acquire(typingctx, arr, idx):
    """``arr[idx]`` read with an atomic acquire load: re-read on every call, never hoisted."""
    sig = arr.dtype(arr, idx)

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        ptr = builder.gep(ary.data, [args[1]])
        return builder.load_atomic(ptr, ordering="acquire", align=8)
    return sig, codegen


@intrinsic
def _pause(typingctx):
    """The x86 ``pause`` spin-loop hint (nothing elsewhere)."""
    sig = types.void()

    def codegen(context, builder, signature, args):
        if _X86:
            fn = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(ir.VoidType(), []), "llvm.x86.sse2.pause")
            builder.call(fn, [])
        return context.get_dummy_value()
    return sig, codegen


@jit
def _spin_until(flags, idx, target, spins):
    """Spin (nogil) until ``flags[idx] >= target`` or ``spins`` rounds have passed; returns
    whether the target was reached."""
    for _ in range(spins):
        if _load_acquire(flags, idx) >= target:
            return True
        _pause()
    return _load_acquire(flags, idx) >= target


def _wait(futures, done, target):
    """Wait until ``done[0]`` reaches ``target`` (the pool threads count their finished
    work there), spinning first, then for the futures themselves."""
    if WAIT_SPINS and _spin_until(done, 0, target, WAIT_SPINS):
        return
    for f in futures:
        try:
            f.result()
        except BaseException:
            pass


def _pool():
    global _executor
    with _lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max(1, numba.config.NUMBA_NUM_THREADS - 1),
                                           thread_name_prefix="fastbp")
        return _executor


def row_chunks(N: int, macs: int):
    """``[(n0, n1), ...]`` splitting N rows over the calling thread's fastbp thread count
    (``fastbp.set_num_threads``), or None when the work is too small to split."""
    k = min(config.get_num_threads(), N // MIN_ROWS)
    if k < 2 or macs < SPLIT_MACS:
        return None
    bounds = [N * i // k for i in range(k + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def run(fn, chunks):
    """``fn(n0, n1)`` for every chunk: the first on the calling thread, the rest on the
    pool. Returns the results in chunk order when all are done; re-raises the first error."""
    done = np.zeros(1, np.int64)
    out, errs = [None] * len(chunks), [None] * len(chunks)

    def job(k):
        try:
            out[k] = fn(*chunks[k])
        except BaseException as e:  # the others still run: they write the same outputs
            errs[k] = e
        finally:
            if k:
                done[0] += 1        # under the GIL; read by _spin_until
    futures = [_pool().submit(job, k) for k in range(1, len(chunks))]
    job(0)
    _wait(futures, done, len(futures))
    err = next((e for e in errs if e is not None), None)
    if err is not None:
        raise err
    return out


def run_items(fn, n_items, n_threads):
    """``fn(i)`` for i in 0 .. n_items−1 on ``n_threads`` threads (the calling one and pool
    threads), each claiming the next item as it finishes one: a thread that runs slower
    (another process on its core) simply does fewer items. ``fn`` must not depend on
    which thread runs an item. Re-raises the first error once all threads have stopped."""
    if n_threads <= 1 or n_items <= 1:
        for i in range(n_items):
            fn(i)
        return
    items = iter(range(n_items))
    lock = threading.Lock()
    failed = []
    done = np.zeros(1, np.int64)

    def worker():
        while not failed:
            with lock:
                i = next(items, None)
            if i is None:
                return
            try:
                fn(i)
            except BaseException as e:
                failed.append(e)
                return

    def pooled():
        try:
            worker()
        finally:
            done[0] += 1            # under the GIL; read by _spin_until
    futures = [_pool().submit(pooled) for _ in range(min(n_threads, n_items) - 1)]
    worker()
    _wait(futures, done, len(futures))
    if failed:
        raise failed[0]
