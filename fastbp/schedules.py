"""Learning-rate schedules: callables ``t -> lr`` for the optimizers in ``fastbp.optim``.

``t`` is the number of updates done so far: the first update uses ``lr(0)``. Each
schedule is a small frozen dataclass, so it prints its settings and can be pickled.

>>> opt = fastbp.optim.adam(fastbp.optim.schedules.cosine(1e-3, total_steps=1000))
"""
from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["constant", "time_decay", "exponential_decay", "step_decay", "cosine"]


def _real(where, name, value, *, lo=None, lo_open=False, hi=None, hi_open=False):
    """``value`` as a float, or ValueError/TypeError when it is not a number in range."""
    if isinstance(value, bool) or not hasattr(value, "__float__"):
        raise TypeError(f"{where}: {name} must be a real number, got {type(value).__name__}")
    v = float(value)
    ok = v == v
    if ok and lo is not None:
        ok = v > lo if lo_open else v >= lo
    if ok and hi is not None:
        ok = v < hi if hi_open else v <= hi
    if not ok:
        lo_s = "" if lo is None else f"{'>' if lo_open else '>='} {lo}"
        hi_s = "" if hi is None else f"{'<' if hi_open else '<='} {hi}"
        rng = " and ".join(s for s in (lo_s, hi_s) if s)
        raise ValueError(f"{where}: {name} must be {rng}, got {value!r}")
    return v


def _positive_int(where, name, value):
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(f"{where}: {name} must be an integer >= 1, got {type(value).__name__}")
    if int(value) < 1:
        raise ValueError(f"{where}: {name} must be an integer >= 1, got {value!r}")
    return int(value)


def _step(where, t):
    if isinstance(t, bool) or not isinstance(t, (int, float)) and not hasattr(t, "__index__"):
        raise TypeError(f"{where}: step must be a number >= 0, got {type(t).__name__}")
    if not t >= 0:
        raise ValueError(f"{where}: step must be >= 0, got {t!r}")
    return t


@dataclass(frozen=True)
class Constant:
    """``lr(t) = lr``."""
    lr: float

    def __call__(self, t):
        _step("constant", t)
        return self.lr


@dataclass(frozen=True)
class TimeDecay:
    """``lr(t) = lr0 / (1 + k·t)``."""
    lr0: float
    k: float

    def __call__(self, t):
        t = _step("time_decay", t)
        return self.lr0 / (1.0 + self.k * t)


@dataclass(frozen=True)
class ExponentialDecay:
    """``lr(t) = lr0 · rate^(t / decay_steps)``; with ``staircase`` the exponent is
    ``floor(t / decay_steps)``."""
    lr0: float
    rate: float
    decay_steps: float = 1
    staircase: bool = False

    def __call__(self, t):
        t = _step("exponential_decay", t)
        e = t / self.decay_steps
        if self.staircase:
            e = math.floor(e)
        return self.lr0 * self.rate ** e


@dataclass(frozen=True)
class StepDecay:
    """``lr(t) = lr0 · drop^floor(t / every)``: multiply by ``drop`` every ``every`` steps."""
    lr0: float
    drop: float
    every: int

    def __call__(self, t):
        t = _step("step_decay", t)
        return self.lr0 * self.drop ** math.floor(t / self.every)


@dataclass(frozen=True)
class Cosine:
    """``lr(t) = lr_min + (lr0 - lr_min)·(1 + cos(π·t / total_steps)) / 2`` for
    ``t <= total_steps``, and ``lr_min`` after (it does not restart, unlike
    torch's CosineAnnealingLR, which is periodic past ``T_max``)."""
    lr0: float
    total_steps: int
    lr_min: float = 0.0

    def __call__(self, t):
        t = min(_step("cosine", t), self.total_steps)
        cos = math.cos(math.pi * t / self.total_steps)
        return self.lr_min + (self.lr0 - self.lr_min) * 0.5 * (1.0 + cos)


def constant(lr):
    """A constant schedule: ``lr(t) = lr``."""
    return Constant(_real("constant", "lr", lr, lo=0))


def time_decay(lr0, k):
    """Inverse-time decay: ``lr(t) = lr0 / (1 + k·t)`` (``k >= 0``)."""
    return TimeDecay(_real("time_decay", "lr0", lr0, lo=0), _real("time_decay", "k", k, lo=0))


def exponential_decay(lr0, rate, decay_steps=1, staircase=False):
    """Exponential decay: ``lr(t) = lr0 · rate^(t / decay_steps)``.

    With ``staircase=True`` the exponent is ``floor(t / decay_steps)``, so the rate drops in
    steps. ``rate > 0``; ``decay_steps > 0``. Equals torch's ExponentialLR(gamma=rate) for
    ``decay_steps=1``.
    """
    where = "exponential_decay"
    return ExponentialDecay(_real(where, "lr0", lr0, lo=0),
                            _real(where, "rate", rate, lo=0, lo_open=True),
                            _real(where, "decay_steps", decay_steps, lo=0, lo_open=True),
                            bool(staircase))


def step_decay(lr0, drop, every):
    """Step decay: ``lr(t) = lr0 · drop^floor(t / every)`` (torch's StepLR(step_size=every,
    gamma=drop)). ``drop >= 0``; ``every`` is an integer ``>= 1``."""
    where = "step_decay"
    return StepDecay(_real(where, "lr0", lr0, lo=0), _real(where, "drop", drop, lo=0),
                     _positive_int(where, "every", every))


def cosine(lr0, total_steps, lr_min=0.0):
    """Cosine annealing from ``lr0`` to ``lr_min`` over ``total_steps`` updates:

    ``lr(t) = lr_min + (lr0 - lr_min)·(1 + cos(π·min(t, total_steps) / total_steps)) / 2``.

    So ``lr(0) = lr0`` and ``lr(t) = lr_min`` for ``t >= total_steps`` (no restart).
    ``total_steps`` is an integer ``>= 1``; ``0 <= lr_min``.
    """
    where = "cosine"
    return Cosine(_real(where, "lr0", lr0, lo=0), _positive_int(where, "total_steps", total_steps),
                  _real(where, "lr_min", lr_min, lo=0))
