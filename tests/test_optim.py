"""Optimizers, schedules and gradient clipping (fastbp.optim, fastbp.schedules)."""
import copy
import math
import threading

import numpy as np
import pytest

import fastbp.optim as O
from fastbp import _tree
from fastbp.kernels import optim as K
from fastbp.schedules import constant, cosine, exponential_decay, step_decay, time_decay

STEPS = 7


def make_tree(dtype, seed=0, scale=1.0):
    """Two 'layers' plus a nested Sequential and a parameter-free layer ({})."""
    rng = np.random.default_rng(seed)
    f = lambda *s: (scale * rng.standard_normal(s)).astype(dtype)  # noqa: E731
    return [{"W": f(4, 3), "b": f(3)}, {}, [{"W": f(3, 5), "b": f(5)}, {"W": f(2, 2, 2)}]]


def grad_seq(dtype, n=STEPS, seed=1):
    return [make_tree(dtype, seed=seed + k) for k in range(n)]


def run(opt, params, grads):
    state = opt.init(params)
    for g in grads:
        params, state = opt.update(params, g, state)
    return params, state


# ----------------------------------------------------------------------------- torch oracle
# Same keyword names on both sides: that is the point of matching torch's API.
CASES = [
    ("sgd", "SGD", dict(lr=0.1)),
    ("sgd", "SGD", dict(lr=0.1, momentum=0.9)),
    ("sgd", "SGD", dict(lr=0.05, momentum=0.8, dampening=0.3)),
    ("sgd", "SGD", dict(lr=0.1, momentum=0.9, nesterov=True)),
    ("sgd", "SGD", dict(lr=0.1, weight_decay=0.1)),
    ("sgd", "SGD", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.05)),
    ("adagrad", "Adagrad", dict(lr=0.1)),
    ("adagrad", "Adagrad", dict(lr=0.1, lr_decay=0.05, weight_decay=0.1,
                                initial_accumulator_value=0.2, eps=1e-3)),
    ("rmsprop", "RMSprop", dict(lr=0.01)),
    ("rmsprop", "RMSprop", dict(lr=0.01, alpha=0.9, eps=1e-3, weight_decay=0.1)),
    ("rmsprop", "RMSprop", dict(lr=0.01, momentum=0.9)),
    ("rmsprop", "RMSprop", dict(lr=0.01, centered=True, eps=1e-2)),
    ("rmsprop", "RMSprop", dict(lr=0.01, alpha=0.3, momentum=0.5, centered=True, weight_decay=0.1)),
    ("adam", "Adam", dict(lr=0.01)),
    ("adam", "Adam", dict(lr=0.01, betas=(0.8, 0.99), eps=1e-2, weight_decay=0.1)),
    ("adam", "Adam", dict(lr=0.01, betas=(0.3, 0.4), amsgrad=True)),  # lerp weight >= 0.5
    ("adamw", "AdamW", dict(lr=0.01)),
    ("adamw", "AdamW", dict(lr=0.02, weight_decay=0.3, eps=1e-3, amsgrad=True)),
]
IDS = [f"{n}-" + ",".join(f"{k}={v}" for k, v in kw.items()) for n, _, kw in CASES]


def torch_run(torch, tname, kw, params, grads, lrs=None):
    """Run torch.optim.<tname> (single-tensor path) and return (params, state) as leaf lists."""
    ts = [torch.tensor(p.copy(), requires_grad=True) for p in _tree.leaves(params)]
    opt = getattr(torch.optim, tname)(ts, foreach=False, **kw)
    for k, g in enumerate(grads):
        if lrs is not None:
            opt.param_groups[0]["lr"] = lrs[k]
        for t, gl in zip(ts, _tree.leaves(g)):
            t.grad = torch.tensor(gl.copy())
        opt.step()
    return [t.detach().numpy() for t in ts], [opt.state[t] for t in ts]


@pytest.mark.parametrize("name,tname,kw", CASES, ids=IDS)
@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-10), (np.float32, 2e-5)])
def test_matches_torch(name, tname, kw, dtype, tol):
    torch = pytest.importorskip("torch")
    params, grads = make_tree(dtype), grad_seq(dtype)
    new, state = run(getattr(O, name)(**kw), params, grads)
    ref, tstate = torch_run(torch, tname, kw, params, grads)
    for a, r in zip(_tree.leaves(new), ref):
        assert a.dtype == dtype
        np.testing.assert_allclose(a, r, rtol=tol, atol=tol)
    assert state["step"] == STEPS
    for buf, lst in state.items():  # the buffers match torch's state of the same name
        if buf == "step":
            continue
        for a, ts in zip(_tree.leaves(lst), tstate):
            assert a.dtype == dtype
            np.testing.assert_allclose(a, ts[buf].numpy(), rtol=tol, atol=tol)


# ----------------------------------------------------------------------------- numpy references
def ref_run(rule, kw, params, grads, lrs=None):
    """Textbook formulas, float64, one array at a time, written independently of the kernels."""
    out = []
    for i, p in enumerate(_tree.leaves(params)):
        p = p.astype(np.float64)
        z = np.zeros_like(p)
        s = {"m": z.copy(), "v": z.copy(), "vmax": z.copy(), "ga": z.copy(), "b": None,
             "sum": z + kw.get("initial_accumulator_value", 0.0)}
        for t, gt in enumerate(grads):
            g = _tree.leaves(gt)[i].astype(np.float64)
            lr = kw["lr"] if lrs is None else lrs[t]
            p = rule(p, g, s, t + 1, lr, **{k: v for k, v in kw.items() if k != "lr"})
        out.append(p)
    return out


def ref_sgd(p, g, s, n, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False):
    g = g + weight_decay * p
    if momentum:
        s["b"] = g.copy() if s["b"] is None else momentum * s["b"] + (1 - dampening) * g
        g = g + momentum * s["b"] if nesterov else s["b"]
    return p - lr * g


def ref_adagrad(p, g, s, n, lr, lr_decay=0.0, weight_decay=0.0, initial_accumulator_value=0.0,
                eps=1e-10):
    g = g + weight_decay * p
    s["sum"] = s["sum"] + g * g
    return p - lr / (1 + (n - 1) * lr_decay) * g / (np.sqrt(s["sum"]) + eps)


def ref_rmsprop(p, g, s, n, lr, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0,
                centered=False):
    g = g + weight_decay * p
    s["v"] = alpha * s["v"] + (1 - alpha) * g * g
    var = s["v"]
    if centered:
        s["ga"] = alpha * s["ga"] + (1 - alpha) * g
        var = var - s["ga"] ** 2
    step = g / (np.sqrt(var) + eps)
    if momentum:
        s["b"] = step if s["b"] is None else momentum * s["b"] + step  # buffer starts at 0
        step = s["b"]
    return p - lr * step


def ref_adam(p, g, s, n, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False,
             decoupled=False):
    b1, b2 = betas
    if decoupled:
        p = p - lr * weight_decay * p
    else:
        g = g + weight_decay * p
    s["m"] = b1 * s["m"] + (1 - b1) * g
    s["v"] = b2 * s["v"] + (1 - b2) * g * g
    v = s["v"]
    if amsgrad:
        s["vmax"] = np.maximum(s["vmax"], v)
        v = s["vmax"]
    m_hat, v_hat = s["m"] / (1 - b1 ** n), v / (1 - b2 ** n)
    return p - lr * m_hat / (np.sqrt(v_hat) + eps)


def ref_adamw(p, g, s, n, lr, weight_decay=1e-2, **kw):
    return ref_adam(p, g, s, n, lr, weight_decay=weight_decay, decoupled=True, **kw)


REFS = {"sgd": ref_sgd, "adagrad": ref_adagrad, "rmsprop": ref_rmsprop, "adam": ref_adam,
        "adamw": ref_adamw}


@pytest.mark.parametrize("name,tname,kw", CASES, ids=IDS)
def test_matches_numpy_reference(name, tname, kw):
    params, grads = make_tree(np.float64), grad_seq(np.float64)
    new, _ = run(getattr(O, name)(**kw), params, grads)
    for a, r in zip(_tree.leaves(new), ref_run(REFS[name], kw, params, grads)):
        np.testing.assert_allclose(a, r, rtol=1e-10, atol=1e-12)


def test_tolerance_catches_eps_placement():
    # The update moves the params, and the 1e-10 tolerance is tight enough to tell
    # sqrt(v) + eps from sqrt(v + eps) (a classic slip) even with the default eps.
    params, grads = make_tree(np.float64), grad_seq(np.float64, 3)
    new, _ = run(O.adam(0.01), params, grads)
    assert not np.allclose(_tree.leaves(new)[0], _tree.leaves(params)[0], rtol=1e-3)

    def _eps_inside(p, g, s, n, lr, eps):
        s["m"] = 0.9 * s["m"] + 0.1 * g
        s["v"] = 0.999 * s["v"] + 0.001 * g * g
        return p - lr * (s["m"] / (1 - 0.9 ** n)) / np.sqrt(s["v"] / (1 - 0.999 ** n) + eps)

    wrong = ref_run(lambda p, g, s, n, lr: _eps_inside(p, g, s, n, lr, 1e-8), {"lr": 0.01}, params, grads)
    right = ref_run(ref_adam, {"lr": 0.01}, params, grads)
    assert not all(np.allclose(a, r, rtol=1e-10, atol=1e-12) for a, r in zip(_tree.leaves(new), wrong))
    assert all(np.allclose(a, r, rtol=1e-10, atol=1e-12) for a, r in zip(_tree.leaves(new), right))


@pytest.mark.parametrize("name,tname,kw", CASES[::3], ids=IDS[::3])
def test_float32_in_float32_out(name, tname, kw):
    params = make_tree(np.float32)
    new, state = run(getattr(O, name)(**kw), params, grad_seq(np.float32, 2))
    for a in _tree.leaves(new) + [x for k, v in state.items() if k != "step" for x in _tree.leaves(v)]:
        assert a.dtype == np.float32
    # float32 run stays close to the float64 run of the same data
    new64, _ = run(getattr(O, name)(**kw), make_tree(np.float64), grad_seq(np.float64, 2))
    for a, b in zip(_tree.leaves(new), _tree.leaves(new64)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name,tname,kw", CASES, ids=IDS)
def test_many_arrays_of_mixed_dtypes(name, tname, kw):
    """A tree of 19 arrays, float32 and float64 mixed (several kernel calls per dtype, a
    tuple holding a dict): each leaf comes out exactly as when updated alone, in its dtype."""
    rng = np.random.default_rng(3)
    shapes = [(3, 4), (5,), (2, 3, 2), (1,), (7,), (4, 4), (6,), (2, 5), (3,), (9,), (1, 8)]

    def tree(seed):
        r = np.random.default_rng(seed)
        leaves = [r.standard_normal(s).astype(np.float32 if i % 3 else np.float64)
                  for i, s in enumerate(shapes + shapes[:8])]
        return [{"a": leaves[0], "b": leaves[1]}, {}, (leaves[2], {"c": leaves[3]}),
                {f"k{i}": a for i, a in enumerate(leaves[4:])}]

    params, grads = tree(rng.integers(1 << 30)), [tree(s) for s in (11, 12, 13)]
    new, _ = run(getattr(O, name)(**kw), params, grads)
    assert _tree.same_structure(new, params) and isinstance(new[2], tuple)
    leaves = _tree.leaves(new)
    for i, p in enumerate(_tree.leaves(params)):
        alone, _ = run(getattr(O, name)(**kw), [p], [[_tree.leaves(g)[i]] for g in grads])
        assert leaves[i].dtype == p.dtype and leaves[i].shape == p.shape
        assert np.array_equal(leaves[i], alone[0])
        assert not np.array_equal(leaves[i], p)


def layer_tree(dtype, seed=0, container=list):
    """The tree a Sequential has (a list of dicts, some empty): the update's fast walk."""
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.standard_normal(s).astype(dtype)  # noqa: E731
    return container([{"W": f(4, 3), "b": f(3)}, {}, {"b": f(5), "W": f(3, 5)}, {"W": f(2, 2, 2)}])


@pytest.mark.parametrize("container", [list, tuple])
@pytest.mark.parametrize("name,tname,kw", CASES, ids=IDS)
def test_layer_trees_take_the_fast_walk(monkeypatch, name, tname, kw, container):
    """A list (or tuple) of dicts is walked by ``_walk_layers``/``_walk_layers_sgd``, never
    by ``_walk``, and gives bitwise the results of the general walk on the same leaves."""
    params = layer_tree(np.float32, 0, container)
    grads = [layer_tree(np.float32, s, container) for s in (1, 2, 3)]
    # the general walk: the same leaves inside a dict, which the fast walk does not take
    ref, ref_state = run(getattr(O, name)(**kw), {"net": params}, [{"net": g} for g in grads])

    def no_walk(*a):
        raise AssertionError("the general _walk ran on a layer tree")
    monkeypatch.setattr(O, "_walk", no_walk)
    new, state = run(getattr(O, name)(**kw), params, grads)
    assert type(new) is container and list(new[2]) == ["b", "W"] and new[1] == {}
    assert _tree.same_structure(new, params)
    for a, b in zip(_tree.leaves(new), _tree.leaves(ref["net"])):
        assert a.dtype == np.float32 and np.array_equal(a, b)
    for k in state:
        if k != "step":
            assert type(state[k]) is container
            for a, b in zip(_tree.leaves(state[k]), _tree.leaves(ref_state[k]["net"])):
                assert np.array_equal(a, b)


@pytest.mark.parametrize("name,tname,kw", CASES[:1] + [c for c in CASES if c[0] == "adam"][:1],
                         ids=lambda v: str(v)[:20])
def test_fast_walk_takes_arrays_made_in_compiled_code(monkeypatch, name, tname, kw):
    """Arrays allocated inside cached Numba code (a Dense layer's gradients) have a dtype
    equal to NumPy's float32 but not the same object (unpickled with the kernel): they
    still take the fast walk."""
    import pickle
    f32 = pickle.loads(pickle.dumps(np.dtype(np.float32)))     # such a dtype object

    def copy(a):
        return a.view(f32).copy()
    params = layer_tree(np.float32, 0)
    grads = [[{k: copy(v) for k, v in d.items()} for d in layer_tree(np.float32, s)]
             for s in (1, 2)]
    assert any(g.dtype is not np.dtype(np.float32) for g in _tree.leaves(grads[0]))
    ref, _ = run(getattr(O, name)(**kw), {"net": params}, [{"net": g} for g in grads])

    def no_walk(*a):
        raise AssertionError("the general _walk ran on a layer tree")
    monkeypatch.setattr(O, "_walk", no_walk)
    new, _ = run(getattr(O, name)(**kw), params, grads)
    for a, b in zip(_tree.leaves(new), _tree.leaves(ref["net"])):
        assert a.dtype == np.float32 and np.array_equal(a, b)
    mixed = [dict(d) for d in grads[0]]
    mixed[0]["W"] = mixed[0]["W"].astype(np.float64)      # still refused by the fast walk
    assert O._walk_layers_sgd(params, mixed) is None
    assert O._walk_layers(params, [mixed], 1) is None


@pytest.mark.parametrize("opt,name", [(O.sgd(0.1), "sgd"), (O.adam(), "adam")])
def test_layer_tree_irregularities_fall_back(opt, name):
    """What the fast walk does not take goes to the general walk: the same results, or
    the general walk's error message."""
    params = layer_tree(np.float64)
    state = opt.init(params)
    grads = layer_tree(np.float64, 1)
    expect, _ = opt.update(params, grads, state)
    # float64 arrays that are non-contiguous or read-only are still updated correctly
    odd_p, odd_g = layer_tree(np.float64), layer_tree(np.float64, 1)
    odd_p[0]["W"] = np.asfortranarray(odd_p[0]["W"])
    odd_g[2]["W"] = np.asfortranarray(odd_g[2]["W"])
    odd_p[3]["W"].flags.writeable = False
    got, _ = opt.update(odd_p, odd_g, state)
    for a, b in zip(_tree.leaves(got), _tree.leaves(expect)):
        assert np.array_equal(a, b)
    # layers of two dtypes: each array in its own
    mixed_p, mixed_g = layer_tree(np.float64), layer_tree(np.float64, 1)
    mixed_p[3]["W"], mixed_g[3]["W"] = (a.astype(np.float32) for a in (mixed_p[3]["W"], mixed_g[3]["W"]))
    got, _ = opt.update(mixed_p, mixed_g, opt.init(mixed_p))
    assert got[3]["W"].dtype == np.float32 and got[0]["W"].dtype == np.float64
    np.testing.assert_allclose(got[3]["W"], expect[3]["W"], rtol=1e-6)
    assert np.array_equal(got[0]["W"], expect[0]["W"])
    # the same number of keys, but not the same keys
    g = layer_tree(np.float64, 1)
    g[0] = {"W": g[0]["W"], "c": g[0]["b"]}
    with pytest.raises(ValueError, match=rf"{name}: grads\[0\] must be a dict with keys \['W', 'b'\]"):
        opt.update(params, g, state)
    g = layer_tree(np.float64, 1)
    g[2]["W"] = g[2]["W"].T.copy()
    with pytest.raises(ValueError, match=rf"{name}: grads\[2\]\['W'\] has shape \(5, 3\), expected \(3, 5\)"):
        opt.update(params, g, state)
    g = layer_tree(np.float64, 1)
    g[0]["b"] = g[0]["b"].astype(np.float32)
    with pytest.raises(TypeError, match=rf"{name}: grads\[0\]\['b'\] has dtype float32, expected float64"):
        opt.update(params, g, state)
    g = layer_tree(np.float64, 1)
    g[1] = {"W": np.zeros(2)}
    with pytest.raises(ValueError, match=rf"{name}: grads\[1\] must be a dict with keys \[\]"):
        opt.update(params, g, state)
    g = layer_tree(np.float64, 1, tuple)
    with pytest.raises(ValueError, match=rf"{name}: grads must be a list of length 4"):
        opt.update(params, g[:3], state)
    bad = layer_tree(np.float64)
    bad[0]["W"] = bad[0]["W"].astype(np.int32)
    with pytest.raises(TypeError, match=rf"{name}: params\[0\]\['W'\] must be a float32 or float64"):
        opt.update(bad, grads, state)


def test_structure_of_results():
    params = make_tree(np.float32)
    params[0] = dict(b=params[0]["b"], W=params[0]["W"])  # key order is kept
    p, state = run(O.adam(), params, grad_seq(np.float32, 1))
    assert isinstance(p, list) and list(p[0]) == ["b", "W"] and p[1] == {} and isinstance(p[2], list)
    assert set(state) == {"step", "exp_avg", "exp_avg_sq"}
    assert _tree.same_structure(state["exp_avg"], params)
    assert set(run(O.sgd(0.1), params, [])[1]) == {"step"}
    assert set(O.rmsprop(momentum=0.1, centered=True).init(params)) == \
        {"step", "square_avg", "grad_avg", "momentum_buffer"}
    assert O.adagrad(initial_accumulator_value=0.5).init(params)["sum"][0]["W"][0, 0] == 0.5


def test_state_round_trips_through_pickle_and_npz():
    import io
    import pickle
    opt = O.rmsprop(0.01, momentum=0.9, centered=True)
    params, (g1, g2) = make_tree(np.float32), grad_seq(np.float32, 2)
    p1, state = opt.update(params, g1, opt.init(params))
    expect, _ = opt.update(p1, g2, state)
    got, _ = opt.update(p1, g2, pickle.loads(pickle.dumps(state)))
    for a, b in zip(_tree.leaves(got), _tree.leaves(expect)):
        assert np.array_equal(a, b)
    # npz: the buffers as leaves plus the step, rebuilt with _tree.unflatten
    buf = io.BytesIO()
    names = [k for k in state if k != "step"]
    np.savez(buf, step=state["step"], **{f"{k}_{i}": a for k in names
                                         for i, a in enumerate(_tree.leaves(state[k]))})
    z = np.load(io.BytesIO(buf.getvalue()))
    loaded = {"step": z["step"]}  # a 0-d int array is accepted as the step
    for k in names:
        n = len(_tree.leaves(state[k]))
        loaded[k] = _tree.unflatten(state[k], [z[f"{k}_{i}"] for i in range(n)])
    got, new_state = opt.update(p1, g2, loaded)
    assert new_state["step"] == 2
    for a, b in zip(_tree.leaves(got), _tree.leaves(expect)):
        assert np.array_equal(a, b)


# ----------------------------------------------------------------------------- purity
@pytest.mark.parametrize("name,tname,kw", CASES, ids=IDS)
def test_update_is_pure(name, tname, kw):
    opt = getattr(O, name)(**kw)
    params, (g1, g2) = make_tree(np.float32), grad_seq(np.float32, 2)
    _, state = opt.update(params, g1, opt.init(params))  # non-zero buffers
    before = copy.deepcopy((params, g2, state))
    new_p, new_s = opt.update(params, g2, state)
    for a, b in zip(_tree.leaves((params, g2, [v for k, v in state.items() if k != "step"])),
                    _tree.leaves((before[0], before[1], [v for k, v in before[2].items() if k != "step"]))):
        assert np.array_equal(a, b) and a.dtype == b.dtype
    assert state["step"] == before[2]["step"] == 1 and new_s["step"] == 2
    inputs = _tree.leaves((params, g2, [v for k, v in state.items() if k != "step"]))
    for out in _tree.leaves((new_p, [v for k, v in new_s.items() if k != "step"])):
        assert not any(np.shares_memory(out, x) for x in inputs)


def test_non_contiguous_and_readonly_inputs():
    base = make_tree(np.float64)
    params = [{"W": np.asfortranarray(base[0]["W"]), "b": base[0]["b"][::1]}, {},
              [{"W": base[2][0]["W"].T.copy().T, "b": base[2][0]["b"]}, {"W": base[2][1]["W"]}]]
    params[0]["W"].flags.writeable = False
    grads = grad_seq(np.float64, 3)
    grads[0][0]["W"] = np.asfortranarray(grads[0][0]["W"])
    strided = np.zeros((4, 6))[:, ::2]
    strided[...] = grads[1][0]["W"]
    grads[1][0]["W"] = strided
    a, _ = run(O.adam(0.01), params, grads)
    b, _ = run(O.adam(0.01), base, [copy.deepcopy(g) for g in grad_seq(np.float64, 3)])
    for x, y in zip(_tree.leaves(a), _tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


def test_serial_and_parallel_builds_agree_bitwise():
    rng = np.random.default_rng(3)
    n = 100_003
    p, g, m = (rng.standard_normal(n).astype(np.float32) for _ in range(3))
    v = np.abs(rng.standard_normal(n)).astype(np.float32)
    f = np.float32
    outs = []
    for build in (K.adam_step.serial, K.adam_step.parallel):
        o = [np.empty_like(p) for _ in range(4)]
        build(p, g, m, v, v, f(0.999), f(0.01), f(0.1), f(0.999), f(0.001), f(1e-8), f(0.01), f(0.03),
              True, *o)
        outs.append(o)
    for a, b in zip(*outs):
        assert np.array_equal(a, b)
    parts = []
    for build in (K.sum_squares.serial, K.sum_squares.parallel):
        parts.append(np.empty(-(-n // 1000)))
        build(p, 1000, parts[-1])
    assert np.array_equal(parts[0], parts[1])


@pytest.mark.parametrize("name,tname,kw", CASES[1::2], ids=IDS[1::2])
def test_update_same_serial_and_parallel(name, tname, kw, parallel_mode):
    params, grads = make_tree(np.float32), grad_seq(np.float32, 3)
    results = []
    for par in (False, True):
        parallel_mode(par, families=("optim",))
        results.append(run(getattr(O, name)(**kw), params, grads)[0])
    for a, b in zip(*map(_tree.leaves, results)):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("name,tname,kw", CASES[1::2], ids=IDS[1::2])
def test_update_mixed_big_and_small_arrays(name, tname, kw, parallel_mode):
    """With a threshold between the arrays' sizes, the big arrays take the parallel build
    and the small ones one serial call: the same numbers as all-serial, every array updated."""
    from fastbp import config
    params, grads = make_tree(np.float32), grad_seq(np.float32, 3)
    parallel_mode(False, families=("optim",))
    serial = run(getattr(O, name)(**kw), params, grads)[0]
    config.set_parallel_threshold("optim", 12)          # W (4, 3) and W (3, 5) are "big"
    mixed = run(getattr(O, name)(**kw), params, grads)[0]
    for a, b, p in zip(_tree.leaves(serial), _tree.leaves(mixed), _tree.leaves(params)):
        assert np.array_equal(a, b)
        assert not np.array_equal(a, p)                   # updated, not left as it was


def test_concurrent_updates_from_threads():
    params = [{"W": np.random.default_rng(0).standard_normal((300, 400)).astype(np.float32)}]
    grads = [{"W": np.random.default_rng(1).standard_normal((300, 400)).astype(np.float32)}]
    opt = O.adam(0.01)
    expect, _ = opt.update(params, grads, opt.init(params))
    results = [None] * 4

    def work(i):
        results[i] = opt.update(params, grads, opt.init(params))[0]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        assert np.array_equal(r[0]["W"], expect[0]["W"])


# ----------------------------------------------------------------------------- schedules
def test_schedule_values():
    ts = [0, 1, 2, 5, 9, 10, 11, 37]
    for t in ts:
        assert constant(0.3)(t) == 0.3
        assert time_decay(0.5, 0.1)(t) == pytest.approx(0.5 / (1 + 0.1 * t), rel=1e-15)
        assert exponential_decay(0.5, 0.9)(t) == pytest.approx(0.5 * 0.9 ** t, rel=1e-14)
        assert exponential_decay(0.5, 0.9, decay_steps=4)(t) == pytest.approx(0.5 * 0.9 ** (t / 4), rel=1e-14)
        assert exponential_decay(0.5, 0.9, 4, staircase=True)(t) == pytest.approx(0.5 * 0.9 ** (t // 4), rel=1e-14)
        assert step_decay(0.5, 0.1, 3)(t) == pytest.approx(0.5 * 0.1 ** (t // 3), rel=1e-14)
        c = 0.01 + (0.5 - 0.01) * (1 + math.cos(math.pi * min(t, 10) / 10)) / 2
        assert cosine(0.5, 10, lr_min=0.01)(t) == pytest.approx(c, rel=1e-14)
    assert cosine(0.5, 10)(0) == 0.5 and cosine(0.5, 10)(10) == pytest.approx(0.0, abs=1e-16)
    assert cosine(0.5, 10, 0.1)(1000) == pytest.approx(0.1)
    assert step_decay(1.0, 0.5, 2)(1) == 1.0 and step_decay(1.0, 0.5, 2)(2) == 0.5
    assert "lr0 / (1 + k·t)" in time_decay(1.0, 1.0).__doc__
    assert O.schedules.cosine is cosine


def test_schedules_match_torch_schedulers():
    torch = pytest.importorskip("torch")
    lr_sched = torch.optim.lr_scheduler
    pairs = [
        (step_decay(0.5, 0.1, 3), lambda o: lr_sched.StepLR(o, step_size=3, gamma=0.1)),
        (exponential_decay(0.5, 0.9), lambda o: lr_sched.ExponentialLR(o, gamma=0.9)),
        (cosine(0.5, 10, 0.01), lambda o: lr_sched.CosineAnnealingLR(o, T_max=10, eta_min=0.01)),
        (time_decay(0.5, 0.2), lambda o: lr_sched.LambdaLR(o, lambda t: 1 / (1 + 0.2 * t))),
    ]
    for ours, make in pairs:
        w = torch.zeros(1, requires_grad=True)
        opt = torch.optim.SGD([w], lr=0.5)
        sch = make(opt)
        for t in range(11):
            assert opt.param_groups[0]["lr"] == pytest.approx(ours(t), rel=1e-12), (ours, t)
            opt.step()
            sch.step()


def test_optimizer_calls_schedule_with_step_count():
    calls = []
    opt = O.sgd(lambda t: calls.append(t) or 0.1)
    run(opt, make_tree(np.float64), grad_seq(np.float64, 4))
    assert calls == [0, 1, 2, 3]


@pytest.mark.parametrize("name,tname,kw", [CASES[3], CASES[7], CASES[12], CASES[14], CASES[17]],
                         ids=[IDS[3], IDS[7], IDS[12], IDS[14], IDS[17]])
def test_schedule_uses_lr_at_step_t(name, tname, kw):
    sched = step_decay(kw["lr"], 0.3, 2)
    lrs = [sched(t) for t in range(STEPS)]
    params, grads = make_tree(np.float64), grad_seq(np.float64)
    new, _ = run(getattr(O, name)(**{**kw, "lr": sched}), params, grads)
    for a, r in zip(_tree.leaves(new), ref_run(REFS[name], kw, params, grads, lrs=lrs)):
        np.testing.assert_allclose(a, r, rtol=1e-10, atol=1e-12)
    torch = pytest.importorskip("torch")
    ref, _ = torch_run(torch, tname, kw, params, grads, lrs=lrs)
    for a, r in zip(_tree.leaves(new), ref):
        np.testing.assert_allclose(a, r, rtol=1e-10, atol=1e-12)


def test_adam_schedule_vs_torch_lambdalr():
    torch = pytest.importorskip("torch")
    sched = cosine(0.05, 5, lr_min=0.001)
    params, grads = make_tree(np.float64), grad_seq(np.float64)
    new, _ = run(O.adam(sched), params, grads)
    ts = [torch.tensor(p.copy(), requires_grad=True) for p in _tree.leaves(params)]
    opt = torch.optim.Adam(ts, lr=1.0, foreach=False)
    lam = torch.optim.lr_scheduler.LambdaLR(opt, sched)
    for g in grads:
        for t, gl in zip(ts, _tree.leaves(g)):
            t.grad = torch.tensor(gl)
        opt.step()
        lam.step()
    for a, t in zip(_tree.leaves(new), ts):
        np.testing.assert_allclose(a, t.detach().numpy(), rtol=1e-10, atol=1e-12)


def test_schedule_errors():
    with pytest.raises(ValueError, match="time_decay: k must be >= 0"):
        time_decay(0.1, -1)
    with pytest.raises(ValueError, match="exponential_decay: rate must be > 0"):
        exponential_decay(0.1, 0)
    with pytest.raises(ValueError, match="step_decay: every must be an integer >= 1"):
        step_decay(0.1, 0.5, 0)
    with pytest.raises(TypeError, match="cosine: total_steps must be an integer"):
        cosine(0.1, 2.5)
    with pytest.raises(ValueError, match="constant: lr must be >= 0"):
        constant(-1.0)
    with pytest.raises(ValueError, match="cosine: step must be >= 0"):
        cosine(0.1, 10)(-1)
    opt = O.adam(lambda t: 0.1 - 0.1 * t)
    params = make_tree(np.float64)
    state = opt.init(params)
    params, state = opt.update(params, params, state)
    params, state = opt.update(params, params, state)  # lr(1) = 0 is fine
    with pytest.raises(ValueError, match=r"adam: the lr schedule returned -0\.1.* at step 2"):
        opt.update(params, params, state)


# ----------------------------------------------------------------------------- clipping
def test_global_norm():
    g = make_tree(np.float32)
    expect = math.sqrt(sum(float(np.sum(a.astype(np.float64) ** 2)) for a in _tree.leaves(g)))
    assert O.global_norm(g) == pytest.approx(expect, rel=1e-14)
    big = [np.random.default_rng(0).standard_normal(100_001).astype(np.float32)]  # several chunks
    assert O.global_norm(big) == pytest.approx(np.linalg.norm(big[0].astype(np.float64)), rel=1e-13)
    assert O.global_norm([]) == 0.0 and O.global_norm([np.zeros(0)]) == 0.0
    huge = [np.array([3e200, 4e200]), {"x": np.array([0.0])}]  # squares overflow float64
    assert O.global_norm(huge) == pytest.approx(5e200, rel=1e-14)


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-6), (np.float32, 1e-5)])
def test_clip_matches_torch(dtype, tol):
    torch = pytest.importorskip("torch")
    g = make_tree(dtype, scale=2.0)
    before = copy.deepcopy(g)
    clipped, norm = O.clip_by_global_norm(g, 1.5)
    ts = [torch.tensor(a.copy()) for a in _tree.leaves(g)]
    for t in ts:
        t.grad = t.clone()
    tnorm = torch.nn.utils.clip_grad_norm_(ts, 1.5, foreach=False)
    assert norm == pytest.approx(float(tnorm), rel=tol) and norm > 1.5
    for a, t in zip(_tree.leaves(clipped), ts):
        assert a.dtype == dtype
        np.testing.assert_allclose(a, t.grad.numpy(), rtol=tol, atol=tol)
    assert O.global_norm(clipped) == pytest.approx(1.5, rel=10 * float(np.finfo(dtype).eps))
    for a, b in zip(_tree.leaves(g), _tree.leaves(before)):  # pure
        assert np.array_equal(a, b)


def test_clip_no_clip_returns_equal_copies():
    g = make_tree(np.float32)
    norm0 = O.global_norm(g)
    clipped, norm = O.clip_by_global_norm(g, norm0 * 1.01)
    assert norm == norm0
    assert _tree.same_structure(clipped, g)
    for a, b in zip(_tree.leaves(clipped), _tree.leaves(g)):
        assert np.array_equal(a, b) and a.dtype == b.dtype and not np.shares_memory(a, b)


def test_clip_non_finite():
    g = make_tree(np.float64)
    g[0]["W"][1, 1] = np.nan
    clipped, norm = O.clip_by_global_norm(g, 1.0)
    assert math.isnan(norm)
    for a, b in zip(_tree.leaves(clipped), _tree.leaves(g)):
        np.testing.assert_array_equal(a, b)  # unscaled, NaN kept (equal_nan by default)
    g[0]["W"][1, 1] = -np.inf
    clipped, norm = O.clip_by_global_norm(g, 1.0)
    assert norm == math.inf and clipped[0]["W"][1, 1] == -np.inf
    assert clipped[2][0]["W"][0, 0] == g[2][0]["W"][0, 0]
    with pytest.raises(ValueError, match="clip_by_global_norm: the global norm of grads is inf"):
        O.clip_by_global_norm(g, 1.0, error_if_nonfinite=True)
    with pytest.raises(ValueError, match="clip_by_global_norm: invalid max_norm -1"):
        O.clip_by_global_norm(make_tree(np.float64), -1)


# ----------------------------------------------------------------------------- errors
ALL = [O.sgd(0.1), O.sgd(0.1, momentum=0.9), O.adagrad(), O.rmsprop(centered=True, momentum=0.5),
       O.adam(), O.adamw(amsgrad=True)]
NAMES = ["sgd", "sgd", "adagrad", "rmsprop", "adam", "adamw"]


@pytest.mark.parametrize("opt,name", list(zip(ALL, NAMES)), ids=[f"{n}{i}" for i, n in enumerate(NAMES)])
def test_mismatched_grads(opt, name):
    params = make_tree(np.float32)
    state = opt.init(params)
    g = make_tree(np.float32)
    g[2][0]["W"] = np.zeros((5, 3), np.float32)
    with pytest.raises(ValueError, match=rf"{name}: grads\[2\]\[0\]\['W'\] has shape \(5, 3\), expected \(3, 5\)"):
        opt.update(params, g, state)
    g = make_tree(np.float32)
    g[0]["b"] = g[0]["b"].astype(np.float64)
    with pytest.raises(TypeError, match=rf"{name}: grads\[0\]\['b'\] has dtype float64, expected float32"):
        opt.update(params, g, state)
    g = make_tree(np.float32)
    del g[2][1]["W"]
    with pytest.raises(ValueError, match=rf"{name}: grads\[2\]\[1\] must be a dict with keys \['W'\]"):
        opt.update(params, g, state)
    g = make_tree(np.float32)[:2]
    with pytest.raises(ValueError, match=rf"{name}: grads must be a list of length 3"):
        opt.update(params, g, state)
    g = make_tree(np.float32)
    g[0]["W"] = g[0]["W"].tolist()
    with pytest.raises(TypeError, match=rf"{name}: grads\[0\]\['W'\] must be an ndarray"):
        opt.update(params, g, state)
    with pytest.raises(TypeError, match=rf"{name}: params\[0\]\['W'\] must be a float32 or float64"):
        opt.init([{"W": np.zeros(3, np.int64)}])


def test_bad_state():
    params = make_tree(np.float32)
    with pytest.raises(ValueError, match="adam: state has no 'exp_avg'"):
        O.adam().update(params, params, O.sgd(0.1).init(params))
    with pytest.raises(TypeError, match="sgd: state must be the dict returned by sgd"):
        O.sgd(0.1).update(params, params, None)
    state = O.adam().init(params)
    state["exp_avg"][0]["W"] = state["exp_avg"][0]["W"].astype(np.float64)
    with pytest.raises(TypeError, match=r"adam: state\['exp_avg'\]\[0\]\['W'\] has dtype float64"):
        O.adam().update(params, params, state)
    state = O.adam().init(params)
    state["step"] = -1
    with pytest.raises(ValueError, match=r"adam: state\['step'\] must be an integer >= 0"):
        O.adam().update(params, params, state)


@pytest.mark.parametrize("fn,kw,msg", [
    (O.sgd, dict(lr=-0.1), "sgd: invalid lr -0.1"),
    (O.sgd, dict(lr=float("nan")), "sgd: invalid lr nan"),
    (O.sgd, dict(lr="0.1"), "sgd: lr must be a real number"),
    (O.sgd, dict(lr=0.1, momentum=-0.9), "sgd: invalid momentum -0.9"),
    (O.sgd, dict(lr=0.1, weight_decay=-1), "sgd: invalid weight_decay -1"),
    (O.sgd, dict(lr=0.1, nesterov=True), "sgd: nesterov=True requires momentum > 0 and dampening == 0"),
    (O.sgd, dict(lr=0.1, momentum=0.9, dampening=0.1, nesterov=True), "sgd: nesterov=True requires"),
    (O.adagrad, dict(eps=-1e-10), "adagrad: invalid eps"),
    (O.adagrad, dict(lr_decay=-1), "adagrad: invalid lr_decay"),
    (O.adagrad, dict(initial_accumulator_value=-1), "adagrad: invalid initial_accumulator_value"),
    (O.rmsprop, dict(eps=-1.0), "rmsprop: invalid eps"),
    (O.rmsprop, dict(momentum=-1.0), "rmsprop: invalid momentum"),
    (O.rmsprop, dict(alpha=-0.5), "rmsprop: invalid alpha"),
    (O.adam, dict(lr=-1e-3), "adam: invalid lr"),
    (O.adam, dict(eps=-1e-8), "adam: invalid eps"),
    (O.adam, dict(betas=(1.0, 0.999)), r"adam: invalid beta1 \(betas\[0\]\) 1.0; expected a number in \[0.0, 1.0\)"),
    (O.adam, dict(betas=(0.9, -0.1)), r"adam: invalid beta2"),
    (O.adamw, dict(weight_decay=-0.01), "adamw: invalid weight_decay"),
])
def test_bad_hyperparameters(fn, kw, msg):
    with pytest.raises((ValueError, TypeError), match=msg):
        fn(**kw)


def test_betas_must_be_a_pair():
    with pytest.raises(TypeError, match="adam: betas must be a pair"):
        O.adam(betas=0.9)
