"""Data-parallel training on a Dask distributed cluster: ``fastbp.distributed.fit``.

Optional: needs ``pip install "fastbp[distributed]"`` (``dask[distributed]``). fastbp
runs no cluster of its own; it uses a ``dask.distributed.Client`` you connect to any
Dask deployment (``dask scheduler`` / ``dask worker``, a ``LocalCluster``, Kubernetes,
SLURM via dask-jobqueue, ...).

How a step runs (``local_steps=1``, synchronous data-parallel SGD):

- The data are split into *shards* along the batch axis that live on the workers: NumPy
  inputs are cut into one contiguous shard per worker and scattered once; a dask.array
  keeps its chunks where they are (one shard per chunk). The data do not move again
  (unless a worker is lost, see Faults).
- The client draws the epoch's permutation and batch boundaries exactly as
  ``fastbp.fit`` does (same ``seed`` → same order, same last partial batch).
- For global batch ``B`` (indices ``idx``, size ``|B|``), shard ``s`` holds the part
  ``B_s``. The params go out (inside the tasks when small, else scattered once per step
  to every worker), and shard ``s`` returns
  ``G_s = |B_s| · ∇(mean loss over B_s)``, computed with fastbp's kernels on its worker.
  The client sums ``G = (Σ_s G_s) / |B|`` in shard order (deterministic), which is
  the gradient of the global batch's mean loss, and applies ``optimizer.update`` once.
  In float64 the result equals ``fastbp.fit`` up to rounding (~1e-16 measured).

``local_steps=k > 1`` is local SGD (periodic model averaging): each shard starts from
the same params and optimizer state, runs k optimizer steps on its own parts of the
next k global batches, and the client averages params and optimizer buffers weighted
by the samples each shard processed. Communication drops k-fold; the trajectory is no
longer the one of ``fastbp.fit``: shards drift apart between averages and each local step
sees only the shard's part of a batch, so large k (with a large learning rate) can need
more epochs or fail to converge.

Faults: a step's update is applied only after every part's gradient has arrived. If a
worker dies, Dask reschedules its tasks; shards it held are re-scattered from the
client's copy (NumPy input) or recomputed by Dask from the array's graph (dask.array),
and the step is recomputed with the same per-part seeds. So no step is skipped or
applied twice and the final params equal an uninterrupted run.

Randomness in the model (Dropout, NoisyReLU) is seeded per (seed, epoch, step, shard),
so runs are reproducible, but those masks differ from ``fastbp.fit``'s (which draws one
stream for the whole batch); equality with ``fit`` holds for models without them.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import CancelledError

import numpy as np

from . import _tree
from .network import backward
from .train import (StopTraining, _axes, _correct, _evaluate, _prepare, _probe,
                    _progress_bar, _take)

__all__ = ["fit", "batch_order", "worker_threads"]

_WHERE = "fastbp.distributed.fit"
_RETRIES = 5            # attempts per step when workers or data are lost
_WORKER_WAIT = 60.0     # seconds to wait for a worker to (re)appear
_INLINE_BYTES = 4 << 20  # params up to this size travel inside the tasks, larger are scattered


def _dask():
    try:
        import dask.array as da
        import distributed
    except ImportError as e:                                    # pragma: no cover
        raise ImportError(f"{_WHERE} needs Dask: pip install \"fastbp[distributed]\" "
                          "(or pip install \"dask[distributed]\")") from e
    return da, distributed


# ----------------------------------------------------------------------------- batching
def batch_order(n, batch_size, epochs, shuffle, seed):
    """Yield ``(epoch, step, idx)`` in the order ``fastbp.fit`` visits its batches.

    ``rng = default_rng(seed)``; each epoch draws ``order = rng.permutation(n)`` (or
    ``arange(n)`` without shuffle) and cuts it into ``ceil(n / batch_size)`` batches, the
    last one partial. This mirrors ``fastbp.train.fit`` line for line (a test checks that
    they agree); it assumes the model draws no random numbers from fit's rng.
    """
    rng = np.random.default_rng(seed)
    steps = (n + batch_size - 1) // batch_size
    for epoch in range(epochs):
        order = rng.permutation(n) if shuffle else np.arange(n)
        for s in range(steps):
            yield epoch, s, order[s * batch_size:(s + 1) * batch_size]


def _split(idx, offsets):
    """``[(shard, local indices)]`` for the non-empty parts of global batch ``idx``."""
    owner = np.searchsorted(offsets, idx, side="right") - 1
    return [(s, idx[owner == s] - offsets[s]) for s in np.unique(owner)]


# ----------------------------------------------------------------------------- threads
def worker_threads(client, numba_threads=None) -> dict:
    """``{worker address: Numba threads}`` so that, on each host,
    ``Numba threads × Dask threads of all workers on that host ≤ cores``.

    ``numba_threads`` (an int) overrides the automatic choice for every worker. A task
    caps the value at its process's ``NUMBA_NUM_THREADS``.
    """
    workers = client.scheduler_info(n_workers=-1)["workers"]
    if numba_threads is not None:
        if isinstance(numba_threads, bool) or int(numba_threads) != numba_threads \
                or numba_threads < 1:
            raise ValueError(f"{_WHERE}: numba_threads must be a positive int or None, "
                             f"got {numba_threads!r}")
        return {a: int(numba_threads) for a in workers}
    cores = client.run(_cores)
    per_host = {}
    for a, w in workers.items():
        per_host[w["host"]] = per_host.get(w["host"], 0) + max(1, int(w.get("nthreads", 1)))
    return {a: max(1, cores.get(a, 1) // per_host[w["host"]]) for a, w in workers.items()}


def _thread_map(client, numba_threads):
    """``worker_threads`` plus one entry per host, used by workers that join later
    (e.g. a restarted worker): they take the smallest value chosen on their host."""
    out = worker_threads(client, numba_threads)
    workers = client.scheduler_info(n_workers=-1)["workers"]
    for a, k in list(out.items()):
        host = workers[a]["host"]
        out[host] = min(k, out.get(host, k))
    return out


def _cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:                                      # pragma: no cover
        return os.cpu_count() or 1


def _use_threads(threads):
    """Inside a task: set this executor thread's Numba thread count (it is per thread)."""
    import numba
    from distributed import get_worker
    from distributed.comm import get_address_host
    try:
        w = get_worker()
    except ValueError:                                          # not on a worker
        w = None
    k = None if w is None else threads.get(w.address, threads.get(get_address_host(w.address)))
    if k is None:   # an unknown host: share its cores among this worker's task threads
        k = _cores() // max(1, w.state.nthreads if w is not None else 1)
    numba.set_num_threads(max(1, min(int(k), numba.config.NUMBA_NUM_THREADS)))


# ----------------------------------------------------------------------------- tasks
def _part_grad(model, params, loss, x, y, ax, ay, idx, key, threads, task):
    """Worker task: ``(n, n·L, (correct, counted) or None, n·∇L)`` for the part
    ``idx`` of this shard (n = len(idx), L the part's mean loss), with fastbp's
    forward/backward."""
    _use_threads(threads)
    xb, yb = _take(x, ax, idx), _take(y, ay, idx)
    out, cache = model.forward(params, xb, train=True, rng=np.random.default_rng(key))
    lval, dout = loss(out, yb)
    _, grads = backward(model, params, cache, dout, input_grad=False)
    n = len(idx)
    grads = _tree.tree_map(lambda g: g * g.dtype.type(n), grads)
    return n, float(lval) * n, (_correct(task, out, yb) if task else None), grads


def _part_local(model, params, state, optimizer, loss, x, y, ax, ay, parts, keys, threads,
                task):
    """Worker task for local SGD: one optimizer step per ``(t, idx)`` of ``parts`` on this
    shard, from ``(params, state)``. Returns ``(n, Σ n_i·L_i, acc, params, state)``."""
    _use_threads(threads)
    total_n, total_l, correct, counted = 0, 0.0, 0, 0
    for (t, idx), key in zip(parts, keys):
        xb, yb = _take(x, ax, idx), _take(y, ay, idx)
        out, cache = model.forward(params, xb, train=True, rng=np.random.default_rng(key))
        lval, dout = loss(out, yb)
        if not np.isfinite(lval):
            return total_n, float(lval), None, params, state
        _, grads = backward(model, params, cache, dout, input_grad=False)
        state = dict(state, step=t)               # the global step count, as in fit
        params, state = optimizer.update(params, grads, state)
        total_n += len(idx)
        total_l += float(lval) * len(idx)
        if task:
            c, m = _correct(task, out, yb)
            correct += c
            counted += m
    return total_n, total_l, ((correct, counted) if task else None), params, state


def _warm(model, params, loss, x, y, ax, ay, threads):
    """Worker task: one forward/backward so the compiled kernels are loaded once."""
    _part_grad(model, params, loss, x, y, ax, ay, np.arange(x.shape[ax]), 0, threads, None)
    return True


# ----------------------------------------------------------------------------- data
class _Shards:
    """The training data as shards on the workers: ``x_futs[s], y_futs[s]`` hold samples
    ``offsets[s]:offsets[s+1]`` (along the batch axes ``ax``, ``ay``). NumPy shards are
    re-scattered from the client's copy when lost; dask.array chunks are recomputed by Dask
    from their graph. ``task`` is the accuracy rule found by probing the first batch."""

    def __init__(self, client, model, params, loss, x, y, batch_axis, batch_size):
        da, distributed = _dask()
        self.client = client
        self.local = None
        if isinstance(x, da.Array) or isinstance(y, da.Array):
            self._from_dask(da, distributed, model, params, loss, x, y, batch_axis, batch_size)
        else:
            x, y, ax, ay = _prepare(_WHERE, params, x, y, batch_axis)
            self.ax, self.ay = ax, ay
            self.task = _probe(_WHERE, model, params, loss, x, y, ax, ay, batch_size)
            n = x.shape[ax]
            workers = sorted(client.scheduler_info(n_workers=-1)["workers"])
            k = max(1, min(len(workers), n))
            self.offsets = np.linspace(0, n, k + 1).astype(np.int64)
            self.local = (x, y)
            self.x_futs, self.y_futs = [None] * k, [None] * k
            for s in range(k):
                self._scatter(s, workers[s % len(workers)])
        self.n = int(self.offsets[-1])

    def _from_dask(self, da, distributed, model, params, loss, x, y, batch_axis, batch_size):
        dtype = _tree.leaves(params)[0].dtype if _tree.leaves(params) else np.dtype(np.float32)
        x = x if isinstance(x, da.Array) else da.from_array(np.asarray(x))
        y = y if isinstance(y, da.Array) else da.from_array(np.asarray(y))
        if x.ndim == 0 or y.ndim == 0:
            raise ValueError(f"{_WHERE}: x and y must be arrays of samples, got x {x.shape} "
                             f"and y {y.shape}")
        ax, ay = _axes(_WHERE, batch_axis, x, y)
        if x.dtype.kind not in "fiub":
            raise TypeError(f"{_WHERE}: x must be numeric, got dtype {x.dtype}")
        if y.dtype.kind not in "fiub":
            raise TypeError(f"{_WHERE}: y must hold integer labels or float targets, "
                            f"got dtype {y.dtype}")
        if any(np.isnan(c) for c in x.chunks[ax]):
            x = x.compute_chunk_sizes()
        if any(np.isnan(c) for c in y.chunks[ay]):
            y = y.compute_chunk_sizes()
        if x.shape[ax] != y.shape[ay]:
            raise ValueError(f"{_WHERE}: x and y must have the same number of samples, got "
                             f"{x.shape[ax]} in x {x.shape} (axis {ax}) and {y.shape[ay]} in "
                             f"y {y.shape} (axis {ay})")
        if x.shape[ax] == 0:
            raise ValueError(f"{_WHERE}: no samples (x has shape {x.shape})")
        x = x.astype(dtype) if x.dtype != dtype else x
        y = y.astype(dtype) if y.dtype.kind == "f" and y.dtype != dtype else y
        # one shard per chunk of the batch axis; other axes whole; y aligned with x
        x = x.rechunk({i: -1 for i in range(x.ndim) if i != ax})
        y = y.rechunk({i: (x.chunks[ax] if i == ay else -1) for i in range(y.ndim)})
        x, y = self.client.persist([x, y])
        futs = {f.key: f for f in distributed.futures_of([x, y])}
        self.x_futs = [futs[k] for k in _chunk_keys(x, ax)]
        self.y_futs = [futs[k] for k in _chunk_keys(y, ay)]
        self.offsets = np.concatenate([[0], np.cumsum(x.chunks[ax])]).astype(np.int64)
        self.ax, self.ay = ax, ay
        self._arrays = (x, y)          # keep the persisted collections alive
        m = min(x.shape[ax], batch_size, 256)
        xh, yh = self.client.compute([_dslice(x, ax, m), _dslice(y, ay, m)], sync=True)
        self.task = _probe(_WHERE, model, params, loss, xh, yh, ax, ay, batch_size)
        if self.task == "labels":      # _probe saw only the head: check all the labels
            k = model.forward(params, _take(xh, ax, slice(0, 1)), train=False, rng=None)[0]
            k = k.shape[-1]
            lo, hi = self.client.compute([y.min(), y.max()], sync=True)
            if lo < 0 or hi >= k:
                raise ValueError(f"{_WHERE}: labels must be in [0, {k}) for a model with {k} "
                                 f"outputs, got {lo if lo < 0 else hi}")

    def _scatter(self, s, worker=None):
        sl = slice(int(self.offsets[s]), int(self.offsets[s + 1]))
        kw = dict(hash=False, workers=[worker] if worker else None)
        x, y = self.local
        self.x_futs[s] = self.client.scatter(_take(x, self.ax, sl), **kw)
        self.y_futs[s] = self.client.scatter(_take(y, self.ay, sl), **kw)

    def repair(self):
        """Re-scatter NumPy shards that were lost with a worker. Returns how many."""
        if self.local is None:
            return 0
        lost = [s for s in range(len(self.x_futs))
                if self.x_futs[s].status != "finished" or self.y_futs[s].status != "finished"]
        for s in lost:
            self._scatter(s)
        return len(lost)

    def head(self, m):
        """The first m samples (client side), for warming the workers."""
        if self.local is not None:
            x, y = self.local
            return _take(x, self.ax, slice(0, m)), _take(y, self.ay, slice(0, m))
        x, y = self._arrays
        return tuple(self.client.compute([_dslice(x, self.ax, m), _dslice(y, self.ay, m)],
                                         sync=True))


def _dslice(a, axis, m):
    return a[(slice(None),) * axis + (slice(0, m),)]


def _chunk_keys(a, axis):
    """The keys of ``a``'s chunks along ``axis``, in order (a has one chunk on the others)."""
    keys = a.__dask_keys__()
    out = []
    for i in range(len(a.chunks[axis])):
        k = keys
        for d in range(a.ndim):
            k = k[i if d == axis else 0]
        out.append(k)
    return out


# ----------------------------------------------------------------------------- fit
def fit(model, params, x, y, *, client, loss, optimizer, epochs=10, batch_size=32,
        shuffle=True, seed=0, local_steps=1, validation_data=None, progress=True,
        callbacks=None, batch_axis=0, numba_threads=None):
    """Data-parallel ``fastbp.fit`` on a Dask cluster. Returns ``(params, history)``.

    client: a ``dask.distributed.Client`` with at least one worker.
    x (N, ...), y (N, ...): NumPy arrays (converted once to the params' dtype, split into
    one shard per worker and scattered once) or dask.arrays (chunked along the batch axis;
    the chunks stay where they are, one shard per chunk).
    local_steps=1: every step, each shard's worker computes ``|B_s|·∇L(B_s)`` for its part
    B_s of the global batch B; the client sums them in shard order, divides by ``|B|`` (the
    gradient of B's mean loss) and applies ``optimizer.update`` once. With the same
    arguments this equals ``fastbp.fit`` (to rounding; for models without Dropout/NoisyReLU).
    local_steps=k > 1: local SGD. Each shard runs k optimizer steps on its own parts of
    the next k batches from the same (params, state); then params and optimizer buffers are
    averaged, weighted by the samples each shard processed. k times less communication.
    numba_threads: Numba threads per task; ``None`` picks ``cores // Dask threads on the
    host`` so that threads × workers ≤ cores (see ``worker_threads``).
    Other arguments and ``history`` are as in ``fastbp.fit``: the training ``loss`` is the
    mean over the epoch's batches at the params each batch saw (with local steps, the
    shard's local params); validation runs on the client with train=False. ``callbacks``
    get ``grads`` of the epoch's last step (None with local_steps > 1).
    Raises RuntimeError when the cluster has no workers (or loses all of them for a
    minute), ValueError/TypeError for bad arguments or data before any training.
    The input params are not modified.
    """
    _, distributed = _dask()
    if not isinstance(client, distributed.Client):
        raise TypeError(f"{_WHERE}: client must be a dask.distributed.Client, got "
                        f"{type(client).__name__}")
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"{_WHERE}: batch_size must be a positive int, got {batch_size!r}")
    if isinstance(epochs, bool) or int(epochs) != epochs or epochs < 0:
        raise ValueError(f"{_WHERE}: epochs must be an int >= 0, got {epochs!r}")
    if isinstance(local_steps, bool) or int(local_steps) != local_steps or local_steps < 1:
        raise ValueError(f"{_WHERE}: local_steps must be an int >= 1, got {local_steps!r}")
    if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
        raise TypeError(f"{_WHERE}: optimizer must have init and update (e.g. "
                        f"fastbp.optim.adam(1e-3)), got {optimizer!r}")
    callbacks = list(callbacks or [])
    for cb in callbacks:
        if not callable(cb):
            raise TypeError(f"{_WHERE}: callbacks must be callables cb(epoch, logs, params, "
                            f"grads), got {cb!r}")
    if not client.scheduler_info(n_workers=-1)["workers"]:
        addr = client.scheduler.address
        raise RuntimeError(f"{_WHERE}: the client's cluster has no workers (scheduler {addr}); "
                           f"start some (e.g. `dask worker {addr}`) or wait for them with "
                           "client.wait_for_workers(n)")
    if numba_threads is not None and (isinstance(numba_threads, bool) or
                                      int(numba_threads) != numba_threads or numba_threads < 1):
        raise ValueError(f"{_WHERE}: numba_threads must be a positive int or None, "
                         f"got {numba_threads!r}")
    batch_size, epochs, local_steps = int(batch_size), int(epochs), int(local_steps)
    data = _Shards(client, model, params, loss, x, y, batch_axis, batch_size)
    if validation_data is not None:
        if not isinstance(validation_data, (tuple, list)) or len(validation_data) != 2:
            raise ValueError(f"{_WHERE}: validation_data must be a pair (x_val, y_val)")
        xv, yv = (np.asarray(v.compute() if hasattr(v, "compute") else v)
                  for v in validation_data)
        xv, yv, axv, ayv = _prepare(f"{_WHERE} (validation_data)", params, xv, yv, batch_axis)
        vtask = _probe(f"{_WHERE} (validation_data)", model, params, loss, xv, yv, axv, ayv,
                       1024)
    threads = _thread_map(client, numba_threads)
    run = _Runner(client, data, threads)
    run.warm(model, params, loss, batch_size)

    n, task = data.n, data.task
    steps = (n + batch_size - 1) // batch_size
    state = optimizer.init(params)
    history = {"loss": []}
    if task is not None:
        history["accuracy"] = []
    if validation_data is not None:
        history["val_loss"] = []
        if vtask is not None:
            history["val_accuracy"] = []
    bar = _progress_bar(epochs * steps) if progress else None
    batches = batch_order(n, batch_size, epochs, shuffle, seed)
    grads = None
    try:
        for epoch in range(epochs):
            total, correct, counted, t0 = 0.0, 0, 0, time.perf_counter()
            s = 0
            while s < steps:
                k = min(local_steps, steps - s)
                group = [next(batches)[2] for _ in range(k)]
                if local_steps == 1:
                    params, state, grads, lsum, acc = run.sync_step(
                        model, params, state, optimizer, loss, group[0], (seed, epoch, s), task)
                else:
                    params, state, lsum, acc = run.local_round(
                        model, params, state, optimizer, loss, group, (seed, epoch, s), task)
                if not np.isfinite(lsum):
                    raise FloatingPointError(
                        f"{_WHERE}: the loss became {lsum} at epoch {epoch + 1}, step {s + 1}; "
                        "lower the learning rate or clip the gradients")
                total += lsum
                if acc is not None:
                    correct += acc[0]
                    counted += acc[1]
                s += k
                if bar is not None:
                    done = min(n, s * batch_size)
                    bar.update(k)
                    bar.set_postfix(epoch=epoch + 1, loss=f"{total / done:.4f}",
                                    samples_per_s=f"{done / max(time.perf_counter() - t0, 1e-9):.0f}",
                                    refresh=False)
            logs = {"loss": total / n}
            if task is not None:
                logs["accuracy"] = correct / counted
            if validation_data is not None:
                logs["val_loss"], vacc = _evaluate(model, params, xv, yv, axv, ayv, loss, 1024,
                                                   vtask)
                if vtask is not None:
                    logs["val_accuracy"] = vacc
            for key in history:
                history[key].append(logs[key])
            stop = False
            for cb in callbacks:
                try:
                    stop = bool(cb(epoch, dict(logs), params, grads)) or stop
                except StopTraining:
                    stop = True
            if stop:
                break
    finally:
        if bar is not None:
            bar.close()
    return params, history


class _Runner:
    """Submits a step's tasks and gathers them, retrying the whole step when a worker or
    a shard is lost (a step is applied only once all its parts have arrived)."""

    def __init__(self, client, data, threads):
        _, self.distributed = _dask()
        self.client, self.data, self.threads = client, data, threads
        self.recoveries = 0           # steps recomputed after a lost worker (for tests/logs)

    def warm(self, model, params, loss, batch_size):
        """One part-sized forward/backward per worker: loads the compiled kernels (serial
        and, with several Numba threads, parallel builds) before the first step."""
        m = max(2, batch_size // len(self.data.x_futs))
        xh, yh = self.data.head(m)
        workers = self.client.scheduler_info(n_workers=-1)["workers"]
        futs = [self.client.submit(_warm, model, params, loss, xh, yh, self.data.ax,
                                   self.data.ay, self.threads,
                                   workers=[a], allow_other_workers=True, pure=False)
                for a in workers]
        self.distributed.wait(futs)
        for f in futs:                      # errors in the model or loss surface here
            if f.status == "error":
                f.result()

    def _ship(self, *trees):
        """The trees as task arguments: inline when small (one message, no extra round
        trip), else scattered once to every worker (so large params don't pass through
        the scheduler once per part)."""
        if sum(_nbytes(t) for t in trees) <= _INLINE_BYTES:
            return trees
        return tuple(self.client.scatter(list(trees), broadcast=True, hash=False))

    def sync_step(self, model, params, state, optimizer, loss, idx, key, task):
        parts = _split(idx, self.data.offsets)

        def submit():
            (pf,) = self._ship(params)
            d = self.data
            return [self.client.submit(_part_grad, model, pf, loss, d.x_futs[s], d.y_futs[s],
                                       d.ax, d.ay, local, key + (int(s),), self.threads, task,
                                       pure=False)
                    for s, local in parts]

        results = self._gather(submit)
        lsum = sum(r[1] for r in results)
        if not np.isfinite(lsum):
            return params, state, None, lsum, None
        g = [list(_tree.leaves(r[3])) for r in results]     # fixed (shard) order
        inv = 1.0 / len(idx)
        total = []
        for i, leaf in enumerate(g[0]):
            acc = leaf.copy()
            for other in g[1:]:
                acc += other[i]
            total.append(acc * leaf.dtype.type(inv) if leaf.dtype == np.float32 else acc * inv)
        grads = _tree.unflatten(results[0][3], total)
        params, state = optimizer.update(params, grads, state)
        return params, state, grads, lsum, _sum_acc(r[2] for r in results)

    def local_round(self, model, params, state, optimizer, loss, group, key, task):
        t0 = int(state["step"])
        per_shard = {}
        for j, idx in enumerate(group):
            for s, local in _split(idx, self.data.offsets):
                per_shard.setdefault(int(s), []).append((t0 + j, local))
        shards = sorted(per_shard)

        def submit():
            ps, ss = self._ship(params, state)
            d = self.data
            futs = []
            for s in shards:
                keys = [key[:2] + (key[2] + (t - t0), s) for t, _ in per_shard[s]]
                futs.append(self.client.submit(_part_local, model, ps, ss, optimizer, loss,
                                               d.x_futs[s], d.y_futs[s], d.ax, d.ay,
                                               per_shard[s], keys, self.threads, task,
                                               pure=False))
            return futs

        results = self._gather(submit)
        lsum = sum(r[1] for r in results)
        if not np.isfinite(lsum):
            return params, state, lsum, None
        weights = np.array([r[0] for r in results], np.float64)
        weights /= weights.sum()
        new_params = _average([r[3] for r in results], weights)
        new_state = {}
        for name, val in state.items():
            if name == "step":
                new_state[name] = t0 + len(group)
            else:
                try:
                    new_state[name] = _average([r[4][name] for r in results], weights)
                except TypeError:             # not a tree of arrays: keep shard 0's value
                    new_state[name] = results[0][4][name]
        return new_params, new_state, lsum, _sum_acc(r[2] for r in results)

    def _gather(self, submit):
        """Results of the futures ``submit()`` returns, in order. Lost data or workers:
        re-scatter what was lost, wait for a worker, and resubmit (up to _RETRIES)."""
        dist = self.distributed
        for attempt in range(_RETRIES):
            try:
                futs = None
                futs = submit()
                dist.wait(futs)
            except (OSError, dist.comm.CommClosedError, CancelledError,
                    TimeoutError) as e:           # lost dependencies, a dying worker, etc.
                err = e
            else:
                bad = [f for f in futs if f.status != "finished"]
                if not bad:
                    return self.client.gather(futs)
                for f in bad:
                    if f.status == "error":       # the task's own error, or KilledWorker (the
                        f.result()                # task took down several workers): raise it
                err = bad[0]
            self.recoveries += 1
            futs = None                           # drop them; Dask forgets them
            try:
                self.client.wait_for_workers(1, timeout=_WORKER_WAIT)
            except TimeoutError as e:
                raise RuntimeError(f"{_WHERE}: all workers were lost and none came back "
                                   f"within {_WORKER_WAIT:.0f} s") from e
            self.data.repair()
        raise RuntimeError(f"{_WHERE}: a step failed {_RETRIES} times because workers or data "
                           f"were lost (last: {err!r})")


def _nbytes(obj):
    """Bytes of all arrays in nested lists/tuples/dicts (other leaves count 0)."""
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def _sum_acc(accs):
    accs = [a for a in accs if a is not None]
    return (sum(a[0] for a in accs), sum(a[1] for a in accs)) if accs else None


def _average(trees, weights):
    """``Σ_s w_s · tree_s`` leaf-wise, summed in order, in each leaf's dtype."""
    flat = [_tree.leaves(t) for t in trees]
    out = []
    for i, leaf in enumerate(flat[0]):
        acc = leaf * leaf.dtype.type(weights[0])
        for w, f in zip(weights[1:], flat[1:]):
            acc += f[i] * leaf.dtype.type(w)
        out.append(acc)
    return _tree.unflatten(trees[0], out)
