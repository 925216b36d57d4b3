"""Saving and loading parameter trees as plain ``.npz`` files.

>>> fastbp.save("model.npz", params)
>>> params = fastbp.load("model.npz")

A tree is nested lists, tuples and dicts (string keys) whose leaves are ndarrays, NumPy
scalars, or plain ``int``/``float``/``bool``/``str``/``None``, so an optimizer state
(``{"step": 3, "exp_avg": [...]}``) can be saved too. Arrays are stored one per ``.npy``
member (``a0``, ``a1``, ...) with their exact dtype and shape; the nesting is stored as JSON in
the member ``__fastbp_tree__``. Nothing is pickled: ``load`` uses ``allow_pickle=False``, so
loading an untrusted file cannot run code, and the file opens with plain ``np.load``.
"""
from __future__ import annotations

import json
import os

import numpy as np

__all__ = ["save", "load"]

_TREE_KEY = "__fastbp_tree__"
_FORMAT = 1


def _encode(tree, arrays, path):
    """JSON-able description of ``tree``; array leaves are appended to ``arrays``."""
    if isinstance(tree, np.ndarray):
        if tree.dtype.hasobject:
            raise TypeError(f"save: {path} is an object array; only numeric, bool and string "
                            "arrays can be saved without pickling")
        arrays.append(tree)
        return {"array": len(arrays) - 1}
    if isinstance(tree, np.generic):          # a NumPy scalar: keep its dtype
        arrays.append(np.asarray(tree))
        return {"scalar": len(arrays) - 1}
    if isinstance(tree, dict):
        for k in tree:
            if not isinstance(k, str):
                raise TypeError(f"save: dict keys must be strings, got {k!r} in {path}")
        return {"dict": [[k, _encode(v, arrays, f"{path}[{k!r}]")] for k, v in tree.items()]}
    if isinstance(tree, (list, tuple)):
        kind = "list" if isinstance(tree, list) else "tuple"
        return {kind: [_encode(v, arrays, f"{path}[{i}]") for i, v in enumerate(tree)]}
    if tree is None or isinstance(tree, (bool, int, float, str)):
        return {"value": tree}
    raise TypeError(f"save: {path} has unsupported type {type(tree).__name__}; expected "
                    "ndarray, dict, list, tuple, int, float, bool, str or None")


def _decode(node, data):
    ((kind, v),) = node.items()
    if kind == "array":
        return data[f"a{v}"]
    if kind == "scalar":
        return data[f"a{v}"][()]
    if kind == "dict":
        return {k: _decode(sub, data) for k, sub in v}
    if kind == "list":
        return [_decode(sub, data) for sub in v]
    if kind == "tuple":
        return tuple(_decode(sub, data) for sub in v)
    if kind == "value":
        return v
    raise ValueError(f"load: unknown node kind {kind!r} in the tree description")


def save(path, params, *, compress=False) -> None:
    """Write a params tree (or any tree described in the module docstring) to ``path``.

    path: a file name or a writable binary file. NumPy appends ``.npz`` to a file name that
    does not already end in it. compress: use ``np.savez_compressed``. Arrays keep their
    dtype, shape and values bit for bit; lists, tuples and dict key order are kept.
    """
    arrays = []
    tree = {"format": _FORMAT, "tree": _encode(params, arrays, "params")}
    members = {f"a{i}": a for i, a in enumerate(arrays)}
    members[_TREE_KEY] = np.array(json.dumps(tree))
    (np.savez_compressed if compress else np.savez)(path, **members)


def load(path):
    """Read a tree written by ``save``. Returns it with the same nesting, dtypes and values.

    path: a file name or a readable binary file. Arrays are loaded into memory (no memory
    mapping), writable and independent of the file.
    """
    if isinstance(path, (str, os.PathLike)) and not os.path.exists(path) \
            and os.path.exists(str(path) + ".npz"):
        path = str(path) + ".npz"
    with np.load(path, allow_pickle=False) as data:
        if _TREE_KEY not in data.files:
            raise ValueError(f"load: {path} was not written by fastbp.save (no {_TREE_KEY} "
                             f"member; members: {data.files[:5]})")
        meta = json.loads(str(data[_TREE_KEY][()]))
        if meta.get("format") != _FORMAT:
            raise ValueError(f"load: {path} has format {meta.get('format')!r}; this fastbp "
                             f"reads format {_FORMAT}")
        return _decode(meta["tree"], data)
