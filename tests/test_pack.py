"""Packs (fastbp._pack): an update's outputs and the fused Dense chain's gradients as views
of one buffer, and the update's one-call path over them (optim._walk_packed)."""
import gc
import threading

import numpy as np
import pytest

import fastbp as F
import fastbp.optim as O
from fastbp import _pack, _tree

from test_optim import CASES, IDS

STEPS = 5


def layer_tree(dtype, seed=0):
    """A Sequential-like tree: a list of dicts (one empty, one with keys b, W)."""
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.standard_normal(s).astype(dtype)  # noqa: E731
    return [{"W": f(4, 3), "b": f(3)}, {}, {"b": f(5), "W": f(3, 5)}, {"W": f(2, 2, 2)}]


def walk_order(tree):
    """The arrays of a list of dicts in the update's order (dicts in insertion order)."""
    return [a for d in tree for a in d.values()]


def packed_like(tree, seed):
    """A tree shaped like ``tree`` whose arrays are the views of one new pack."""
    leaves = walk_order(tree)
    lay = _pack.layout([a.shape for a in leaves])
    views = iter(_pack.new(lay, leaves[0].dtype)[1])
    rng = np.random.default_rng(seed)
    out = [{k: next(views) for k in d} for d in tree]
    for v in walk_order(out):
        v[...] = rng.standard_normal(v.shape)
    return out


def is_pack(tree):
    leaves = walk_order(tree)
    pk = _pack.find(leaves[0])
    return pk is not None and all(r() is a for r, a in zip(pk.refs, leaves)) and \
        len(pk.refs) == len(leaves)


def run(opt, params, grads, packed_path=True, monkeypatch=None):
    if not packed_path:
        monkeypatch.setattr(O, "_walk_packed", lambda *a: None)
    state = opt.init(params)
    for g in grads:
        params, state = opt.update(params, g, state)
    if not packed_path:
        monkeypatch.undo()
    return params, state


def test_new_views_are_consecutive_and_recorded():
    lay = _pack.layout([(3, 4), (4,), (2, 2, 2)])
    assert lay is _pack.layout([(3, 4), (4,), (2, 2, 2)])        # interned
    buf, views = _pack.new(lay, np.float32)
    assert buf.shape == (24,) and buf.dtype == np.float32
    assert [v.shape for v in views] == [(3, 4), (4,), (2, 2, 2)]
    buf[:] = np.arange(24)
    assert np.array_equal(views[1], [12, 13, 14, 15]) and views[2][1, 1, 1] == 23
    for v in views:
        assert v.base is buf and v.flags.c_contiguous and v.flags.writeable
        assert _pack.find(v).buffer() is buf
    assert _pack.find(np.zeros(3)) is None and _pack.find(buf[:3]) is not None
    assert _pack.find(buf) is None                    # the buffer itself owns its data


def test_layouts_from_another_process_are_interned_on_use():
    """A layout tuple that was pickled (a Sequential sent to a worker process) is equal
    to the interned one but not the same object: ``new`` interns it."""
    import pickle
    lay = pickle.loads(pickle.dumps(((7, 3), (3,), (11, 2))))
    buf, views = _pack.new(lay, np.float64)
    assert [v.shape for v in views] == [(7, 3), (3,), (11, 2)] and buf.shape == (46,)
    assert _pack.find(views[0]).layout is _pack.layout([(7, 3), (3,), (11, 2)])


def test_dead_buffers_leave_the_registry():
    lay = _pack.layout([(5,), (2, 3)])
    before = len(_pack._REG)
    for _ in range(100):
        buf, views = _pack.new(lay, np.float64)
    del buf, views
    gc.collect()
    assert len(_pack._REG) <= before


@pytest.mark.parametrize("name,tname,kw", CASES, ids=IDS)
def test_packed_path_gives_the_general_walks_results(monkeypatch, name, tname, kw):
    """From the second step on, params, buffers (outputs of the update) and grads (packs
    here) are packs: the one-call path runs, and its results are bitwise those of the
    per-array walks."""
    params = layer_tree(np.float32)
    grads = [packed_like(params, s) for s in range(1, STEPS + 1)]
    calls = []
    real = O._walk_packed

    def spy(*a):
        r = real(*a)
        calls.append(r is not None)
        return r
    monkeypatch.setattr(O, "_walk_packed", spy)
    new, state = run(getattr(O, name)(**kw), params, grads)
    monkeypatch.undo()
    assert calls == [False] + [True] * (STEPS - 1)
    assert is_pack(new)
    for k in state:
        if k != "step":
            assert is_pack(state[k])
    ref, ref_state = run(getattr(O, name)(**kw), params, grads, False, monkeypatch)
    assert list(new[2]) == ["b", "W"] and new[1] == {}
    for a, b in zip(_tree.leaves(new), _tree.leaves(ref)):
        assert a.dtype == np.float32 and a.shape == b.shape and np.array_equal(a, b)
    for k in state:
        if k != "step":
            for a, b in zip(_tree.leaves(state[k]), _tree.leaves(ref_state[k])):
                assert np.array_equal(a, b)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_changed_arrays_are_seen(dtype):
    """The packed path trusts only the identity of the views: a params tree whose array was
    replaced (by a copy with other values, or another view of the same buffer) or changed
    in place is updated with what it holds now."""
    opt = O.sgd(0.5)
    params = layer_tree(dtype)
    p1, s1 = opt.update(params, packed_like(params, 1), opt.init(params))
    assert is_pack(p1)
    g = packed_like(params, 2)

    def expect(p):
        return [{k: a - dtype(0.5) * g[i][k] for k, a in d.items()} for i, d in enumerate(p)]
    # a copy with other values
    q = [dict(d) for d in p1]
    q[0]["W"] = p1[0]["W"] + 1
    got, _ = opt.update(q, g, s1)
    for a, b in zip(_tree.leaves(got), _tree.leaves(expect(q))):
        assert np.array_equal(a, b)
    # another view of the same buffer, same shape (the first array of the pack)
    q = [dict(d) for d in p1]
    q[3]["W"] = p1[0]["W"].base[:8].reshape(2, 2, 2)
    got, _ = opt.update(q, g, s1)
    for a, b in zip(_tree.leaves(got), _tree.leaves(expect(q))):
        assert np.array_equal(a, b)
    # grads: a copy with other values, another view of the buffer
    for i, k, make in [(0, "W", lambda: g[0]["W"] * 2),
                       (3, "W", lambda: g[0]["W"].base[1:9].reshape(2, 2, 2))]:
        g2 = [dict(d) for d in g]
        g2[i][k] = make()
        got, _ = opt.update(p1, g2, s1)
        want = [{k: a - dtype(0.5) * g2[i][k] for k, a in d.items()} for i, d in enumerate(p1)]
        for a, b in zip(_tree.leaves(got), _tree.leaves(want)):
            assert np.array_equal(a, b)
    # changed in place (params and grads)
    p1[2]["b"][...] = 7
    g[0]["W"][...] = -3
    got, _ = opt.update(p1, g, s1)
    assert np.all(got[2]["b"] == dtype(7) - dtype(0.5) * g[2]["b"])
    assert np.all(got[0]["W"] == p1[0]["W"] + dtype(1.5))
    # inputs never modified by the update
    snap = [_tree.leaves(t) for t in (p1, g)]
    snap = [[a.copy() for a in s] for s in snap]
    opt.update(p1, g, s1)
    for t, s in zip((p1, g), snap):
        for a, b in zip(_tree.leaves(t), s):
            assert np.array_equal(a, b)


def test_mismatches_take_the_general_path_and_its_errors():
    """Grads of another layout, a missing key, an extra layer: the general walks take them
    (their results, or their messages)."""
    opt = O.sgd(0.1)
    params = layer_tree(np.float64)
    p1, s1 = opt.update(params, packed_like(params, 1), opt.init(params))
    g = packed_like(params, 2)
    assert O._walk_packed(p1, [g], 1) is not None
    other = [d for d in g] + [{"W": np.zeros(2)}]
    assert O._walk_packed(p1, [other], 1) is None
    bad = [dict(d) for d in g]
    del bad[3]["W"]
    bad[3]["V"] = g[3]["W"]
    assert O._walk_packed(p1, [bad], 1) is None
    with pytest.raises(ValueError, match=r"grads\[3\] must be a dict with keys \['W'\]"):
        opt.update(p1, bad, s1)
    g32 = packed_like(layer_tree(np.float32), 3)
    assert O._walk_packed(p1, [g32], 1) is None
    with pytest.raises(TypeError, match="dtype"):
        opt.update(p1, g32, s1)
    as_tuple = tuple(p1)
    assert O._walk_packed(as_tuple, [g], 1) is None      # the containers must match
    got, _ = opt.update(as_tuple, tuple(g), s1)
    assert type(got) is tuple and is_pack(got)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_mlp_gradients_are_a_pack_and_training_matches(dtype):
    """The fused Dense chain's gradients are one pack (W, b per layer), so sgd runs in one
    call from the second step; the trained params equal a run on the per-array walks."""
    model = F.Sequential(F.Dense(6, 8), F.ReLU(), F.Dense(8, 5, bias=False), F.ReLU(),
                         F.Dense(5, 3))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((7, 6)).astype(dtype)
    y = rng.integers(0, 3, 7)

    def train(packed_path):
        params = F.init(model, seed=1, dtype=dtype)
        opt = O.sgd(0.1, momentum=0.9)
        state = opt.init(params)
        saved = O._walk_packed
        if not packed_path:
            O._walk_packed = lambda *a: None
        try:
            for _ in range(4):
                out, cache = F.forward(model, params, x, train=True)
                _, d = F.losses.softmax_cross_entropy(out, y)
                _, g = F.backward(model, params, cache, d, input_grad=False)
                if packed_path:
                    assert is_pack(g)
                    assert [a.shape for a in walk_order(g)] == [(6, 8), (8,), (8, 5), (5, 3), (3,)]
                params, state = opt.update(params, g, state)
        finally:
            O._walk_packed = saved
        return params
    a, b = train(True), train(False)
    for u, v in zip(_tree.leaves(a), _tree.leaves(b)):
        assert u.dtype == dtype and np.array_equal(u, v)


def test_threads_updating_at_once():
    """Several Python threads running packed updates at once get their own results."""
    opt = O.adam(0.01)
    params = layer_tree(np.float32)
    grads = [packed_like(params, s) for s in range(1, 6)]
    expect, _ = run(opt, params, grads)
    out, errors = [None] * 4, []

    def work(i):
        try:
            for _ in range(20):
                out[i] = run(opt, params, grads)[0]
        except Exception as e:      # pragma: no cover
            errors.append(e)
    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for o in out:
        for a, b in zip(_tree.leaves(o), _tree.leaves(expect)):
            assert np.array_equal(a, b)
