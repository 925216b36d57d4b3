"""Gradient checking: ``backward`` against central finite differences in float64."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import _tree
from .network import backward, forward

__all__ = ["gradcheck", "GradcheckReport"]


@dataclass
class GradcheckReport:
    """Result of ``gradcheck``.

    errors: ``{name: max relative error}`` per checked array (``"x"`` is the input,
    ``"0.W"`` is parameter W of layer 0). The error of an array is
    ``max_i |analytic_i − numeric_i| / max(max_i |analytic_i|, max_i |numeric_i|)``
    (0 when both are exactly zero), over the checked elements.
    """
    errors: dict = field(default_factory=dict)
    checked: dict = field(default_factory=dict)

    @property
    def max_error(self) -> float:
        return max(self.errors.values(), default=0.0)

    def passed(self, tol: float = 1e-6) -> bool:
        return self.max_error <= tol

    def __str__(self):
        rows = [f"{'array':<12} {'checked':>8} {'max rel err':>12}"]
        rows += [f"{k:<12} {self.checked[k]:>8d} {v:>12.3e}" for k, v in self.errors.items()]
        return "\n".join(rows)


def _names(params, prefix=""):
    """Names for the leaves of a params tree, in ``_tree.leaves`` order."""
    out = []
    if isinstance(params, np.ndarray):
        return [prefix or "param"]
    if isinstance(params, dict):
        for k in sorted(params):
            out += _names(params[k], f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(params, (list, tuple)):
        for i, p in enumerate(params):
            out += _names(p, f"{prefix}.{i}" if prefix else str(i))
    return out


def _rel_error(a, n):
    scale = max(np.max(np.abs(a), initial=0.0), np.max(np.abs(n), initial=0.0))
    if scale == 0.0:
        return 0.0
    return float(np.max(np.abs(a - n)) / scale)


def gradcheck(model, params, x, target, loss, *, eps=1e-6, max_checks=None, train=False,
              seed=0, check_input=True) -> GradcheckReport:
    """Compare ``backward`` with central differences ``(L(θ+ε) − L(θ−ε)) / 2ε`` in float64.

    model, params: a model and its params (copied to float64; nothing is modified).
    x: the input; target: what ``loss(y, target)`` takes; loss: ``(y, target) -> (L, dL/dy)``,
    for example ``fastbp.losses.mse``. max_checks: at most this many elements per array,
    chosen with ``seed`` (None: all). train/seed: forward mode; each forward reuses ``seed``
    so dropout masks are the same in every evaluation.
    Returns a ``GradcheckReport`` with the max relative error per array.
    """
    # C order: the perturbation below goes through reshape(-1), a view only for C arrays
    params64 = _tree.tree_map(lambda a: np.array(a, dtype=np.float64, order="C"), params)
    x64 = np.array(x, dtype=np.float64, order="C")
    if isinstance(target, np.ndarray) and target.dtype.kind == "f":
        target = target.astype(np.float64)

    def total_loss(p, xx):
        y, _ = forward(model, p, xx, train=train, seed=seed)
        return float(loss(y, target)[0])

    y, cache = forward(model, params64, x64, train=train, seed=seed)
    _, dy = loss(y, target)
    dx, grads = backward(model, params64, cache, dy, input_grad=check_input)
    if not _tree.same_structure(params64, grads):
        raise ValueError("gradcheck: the grads returned by backward do not have the structure "
                         "and shapes of params")

    rng = np.random.default_rng(seed)
    report = GradcheckReport()
    arrays = list(zip(_names(params64), _tree.leaves(params64), _tree.leaves(grads)))
    if check_input:
        arrays.append(("x", x64, dx))
    for name, arr, g in arrays:
        flat = arr.reshape(-1)          # a view: perturbs the float64 copy in place
        idx = np.arange(flat.size)
        if max_checks is not None and flat.size > max_checks:
            idx = np.sort(rng.choice(flat.size, size=max_checks, replace=False))
        num = np.empty(idx.size)
        for j, i in enumerate(idx):
            old = flat[i]
            flat[i] = old + eps
            lp = total_loss(params64, x64)
            flat[i] = old - eps
            lm = total_loss(params64, x64)
            flat[i] = old
            num[j] = (lp - lm) / (2 * eps)
        report.errors[name] = _rel_error(np.asarray(g).reshape(-1)[idx], num)
        report.checked[name] = int(idx.size)
    return report
