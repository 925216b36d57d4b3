"""Packs: the arrays of a params-shaped tree as consecutive views of one flat buffer.

An optimizer update over many small arrays spends most of its time per array (checks,
views, one kernel argument each). Where fastbp itself makes such a tree (an update's new
params and buffers, the fused Dense chain's gradients), it allocates one flat buffer,
hands out views of it (``new``) and records them here. An update whose params, grads and
buffers are all recorded packs of one layout runs its rule once over the flat buffers.

A pack is recognised only by the identity of its views (weak references, ``views``):
an array the caller replaced or made itself sends the update down its general path, so
packs change no result, only the time. The views are ordinary NumPy arrays (``a.base``
is the buffer). Entries hold weak references only and leave when the buffer dies.
"""
from __future__ import annotations

import math
import threading
import weakref

import numpy as np

_REG: dict = {}                 # id(buffer) -> Pack
_LAYOUTS: dict = {}             # interned layouts -> (layout, cuts, total)
_lock = threading.Lock()


class Pack:
    """A recorded buffer: ``buffer`` (a weak reference), ``refs`` (weak references to
    its views, in order) and ``layout`` (their shapes, an interned tuple)."""
    __slots__ = ("buffer", "refs", "layout")

    def __init__(self, buffer, refs, layout):
        self.buffer, self.refs, self.layout = buffer, refs, layout


def layout(shapes) -> tuple:
    """The interned tuple of ``shapes`` (each a tuple of ints, like ``ndarray.shape``):
    equal layouts are one object."""
    key = tuple(shapes)
    got = _LAYOUTS.get(key)
    if got is None:
        sizes = tuple(math.prod(s) for s in key)
        # per view: (start, stop, shape or None where the 1-D slice is already that shape)
        cuts, o = [], 0
        for s, n in zip(key, sizes):
            cuts.append((o, o + n, None if len(s) == 1 else s))
            o += n
        with _lock:
            _LAYOUTS.setdefault(key, (key, tuple(cuts), o))
        got = _LAYOUTS[key]
    return got[0]


def new(layout_, dtype):
    """``(buffer, views)``: a new flat buffer of ``dtype`` (uninitialised) and its views,
    one per shape of ``layout_`` (from ``layout``), consecutive and in order; recorded."""
    got = _LAYOUTS.get(layout_)
    if got is None:                 # e.g. unpickled in another process: intern it here
        got = _LAYOUTS[layout(layout_)]
    layout_, cuts, total = got
    buf = np.empty(total, dtype)
    views = [buf[a:b] if s is None else buf[a:b].reshape(s) for a, b, s in cuts]
    key = id(buf)
    ref = weakref.ref
    pack = Pack(ref(buf, lambda r, key=key: _forget(r, key)), tuple([ref(v) for v in views]),
                layout_)
    _REG[key] = pack
    return buf, views


def _forget(ref, key):
    pack = _REG.get(key)
    if pack is not None and pack.buffer is ref:
        _REG.pop(key, None)


def find(a):
    """The ``Pack`` whose buffer is ``a.base`` (``a`` an ndarray), or None."""
    base = a.base
    if base is None:
        return None
    pack = _REG.get(id(base))
    if pack is None or pack.buffer() is not base:
        return None
    return pack
