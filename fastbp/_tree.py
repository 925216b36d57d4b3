"""Tiny helpers over parameter trees: nested lists/tuples/dicts whose leaves are ndarrays.

Leaves are visited in a fixed order (list order, then sorted dict keys), so flattening
two trees of the same structure pairs up matching arrays.
"""
from __future__ import annotations

import numpy as np


def leaves(tree) -> list:
    """All ndarray leaves of ``tree``, in a deterministic order."""
    out = []
    _collect(tree, out)
    return out


def _collect(tree, out):
    if isinstance(tree, np.ndarray):
        out.append(tree)
    elif isinstance(tree, dict):
        for k in sorted(tree):
            _collect(tree[k], out)
    elif isinstance(tree, (list, tuple)):
        for t in tree:
            _collect(t, out)
    elif tree is None:
        return
    else:
        raise TypeError(f"parameter tree: unsupported leaf type {type(tree).__name__}; "
                        "expected ndarray, dict, list or tuple")


def unflatten(tree, new_leaves):
    """A tree with the structure of ``tree`` whose leaves are taken from ``new_leaves``."""
    it = iter(new_leaves)
    out = _rebuild(tree, it)
    rest = list(it)
    if rest:
        raise ValueError(f"unflatten: {len(rest)} leaves left over")
    return out


def _rebuild(tree, it):
    if isinstance(tree, np.ndarray):
        return next(it)
    if isinstance(tree, dict):
        return dict(_rebuild_dict(tree, it))
    if isinstance(tree, list):
        return [_rebuild(t, it) for t in tree]
    if isinstance(tree, tuple):
        return tuple(_rebuild(t, it) for t in tree)
    return tree


def _rebuild_dict(tree, it):
    rebuilt = {k: _rebuild(tree[k], it) for k in sorted(tree)}
    # keep the caller's key order in the result
    return [(k, rebuilt[k]) for k in tree]


def tree_map(fn, tree, *rest):
    """Apply ``fn`` leaf-wise over trees of identical structure."""
    flat = leaves(tree)
    others = [leaves(r) for r in rest]
    for o in others:
        if len(o) != len(flat):
            raise ValueError(f"tree_map: trees differ in structure ({len(flat)} vs {len(o)} arrays)")
    return unflatten(tree, [fn(a, *(o[i] for o in others)) for i, a in enumerate(flat)])


def same_structure(a, b) -> bool:
    """True when two trees have the same nesting, keys and leaf shapes."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.shape == b.shape
    if isinstance(a, dict) and isinstance(b, dict):
        return set(a) == set(b) and all(same_structure(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_structure(x, y) for x, y in zip(a, b))
    return a is None and b is None
