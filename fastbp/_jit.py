"""One place for Numba compile options (the numba-stats ``_jit`` idea).

``jit``  compiles a serial function (used for helpers and small kernels).
``dual`` compiles one Python source twice, serial and ``parallel=True``, and returns a
callable that picks between them by work size (``config.use_parallel``).
"""
from __future__ import annotations

import types

import numba

from . import config

# error_model="numpy": x/0 gives inf/nan like NumPy, and no per-division check blocks
# vectorisation. fastmath stays off: it would break NaN propagation and the careful
# range reductions in kernels/_math.py.
# cache=True unless no cache directory is writable (see config: the fallback cache dir).
OPTIONS = dict(cache=config.CACHE_ENABLED, nogil=True, error_model="numpy")


def jit(fn=None, **extra):
    """``numba.njit`` with fastbp's options. Usable as ``@jit`` or ``@jit(inline="always")``."""
    opts = {**OPTIONS, **extra}

    def build(f):
        d = numba.njit(**opts)(f)
        if opts.get("inline", "never") == "never":   # inlined helpers never compile alone
            _JIT_REGISTRY.append(d)
        return d
    if fn is None:
        return build
    return build(fn)


def _renamed_copy(fn, suffix):
    """A new function object with the same code and a distinct ``__qualname__``.

    Numba's on-disk cache is keyed by qualname, so the serial and the parallel build of
    one source need distinct names or they overwrite each other's cache entries.
    """
    new = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + suffix,
                             fn.__defaults__, fn.__closure__)
    new.__qualname__ = fn.__qualname__ + suffix
    new.__doc__ = fn.__doc__
    new.__module__ = fn.__module__
    return new


class DualKernel:
    """A kernel compiled serial (``.serial``) and parallel (``.parallel``).

    ``kernel(*args, work=n)`` runs the parallel build when ``n`` reaches the threshold
    of the kernel's family, else the serial one. Both builds give the same results for
    the same thread count; race-free reductions are the kernel's responsibility.
    """

    def __init__(self, fn, family, **extra):
        if family not in config.thresholds:
            raise ValueError(f"unknown kernel family {family!r}")
        self.family = family
        self.py_func = fn
        opts = {**OPTIONS, **extra}
        self.serial = numba.njit(**opts)(_renamed_copy(fn, "_serial"))
        self.parallel = numba.njit(parallel=True, **opts)(_renamed_copy(fn, "_parallel"))
        self.__doc__ = fn.__doc__
        self.__name__ = fn.__name__
        self.__wrapped__ = fn
        _REGISTRY.append(self)

    def __call__(self, *args, work):
        if config.use_parallel(self.family, work):
            return self.parallel(*args)
        return self.serial(*args)

    def __repr__(self):
        return f"<DualKernel {self.__name__} family={self.family}>"


def dual(family, **extra):
    """Decorator: ``@dual("dense")`` compiles the function both serial and parallel.
    ``extra`` adds Numba options for this kernel only (e.g. ``fastmath={"reassoc"}``)."""
    return lambda fn: DualKernel(fn, family, **extra)


_REGISTRY: list = []       # DualKernels
_JIT_REGISTRY: list = []   # serial dispatchers made by ``jit`` (not the inline-only ones)


def all_dual_kernels():
    """Every DualKernel created so far (for ``fastbp info`` and warm-up checks)."""
    return list(_REGISTRY)


def all_dispatchers():
    """Every compiled entry point created so far, as ``(name, family, dispatcher)``.

    DualKernels give two rows (``name.serial``, ``name.parallel``); a ``jit`` function
    gets the family of its kernel module (``None`` outside ``fastbp/kernels``). A dispatcher's ``signatures`` lists what it has compiled (or
    loaded from the cache) in this process.
    """
    rows = []
    for k in _REGISTRY:
        mod = k.py_func.__module__.rsplit(".", 1)[-1]
        rows.append((f"{mod}.{k.__name__}.serial", k.family, k.serial))
        rows.append((f"{mod}.{k.__name__}.parallel", k.family, k.parallel))
    for d in _JIT_REGISTRY:
        mod = d.py_func.__module__.rsplit(".", 1)[-1]
        family = "activations" if mod == "_math" else mod if mod in config.thresholds else None
        rows.append((f"{mod}.{d.py_func.__name__}", family, d))
    return rows
