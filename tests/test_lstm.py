"""LSTM: kernels and layer against plain loops, finite differences, cell loops; states; errors."""
import numpy as np
import pytest

import fastbp as F
from fastbp.kernels import lstm as K
from fastbp.layers.recurrent import final_state

import naive_recurrent as NV
from fd import central_diffs

SHAPES = [(1, 1, 3, 4), (1, 3, 3, 4), (4, 1, 3, 4), (5, 3, 2, 4)]   # T, N, D, H
ids = lambda s: "T{}N{}D{}H{}".format(*s)  # noqa: E731


def _weights(rng, D, H, dtype=np.float64, scale=0.5):
    return [(scale * rng.standard_normal(s)).astype(dtype) for s in ((D, 4 * H), (H, 4 * H), (4 * H,))]


# ---------------------------------------------------------------- kernels
@pytest.mark.parametrize("shape", SHAPES, ids=ids)
def test_sequence_kernels_match_plain_loops(shape, rng):
    T, N, D, H = shape
    x = rng.standard_normal((T, N, D))
    h0, c0 = rng.standard_normal((N, H)), rng.standard_normal((N, H))
    Wx, Wh, b = _weights(rng, D, H)
    gates, cs, hs = K.lstm_forward(x, h0, c0, Wx, Wh, b)
    rh, rc = NV.lstm_forward(x, h0, c0, Wx, Wh, b)
    np.testing.assert_allclose(hs, rh, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(cs, rc, rtol=1e-12, atol=1e-13)
    dhs, dhT, dcT = (rng.standard_normal(s) for s in ((T, N, H), (N, H), (N, H)))
    got = K.lstm_backward(x, h0, c0, gates, cs, hs, Wx, Wh, dhs, dhT, dcT, True)
    ref = NV.lstm_backward(x, h0, c0, Wx, Wh, b, dhs, dhT, dcT)
    for name, a, r in zip(["dx", "dh0", "dc0", "dWx", "dWh", "db"], got, ref):
        np.testing.assert_allclose(a, r, rtol=1e-11, atol=1e-12, err_msg=name)
    got = K.lstm_backward(x, h0, c0, gates, cs, hs, Wx, Wh, np.zeros((0, N, H)), dhT, dcT, False)
    ref = NV.lstm_backward(x, h0, c0, Wx, Wh, b, np.zeros((T, N, H)), dhT, dcT)
    assert got[0].shape == (0, 0, 0)
    for a, r in zip(got[1:], ref[1:]):
        np.testing.assert_allclose(a, r, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES, ids=ids)
def test_sequence_equals_loop_over_cells(shape, rng):
    T, N, D, H = shape
    x = rng.standard_normal((T, N, D))
    h0, c0 = rng.standard_normal((N, H)), rng.standard_normal((N, H))
    Wx, Wh, b = _weights(rng, D, H)
    gates, cs, hs = K.lstm_forward(x, h0, c0, Wx, Wh, b)
    h, c, steps = h0, c0, []
    for t in range(T):
        h_new, c_new, g = K.lstm_cell_forward(x[t], h, c, Wx, Wh, b)
        steps.append((h, c, c_new, g))
        h, c = h_new, c_new
        np.testing.assert_allclose(hs[t], h, rtol=1e-13, atol=1e-14)
        np.testing.assert_allclose(cs[t], c, rtol=1e-13, atol=1e-14)
        np.testing.assert_allclose(gates[t], g, rtol=1e-13, atol=1e-14)

    dhs, dhT, dcT = (rng.standard_normal(s) for s in ((T, N, H), (N, H), (N, H)))
    got = K.lstm_backward(x, h0, c0, gates, cs, hs, Wx, Wh, dhs, dhT, dcT)
    gh, gc = dhT.copy(), dcT.copy()
    sums = [np.zeros_like(Wx), np.zeros_like(Wh), np.zeros_like(b)]
    dxs = np.zeros_like(x)
    for t in reversed(range(T)):
        hp, cp, cn, g = steps[t]
        dxs[t], gh, gc, *parts = K.lstm_cell_backward(x[t], hp, cp, cn, g, Wx, Wh, gh + dhs[t], gc)
        sums = [s + p for s, p in zip(sums, parts)]
    for a, r in zip(got, [dxs, gh, gc, *sums]):
        np.testing.assert_allclose(a, r, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("N", [1, 3])
def test_cell_central_differences(N, rng):
    D, H = 3, 4
    x, h, c = rng.standard_normal((N, D)), rng.standard_normal((N, H)), rng.standard_normal((N, H))
    Wx, Wh, b = _weights(rng, D, H)
    Rh, Rc = rng.standard_normal((N, H)), rng.standard_normal((N, H))

    def loss():
        h_new, c_new, _ = K.lstm_cell_forward(x, h, c, Wx, Wh, b)
        return float(np.sum(h_new * Rh) + np.sum(c_new * Rc))

    _, c_new, gates = K.lstm_cell_forward(x, h, c, Wx, Wh, b)
    got = K.lstm_cell_backward(x, h, c, c_new, gates, Wx, Wh, Rh, Rc)
    num = central_diffs(loss, [x, h, c, Wx, Wh, b])
    for name, a, n in zip(["dx", "dh", "dc", "dWx", "dWh", "db"], got, num):
        np.testing.assert_allclose(a, n, rtol=1e-6, atol=1e-8, err_msg=name)


def test_serial_and_parallel_builds_agree(rng):
    T, N, D, H = 6, 5, 3, 7
    x = rng.standard_normal((T, N, D))
    h0, c0 = rng.standard_normal((N, H)), rng.standard_normal((N, H))
    Wx, Wh, b = _weights(rng, D, H)
    fs = K._lstm_forward.serial(x, h0, c0, Wx, Wh, b)
    for p, q in zip(fs, K._lstm_forward.parallel(x, h0, c0, Wx, Wh, b)):
        np.testing.assert_array_equal(p, q)
    args = (x, h0, c0, *fs, Wx, Wh, *(rng.standard_normal(s) for s in ((T, N, H), (N, H), (N, H))),
            True)
    for p, q in zip(K._lstm_backward.serial(*args), K._lstm_backward.parallel(*args)):
        np.testing.assert_array_equal(p, q)


@pytest.mark.parametrize("N, H", [(12, 6), (32, 48)])
def test_blas_matmul_paths_match_loops(N, H, rng):
    """N = 12: one BLAS call per step (N = 2..8 use a loop); N = 32, H = 48: the per-step
    product is split in column blocks (N·H·4H > BLAS_SERIAL_MNK)."""
    T, D = 3, 5
    x = rng.standard_normal((T, N, D))
    h0, c0 = rng.standard_normal((N, H)), rng.standard_normal((N, H))
    Wx, Wh, b = _weights(rng, D, H, scale=0.2)
    gates, cs, hs = K.lstm_forward(x, h0, c0, Wx, Wh, b)
    np.testing.assert_allclose(hs, NV.lstm_forward(x, h0, c0, Wx, Wh, b)[0], rtol=1e-12, atol=1e-13)
    dhs, dhT, dcT = (rng.standard_normal(s) for s in ((T, N, H), (N, H), (N, H)))
    got = K.lstm_backward(x, h0, c0, gates, cs, hs, Wx, Wh, dhs, dhT, dcT)
    ref = NV.lstm_backward(x, h0, c0, Wx, Wh, b, dhs, dhT, dcT)
    for a, r in zip(got, ref):
        np.testing.assert_allclose(a, r, rtol=1e-11, atol=1e-12)


# ---------------------------------------------------------------- layer
@pytest.mark.parametrize("shape", SHAPES, ids=ids)
@pytest.mark.parametrize("return_sequences", [True, False])
@pytest.mark.parametrize("with_dstate", [False, True])
def test_layer_central_differences(shape, return_sequences, with_dstate, rng):
    T, N, D, H = shape
    layer = F.LSTM(D, H, return_sequences=return_sequences)
    params = layer.init(rng, np.float64)
    params["b"] = 0.3 * rng.standard_normal(4 * H)
    x = rng.standard_normal((T, N, D))
    h0, c0 = rng.standard_normal((N, H)), rng.standard_normal((N, H))
    y, cache = layer.forward(params, (x, (h0, c0)))
    R = rng.standard_normal(y.shape)
    Rh, Rc = rng.standard_normal((N, H)), rng.standard_normal((N, H))

    def loss():
        yy, c = layer.forward(params, (x, (h0, c0)))
        out = np.sum(yy * R)
        if with_dstate:
            hT, cT = final_state(c)
            out += np.sum(hT * Rh) + np.sum(cT * Rc)
        return float(out)

    (dx, (dh0, dc0)), grads = layer.backward(params, cache, (R, (Rh, Rc)) if with_dstate else R)
    num = central_diffs(loss, [x, h0, c0, params["Wx"], params["Wh"], params["b"]])
    for name, a, n in zip(["x", "h0", "c0", "Wx", "Wh", "b"],
                          [dx, dh0, dc0, grads["Wx"], grads["Wh"], grads["b"]], num):
        np.testing.assert_allclose(a, n, rtol=1e-6, atol=1e-8, err_msg=name)


def test_gradcheck_in_sequential(rng):
    model = F.Sequential(F.LSTM(3, 4), F.Tanh(), F.LSTM(4, 5, return_sequences=False),
                         F.Dense(5, 2))
    params = F.init(model, seed=3, dtype=np.float64)
    x = rng.standard_normal((4, 2, 3))
    rep = F.gradcheck(model, params, x, rng.integers(0, 2, 2), F.losses.softmax_cross_entropy)
    assert rep.passed(1e-6), str(rep)


def test_init_layout_and_forget_bias(rng):
    p = F.LSTM(3, 5).init(rng, np.float32)
    assert {k: v.shape for k, v in p.items()} == {"Wx": (3, 20), "Wh": (5, 20), "b": (20,)}
    assert all(v.dtype == np.float32 and v.flags.c_contiguous for v in p.values())
    np.testing.assert_array_equal(p["b"][5:10], 1)
    np.testing.assert_array_equal(np.delete(p["b"], np.s_[5:10]), 0)
    for k in range(4):                                    # orthogonal recurrent blocks
        blk = p["Wh"][:, 5 * k:5 * (k + 1)].astype(np.float64)
        np.testing.assert_allclose(blk.T @ blk, np.eye(5), atol=1e-6)
    assert not F.LSTM(3, 5, forget_bias=0).init(rng)["b"].any()


def test_plain_input_means_zero_state(rng):
    layer = F.LSTM(3, 4, return_sequences=False)
    params = layer.init(rng, np.float64)
    x = rng.standard_normal((5, 2, 3))
    y, cache = layer.forward(params, x)
    y0, cache0 = layer.forward(params, (x, (np.zeros((2, 4)), np.zeros((2, 4)))))
    yn, _ = layer.forward(params, (x, None))
    np.testing.assert_array_equal(y, y0)
    np.testing.assert_array_equal(y, yn)
    np.testing.assert_array_equal(final_state(cache)[0], y)
    dy = rng.standard_normal(y.shape)
    dx, _ = layer.backward(params, cache, dy)
    (dx0, (dh0, dc0)), _ = layer.backward(params, cache0, dy)
    np.testing.assert_array_equal(dx, dx0)


@pytest.mark.parametrize("return_sequences", [True, False])
def test_truncated_bptt_pieces_equal_whole_sequence(return_sequences, rng):
    model = F.Sequential(F.LSTM(3, 4, return_sequences=return_sequences), F.Dense(4, 2))
    params = F.init(model, seed=1, dtype=np.float64)
    x = rng.standard_normal((7, 2, 3))
    state = (rng.standard_normal((2, 4)), rng.standard_normal((2, 4)))
    y, cache = F.forward(model, params, (x, state))
    y1, c1 = F.forward(model, params, (x[:3], state))
    y2, c2 = F.forward(model, params, (x[3:], final_state(c1)))
    np.testing.assert_allclose(np.concatenate([y1, y2]) if return_sequences else y2, y, rtol=1e-13)
    dy = rng.standard_normal(y.shape)
    (dx, (dh0, dc0)), grads = F.backward(model, params, cache, dy)
    (dx2, ds), g2 = F.backward(model, params, c2, dy[3:] if return_sequences else dy)
    dy1 = model[1].backward(params[1], c1[1], dy[:3])[0] if return_sequences else None
    (dx1, (dh01, dc01)), g1 = model[0].backward(params[0], c1[0], (dy1, ds))
    np.testing.assert_allclose(np.concatenate([dx1, dx2]), dx, rtol=1e-11, atol=1e-13)
    np.testing.assert_allclose(dh01, dh0, rtol=1e-11, atol=1e-13)
    np.testing.assert_allclose(dc01, dc0, rtol=1e-11, atol=1e-13)
    for k in grads[0]:
        np.testing.assert_allclose(g1[k] + g2[0][k], grads[0][k], rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtype_preserved_and_float32_close(dtype, rng):
    layer = F.LSTM(3, 6)
    p64 = layer.init(rng, np.float64)
    params = {k: v.astype(dtype) for k, v in p64.items()}
    x = rng.standard_normal((5, 4, 3))
    y, cache = layer.forward(params, (x.astype(dtype), None))
    (dx, (dh0, dc0)), grads = layer.backward(params, cache, np.ones(y.shape, dtype))
    for a in (y, dx, dh0, dc0, *grads.values(), *final_state(cache)):
        assert a.dtype == dtype
    y64, c64 = layer.forward(p64, x)
    g64 = layer.backward(p64, c64, np.ones(y.shape))[1]
    np.testing.assert_allclose(y, y64, rtol=1e-5, atol=1e-6)
    for k in grads:
        np.testing.assert_allclose(grads[k], g64[k], rtol=1e-4, atol=1e-5)


def test_inputs_not_mutated_and_cache_reusable(rng):
    layer = F.LSTM(3, 4)
    params = layer.init(rng, np.float64)
    x = rng.standard_normal((3, 2, 3))
    st = (rng.standard_normal((2, 4)), rng.standard_normal((2, 4)))
    dy, ds = rng.standard_normal((3, 2, 4)), (rng.standard_normal((2, 4)), rng.standard_normal((2, 4)))
    arrays = (x, *st, dy, *ds, *params.values())
    saved = [a.copy() for a in arrays]
    y, cache = layer.forward(params, (x, st))
    a = layer.backward(params, cache, (dy, ds))
    b = layer.backward(params, cache, (dy, ds))
    np.testing.assert_array_equal(a[1]["Wh"], b[1]["Wh"])
    for arr, s in zip(arrays, saved):
        np.testing.assert_array_equal(arr, s)


def test_extreme_inputs_stay_finite(rng):
    layer = F.LSTM(2, 3)
    params = layer.init(rng, np.float32)
    x = np.full((4, 2, 2), 1e4, np.float32)
    x[:, 1] = -1e4
    y, cache = layer.forward(params, x)
    dx, g = layer.backward(params, cache, np.ones_like(y))
    assert np.isfinite(y).all() and np.isfinite(dx).all()
    assert all(np.isfinite(v).all() for v in g.values())
    x[0, 0, 0] = np.nan
    assert np.isnan(layer.forward(params, x)[0][:, 0]).all()


# ---------------------------------------------------------------- errors
def test_error_messages(rng):
    layer = F.LSTM(3, 4)
    p = layer.init(rng, np.float32)
    x = np.zeros((2, 1, 3), np.float32)
    z = np.zeros((1, 4), np.float32)
    with pytest.raises(ValueError, match=r"LSTM\(3, 4\): expected input \(T, N, 3\).*got \(2, 3\)"):
        layer.forward(p, np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match=r"expected parameter Wx of shape \(3, 16\), got \(3, 4\)"):
        layer.forward({**p, "Wx": np.zeros((3, 4), np.float32)}, x)
    with pytest.raises(ValueError, match=r"expected state as a pair \(h0, c0\)"):
        layer.forward(p, (x, z))
    with pytest.raises(ValueError, match=r"expected c0 of shape \(1, 4\), got \(1, 5\)"):
        layer.forward(p, (x, (z, np.zeros((1, 5), np.float32))))
    with pytest.raises(TypeError, match="c0 dtype float64"):
        layer.forward(p, (x, (z, np.zeros((1, 4)))))
    with pytest.raises(TypeError, match="parameter 'b' dtype float64"):
        layer.forward({**p, "b": p["b"].astype(np.float64)}, x)
    with pytest.raises(TypeError, match="expected a float32 or float64 input"):
        layer.forward(p, np.zeros((2, 1, 3), np.int64))
    y, cache = layer.forward(p, x)
    with pytest.raises(ValueError, match=r"gradient of the final c of shape \(1, 4\)"):
        layer.backward(p, cache, (y, (z, np.zeros((2, 4), np.float32))))
    with pytest.raises(ValueError, match="cache does not come from LSTM.forward"):
        layer.backward(p, F.RNN(3, 4).forward(F.RNN(3, 4).init(rng), x)[1], y)
