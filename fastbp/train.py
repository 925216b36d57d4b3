"""Training loop: ``fit`` (mini-batch gradient descent) and ``evaluate``."""
from __future__ import annotations

import time

import numpy as np

from . import _tree
from .network import backward

__all__ = ["fit", "evaluate", "StopTraining"]


class StopTraining(Exception):
    """Raise from a callback (or return True from it) to end ``fit`` after this epoch."""


def _params_dtype(params):
    leaves = _tree.leaves(params)
    return leaves[0].dtype if leaves else np.dtype(np.float32)


def _prepare(where, params, x, y):
    dtype = _params_dtype(params)
    x = np.asarray(x)
    if x.dtype.kind not in "fiub":
        raise TypeError(f"{where}: x must be numeric, got dtype {x.dtype}")
    x = np.ascontiguousarray(x, dtype=dtype)          # once, up front
    y = np.asarray(y)
    if y.dtype.kind == "f":
        y = np.ascontiguousarray(y, dtype=dtype)
    elif y.dtype.kind not in "iub":
        raise TypeError(f"{where}: y must hold integer labels or float targets, got dtype {y.dtype}")
    if x.ndim == 0 or y.ndim == 0 or len(x) != len(y):
        raise ValueError(f"{where}: x and y must have the same number of samples, got "
                         f"x {x.shape} and y {y.shape}")
    return x, y


def _accuracy_count(out, y):
    """Number of correct arg-max predictions, or None when y are not class labels."""
    if y.dtype.kind in "iu" and out.ndim == y.ndim + 1 and out.shape[-1] > 1:
        return int(np.sum(np.argmax(out, axis=-1) == y)), y.size
    if y.dtype.kind == "f" and y.shape == out.shape and out.shape[-1] > 1:   # one-hot targets
        return int(np.sum(np.argmax(out, -1) == np.argmax(y, -1))), y.size // y.shape[-1]
    return None


def evaluate(model, params, x, y, *, loss, batch_size=None) -> dict:
    """Mean loss (and accuracy, for class labels) of ``model`` on ``(x, y)``, train=False.

    x (N, ...), y (N, ...): converted once to the params' dtype (labels stay integers).
    Returns ``{"loss": float, "accuracy": float or None}``; the loss is the mean over all
    samples (batches weighted by size).
    """
    x, y = _prepare("evaluate", params, x, y)
    n = len(x)
    bs = n if batch_size is None else int(batch_size)
    if bs < 1:
        raise ValueError(f"evaluate: batch_size must be >= 1, got {batch_size}")
    total, correct, counted = 0.0, 0, 0
    for i in range(0, n, bs):
        out, _ = model.forward(params, x[i:i + bs], train=False, rng=None)
        lval, _ = loss(out, y[i:i + bs])
        total += float(lval) * len(out)
        acc = _accuracy_count(out, y[i:i + bs])
        if acc is not None:
            correct += acc[0]
            counted += acc[1]
    return {"loss": total / max(n, 1), "accuracy": (correct / counted) if counted else None}


def fit(model, params, x, y, *, loss, optimizer, epochs=10, batch_size=32, shuffle=True,
        seed=0, validation_data=None, progress=True, callbacks=None):
    """Train ``model`` with mini-batch gradient descent. Returns ``(params, history)``.

    Each step: forward (train=True) on a batch, ``loss(out, y_batch) -> (L, dL/dout)`` where L
    is the batch's mean loss, ``backward(..., input_grad=False)``, then
    ``optimizer.update``. x (N, ...) and y (N, ...) are converted once to the params'
    dtype (integer labels stay integers). ``shuffle`` reshuffles every epoch with ``seed``,
    which also seeds dropout. ``history`` holds per-epoch lists: ``loss``, ``accuracy``
    (class labels only) and, with ``validation_data=(xv, yv)``, ``val_loss`` and
    ``val_accuracy``. ``callbacks``: callables ``cb(epoch, logs, params, grads)``; one that
    returns True or raises ``StopTraining`` ends training after that epoch.
    The input params are not modified.
    """
    x, y = _prepare("fit", params, x, y)
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"fit: batch_size must be a positive int, got {batch_size!r}")
    if isinstance(epochs, bool) or int(epochs) != epochs or epochs < 0:
        raise ValueError(f"fit: epochs must be an int >= 0, got {epochs!r}")
    if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
        raise TypeError(f"fit: optimizer must have init and update (e.g. fastbp.optim.adam(1e-3)), "
                        f"got {optimizer!r}")
    if validation_data is not None:
        if len(validation_data) != 2:
            raise ValueError("fit: validation_data must be a pair (x_val, y_val)")
        xv, yv = _prepare("fit (validation_data)", params, *validation_data)
    batch_size, n = int(batch_size), len(x)
    rng = np.random.default_rng(seed)
    state = optimizer.init(params)
    history = {"loss": [], "accuracy": []}
    if validation_data is not None:
        history.update(val_loss=[], val_accuracy=[])
    callbacks = list(callbacks or [])
    steps = (n + batch_size - 1) // batch_size
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=int(epochs) * steps, unit="step", dynamic_ncols=True, leave=True)
    grads = None
    try:
        for epoch in range(int(epochs)):
            order = rng.permutation(n) if shuffle else np.arange(n)
            total, correct, counted, t0 = 0.0, 0, 0, time.perf_counter()
            for s in range(steps):
                idx = order[s * batch_size:(s + 1) * batch_size]
                xb, yb = x[idx], y[idx]
                out, cache = model.forward(params, xb, train=True, rng=rng)
                lval, dout = loss(out, yb)
                if not np.isfinite(lval):
                    raise FloatingPointError(f"fit: loss became {lval} at epoch {epoch + 1}, "
                                             f"step {s + 1}; lower the learning rate or clip gradients")
                _, grads = backward(model, params, cache, dout, input_grad=False)
                params, state = optimizer.update(params, grads, state)
                total += float(lval) * len(idx)
                acc = _accuracy_count(out, yb)
                if acc is not None:
                    correct += acc[0]
                    counted += acc[1]
                if bar is not None:
                    bar.update(1)
                    if s % 10 == 0 or s == steps - 1:
                        rate = (s + 1) * batch_size / max(time.perf_counter() - t0, 1e-9)
                        bar.set_postfix(epoch=epoch + 1, loss=f"{total / min(n, (s + 1) * batch_size):.4f}",
                                        samples_per_s=f"{rate:.0f}", refresh=False)
            logs = {"loss": total / n, "accuracy": (correct / counted) if counted else None}
            if validation_data is not None:
                v = evaluate(model, params, xv, yv, loss=loss, batch_size=1024)
                logs.update(val_loss=v["loss"], val_accuracy=v["accuracy"])
            for k in history:
                history[k].append(logs.get(k))
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
    if all(a is None for a in history["accuracy"]):
        history.pop("accuracy")
    return params, history
