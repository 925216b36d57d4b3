"""PyTorch nn.RNN / nn.LSTM as an oracle: same weights, same outputs and gradients.

Weights map as Wx = weight_ihᵀ, Wh = weight_hhᵀ, b = bias_ih + bias_hh (the gate order
i, f, g, o is PyTorch's too). Skips cleanly when torch is not installed.
"""
import numpy as np
import pytest

import fastbp as F

torch = pytest.importorskip("torch")

TOL = {np.float64: dict(rtol=1e-10, atol=1e-12), np.float32: dict(rtol=2e-4, atol=2e-5)}
CASES = [(1, 1, 3, 4), (6, 1, 3, 5), (5, 3, 4, 6), (3, 4, 5, 48)]     # T, N, D, H


def _params(mod):
    p = {"Wx": mod.weight_ih_l0.detach().numpy().T, "Wh": mod.weight_hh_l0.detach().numpy().T,
         "b": (mod.bias_ih_l0 + mod.bias_hh_l0).detach().numpy()}
    return {k: np.ascontiguousarray(v) for k, v in p.items()}


def _close(a, b, dtype, name):
    assert a.dtype == dtype, name
    np.testing.assert_allclose(a, b.detach().numpy(), err_msg=name, **TOL[dtype])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "T{}N{}D{}H{}".format(*c))
@pytest.mark.parametrize("return_sequences", [True, False])
@pytest.mark.parametrize("kind", ["tanh", "relu", "lstm"])
def test_matches_torch(kind, return_sequences, case, dtype, rng):
    T, N, D, H = case
    tdt = torch.float64 if dtype == np.float64 else torch.float32
    torch.manual_seed(0)
    if kind == "lstm":
        mod = torch.nn.LSTM(D, H).to(tdt)
        layer = F.LSTM(D, H, return_sequences=return_sequences)
    else:
        mod = torch.nn.RNN(D, H, nonlinearity=kind).to(tdt)
        layer = F.RNN(D, H, nonlinearity=kind, return_sequences=return_sequences)
    params = _params(mod)
    x = rng.standard_normal((T, N, D)).astype(dtype)
    h0 = rng.standard_normal((N, H)).astype(dtype)
    c0 = rng.standard_normal((N, H)).astype(dtype)
    state = (h0, c0) if kind == "lstm" else h0

    xt = torch.tensor(x, requires_grad=True)
    h0t = torch.tensor(h0[None], requires_grad=True)
    c0t = torch.tensor(c0[None], requires_grad=True)
    out, hn = mod(xt, (h0t, c0t) if kind == "lstm" else h0t)
    y_t = out if return_sequences else out[-1]

    y, cache = layer.forward(params, (x, state))
    _close(y, y_t, dtype, "y")
    dy = rng.standard_normal(y.shape).astype(dtype)
    y_t.backward(torch.tensor(dy))
    (dx, dstate), grads = layer.backward(params, cache, dy)
    _close(dx, xt.grad, dtype, "dx")
    if kind == "lstm":
        _close(dstate[0], h0t.grad[0], dtype, "dh0")
        _close(dstate[1], c0t.grad[0], dtype, "dc0")
        hT, cT = F.final_state(cache)
        _close(cT, hn[1][0], dtype, "cT")
        _close(hT, hn[0][0], dtype, "hT")
    else:
        _close(dstate, h0t.grad[0], dtype, "dh0")
        _close(F.final_state(cache), hn[0], dtype, "hT")
    _close(grads["Wx"], mod.weight_ih_l0.grad.T, dtype, "dWx")
    _close(grads["Wh"], mod.weight_hh_l0.grad.T, dtype, "dWh")
    _close(grads["b"], mod.bias_ih_l0.grad, dtype, "db")
    _close(grads["b"], mod.bias_hh_l0.grad, dtype, "db (hh)")


def test_char_model_loss_matches_torch(rng):
    """Sequential(LSTM(V, H), Dense(H, V)) with per-step softmax cross-entropy."""
    T, N, V, H = 5, 3, 7, 6
    torch.manual_seed(1)
    lstm, lin = torch.nn.LSTM(V, H).double(), torch.nn.Linear(H, V).double()
    model = F.Sequential(F.LSTM(V, H), F.Dense(H, V))
    params = [_params(lstm), {"W": lin.weight.detach().numpy().T.copy(),
                              "b": lin.bias.detach().numpy().copy()}]
    x = np.eye(V)[rng.integers(0, V, (T, N))]
    labels = rng.integers(0, V, (T, N))
    logits, cache = F.forward(model, params, x)
    loss, dl = F.losses.softmax_cross_entropy(logits, labels)
    _, grads = F.backward(model, params, cache, dl, input_grad=False)

    lt = lin(lstm(torch.tensor(x))[0])
    ref = torch.nn.functional.cross_entropy(lt.reshape(-1, V), torch.tensor(labels).reshape(-1))
    ref.backward()
    np.testing.assert_allclose(loss, ref.item(), rtol=1e-12)
    np.testing.assert_allclose(grads[0]["Wh"], lstm.weight_hh_l0.grad.numpy().T, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(grads[1]["W"], lin.weight.grad.numpy().T, rtol=1e-9, atol=1e-12)
