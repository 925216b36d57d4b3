"""Training loop: ``fit`` (mini-batch gradient descent), ``evaluate`` and ``EarlyStopping``.

>>> params, history = fastbp.fit(model, params, x, y, loss=fastbp.losses.softmax_cross_entropy,
...                              optimizer=fastbp.optim.adam(1e-3), epochs=10, batch_size=32)
>>> fastbp.evaluate(model, params, x_test, y_test, loss=fastbp.losses.softmax_cross_entropy)
{'loss': 0.08..., 'accuracy': 0.97...}

Samples are stacked along ``batch_axis`` (0 by default). Time-major sequences ``x (T, N, D)``
use ``batch_axis=1``: labels ``y (N,)`` are then batched along axis 0 and per-time-step labels
``y (T, N)`` along axis 1 (pass a pair ``(x_axis, y_axis)`` to say it explicitly).
"""
from __future__ import annotations

import math
import numbers
import sys
import time

import numpy as np

from . import _tree
from .losses import binary_cross_entropy
from .network import _accepts_input_grad

__all__ = ["fit", "evaluate", "EarlyStopping", "StopTraining"]


class StopTraining(Exception):
    """Raise from a callback (or return True from it) to end ``fit`` after this epoch."""


# ---------------------------------------------------------------------------- data checks
def _params_dtype(params):
    leaves = _tree.leaves(params)
    return leaves[0].dtype if leaves else np.dtype(np.float32)


def _axes(where, batch_axis, x, y):
    """The batch axis of x and of y, checked."""
    if isinstance(batch_axis, (tuple, list)) and len(batch_axis) == 2:
        ax, ay = batch_axis
    else:
        ax = batch_axis
        ay = batch_axis if (isinstance(batch_axis, numbers.Integral) and y.ndim > batch_axis) else 0
    for name, a, arr in (("x", ax, x), ("y", ay, y)):
        if isinstance(a, bool) or not isinstance(a, numbers.Integral) or not 0 <= a < max(arr.ndim, 1):
            raise ValueError(f"{where}: batch_axis must be an int or a pair (x_axis, y_axis) of "
                             f"axes that exist; got {batch_axis!r} for {name} of shape {arr.shape}")
    return int(ax), int(ay)


def _prepare(where, params, x, y, batch_axis=0, model=None):
    """x in the params' dtype (once, up front), y as labels or float targets in that dtype."""
    if model is not None and not all(hasattr(model, m) for m in ("forward", "backward")):
        raise TypeError(f"{where}: model must implement init/forward/backward (e.g. a "
                        f"fastbp.Sequential), got {model!r}")
    dtype = _params_dtype(params)
    x = np.asarray(x)
    if x.dtype.kind not in "fiub":
        raise TypeError(f"{where}: x must be numeric, got dtype {x.dtype}")
    x = np.ascontiguousarray(x, dtype=dtype)
    y = np.asarray(y)
    if y.dtype.kind == "f":
        y = np.ascontiguousarray(y, dtype=dtype)
    elif y.dtype.kind not in "iub":
        raise TypeError(f"{where}: y must hold integer labels or float targets, got dtype {y.dtype}")
    if x.ndim == 0 or y.ndim == 0:
        raise ValueError(f"{where}: x and y must be arrays of samples, got x {x.shape} and y {y.shape}")
    ax, ay = _axes(where, batch_axis, x, y)
    if x.shape[ax] != y.shape[ay]:
        raise ValueError(f"{where}: x and y must have the same number of samples, got "
                         f"{x.shape[ax]} in x {x.shape} (axis {ax}) and {y.shape[ay]} in "
                         f"y {y.shape} (axis {ay})")
    if x.shape[ax] == 0:
        raise ValueError(f"{where}: no samples (x has shape {x.shape})")
    return x, y, ax, ay


def _task(loss, out, y):
    """How to count correct predictions: "labels" (argmax vs integer labels), "onehot"
    (argmax vs argmax of probability targets), "binary" (logit > 0 vs target >= 0.5 for
    binary_cross_entropy) or None (regression: no accuracy)."""
    if y.dtype.kind in "iub" and out.ndim == y.ndim + 1 and out.shape[-1] > 1:
        return "labels"
    if y.dtype.kind == "f" and y.shape == out.shape:
        if loss is binary_cross_entropy:
            return "binary"
        if out.shape[-1] > 1 and y.size and np.min(y) >= 0 and \
                np.allclose(y.sum(axis=-1), 1, atol=1e-3):
            return "onehot"
    return None


def _correct(task, out, y):
    """(number correct, number of predictions) for one batch."""
    if task == "labels":
        return int(np.count_nonzero(np.argmax(out, axis=-1) == y)), y.size
    if task == "onehot":
        return int(np.count_nonzero(np.argmax(out, -1) == np.argmax(y, -1))), y.size // y.shape[-1]
    return int(np.count_nonzero((out > 0) == (y >= 0.5))), y.size


def _loss_name(loss):
    return getattr(loss, "__name__", None) or repr(loss)


def _probe(where, model, params, loss, x, y, ax, ay, batch_size):
    """Run the model and the loss on the first batch, so a loss that does not match the
    labels fails before any training, with the function's name. Returns the accuracy task."""
    m = min(x.shape[ax], batch_size, 256)
    xb, yb = _take(x, ax, slice(0, m)), _take(y, ay, slice(0, m))
    out, _ = model.forward(params, xb, train=False, rng=None)
    try:
        loss(out, yb)
    except (ValueError, TypeError) as e:
        raise type(e)(f"{where}: the loss {_loss_name(loss)} does not accept these targets "
                      f"(model output {out.shape} {out.dtype}, y {yb.shape} {yb.dtype}): {e}") from e
    task = _task(loss, out, yb)
    if task == "labels":   # the first batch passed; check every label against the classes
        k = out.shape[-1]
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= k:
            raise ValueError(f"{where}: labels must be in [0, {k}) for a model with {k} outputs, "
                             f"got {lo if lo < 0 else hi}")
    return task


def _take(a, axis, idx):
    """Samples ``idx`` (a slice or an index array) of ``a`` along ``axis``, C-contiguous."""
    if axis == 0:
        return a[idx]
    if isinstance(idx, slice):
        return np.ascontiguousarray(a[(slice(None),) * axis + (idx,)])
    return np.take(a, idx, axis)


def _batch_size(where, batch_size, allow_none=False):
    if batch_size is None and allow_none:
        return None
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) \
            or batch_size < 1:
        raise ValueError(f"{where}: batch_size must be a positive int, got {batch_size!r}")
    return int(batch_size)


def _in_notebook():
    """True inside a Jupyter kernel (not merely when ipykernel has been imported)."""
    ipy = sys.modules.get("IPython")
    try:
        shell = ipy.get_ipython() if ipy is not None else None
    except Exception:  # pragma: no cover - exotic IPython states
        return False
    return type(shell).__name__ == "ZMQInteractiveShell"


def _progress_bar(total):
    """A tqdm bar: the notebook widget inside Jupyter when ipywidgets is installed, else text."""
    if _in_notebook():
        try:
            import ipywidgets  # noqa: F401
            from tqdm.notebook import tqdm
            return tqdm(total=total, unit="step")
        except ImportError:
            pass
    from tqdm.std import tqdm
    return tqdm(total=total, unit="step", dynamic_ncols=True, leave=True)


# ---------------------------------------------------------------------------- evaluate
def _evaluate(model, params, x, y, ax, ay, loss, bs, task):
    n = x.shape[ax]
    total, correct, counted = 0.0, 0, 0
    for i in range(0, n, bs):
        sl = slice(i, min(i + bs, n))
        xb, yb = _take(x, ax, sl), _take(y, ay, sl)
        out, _ = model.forward(params, xb, train=False, rng=None)
        lval, _ = loss(out, yb)
        total += float(lval) * (sl.stop - sl.start)
        if task is not None:
            c, m = _correct(task, out, yb)
            correct += c
            counted += m
    return total / n, (correct / counted if counted else None)


def evaluate(model, params, x, y, *, loss, batch_size=None, batch_axis=0) -> dict:
    """Mean loss, and accuracy for classification, of ``model`` on ``(x, y)`` (train=False).

    x (N, ...): inputs, converted once to the params' dtype. y (N, ...): integer class
    labels or float targets (converted to the params' dtype). loss: ``(out, y) -> (L, dL/dout)``
    such as ``fastbp.losses.softmax_cross_entropy``. batch_size: samples per forward pass
    (None: all at once).

    Returns ``{"loss": (1/N) Σ_batches n_b·L_b, "accuracy": fraction correct}``. Accuracy is
    argmax(out) == label for integer labels or one-hot/probability targets, ``(logit > 0) ==
    (target >= 0.5)`` for ``binary_cross_entropy``, and ``None`` for regression targets.
    """
    x, y, ax, ay = _prepare("evaluate", params, x, y, batch_axis, model)
    n = x.shape[ax]
    bs = _batch_size("evaluate", batch_size, allow_none=True) or n
    task = _probe("evaluate", model, params, loss, x, y, ax, ay, bs)
    lval, acc = _evaluate(model, params, x, y, ax, ay, loss, bs, task)
    return {"loss": lval, "accuracy": acc}


# ---------------------------------------------------------------------------- callbacks
class EarlyStopping:
    """Callback that stops ``fit`` when ``monitor`` has not improved for ``patience`` epochs.

    An improvement is a decrease by more than ``min_delta`` (an increase for ``mode="max"``;
    ``mode="auto"`` uses "max" for names containing "accuracy"). After ``fit`` returns,
    ``best_params`` holds the params of the best epoch (``best_epoch``, 0-based) and
    ``best`` its value: ``params = stopper.best_params`` restores them.
    """

    def __init__(self, monitor="val_loss", patience=5, min_delta=0.0, mode="auto"):
        if mode not in ("auto", "min", "max"):
            raise ValueError(f"EarlyStopping: mode must be 'auto', 'min' or 'max', got {mode!r}")
        if isinstance(patience, bool) or not isinstance(patience, numbers.Integral) or patience < 0:
            raise ValueError(f"EarlyStopping: patience must be an int >= 0, got {patience!r}")
        self.monitor, self.patience, self.min_delta = monitor, int(patience), float(min_delta)
        self.mode = ("max" if "acc" in monitor else "min") if mode == "auto" else mode
        self.best, self.best_epoch, self.best_params, self.stopped_epoch = None, None, None, None
        self._wait = 0

    def __call__(self, epoch, logs, params, grads):
        if self.monitor not in logs or logs[self.monitor] is None:
            raise ValueError(f"EarlyStopping: fit logs have no {self.monitor!r}; available: "
                             f"{sorted(k for k, v in logs.items() if v is not None)} "
                             "(val_* needs validation_data)")
        v = float(logs[self.monitor])
        sign = 1.0 if self.mode == "min" else -1.0
        if self.best is None or sign * (self.best - v) > self.min_delta:
            self.best, self.best_epoch, self.best_params, self._wait = v, epoch, params, 0
            return False
        self._wait += 1
        if self._wait > self.patience:
            self.stopped_epoch = epoch
            return True
        return False


# ---------------------------------------------------------------------------- fit
def fit(model, params, x, y, *, loss, optimizer, epochs=10, batch_size=32, shuffle=True,
        seed=0, validation_data=None, progress=True, callbacks=None, batch_axis=0):
    """Train ``model`` by mini-batch gradient descent. Returns ``(params, history)``.

    x (N, ...): inputs; y (N, ...): integer class labels or float targets. Both are
    converted once, up front, to the params' dtype (labels stay integers).
    loss: ``(out, y_batch) -> (L, dL/dout)`` where L is the MEAN loss of the batch (all
    ``fastbp.losses`` are), so each step follows the gradient of the batch's mean loss:
    forward(train=True) → loss → backward(input_grad=False) → ``optimizer.update``.
    optimizer: a ``fastbp.optim`` optimizer. A learning-rate schedule goes in it, counted in
    steps: there are ``ceil(N / batch_size)`` steps per epoch, e.g.
    ``adam(schedules.cosine(1e-3, total_steps=epochs * ceil(N / batch_size)))``.
    shuffle: a new order every epoch, from ``seed``, which also seeds dropout.
    validation_data: ``(x_val, y_val)``, evaluated after every epoch with train=False.
    progress: a tqdm bar with the running loss and samples/s; False for silence.
    callbacks: callables ``cb(epoch, logs, params, grads)`` run after every epoch, where
    epoch is 0-based, logs the epoch's metrics (as in history), params the current params and
    grads those of the epoch's last step. A callback that returns True or raises
    ``StopTraining`` ends training after that epoch (see ``EarlyStopping``).
    batch_axis: the sample axis (see the module docstring); 1 for time-major sequences.

    history: per-epoch lists ``loss`` (mean training loss over the epoch's batches, weighted by
    batch size, measured as the weights changed) and, for classification, ``accuracy``;
    with validation_data also ``val_loss`` and ``val_accuracy``.
    The input params are not modified. Raises ValueError/TypeError before training for
    mismatched x/y, a bad batch_size or epochs, or a loss that does not accept the targets;
    FloatingPointError when the loss becomes NaN or infinite.
    """
    where = "fit"
    x, y, ax, ay = _prepare(where, params, x, y, batch_axis, model)
    batch_size = _batch_size(where, batch_size)
    if isinstance(epochs, bool) or not isinstance(epochs, numbers.Integral) or epochs < 0:
        raise ValueError(f"{where}: epochs must be an int >= 0, got {epochs!r}")
    if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
        raise TypeError(f"{where}: optimizer must have init and update (e.g. "
                        f"fastbp.optim.adam(1e-3)), got {optimizer!r}")
    callbacks = list(callbacks or [])
    for cb in callbacks:
        if not callable(cb):
            raise TypeError(f"{where}: callbacks must be callables cb(epoch, logs, params, grads), "
                            f"got {cb!r}")
    task = _probe(where, model, params, loss, x, y, ax, ay, batch_size)
    if validation_data is not None:
        if not isinstance(validation_data, (tuple, list)) or len(validation_data) != 2:
            raise ValueError(f"{where}: validation_data must be a pair (x_val, y_val)")
        xv, yv, axv, ayv = _prepare(f"{where} (validation_data)", params, *validation_data,
                                    batch_axis)
        vtask = _probe(f"{where} (validation_data)", model, params, loss, xv, yv, axv, ayv, 1024)

    n = x.shape[ax]
    rng = np.random.default_rng(seed)
    state = optimizer.init(params)
    history = {"loss": []}
    if task is not None:
        history["accuracy"] = []
    if validation_data is not None:
        history["val_loss"] = []
        if vtask is not None:
            history["val_accuracy"] = []
    steps = math.ceil(n / batch_size)
    if _accepts_input_grad(model):      # decided once, not per step
        def backward(p, cache, dout):
            return model.backward(p, cache, dout, input_grad=False)[1]
    else:
        def backward(p, cache, dout):
            return model.backward(p, cache, dout)[1]
    bar = _progress_bar(int(epochs) * steps) if progress else None
    grads = None
    try:
        for epoch in range(int(epochs)):
            order = rng.permutation(n) if shuffle else None
            total, correct, counted, t0 = 0.0, 0, 0, time.perf_counter()
            for s in range(steps):
                lo, hi = s * batch_size, min((s + 1) * batch_size, n)
                idx = order[lo:hi] if shuffle else slice(lo, hi)
                xb, yb = _take(x, ax, idx), _take(y, ay, idx)
                out, cache = model.forward(params, xb, train=True, rng=rng)
                lval, dout = loss(out, yb)
                if not math.isfinite(lval):
                    raise FloatingPointError(
                        f"{where}: the loss became {lval} at epoch {epoch + 1}, step {s + 1}; "
                        "lower the learning rate or clip the gradients")
                grads = backward(params, cache, dout)
                params, state = optimizer.update(params, grads, state)
                total += float(lval) * (hi - lo)
                if task is not None:
                    c, m = _correct(task, out, yb)
                    correct += c
                    counted += m
                if bar is not None:
                    bar.update(1)
                    if s % 10 == 0 or s == steps - 1:
                        rate = hi / max(time.perf_counter() - t0, 1e-9)
                        bar.set_postfix(epoch=epoch + 1, loss=f"{total / hi:.4f}",
                                        samples_per_s=f"{rate:.0f}", refresh=False)
            logs = {"loss": total / n}
            if task is not None:
                logs["accuracy"] = correct / counted
            if validation_data is not None:
                logs["val_loss"], vacc = _evaluate(model, params, xv, yv, axv, ayv, loss, 1024, vtask)
                if vtask is not None:
                    logs["val_accuracy"] = vacc
            for k in history:
                history[k].append(logs[k])
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
