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

The conv layers split their samples here too (``run_split``). The pool threads are plain
daemon threads (``_Worker``, NUMBA_NUM_THREADS − 1 of them), each running its jobs in
order. Neither side sleeps at once: a pool thread polls for its next job for about half a
millisecond (``WORKER_SPINS``) and the caller spins for its pool threads' results
(``WAIT_SPINS``), both with the GIL released, because waking a sleeping thread costs about
100 µs on these VMs. For the same reason each side asks for the GIL only when the other
has let go of it (``START_SPINS``, ``_Done``). A split started on a pool thread runs
there, serially.
"""
from __future__ import annotations

import collections
import os
import platform
import threading

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

# The caller's wait for its pool threads: spin (GIL released) up to WAIT_SPINS rounds of the
# CPU's pause instruction, then block. A blocked caller is woken through the host on these
# VMs (an idle vCPU halts at once), which cost cnn_lenet's conv splits 90-210 µs per call
# (wall time against half the items' summed time; FASTBP_POOL_SPINS overrides, 0 blocks).
WAIT_SPINS = int(os.environ.get("FASTBP_POOL_SPINS", 1 << 16))
# The pool threads' wait for their next job, the same way: up to WORKER_SPINS rounds (a
# sched_yield every YIELD_EVERY rounds hands the core to libgomp's or MKL's threads when
# they want it), then block. Blocked, a pool thread started its first item a median 105-139
# µs after the submit in cnn_cifar and cnn_lenet, and in 87 of 800 lenet conv calls it got
# no item at all; a conv net's split calls come a few hundred µs apart.
# FASTBP_WORKER_SPINS overrides (0: block at once).
WORKER_SPINS = int(os.environ.get("FASTBP_WORKER_SPINS", 1 << 15))
YIELD_EVERY = 64
# Taking the GIL while another thread holds it puts a thread to sleep in the kernel, and
# waking it cost 20-30 µs on these VMs: a split of two 14.5 µs nogil jobs took 42-52 µs
# (median) when the pool thread, seeing its job, asked for the GIL while the caller was
# still in the Python before its own compiled loop, and the caller, back from its wait,
# asked for it while the pool thread was still in the Python after its job. So a pool
# thread that sees a job first pauses START_SPINS more rounds (about 3 µs), and the caller
# waits until its pool threads are back in their nogil poll (``_Done``).
START_SPINS = int(os.environ.get("FASTBP_START_SPINS", 1 << 7))
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
def _store_release(typingctx, arr, idx, val):
    """``arr[idx] = val`` as an atomic release store (seen by other threads' acquire loads)."""
    sig = types.void(arr, idx, val)

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        ptr = builder.gep(ary.data, [args[1]])
        v = context.cast(builder, args[2], signature.args[2], signature.args[0].dtype)
        builder.store_atomic(v, ptr, ordering="release", align=8)
        return context.get_dummy_value()
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


@intrinsic
def _fetch_add(typingctx, arr, idx, val):
    """``arr[idx] += val`` as one atomic (sequentially consistent) operation; returns the
    value before the addition."""
    sig = arr.dtype(arr, idx, val)

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        ptr = builder.gep(ary.data, [args[1]])
        v = context.cast(builder, args[2], signature.args[2], signature.args[0].dtype)
        return builder.atomic_rmw("add", ptr, v, "seq_cst")
    return sig, codegen


@jit
def claim(counter):
    """The next item number from ``counter`` (an int64 array of one element, shared by
    the threads of a split): compiled loops claim their work items this way, with no
    Python (and no GIL hand-off) between items."""
    return _fetch_add(counter, 0, 1)


_sched_yield = types.ExternalFunction("sched_yield", types.int32())


@jit
def _spin_until(flags, idx, target, spins):
    """Spin (nogil) until ``flags[idx] >= target`` or ``spins`` rounds have passed; returns
    whether the target was reached."""
    for _ in range(spins):
        if _load_acquire(flags, idx) >= target:
            return True
        _pause()
    return _load_acquire(flags, idx) >= target


@jit
def _poll_until(flags, idx, target, spins, yield_every, mark, mark_value, after):
    """``_spin_until`` that calls ``sched_yield`` instead of ``pause`` every ``yield_every``
    rounds, so a thread polling for long lets any other runnable thread have its core.
    First ``mark[0] = mark_value``: this thread has let go of the GIL (see ``_Done``);
    once the target is reached, ``after`` more pause rounds (see START_SPINS)."""
    _store_release(mark, 0, mark_value)
    for i in range(spins):
        if _load_acquire(flags, idx) >= target:
            for _ in range(after):
                _pause()
            return True
        if i % yield_every == yield_every - 1:
            _sched_yield()
        else:
            _pause()
    return _load_acquire(flags, idx) >= target


class _Worker:
    """A pool thread: runs the jobs ``submit`` gives it, in order. Between jobs it polls
    for the next one (``WORKER_SPINS`` rounds, GIL released), then sleeps on a condition."""

    def __init__(self, name):
        self.jobs = collections.deque()
        self.posted = np.zeros(1, np.int64)     # jobs submitted so far (polled nogil)
        self.idle = np.zeros(1, np.int64)       # jobs done when it last let go of the GIL
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.thread.start()

    def submit(self, fn):
        """Queue ``fn()`` (it must not raise: the pool's jobs catch their errors). Returns
        the number of jobs this worker will have done once ``fn`` is done."""
        with self.cond:
            self.jobs.append(fn)
            self.posted[0] += 1
            self.cond.notify()
            return int(self.posted[0])

    def _loop(self):
        taken = 0
        while True:
            if not WORKER_SPINS:
                self.idle[0] = taken
            if not (WORKER_SPINS and _poll_until(self.posted, 0, taken + 1, WORKER_SPINS,
                                                 YIELD_EVERY, self.idle, taken, START_SPINS)):
                with self.cond:
                    while self.posted[0] <= taken:
                        self.cond.wait()
            taken += 1
            try:
                self.jobs.popleft()()
            except BaseException:       # never lose the thread (the jobs catch their own)
                pass


_lock = threading.Lock()
_workers: list = []
_worker_threads: set = set()


def _reset_after_fork():
    global _lock
    _lock = threading.Lock()
    _workers.clear()
    _worker_threads.clear()


if hasattr(os, "register_at_fork"):         # a forked child has none of the threads
    os.register_at_fork(after_in_child=_reset_after_fork)


def _pool(k):
    """The first ``k`` pool threads (created on first use; at most NUMBA_NUM_THREADS − 1)."""
    with _lock:
        while len(_workers) < min(k, max(1, numba.config.NUMBA_NUM_THREADS - 1)):
            w = _Worker(f"fastbp-{len(_workers)}")
            _workers.append(w)
            _worker_threads.add(w.thread)
        return _workers[:k]


class _Done:
    """Counts a call's finished pool jobs. The caller spins (WAIT_SPINS rounds) until every
    pool thread that ran one of its jobs is back in its nogil poll (``_Worker.idle`` reaches
    the count ``expect`` recorded from ``submit``; the job's ``add`` came before), else
    blocks on an event that the last job sets (made only then, under ``lock``). Waiting on
    the poll and not on ``count`` keeps the caller from asking for the GIL while the pool
    thread still runs the Python after its job (see START_SPINS)."""
    __slots__ = ("count", "target", "lock", "event", "waits")

    def __init__(self, target):
        self.count = 0
        self.target = target
        self.lock = threading.Lock()
        self.event = None
        self.waits = []

    def expect(self, worker, jobs):
        self.waits.append((worker.idle, jobs))

    def add(self):
        with self.lock:
            self.count += 1
            if self.count >= self.target and self.event is not None:
                self.event.set()

    def wait(self):
        if self.target <= 0:
            return
        if WAIT_SPINS and all(_spin_until(idle, 0, jobs, WAIT_SPINS)
                              for idle, jobs in self.waits):
            return                  # every job done (each add()s before its thread polls)
        with self.lock:
            if self.count >= self.target:
                return
            self.event = threading.Event()
        self.event.wait()


def _on_pool_thread():
    """True on a pool thread: a split started there runs on it alone (no self-deadlock)."""
    return threading.current_thread() in _worker_threads


def _hand_out(fns):
    """Queue ``fns[k]`` on pool thread k (round robin over the pool) and return the
    ``_Done`` the caller waits on: each job ``add()``s once its fn has returned or raised
    (the fns record their own errors)."""
    workers = _pool(len(fns))
    done = _Done(len(fns))
    for k, fn in enumerate(fns):
        def job(fn=fn):
            try:
                fn()
            finally:
                done.add()
        w = workers[k % len(workers)]
        done.expect(w, w.submit(job))
    return done


def run_split(prepare, kernel, n_threads):
    """``kernel(*prepare())`` once on each of ``n_threads`` threads (the calling one and
    pool threads). ``prepare`` runs on the thread that will use its result (per-thread
    scratch, BLAS settings); ``kernel`` is a compiled ``nogil`` function that shares the
    work out itself (a claim counter among its arguments: ``claim``). The caller runs its
    ``prepare`` before it hands out the pool jobs, so that after the hand-off it holds the
    GIL only for the call into ``kernel``, and the pool thread, asking for the GIL a moment
    later (START_SPINS), finds it free instead of sleeping on it. With the caller's
    Python after the hand-off (``run_items``), the pool thread of a cnn_lenet conv call
    entered its kernel 28-34 µs after the caller (median), most of it a sleep on the GIL;
    the cnn_lenet step ran 0.945 (0.79-0.95) of that in alternating blocks. Re-raises
    the first error once every thread is done."""
    if n_threads <= 1 or _on_pool_thread():
        kernel(*prepare())
        return
    mine = prepare()
    failed = []

    def pooled():
        try:
            kernel(*prepare())
        except BaseException as e:
            failed.append(e)
    done = _hand_out([pooled] * len(_pool(n_threads - 1)))
    try:
        kernel(*mine)
    finally:
        done.wait()                 # the pool jobs share the outputs: let them finish
    if failed:
        raise failed[0]


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
    out, errs = [None] * len(chunks), [None] * len(chunks)

    def job(k):
        try:
            out[k] = fn(*chunks[k])
        except BaseException as e:  # the others still run: they write the same outputs
            errs[k] = e
    if len(chunks) > 1 and not _on_pool_thread():
        done = _hand_out([lambda k=k: job(k) for k in range(1, len(chunks))])
        job(0)
        done.wait()
    else:
        for k in range(len(chunks)):
            job(k)
    err = next((e for e in errs if e is not None), None)
    if err is not None:
        raise err
    return out


def run_items(fn, n_items, n_threads):
    """``fn(i)`` for i in 0 .. n_items−1 on ``n_threads`` threads (the calling one and pool
    threads), each claiming the next item as it finishes one: a thread that runs slower
    (another process on its core) simply does fewer items. ``fn`` must not depend on
    which thread runs an item. Re-raises the first error once all threads have stopped."""
    if n_threads <= 1 or n_items <= 1 or _on_pool_thread():
        for i in range(n_items):
            fn(i)
        return
    items = iter(range(n_items))
    lock = threading.Lock()
    failed = []

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
    done = _hand_out([worker] * len(_pool(min(n_threads, n_items) - 1)))
    worker()
    done.wait()
    if failed:
        raise failed[0]
