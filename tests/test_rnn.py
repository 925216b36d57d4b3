"""RNN: kernels and layer against plain loops, finite differences, cell loops; states; errors."""
import numpy as np
import pytest

import fastbp as F
from fastbp.kernels import rnn as K
from fastbp.layers.recurrent import final_state

import naive_recurrent as NV
from fd import central_diffs

SHAPES = [(1, 1, 3, 4), (1, 3, 3, 4), (4, 1, 3, 4), (5, 3, 2, 4)]   # T, N, D, H
ids = lambda s: "T{}N{}D{}H{}".format(*s)  # noqa: E731


def _weights(rng, D, H, dtype=np.float64, scale=0.5):
    return [(scale * rng.standard_normal(s)).astype(dtype) for s in ((D, H), (H, H), (H,))]


def _relu_safe(x, h0, Wx, Wh, b):
    """Nudge the biases so no pre-activation sits within 0.05 of relu's kink (for FD)."""
    for _ in range(50):
        hs = NV.rnn_forward(x, h0, Wx, Wh, b, relu=True)
        a = [x[t] @ Wx + (hs[t - 1] if t else h0) @ Wh + b for t in range(len(x))]
        if min(np.abs(v).min() for v in a) > 0.05:
            return b
        b = b + 0.1
    return b


# ---------------------------------------------------------------- kernels
@pytest.mark.parametrize("shape", SHAPES + [(2, 12, 3, 5), (2, 32, 3, 96)], ids=ids)
@pytest.mark.parametrize("relu", [False, True], ids=["tanh", "relu"])
def test_sequence_kernels_match_plain_loops(shape, relu, rng):
    T, N, D, H = shape
    x = rng.standard_normal((T, N, D))
    h0 = rng.standard_normal((N, H))
    Wx, Wh, b = _weights(rng, D, H)
    hs = K.rnn_forward(x, h0, Wx, Wh, b, relu)
    np.testing.assert_allclose(hs, NV.rnn_forward(x, h0, Wx, Wh, b, relu), rtol=1e-12, atol=1e-13)
    dhs, dhT = rng.standard_normal((T, N, H)), rng.standard_normal((N, H))
    got = K.rnn_backward(x, h0, hs, Wx, Wh, dhs, dhT, relu, True)
    ref = NV.rnn_backward(x, h0, hs, Wx, Wh, dhs, dhT, relu)
    for name, a, r in zip(["dx", "dh0", "dWx", "dWh", "db"], got, ref):
        np.testing.assert_allclose(a, r, rtol=1e-11, atol=1e-12, err_msg=name)
    # only the final state used: dhs of shape (0, N, H)
    got = K.rnn_backward(x, h0, hs, Wx, Wh, np.zeros((0, N, H)), dhT, relu, False)
    ref = NV.rnn_backward(x, h0, hs, Wx, Wh, np.zeros((T, N, H)), dhT, relu)
    assert got[0].shape == (0, 0, 0)
    for a, r in zip(got[1:], ref[1:]):
        np.testing.assert_allclose(a, r, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES, ids=ids)
@pytest.mark.parametrize("relu", [False, True], ids=["tanh", "relu"])
def test_sequence_equals_loop_over_cells(shape, relu, rng):
    T, N, D, H = shape
    x = rng.standard_normal((T, N, D))
    h0 = rng.standard_normal((N, H))
    Wx, Wh, b = _weights(rng, D, H)
    hs = K.rnn_forward(x, h0, Wx, Wh, b, relu)
    h, loop_hs = h0, []
    for t in range(T):
        h = K.rnn_cell_forward(x[t], h, Wx, Wh, b, relu)
        loop_hs.append(h)
    np.testing.assert_allclose(hs, np.stack(loop_hs), rtol=1e-13, atol=1e-14)

    dhs, dhT = rng.standard_normal((T, N, H)), rng.standard_normal((N, H))
    dx, dh0, dWx, dWh, db = K.rnn_backward(x, h0, hs, Wx, Wh, dhs, dhT, relu)
    g = dhT.copy()
    sums = [np.zeros_like(Wx), np.zeros_like(Wh), np.zeros_like(b)]
    dxs = np.zeros_like(x)
    for t in reversed(range(T)):
        hprev = loop_hs[t - 1] if t else h0
        dxs[t], g, *parts = K.rnn_cell_backward(x[t], hprev, loop_hs[t], Wx, Wh, g + dhs[t], relu)
        sums = [s + p for s, p in zip(sums, parts)]
    for a, r in zip([dx, dh0, *[dWx, dWh, db]], [dxs, g, *sums]):
        np.testing.assert_allclose(a, r, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("N", [1, 3])
@pytest.mark.parametrize("relu", [False, True], ids=["tanh", "relu"])
def test_cell_central_differences(N, relu, rng):
    D, H = 3, 4
    x, h = rng.standard_normal((N, D)), rng.standard_normal((N, H))
    Wx, Wh, b = _weights(rng, D, H)
    if relu:
        b = _relu_safe(x[None], h, Wx, Wh, b)
    R = rng.standard_normal((N, H))

    def loss():
        return float(np.sum(K.rnn_cell_forward(x, h, Wx, Wh, b, relu) * R))

    h_new = K.rnn_cell_forward(x, h, Wx, Wh, b, relu)
    got = K.rnn_cell_backward(x, h, h_new, Wx, Wh, R, relu)
    num = central_diffs(loss, [x, h, Wx, Wh, b])
    for a, n in zip(got, num):
        np.testing.assert_allclose(a, n, rtol=1e-6, atol=1e-8)


def test_serial_and_parallel_builds_agree(rng):
    T, N, D, H = 6, 5, 3, 7
    x, h0 = rng.standard_normal((T, N, D)), rng.standard_normal((N, H))
    Wx, Wh, b = _weights(rng, D, H)
    for relu in (False, True):
        a = K._rnn_forward.serial(x, h0, Wx, Wh, b, relu)
        np.testing.assert_array_equal(a, K._rnn_forward.parallel(x, h0, Wx, Wh, b, relu))
        args = (x, h0, a, Wx, Wh, rng.standard_normal((T, N, H)), rng.standard_normal((N, H)),
                relu, True)
        for p, q in zip(K._rnn_backward.serial(*args), K._rnn_backward.parallel(*args)):
            np.testing.assert_array_equal(p, q)


# ---------------------------------------------------------------- layer
def _layer_fd_check(layer, params, x, state, rng, with_dstate):
    """Backward of ``layer`` on input (x, state) vs central differences of
    L = Σ y⊙R (+ Σ hT⊙Rs when with_dstate)."""
    y, cache = layer.forward(params, (x, state))
    R = rng.standard_normal(y.shape)
    Rs = rng.standard_normal(state.shape) if with_dstate else None

    def loss():
        yy, c = layer.forward(params, (x, state))
        out = np.sum(yy * R)
        if with_dstate:
            out += np.sum(final_state(c) * Rs)
        return float(out)

    (dx, dh0), grads = layer.backward(params, cache, (R, Rs) if with_dstate else R)
    num = central_diffs(loss, [x, state, params["Wx"], params["Wh"], params["b"]])
    for name, a, n in zip(["x", "h0", "Wx", "Wh", "b"],
                          [dx, dh0, grads["Wx"], grads["Wh"], grads["b"]], num):
        np.testing.assert_allclose(a, n, rtol=1e-6, atol=1e-8, err_msg=name)


@pytest.mark.parametrize("shape", SHAPES, ids=ids)
@pytest.mark.parametrize("return_sequences", [True, False])
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_layer_central_differences(shape, return_sequences, nonlinearity, rng):
    T, N, D, H = shape
    layer = F.RNN(D, H, nonlinearity=nonlinearity, return_sequences=return_sequences)
    params = layer.init(rng, np.float64)
    params["b"] = 0.3 * rng.standard_normal(H)
    x, h0 = rng.standard_normal((T, N, D)), rng.standard_normal((N, H))
    if nonlinearity == "relu":
        params["b"] = _relu_safe(x, h0, params["Wx"], params["Wh"], params["b"])
    _layer_fd_check(layer, params, x, h0, rng, with_dstate=False)
    _layer_fd_check(layer, params, x, h0, rng, with_dstate=True)


def test_plain_input_means_zero_state_and_plain_dx(rng):
    layer = F.RNN(3, 4)
    params = layer.init(rng, np.float64)
    x = rng.standard_normal((5, 2, 3))
    y, cache = layer.forward(params, x)
    y0, cache0 = layer.forward(params, (x, np.zeros((2, 4))))
    yn, _ = layer.forward(params, (x, None))
    np.testing.assert_array_equal(y, y0)
    np.testing.assert_array_equal(y, yn)
    dy = rng.standard_normal(y.shape)
    dx, g = layer.backward(params, cache, dy)
    (dx0, dh0), g0 = layer.backward(params, cache0, dy)
    assert isinstance(dx, np.ndarray) and dh0.shape == (2, 4)
    np.testing.assert_array_equal(dx, dx0)
    for k in g:
        np.testing.assert_array_equal(g[k], g0[k])
    assert layer.backward(params, cache0, dy, input_grad=False)[0] is None


def test_last_step_output_is_last_of_sequence(rng):
    x = rng.standard_normal((4, 3, 2))
    full, last = F.RNN(2, 5), F.RNN(2, 5, return_sequences=False)
    params = full.init(rng, np.float64)
    y_full, c_full = full.forward(params, x)
    y_last, c_last = last.forward(params, x)
    np.testing.assert_array_equal(y_full[-1], y_last)
    np.testing.assert_array_equal(final_state(c_last), y_last)
    dy = rng.standard_normal((3, 5))
    dy_full = np.zeros((4, 3, 5))
    dy_full[-1] = dy
    a, ga = full.backward(params, c_full, dy_full)
    b, gb = last.backward(params, c_last, dy)
    np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-14)
    for k in ga:
        np.testing.assert_allclose(ga[k], gb[k], rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("return_sequences", [True, False])
def test_truncated_bptt_pieces_equal_whole_sequence(return_sequences, rng):
    """Forward in two chunks with the state carried equals one forward; backward of the
    second chunk, whose dh0 is fed to the first chunk as dstate_T, equals full BPTT."""
    model = F.Sequential(F.RNN(3, 4, return_sequences=return_sequences), F.Dense(4, 2))
    params = F.init(model, seed=1, dtype=np.float64)
    x, h0 = rng.standard_normal((6, 2, 3)), rng.standard_normal((2, 4))
    y, cache = F.forward(model, params, (x, h0))
    y1, c1 = F.forward(model, params, (x[:4], h0))
    y2, c2 = F.forward(model, params, (x[4:], final_state(c1)))
    if return_sequences:
        np.testing.assert_allclose(np.concatenate([y1, y2]), y, rtol=1e-13)
    else:
        np.testing.assert_allclose(y2, y, rtol=1e-13)
    dy = rng.standard_normal(y.shape)
    (dx, dh0), grads = F.backward(model, params, cache, dy)
    (dx2, ds), g2 = F.backward(model, params, c2, dy[4:] if return_sequences else dy)
    rec = model[0]
    dy1 = model[1].backward(params[1], c1[1], dy[:4])[0] if return_sequences else None
    (dx1, dh01), g1 = rec.backward(params[0], c1[0], (dy1, ds))
    np.testing.assert_allclose(np.concatenate([dx1, dx2]), dx, rtol=1e-11, atol=1e-13)
    np.testing.assert_allclose(dh01, dh0, rtol=1e-11, atol=1e-13)
    for k in grads[0]:
        np.testing.assert_allclose(g1[k] + g2[0][k], grads[0][k], rtol=1e-11, atol=1e-13)


def test_dense_after_rnn_applies_per_step(rng):
    model = F.Sequential(F.RNN(3, 4), F.Dense(4, 5))
    params = F.init(model, dtype=np.float64)
    x = rng.standard_normal((7, 2, 3))
    logits, cache = F.forward(model, params, x)
    assert logits.shape == (7, 2, 5)
    labels = rng.integers(0, 5, (7, 2))
    loss, dl = F.losses.softmax_cross_entropy(logits, labels)
    dx, grads = F.backward(model, params, cache, dl)
    assert dx.shape == x.shape and grads[0]["Wh"].shape == (4, 4)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtype_preserved_and_float32_close(dtype, rng):
    layer = F.RNN(3, 6)
    p64 = layer.init(rng, np.float64)
    params = {k: v.astype(dtype) for k, v in p64.items()}
    x = rng.standard_normal((5, 4, 3))
    y, cache = layer.forward(params, (x.astype(dtype), None))
    (dx, dh0), grads = layer.backward(params, cache, np.ones(y.shape, dtype))
    for a in (y, dx, dh0, *grads.values()):
        assert a.dtype == dtype
    y64, c64 = layer.forward(p64, x)
    g64 = layer.backward(p64, c64, np.ones(y.shape))[1]
    np.testing.assert_allclose(y, y64, rtol=1e-5, atol=1e-6)
    for k in grads:
        np.testing.assert_allclose(grads[k], g64[k], rtol=1e-4, atol=1e-5)


def test_inputs_not_mutated(rng):
    layer = F.RNN(3, 4)
    params = layer.init(rng, np.float64)
    x, h0 = rng.standard_normal((3, 2, 3)), rng.standard_normal((2, 4))
    dy, ds = rng.standard_normal((3, 2, 4)), rng.standard_normal((2, 4))
    saved = [a.copy() for a in (x, h0, dy, ds, *params.values())]
    y, cache = layer.forward(params, (x, h0))
    layer.backward(params, cache, (dy, ds))
    layer.backward(params, cache, (dy, ds))        # a cache can be used twice
    for a, s in zip((x, h0, dy, ds, *params.values()), saved):
        np.testing.assert_array_equal(a, s)


def test_non_contiguous_inputs(rng):
    layer = F.RNN(3, 4)
    params = layer.init(rng, np.float64)
    params_t = {"Wx": np.asfortranarray(params["Wx"]), "Wh": params["Wh"].T.copy().T,
                "b": params["b"]}
    x = rng.standard_normal((2, 3, 5)).transpose(0, 2, 1)        # (2, 5, 3), strided
    y, c = layer.forward(params, np.ascontiguousarray(x))
    yt, ct = layer.forward(params_t, x)
    np.testing.assert_array_equal(y, yt)


# ---------------------------------------------------------------- errors
def test_error_messages(rng):
    layer = F.RNN(3, 4)
    p = layer.init(rng, np.float32)
    with pytest.raises(ValueError, match=r"RNN\(3, 4\): expected input \(T, N, 3\).*got \(2, 3\)"):
        layer.forward(p, np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match=r"RNN\(3, 4\): expected input \(T, N, 3\).*got \(2, 1, 5\)"):
        layer.forward(p, np.zeros((2, 1, 5), np.float32))
    with pytest.raises(ValueError, match=r"expected h0 of shape \(1, 4\), got \(2, 4\)"):
        layer.forward(p, (np.zeros((2, 1, 3), np.float32), np.zeros((2, 4), np.float32)))
    with pytest.raises(TypeError, match="does not match parameters dtype float32"):
        layer.forward(p, np.zeros((2, 1, 3)))
    with pytest.raises(TypeError, match="h0 dtype float64"):
        layer.forward(p, (np.zeros((2, 1, 3), np.float32), np.zeros((1, 4))))
    with pytest.raises(ValueError, match="pair"):
        layer.forward(p, (np.zeros((2, 1, 3), np.float32), None, None))
    with pytest.raises(ValueError, match="expected parameter Wh of shape"):
        layer.forward({**p, "Wh": np.zeros((4, 5), np.float32)}, np.zeros((2, 1, 3), np.float32))
    with pytest.raises(ValueError, match="nonlinearity"):
        F.RNN(3, 4, nonlinearity="sigmoid")
    with pytest.raises(ValueError, match="hidden_size must be a positive int"):
        F.RNN(3, 0)
    y, cache = layer.forward(p, np.zeros((2, 1, 3), np.float32))
    with pytest.raises(ValueError, match=r"expected output gradient of shape \(2, 1, 4\)"):
        layer.backward(p, cache, np.zeros((1, 4), np.float32))
    with pytest.raises(ValueError, match="cache does not come from RNN.forward"):
        layer.backward(p, [cache], y)
    with pytest.raises(ValueError, match="final_state: no RNN or LSTM cache"):
        final_state([None, "x"])
