"""fastbp.io.save / load: exact round trips of nested params and optimizer state."""
import io

import numpy as np
import pytest

import fastbp as F
from fastbp.io import load, save


def assert_same_tree(a, b):
    assert type(a) is type(b)
    if isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
        assert a.tobytes() == b.tobytes()             # bit for bit (NaN payloads, -0.0)
    elif isinstance(a, np.generic):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()
    elif isinstance(a, dict):
        assert list(a) == list(b)                     # keys and their order
        for k in a:
            assert_same_tree(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_tree(x, y)
    else:
        assert a == b or (a != a and b != b)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_params_round_trip(tmp_path, dtype):
    model = F.Sequential(F.Dense(5, 4), F.ReLU(), F.Sequential(F.Dense(4, 3, bias=False),
                                                               F.Tanh()), F.Dense(3, 2))
    params = F.init(model, seed=3, dtype=dtype)
    path = tmp_path / "params.npz"
    save(path, params)
    back = load(path)
    assert_same_tree(params, back)
    out1, _ = F.forward(model, params, np.ones((2, 5), dtype))
    out2, _ = F.forward(model, back, np.ones((2, 5), dtype))
    np.testing.assert_array_equal(out1, out2)


def test_optimizer_state_and_mixed_leaves(tmp_path):
    model = F.Sequential(F.Dense(3, 2))
    params = F.init(model)
    opt = F.optim.adam(1e-3)
    state = opt.init(params)
    _, state = opt.update(params, params, state)
    tree = {"params": params, "state": state, "epoch": 7, "lr": 0.1, "name": "run-1",
            "flag": True, "none": None, "shape": (2, 3), "f16": np.float16(1.5),
            "i8": np.arange(4, dtype=np.int8), "special": np.array([np.nan, -0.0, np.inf]),
            "empty": np.zeros((0, 3), np.float32), "scalar0d": np.array(2.0), "nested": [[], {}]}
    save(tmp_path / "all.npz", tree)
    back = load(tmp_path / "all.npz")
    assert_same_tree(tree, back)
    assert isinstance(back["state"]["step"], int)
    assert back["scalar0d"].shape == ()


def test_file_objects_and_npz_suffix(tmp_path):
    params = [{"W": np.arange(6, dtype=np.float32).reshape(2, 3)}]
    buf = io.BytesIO()
    save(buf, params, compress=True)
    buf.seek(0)
    assert_same_tree(params, load(buf))
    save(str(tmp_path / "noext"), params)              # NumPy adds .npz
    assert (tmp_path / "noext.npz").exists()
    assert_same_tree(params, load(str(tmp_path / "noext")))


def test_plain_npz_and_no_pickle(tmp_path):
    params = [{"W": np.ones((2, 2))}, {}]
    save(tmp_path / "p.npz", params)
    with np.load(tmp_path / "p.npz", allow_pickle=False) as data:   # readable without fastbp
        assert "a0" in data.files
    np.testing.assert_array_equal(load(tmp_path / "p.npz")[0]["W"], np.ones((2, 2)))


def test_loaded_arrays_are_writable_and_independent(tmp_path):
    save(tmp_path / "p.npz", [{"W": np.zeros(3)}])
    back = load(tmp_path / "p.npz")
    back[0]["W"][0] = 1.0
    assert load(tmp_path / "p.npz")[0]["W"][0] == 0.0


def test_errors(tmp_path):
    with pytest.raises(TypeError, match="object array"):
        save(tmp_path / "x.npz", [np.array([1, "a"], dtype=object)])
    with pytest.raises(TypeError, match="dict keys must be strings"):
        save(tmp_path / "x.npz", {1: np.zeros(2)})
    with pytest.raises(TypeError, match=r"params\[0\] has unsupported type"):
        save(tmp_path / "x.npz", [object()])
    np.savez(tmp_path / "other.npz", a=np.zeros(2))
    with pytest.raises(ValueError, match="not written by fastbp.save"):
        load(tmp_path / "other.npz")


def test_top_level_save_load(tmp_path):
    params = F.init(F.Sequential(F.Dense(3, 2), F.LSTM(2, 4)), seed=0, dtype=np.float64)
    F.save(tmp_path / "p.npz", params)
    assert_same_tree(F.load(tmp_path / "p.npz"), params)
