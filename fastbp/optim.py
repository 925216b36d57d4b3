"""Optimizers in the Optax style, with torch.optim's hyper-parameter names and defaults.

>>> opt = fastbp.optim.adam(1e-3)
>>> state = opt.init(params)
>>> params, state = opt.update(params, grads, state)

``update`` is pure: it never modifies ``params``, ``grads`` or ``state``; it returns new
arrays. ``params``/``grads`` are nested lists/tuples/dicts of float32 or float64 arrays
(``grads`` must match ``params`` leaf by leaf in structure, shape and dtype). ``state`` is
a plain dict: ``{"step": int, <buffer name>: tree shaped like params, ...}`` using
torch's buffer names (``momentum_buffer``, ``sum``, ``square_avg``, ``grad_avg``,
``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``), so it can be pickled or saved.
For a list or tuple of dicts (a ``Sequential``'s params) the new arrays of each tree are
views of one flat buffer (a pack, ``fastbp._pack``); an update whose params, grads and
buffers are exactly such views runs its rule once over the buffers.

``lr`` is a number or a schedule ``t -> lr`` (see ``fastbp.optim.schedules``), called
with ``t = state["step"]``, the number of updates done before this one (0 first).

Each rule is one fused compiled kernel (``fastbp.kernels.optim``) called once per group of
up to 8 arrays of one dtype (not one Python loop per array), computed in the arrays' dtype, with torch's order of operations. Notation in the docstrings:
``p`` a parameter, ``g`` its gradient, ``t`` the 0-based step, all operations elementwise.
"""
from __future__ import annotations

import math
import operator
from typing import Callable, NamedTuple

import numpy as np

from . import _pack, _tree, schedules  # noqa: F401  (``fastbp.optim.schedules.cosine`` works)
from .kernels import optim as K

__all__ = ["Optimizer", "sgd", "adagrad", "rmsprop", "adam", "adamw",
           "global_norm", "clip_by_global_norm", "schedules"]

_F32, _F64 = np.dtype(np.float32), np.dtype(np.float64)
_FLOATS = (_F32, _F64)
_EMPTY = {dt: np.empty(0, dt) for dt in _FLOATS}  # stand-ins for buffers a rule doesn't use


class Optimizer(NamedTuple):
    """``init(params) -> state`` and ``update(params, grads, state) -> (params, state)``."""
    init: Callable
    update: Callable


# ----------------------------------------------------------------------------- checks
def _where(root, path):
    return root + "".join(f"[{k!r}]" for k in path)


def _leaves(name, tree, root="params", path=()):
    """The float array leaves of ``tree`` in ``_tree.leaves`` order, checked."""
    out = []
    _collect(name, tree, root, path, out)
    return out


def _collect(name, tree, root, path, out):
    if isinstance(tree, np.ndarray):
        if tree.dtype not in _FLOATS:
            raise TypeError(f"{name}: {_where(root, path)} must be a float32 or float64 array, "
                            f"got dtype {tree.dtype}")
        out.append(tree)
    elif isinstance(tree, dict):
        for k in sorted(tree):
            _collect(name, tree[k], root, path + (k,), out)
    elif isinstance(tree, (list, tuple)):
        for i, sub in enumerate(tree):
            _collect(name, sub, root, path + (i,), out)
    elif tree is not None:
        raise TypeError(f"{name}: {_where(root, path)} must be an ndarray, dict, list or tuple, "
                        f"got {type(tree).__name__}")


def _row(name, p, os, whats, path, out):
    if isinstance(p, np.ndarray):
        if p.dtype not in _FLOATS:
            raise TypeError(f"{name}: {_where('params', path)} must be a float32 or float64 array, "
                            f"got dtype {p.dtype}")
        for o, what in zip(os, whats):
            if not isinstance(o, np.ndarray):
                raise TypeError(f"{name}: {_where(what, path)} must be an ndarray like "
                                f"{_where('params', path)}, got {type(o).__name__}")
            if o.shape != p.shape:
                raise ValueError(f"{name}: {_where(what, path)} has shape {o.shape}, expected "
                                 f"{p.shape} (the shape of {_where('params', path)})")
            if o.dtype != p.dtype:
                raise TypeError(f"{name}: {_where(what, path)} has dtype {o.dtype}, expected "
                                f"{p.dtype} (the dtype of {_where('params', path)}; mixing float32 "
                                "and float64 is not allowed)")
        out.append((p, *os))
    elif isinstance(p, dict):
        for o, what in zip(os, whats):
            if not isinstance(o, dict) or o.keys() != p.keys():
                got = sorted(o, key=repr) if isinstance(o, dict) else type(o).__name__
                raise ValueError(f"{name}: {_where(what, path)} must be a dict with keys "
                                 f"{sorted(p, key=repr)} like {_where('params', path)}, got {got}")
        for k in sorted(p):
            _row(name, p[k], [o[k] for o in os], whats, path + (k,), out)
    elif isinstance(p, (list, tuple)):
        for o, what in zip(os, whats):
            if not isinstance(o, (list, tuple)) or len(o) != len(p):
                got = f"length {len(o)}" if isinstance(o, (list, tuple)) else type(o).__name__
                raise ValueError(f"{name}: {_where(what, path)} must be a list of length {len(p)} "
                                 f"like {_where('params', path)}, got {got}")
        for i, sub in enumerate(p):
            _row(name, sub, [o[i] for o in os], whats, path + (i,), out)
    elif p is None:
        for o, what in zip(os, whats):
            if o is not None:
                raise ValueError(f"{name}: {_where(what, path)} must be None like "
                                 f"{_where('params', path)}, got {type(o).__name__}")
    else:
        raise TypeError(f"{name}: {_where('params', path)} must be an ndarray, dict, list or "
                        f"tuple, got {type(p).__name__}")


def _consts(*values):
    """``{dtype: values cast to dtype}`` for float32 and float64, computed once."""
    return {dt: tuple(dt.type(v) for v in values) for dt in _FLOATS}


def _real(name, what, value, lo=0.0, hi=None):
    """A hyper-parameter as a float in ``[lo, hi)``, else ValueError/TypeError."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name}: {what} must be a real number, got {type(value).__name__}")
    v = float(value)
    if not (v >= lo and (hi is None or v < hi)):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi})"
        raise ValueError(f"{name}: invalid {what} {value!r}; expected a number {rng}")
    return v


def _check_lr(name, lr):
    return lr if callable(lr) else _real(name, "lr", lr)


def _lr_at(name, lr, t):
    if not callable(lr):
        return lr
    v = lr(t)
    if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)) \
            or not v >= 0:
        raise ValueError(f"{name}: the lr schedule returned {v!r} at step {t}; "
                         "expected a number >= 0")
    return float(v)


def _state_step(name, state, buffers):
    if not isinstance(state, dict) or "step" not in state:
        raise TypeError(f"{name}: state must be the dict returned by {name}(...).init(params), "
                        f"got {type(state).__name__}")
    missing = [b for b in buffers if b not in state]
    if missing:
        raise ValueError(f"{name}: state has no {missing[0]!r} (keys {sorted(state)}); pass the "
                         f"state returned by {name}(...).init(params) with the same settings")
    t = state["step"]
    try:
        t = -1 if isinstance(t, bool) else operator.index(t)  # int, np.int64, 0-d int array
    except TypeError:
        t = -1
    if t < 0:
        raise ValueError(f"{name}: state['step'] must be an integer >= 0, got {state['step']!r}")
    return t


# ----------------------------------------------------------------------------- builder
_GROUP = 8  # arrays per kernel call: one compiled signature serves every model size


def _flat(a):
    """``a`` as a 1-D C-contiguous writeable-typed array (a view when possible)."""
    r = a.ravel()
    return r if r.flags.writeable else r.copy()


def _walk(p, os, nout, by_dt):
    """One pass over ``params`` (``p``) and the matching trees ``os`` (grads, buffers):
    checks them (as ``_row`` does, silently) and, per array, allocates ``nout`` outputs like it.
    Appends the flat views of ``p``, of each ``os`` and of the outputs to the columns
    ``by_dt[dtype]`` (lists, one per argument) and returns the ``nout`` output trees, or
    None at the first anomaly (``_row`` then names it). Dict keys are visited in the
    caller's order (the update is element-wise, so the order of the arrays is free)."""
    tp = type(p)
    if tp is np.ndarray:
        dt = p.dtype
        if dt is not _F32 and dt is not _F64:   # identity first: the cheap common case
            if dt != _F32 and dt != _F64:
                return None
            dt = _F32 if dt == _F32 else _F64
        shape = p.shape
        for o in os:
            if type(o) is not np.ndarray or o.shape != shape or \
                    (o.dtype is not dt and o.dtype != dt):
                if isinstance(o, np.ndarray) and o.shape == shape and o.dtype == dt:
                    continue                      # an ndarray subclass
                return None
        cols = by_dt.get(dt)
        if cols is None:
            cols = by_dt[dt] = [[] for _ in range(1 + len(os) + nout)]
        # _flat inlined and sgd (params and grads only) without loops: the general form
        # below made mlp_small's sgd update 53-56 µs against 40-43 (alternating runs)
        r = p.ravel()
        cols[0].append(r if r.flags.writeable else r.copy())
        if nout == 1 and len(os) == 1:
            out = np.empty(shape, dt)
            r = os[0].ravel()
            cols[1].append(r if r.flags.writeable else r.copy())
            cols[2].append(out.ravel())
            return (out,)
        k = 1
        for o in os:
            cols[k].append(_flat(o))
            k += 1
        outs = [np.empty(shape, dt) for _ in range(nout)]
        for o in outs:
            cols[k].append(o.ravel())
            k += 1
        return outs
    if tp is dict or (tp is not list and tp is not tuple and isinstance(p, dict)):
        keys = p.keys()
        for o in os:
            if not isinstance(o, dict) or o.keys() != keys:
                return None
        if nout == 1 and len(os) == 1:            # sgd: params and grads only
            g = os[0]
            out = {}
            for k in p:
                r = _walk(p[k], (g[k],), 1, by_dt)
                if r is None:
                    return None
                out[k] = r[0]
            return (out,)
        sub = {}
        for k in p:
            r = _walk(p[k], [o[k] for o in os], nout, by_dt)
            if r is None:
                return None
            sub[k] = r
        return [{k: sub[k][j] for k in p} for j in range(nout)]
    if tp is list or tp is tuple or isinstance(p, (list, tuple)):
        n = len(p)
        for o in os:
            if not isinstance(o, (list, tuple)) or len(o) != n:
                return None
        make = list if isinstance(p, list) else tuple
        if nout == 1 and len(os) == 1:
            g = os[0]
            out = []
            for i in range(n):
                r = _walk(p[i], (g[i],), 1, by_dt)
                if r is None:
                    return None
                out.append(r[0])
            return (out if make is list else tuple(out),)
        subs = []
        for i in range(n):
            r = _walk(p[i], [o[i] for o in os], nout, by_dt)
            if r is None:
                return None
            subs.append(r)
        return [make([s[j] for s in subs]) for j in range(nout)]
    if p is None and all(o is None for o in os):
        return [None] * nout
    if isinstance(p, np.ndarray):               # an ndarray subclass
        return _walk(np.asarray(p), os, nout, by_dt)
    return None


def _same_float(dt, other):
    """The canonical float32/float64 dtype for ``other`` when it is one and ``dt`` is None
    or equal to it, else None. (Arrays made in compiled code have dtypes that are equal to
    NumPy's, not the same objects: an identity test alone sent a cnn_lenet update, whose
    Dense gradients come from a kernel, down the slow general walk.)"""
    c = _F32 if other == _F32 else _F64 if other == _F64 else None
    return c if dt is None or dt is c else None


def _walk_layers_sgd(p, g):
    """``_walk_layers(p, [g], 1)`` for plain SGD (no buffers, one output), with the loops
    over buffers and outputs unrolled (its checks repeat ``_walk_layers``'s on purpose: a
    helper call per array is what this avoids). mlp_small's six arrays, same processes:
    8 µs against 12-17 for ``_walk_layers`` and 14-24 for ``_walk``."""
    tp = type(p)
    n = len(p) if tp is list or tp is tuple else -1
    if n <= 0 or type(g) is not tp or len(g) != n:
        return None
    ndarray = np.ndarray
    pcol, gcol, shapes = [], [], []
    dt = None
    for i in range(n):
        pd, gd = p[i], g[i]
        if type(pd) is not dict or type(gd) is not dict or len(gd) != len(pd):
            return None
        for k, a in pd.items():
            b = gd.get(k)
            if type(a) is not ndarray or type(b) is not ndarray:
                return None
            if a.dtype is not dt:
                dt = _same_float(dt, a.dtype)
                if dt is None:
                    return None
            shape = a.shape
            if (b.dtype is not dt and b.dtype != dt) or b.shape != shape:
                return None     # (arrays made in compiled code have equal, not identical, dtypes)
            f = a.flags
            if not (f.c_contiguous and f.writeable):
                return None
            f = b.flags
            if not (f.c_contiguous and f.writeable):
                return None
            pcol.append(a.ravel())
            gcol.append(b.ravel())
            shapes.append(shape)
    if dt is None:
        return None
    outs, ocol = _new_trees(p, shapes, dt, 1, tp)
    return {dt: [pcol, gcol, ocol[0]]}, outs


def _walk_layers(p, os, nout):
    """``_walk`` for the tree a ``Sequential`` has: a list or tuple of dicts of arrays, all
    of one dtype, C-contiguous and writeable. Returns ``(by_dt, new_trees)`` like ``_walk``,
    or None for anything else (``_walk`` then takes it and names the problem). Flat loops,
    no recursion and no per-node calls, unlike ``_walk``."""
    tp = type(p)
    n = len(p) if tp is list or tp is tuple else -1
    if n <= 0:
        return None
    for o in os:
        if type(o) is not tp or len(o) != n:
            return None
    nos = len(os)
    ndarray = np.ndarray
    cols = [[] for _ in range(1 + nos)]
    pcol = cols[0]
    shapes = []
    dt = None
    for i in range(n):
        pd = p[i]
        if type(pd) is not dict:
            return None
        for o in os:
            od = o[i]
            if type(od) is not dict or len(od) != len(pd):
                return None
        for k, a in pd.items():
            if type(a) is not ndarray:
                return None
            if a.dtype is not dt:
                dt = _same_float(dt, a.dtype)
                if dt is None:
                    return None
            f = a.flags
            if not (f.c_contiguous and f.writeable):
                return None
            shape = a.shape
            pcol.append(a.ravel())
            c = 1
            for o in os:
                b = o[i].get(k)
                if type(b) is not ndarray or (b.dtype is not dt and b.dtype != dt) or \
                        b.shape != shape:
                    return None
                f = b.flags
                if not (f.c_contiguous and f.writeable):
                    return None
                cols[c].append(b.ravel())
                c += 1
            shapes.append(shape)
    if dt is None:
        return None
    trees, ocols = _new_trees(p, shapes, dt, nout, tp)
    return {dt: cols + ocols}, trees


def _new_trees(p, shapes, dt, nout, tp):
    """``nout`` new trees shaped like ``p`` (a list/tuple of dicts of arrays with
    ``shapes``, in order), each a new pack (``fastbp._pack``, so the next update can take
    ``_walk_packed``), and their flat views: ``(trees, [cols per tree])``."""
    lay = _pack.layout(shapes)
    trees, ocols = [], []
    for _ in range(nout):
        views = _pack.new(lay, dt)[1]
        trees.append(_like(p, views, tp))
        ocols.append([v.ravel() for v in views])
    return trees, ocols


def _like(p, views, tp):
    """A tree shaped like ``p`` (a list/tuple ``tp`` of dicts) holding ``views`` in order."""
    tree, j = [], 0
    for pd in p:
        d = {}
        for k in pd:
            d[k] = views[j]
            j += 1
        tree.append(d)
    return tree if tp is list else tuple(tree)


def _walk_packed(p, os, nout):
    """The update's walk when every tree is a pack (``fastbp._pack``): ``p`` (params) and
    each of ``os`` (grads, buffers) a list or tuple of dicts whose arrays are, in order,
    exactly the views of one recorded pack, all of one layout and dtype. Returns
    ``(dtype, buffers, new_trees)`` (the flat buffers of p, os and the ``nout`` new packs
    made here), or None for anything else (the general walks then take it)."""
    tp = type(p)
    if tp is not list and tp is not tuple:
        return None
    n = len(p)
    for o in os:
        if type(o) is not tp or len(o) != n:
            return None
    for i0 in range(n):                  # the first array
        pd = p[i0]
        if type(pd) is not dict:
            return None
        if pd:
            break
    else:
        return None
    k0, a0 = next(iter(pd.items()))
    if type(a0) is not np.ndarray:
        return None
    pk = _pack.find(a0)
    if pk is None:
        return None
    lay = pk.layout
    buf = pk.buffer()
    dt = _same_float(None, buf.dtype)
    if dt is None:
        return None
    bufs, refs = [buf], [pk.refs]
    for o in os:
        od = o[i0]
        b = od.get(k0) if type(od) is dict else None
        ok = _pack.find(b) if type(b) is np.ndarray else None
        if ok is None or ok.layout is not lay:
            return None
        b = ok.buffer()
        if b.dtype != dt:
            return None
        bufs.append(b)
        refs.append(ok.refs)
    prefs, orefs = refs[0], refs[1:]
    m = len(prefs)
    j = 0
    for i in range(n):
        pd = p[i]
        if type(pd) is not dict:
            return None
        ods = []
        for o in os:
            od = o[i]
            if type(od) is not dict or len(od) != len(pd):
                return None
            ods.append(od)
        for k, a in pd.items():
            if j >= m or prefs[j]() is not a:
                return None
            for od, r in zip(ods, orefs):
                if r[j]() is not od.get(k):
                    return None
            j += 1
    if j != m:
        return None
    trees = []
    for _ in range(nout):
        b, views = _pack.new(lay, dt)
        bufs.append(b)
        trees.append(_like(p, views, tp))
    return dt, bufs, trees


def _groups(by_dt):
    """Split the columns of ``_walk`` into calls of ``_GROUP`` arrays of one dtype, padded
    with empty arrays.

    Yields ``(dtype, cols, work)``: ``cols[c]`` is a tuple of flat arrays (argument ``c``:
    params, grads, buffers, then outputs), ``work`` the number of elements.
    """
    for dt, cols in by_dt.items():
        n = len(cols[0])
        if n <= _GROUP:
            fill = _PAD[dt][n]
            yield dt, [tuple(c) + fill for c in cols], sum([a.size for a in cols[0]])
            continue
        for lo in range(0, n, _GROUP):
            part = cols[0][lo:lo + _GROUP]
            fill = _PAD[dt][len(part)]
            yield dt, [tuple(c[lo:lo + _GROUP]) + fill for c in cols], \
                sum([a.size for a in part])


_PAD = {dt: [(_EMPTY[dt],) * (_GROUP - k) for k in range(_GROUP + 1)] for dt in _FLOATS}


def _none(dt):
    """Stand-ins for arrays a rule does not use (a group of empty arrays)."""
    return (_EMPTY[dt],) * _GROUP


def _make(name, lr, buffers, kernel_step, fill=None):
    """An Optimizer whose rule is ``kernel_step(t, lr_t, dt, ps, gs, bufs, outs, work)``
    on tuples of raveled arrays of dtype ``dt`` (see ``_groups``): it reads ``ps``, ``gs``
    and the buffer tuples ``bufs`` and writes ``outs = [p_outs, *buf_outs]``.
    ``buffers`` names the state trees."""
    fill = fill or {}
    nbuf = len(buffers)

    def init(params):
        ps = _leaves(name, params)
        state = {"step": 0}
        for b in buffers:
            state[b] = _tree.unflatten(params, [np.full(p.shape, fill.get(b, 0), p.dtype)
                                                for p in ps])
        return state

    def update(params, grads, state):
        t = _state_step(name, state, buffers)
        others = [grads] + [state[b] for b in buffers]
        packed = _walk_packed(params, others, 1 + nbuf)
        if packed is not None:
            dt, bufs, new = packed
            cols = [(b,) for b in bufs]
            kernel_step(t, _lr_at(name, lr, t), dt, cols[0], cols[1], cols[2:2 + nbuf],
                        cols[2 + nbuf:], bufs[0].size)
            new_state = {"step": t + 1}
            for b, tree in zip(buffers, new[1:]):
                new_state[b] = tree
            return new[0], new_state
        fast = _walk_layers_sgd(params, grads) if nbuf == 0 else \
            _walk_layers(params, others, 1 + nbuf)
        if fast is not None:
            by_dt, new = fast
        else:
            by_dt = {}
            new = _walk(params, others, 1 + nbuf, by_dt)
        if new is None:   # report the problem with its path
            _row(name, params, others, ["grads"] + [f"state[{b!r}]" for b in buffers], (), [])
            raise TypeError(f"{name}: params, grads and state do not match")  # pragma: no cover
        lr_t = _lr_at(name, lr, t)
        if by_dt:
            for dt, cols, work in _groups(by_dt):
                kernel_step(t, lr_t, dt, cols[0], cols[1], cols[2:2 + nbuf], cols[2 + nbuf:],
                            work)
        new_state = {"step": t + 1}
        for b, tree in zip(buffers, new[1:]):
            new_state[b] = tree
        return new[0], new_state

    init.__doc__ = f"{name}: the initial state for ``params`` (step 0, buffers {list(buffers)})."
    update.__doc__ = f"{name}: ``(params, grads, state) -> (new_params, new_state)``; pure."
    return Optimizer(init, update)


# ----------------------------------------------------------------------------- rules
def sgd(lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False) -> Optimizer:
    """Stochastic gradient descent, as ``torch.optim.SGD``.

    ``g' = g + weight_decay·p``. Without momentum: ``p ← p - lr·g'``. With momentum the
    buffer is ``b ← g'`` on the first step and ``b ← momentum·b + (1 - dampening)·g'``
    after; then ``p ← p - lr·(g' + momentum·b)`` if ``nesterov`` else ``p ← p - lr·b``.

    State: ``{"step", "momentum_buffer"}`` (no buffer when ``momentum == 0``).
    ``nesterov`` needs ``momentum > 0`` and ``dampening == 0`` (as in torch).
    """
    name = "sgd"
    lr = _check_lr(name, lr)
    momentum = _real(name, "momentum", momentum)
    dampening = _real(name, "dampening", dampening)
    weight_decay = _real(name, "weight_decay", weight_decay)
    nesterov = bool(nesterov)
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError(f"{name}: nesterov=True requires momentum > 0 and dampening == 0, "
                         f"got momentum={momentum}, dampening={dampening}")

    consts = _consts(weight_decay, momentum, 1 - dampening)

    def step(t, lr_t, dt, ps, gs, bufs, outs, work):
        wd, mom, omd = consts[dt]
        if momentum == 0:
            K.run(K.sgd_step, K.sgd_multi, work, ps, gs, dt.type(lr_t), wd, outs[0])
        else:
            K.run(K.sgd_momentum_step, K.sgd_momentum_multi, work, ps, gs, bufs[0],
                  dt.type(lr_t), wd, mom, omd, nesterov, t == 0, outs[0], outs[1])

    return _make(name, lr, ("momentum_buffer",) if momentum != 0 else (), step)


def adagrad(lr=1e-2, lr_decay=0.0, weight_decay=0.0, initial_accumulator_value=0.0,
            eps=1e-10) -> Optimizer:
    """Adagrad, as ``torch.optim.Adagrad``.

    ``g' = g + weight_decay·p``;  ``s ← s + g'²``;
    ``p ← p - lr_t/(1 + t·lr_decay) · g' / (sqrt(s) + eps)``, with ``s`` starting at
    ``initial_accumulator_value``. State: ``{"step", "sum"}``.
    """
    name = "adagrad"
    lr = _check_lr(name, lr)
    lr_decay = _real(name, "lr_decay", lr_decay)
    weight_decay = _real(name, "weight_decay", weight_decay)
    init_acc = _real(name, "initial_accumulator_value", initial_accumulator_value)
    eps = _real(name, "eps", eps)

    consts = _consts(weight_decay, eps)

    def step(t, lr_t, dt, ps, gs, bufs, outs, work):
        clr = lr_t / (1 + t * lr_decay)
        K.run(K.adagrad_step, K.adagrad_multi, work, ps, gs, bufs[0], dt.type(clr), *consts[dt],
              outs[0], outs[1])

    return _make(name, lr, ("sum",), step, fill={"sum": init_acc})


def rmsprop(lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0,
            centered=False) -> Optimizer:
    """RMSprop, as ``torch.optim.RMSprop`` (with momentum and the centered variant).

    ``g' = g + weight_decay·p``;  ``v ← alpha·v + (1 - alpha)·g'²``.
    Centered: ``ḡ ← ḡ + (1 - alpha)·(g' - ḡ)`` and ``d = sqrt(v - ḡ²) + eps``;
    otherwise ``d = sqrt(v) + eps``.
    With momentum: ``b ← momentum·b + g'/d``, ``p ← p - lr·b``;
    without: ``p ← p - lr·g'/d``.
    All buffers start at zero. State: ``{"step", "square_avg"}`` plus ``"grad_avg"`` when
    centered and ``"momentum_buffer"`` when ``momentum > 0``.
    (Like torch, centered RMSprop gives NaN if rounding makes ``v - ḡ²`` negative.)
    """
    name = "rmsprop"
    lr = _check_lr(name, lr)
    alpha = _real(name, "alpha", alpha)
    eps = _real(name, "eps", eps)
    weight_decay = _real(name, "weight_decay", weight_decay)
    momentum = _real(name, "momentum", momentum)
    centered = bool(centered)
    buffers = ("square_avg",) + (("grad_avg",) if centered else ()) + \
        (("momentum_buffer",) if momentum > 0 else ())

    consts = _consts(alpha, 1 - alpha, eps, weight_decay, momentum)

    def step(t, lr_t, dt, ps, gs, bufs, outs, work):
        none = _none(dt)
        ga, ga_outs = (bufs[1], outs[2]) if centered else (none, none)
        buf, buf_outs = (bufs[-1], outs[-1]) if momentum > 0 else (none, none)
        K.run(K.rmsprop_step, K.rmsprop_multi, work, ps, gs, bufs[0], ga, buf, dt.type(lr_t),
              *consts[dt], centered, outs[0], outs[1], ga_outs, buf_outs)

    return _make(name, lr, buffers, step)


def _adam(name, lr, betas, eps, weight_decay, amsgrad, decoupled):
    lr = _check_lr(name, lr)
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"{name}: betas must be a pair (beta1, beta2), got {betas!r}")
    b1 = _real(name, "beta1 (betas[0])", betas[0], 0.0, 1.0)
    b2 = _real(name, "beta2 (betas[1])", betas[1], 0.0, 1.0)
    eps = _real(name, "eps", eps)
    weight_decay = _real(name, "weight_decay", weight_decay)
    amsgrad = bool(amsgrad)
    buffers = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ())

    consts = _consts(0.0 if decoupled else weight_decay, 1 - b1, b2, 1 - b2, eps)

    def step(t, lr_t, dt, ps, gs, bufs, outs, work):
        f = dt.type
        n = t + 1                        # torch counts steps from 1
        step_size = lr_t / (1 - b1 ** n)
        bc2_sqrt = (1 - b2 ** n) ** 0.5
        decay = 1 - lr_t * weight_decay if decoupled else 1.0
        vmax, vmax_outs = (bufs[2], outs[3]) if amsgrad else (_none(dt), _none(dt))
        K.run(K.adam_step, K.adam_multi, work, ps, gs, bufs[0], bufs[1], vmax, f(decay),
              *consts[dt], f(step_size), f(bc2_sqrt), amsgrad, outs[0], outs[1], outs[2],
              vmax_outs)

    return _make(name, lr, buffers, step)


def adam(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False) -> Optimizer:
    """Adam, as ``torch.optim.Adam`` (weight decay added to the gradient, "L2").

    With ``n = t + 1``: ``g' = g + weight_decay·p``;  ``m ← m + (1 - β1)·(g' - m)``;
    ``v ← β2·v + (1 - β2)·g'²``;  ``v̂ = max(v̂, v)`` if ``amsgrad`` else ``v``;
    ``p ← p - lr_t/(1 - β1ⁿ) · m / (sqrt(v̂)/sqrt(1 - β2ⁿ) + eps)``.
    ``betas = (β1, β2)``, each in [0, 1). Buffers start at zero.
    State: ``{"step", "exp_avg", "exp_avg_sq"}`` (+ ``"max_exp_avg_sq"`` with amsgrad).
    """
    return _adam("adam", lr, betas, eps, weight_decay, amsgrad, decoupled=False)


def adamw(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False) -> Optimizer:
    """AdamW, as ``torch.optim.AdamW`` (decoupled weight decay).

    ``p ← p·(1 - lr_t·weight_decay)``, then the Adam update of ``adam`` with the raw
    gradient (no decay term in ``g``), all in one pass:
    ``p ← p·(1 - lr_t·wd) - lr_t/(1 - β1ⁿ) · m / (sqrt(v̂)/sqrt(1 - β2ⁿ) + eps)``.
    State as for ``adam``.
    """
    return _adam("adamw", lr, betas, eps, weight_decay, amsgrad, decoupled=True)


# ----------------------------------------------------------------------------- clipping
_CHUNK = 1 << 15  # elements per partial sum (fixed, so results don't depend on threads)


def _sum_squares(a):
    n = a.size
    if n == 0:
        return 0.0
    partial = np.empty(-(-n // _CHUNK), np.float64)
    K.sum_squares(a, _CHUNK, partial, work=n)
    return float(partial.sum())


def _norm(flat):
    total = 0.0
    for a in flat:
        total += _sum_squares(a.ravel())
    if total == math.inf:  # maybe only the squares overflowed: rescale by the largest |x|
        amax = max((float(np.max(np.abs(a))) for a in flat if a.size), default=0.0)
        if math.isfinite(amax) and amax > 0:
            total = sum(_sum_squares((a / amax).ravel()) for a in flat)
            return amax * math.sqrt(total)
    return math.sqrt(total)


def global_norm(grads) -> float:
    """The L2 norm of all leaves together: ``sqrt(Σ_leaves Σ_i x_i²)``, as a Python float.

    ``grads`` is a tree of float32/float64 arrays. Squares are summed in float64 in fixed
    chunks, so the result is deterministic and independent of the thread count; float64
    squares that overflow are handled by rescaling. NaN anywhere gives NaN; ±inf gives inf.
    """
    return _norm(_leaves("global_norm", grads, "grads"))


def clip_by_global_norm(grads, max_norm, error_if_nonfinite=False):
    """Scale ``grads`` so their global norm is at most ``max_norm``; returns ``(clipped, norm)``.

    ``norm = global_norm(grads)`` (the norm before clipping). If ``norm > max_norm`` every
    leaf is multiplied by ``max_norm / norm`` (in the leaf's dtype); otherwise the result is
    an equal copy. Like ``torch.nn.utils.clip_grad_norm_`` but pure (new arrays, inputs
    untouched) and without torch's ``+1e-6`` in the denominator, so the clipped norm is
    ``max_norm`` up to rounding.

    Non-finite norm (a NaN or inf in ``grads``): the grads are returned unscaled (copies; the
    NaN/inf stays visible, nothing is hidden or zeroed) together with the non-finite
    ``norm``, so the caller can test ``math.isfinite(norm)`` and skip the step. With
    ``error_if_nonfinite=True`` a ValueError is raised instead.
    """
    name = "clip_by_global_norm"
    max_norm = _real(name, "max_norm", max_norm)
    flat = _leaves(name, grads, "grads")
    norm = _norm(flat)
    if not math.isfinite(norm):
        if error_if_nonfinite:
            raise ValueError(f"{name}: the global norm of grads is {norm}; the gradients contain "
                             "NaN or inf")
        factor = 1.0
    else:
        factor = max_norm / norm if norm > max_norm else 1.0
    out = []
    for a in flat:
        if factor == 1.0:
            out.append(a.copy())
        else:
            x = a.ravel()
            y = np.empty_like(x)
            K.scale(x, a.dtype.type(factor), y, work=x.size)
            out.append(y.reshape(a.shape))
    return _tree.unflatten(grads, out), norm
