"""Composing layers: ``Sequential`` and the functional entry points.

``Sequential(*layers)`` implements the layer protocol itself, so it nests. Its params and
grads are lists with one entry per layer (a dict, or a list for a nested Sequential).
A ``Dense`` or ``Conv2D`` followed by a ``ReLU`` is run as one fused kernel, and so is a
``Conv2D`` (+ ``ReLU``) followed by a ``MaxPool2D``; the results are identical.
"""
from __future__ import annotations

import inspect

import numpy as np

from . import _mlp, _tree
from ._validate import as_float_array
from .layers import Conv2D, Dense, Layer, MaxPool2D, ReLU

__all__ = ["Sequential", "init", "forward", "backward", "predict", "count_params", "grad_norms"]

_FUSED = _mlp.FUSED
_FUSES_RELU = (Dense, Conv2D)    # layers whose forward(relu=True) folds in a following ReLU


def _accepts_input_grad(layer) -> bool:
    fn = getattr(type(layer), "backward", None)
    if fn is not None and "backward" not in getattr(layer, "__dict__", {}):
        try:
            return _INPUT_GRAD_KW[fn]
        except (KeyError, TypeError):
            pass
    else:
        fn = None
    try:
        ok = "input_grad" in inspect.signature(layer.backward).parameters
    except (TypeError, ValueError):
        ok = False
    if fn is not None:
        try:
            _INPUT_GRAD_KW[fn] = ok
        except TypeError:
            pass
    return ok


_INPUT_GRAD_KW = {}  # layer class's backward function -> accepts input_grad


def _has_params(params) -> bool:
    return len(_tree.leaves(params)) > 0


class Sequential(Layer):
    """Layers applied in order: ``y = f_L(...f_2(f_1(x)))``.

    params: list with one params entry per layer. cache: list with one cache per layer.
    Backward applies the chain rule from the last layer to the first:
    ``dx_{l-1} = backward_l(dx_l)``, collecting each layer's grads.
    """

    def __init__(self, *layers):
        if len(layers) == 1 and isinstance(layers[0], (list, tuple)):
            layers = tuple(layers[0])
        for i, layer in enumerate(layers):
            if not all(hasattr(layer, m) for m in ("init", "forward", "backward")):
                raise TypeError(f"Sequential: item {i} ({layer!r}) is not a layer: it needs "
                                "init, forward and backward methods")
        self.layers = tuple(layers)
        self._mlp = _mlp.plan(self.layers)   # Dense/ReLU chains run as one compiled call
        self._input_grad_kw = tuple(_accepts_input_grad(layer) for layer in layers)

    def __setattr__(self, name, value):
        if hasattr(self, "_input_grad_kw"):
            raise AttributeError("Sequential is immutable")
        object.__setattr__(self, name, value)

    def __repr__(self):
        inner = ",\n".join("  " + repr(layer).replace("\n", "\n  ") for layer in self.layers)
        return f"Sequential(\n{inner}\n)"

    def __len__(self):
        return len(self.layers)

    def __getitem__(self, i):
        return self.layers[i]

    def __eq__(self, other):
        return isinstance(other, Sequential) and self.layers == other.layers

    def __hash__(self):
        return hash(self.layers)

    def init(self, rng, dtype=np.float32):
        return [layer.init(rng, dtype) for layer in self.layers]

    def _check_params(self, params):
        if not isinstance(params, (list, tuple)) or len(params) != len(self.layers):
            got = f"a list of {len(params)}" if isinstance(params, (list, tuple)) \
                else type(params).__name__
            raise ValueError(f"Sequential: expected params as a list of {len(self.layers)} "
                             f"entries (one per layer), got {got}")

    def forward(self, params, x, *, train=False, rng=None):
        self._check_params(params)
        if self._mlp is not None:
            out = _mlp.forward(self._mlp, len(self.layers), params, x)
            if out is not None:
                return out
        caches = []
        layers = self.layers
        i, n = 0, len(layers)
        while i < n:
            layer = layers[i]
            if type(layer) is Conv2D:
                # Conv2D [→ ReLU] → MaxPool2D: pooled group by group as the conv computes
                relu = i + 1 < n and type(layers[i + 1]) is ReLU
                j = i + 1 + relu
                if j < n and type(layers[j]) is MaxPool2D:
                    x, cache = layer.forward(params[i], x, train=train, rng=rng, relu=relu,
                                             pool=layers[j])
                    caches += [cache] + [_FUSED] * (j - i)
                    i = j + 1
                    continue
            if type(layer) in _FUSES_RELU and i + 1 < n and type(layers[i + 1]) is ReLU:
                x, cache = layer.forward(params[i], x, train=train, rng=rng, relu=True)
                caches += [cache, _FUSED]
                i += 2
                continue
            x, cache = layer.forward(params[i], x, train=train, rng=rng)
            caches.append(cache)
            i += 1
        return x, caches

    def backward(self, params, cache, dy, *, input_grad=True):
        self._check_params(params)
        if not isinstance(cache, list) or len(cache) != len(self.layers):
            raise ValueError("Sequential: cache does not come from this model's forward")
        if self._mlp is not None:
            out = _mlp.backward(self._mlp, len(self.layers), params, cache, dy, input_grad)
            if out is not None:
                return out
        # Without input_grad, layers before the first one with params need not run at all.
        first = 0
        if not input_grad:
            first = next((i for i, p in enumerate(params) if _has_params(p)), len(params))
        grads = [None] * len(self.layers)
        for i in range(len(self.layers) - 1, first - 1, -1):
            layer = self.layers[i]
            if cache[i] is _FUSED:          # ReLU or MaxPool2D folded into the conv/dense before
                grads[i] = {}
                continue
            need_dx = input_grad or i > first
            if self._input_grad_kw[i]:
                dy, grads[i] = layer.backward(params[i], cache[i], dy, input_grad=need_dx)
            else:
                dy, grads[i] = layer.backward(params[i], cache[i], dy)
        for i in range(first):
            grads[i] = _tree.tree_map(np.zeros_like, params[i]) if _has_params(params[i]) \
                else ({} if isinstance(params[i], dict) else params[i])
        return (dy if input_grad else None), grads


# ---------------------------------------------------------------------------- functional API
def _check_model(where, model):
    if not all(hasattr(model, m) for m in ("init", "forward", "backward")):
        raise TypeError(f"{where}: model must implement init/forward/backward, got {model!r}")


def init(model, seed=0, dtype=np.float32):
    """Fresh parameters for ``model``: ``model.init(np.random.default_rng(seed), dtype)``.

    dtype: float32 (default) or float64. Returns the params tree (a list of dicts for a
    Sequential).
    """
    _check_model("init", model)
    return model.init(np.random.default_rng(seed), np.dtype(dtype))


class _LazyRng:
    """``np.random.default_rng(seed)``, created on first use.

    Most models draw no random numbers, and creating a Generator from OS entropy costs
    ~20 µs, a large part of a small training step. Attribute access is forwarded.
    """
    __slots__ = ("_seed", "_gen")

    def __init__(self, seed):
        self._seed = seed
        self._gen = None

    def __getattr__(self, name):
        if self._gen is None:
            self._gen = np.random.default_rng(self._seed)
        return getattr(self._gen, name)


def forward(model, params, x, train=False, seed=None):
    """Run the forward pass. Returns ``(y, cache)``; pass ``cache`` to ``backward``.

    train: enables Dropout / NoisyReLU noise. seed: seeds that noise (``None``: fresh
    entropy). x: the model's input, in the params' dtype.
    """
    if type(model) is Sequential:
        plan = model._mlp
        if plan is not None and type(params) is list and len(params) == len(model.layers):
            out = _mlp.forward(plan, len(params), params, x)   # draws no random numbers
            if out is not None:
                return out
    else:
        _check_model("forward", model)
    return model.forward(params, x, train=train, rng=_LazyRng(seed))


def backward(model, params, cache, dy, input_grad=True):
    """Backpropagate ``dy`` (gradient of the loss w.r.t. the model's output).

    Returns ``(dx, grads)``: grads has the structure and shapes of params; dx is the
    gradient w.r.t. the input, or ``None`` when ``input_grad=False`` (its work is skipped).
    """
    if type(model) is Sequential:
        plan = model._mlp
        if plan is not None and type(params) is list and len(params) == len(model.layers):
            out = _mlp.backward(plan, len(params), params, cache, dy, input_grad)
            if out is not None:
                return out
        return model.backward(params, cache, dy, input_grad=input_grad)
    _check_model("backward", model)
    if _accepts_input_grad(model):
        return model.backward(params, cache, dy, input_grad=input_grad)
    dx, grads = model.backward(params, cache, dy)
    return (dx if input_grad else None), grads


def predict(model, params, x, batch_size=None, batch_axis=0):
    """Inference (``train=False``) forward pass, in batches of ``batch_size`` samples.

    x (..., N along ``batch_axis``, ...): converted once to the params' dtype (as in
    ``fit``/``evaluate``). ``batch_axis`` is the sample axis: 0 for ``(N, ...)`` data, 1 for
    time-major sequences ``(T, N, D)`` (splitting along time would restart the recurrence).
    Returns ``model``'s output for all samples, the batches concatenated along the output's
    sample axis: ``batch_axis`` when the output has as many dimensions as x (e.g. ``(T, N,
    K)`` per-step outputs), else 0 (e.g. ``(N, K)`` from ``return_sequences=False``).
    ``batch_size=None`` runs everything at once.
    """
    _check_model("predict", model)
    x = np.asarray(x)
    leaves = _tree.leaves(params)
    if leaves and x.dtype.kind in "biuf":
        x = x.astype(leaves[0].dtype, copy=False)     # once, up front, like fit/evaluate
    x = as_float_array("predict", x)
    if isinstance(batch_axis, bool) or batch_axis not in (0, 1) or batch_axis >= max(x.ndim, 1):
        raise ValueError(f"predict: batch_axis must be 0 or 1 (and < x.ndim = {x.ndim}), "
                         f"got {batch_axis!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or int(batch_size) < 1):
        raise ValueError(f"predict: batch_size must be >= 1, got {batch_size}")
    n = x.shape[batch_axis]
    if batch_size is None or n <= batch_size:
        return model.forward(params, x, train=False, rng=None)[0]
    bs = int(batch_size)
    outs = [model.forward(params, np.take(x, np.arange(i, min(i + bs, n)), axis=batch_axis),
                          train=False, rng=None)[0] for i in range(0, n, bs)]
    axis = batch_axis if outs[0].ndim == x.ndim else 0
    return np.concatenate(outs, axis=axis)


def count_params(params) -> int:
    """Total number of scalar parameters in a params tree."""
    return int(sum(a.size for a in _tree.leaves(params)))


def grad_norms(grads, per_array=False) -> dict:
    """Per-layer L2 norms of a grads tree, to spot vanishing or exploding gradients.

    Returns ``{path: ‖g‖₂}`` in layer order for layers that have parameters, where path is
    the layer index (``"2"``, or ``"1.0"`` inside a nested Sequential) and ‖g‖₂ is over all
    of that layer's arrays. ``per_array=True`` gives one entry per array (``"2.W"``).
    """
    out = {}

    def walk(g, path):
        if isinstance(g, dict):
            if not g:
                return
            if per_array:
                for k, a in g.items():
                    out[f"{path}.{k}" if path else k] = float(np.sqrt(np.sum(np.square(a, dtype=np.float64))))
            else:
                out[path or "0"] = float(np.sqrt(sum(np.sum(np.square(a, dtype=np.float64)) for a in g.values())))
        elif isinstance(g, (list, tuple)):
            for i, sub in enumerate(g):
                walk(sub, f"{path}.{i}" if path else str(i))
        elif isinstance(g, np.ndarray):
            out[path or "0"] = float(np.sqrt(np.sum(np.square(g, dtype=np.float64))))
    walk(grads, "")
    return out
