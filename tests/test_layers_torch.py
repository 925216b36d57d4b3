"""PyTorch autograd as an oracle: the same weights give the same outputs and gradients.

Each test skips cleanly when torch is not installed.
"""
import numpy as np
import pytest

import fastbp as F

TOL = {np.float64: dict(rtol=1e-10, atol=1e-12), np.float32: dict(rtol=2e-5, atol=2e-6)}
DTYPES = [np.float64, np.float32]


def _torch():
    return pytest.importorskip("torch")


def t(a, grad=False):
    torch = _torch()
    return torch.tensor(np.array(a), requires_grad=grad)


def close(a, b, dtype):
    b = b.detach().numpy() if hasattr(b, "detach") else b
    assert a.dtype == dtype
    np.testing.assert_allclose(a, b, **TOL[dtype])


def torch_grads(fn, x, dy, *params):
    """Run ``y = fn(x, *params)`` in torch and backprop ``dy``. Returns y, dx, [dparams]."""
    xt = t(x, grad=True)
    pt = [t(p, grad=True) for p in params]
    y = fn(xt, *pt)
    y.backward(t(dy))
    return y, xt.grad, [p.grad for p in pt]


def off_kinks(x, margin=0.1):
    return np.where(x >= 0, x + margin, x - margin)


# ---------------------------------------------------------------- dense
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(6,), (5, 6), (3, 4, 6), (2, 2, 3, 6)], ids=lambda s: f"x{s}")
@pytest.mark.parametrize("bias", [True, False])
def test_dense_vs_nn_linear(shape, bias, dtype, rng):
    torch = _torch()
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 4, bias=bias).to(torch.float64 if dtype == np.float64 else torch.float32)
    # W = weight.T (a transposed view, not C-contiguous: the layer must cope)
    params = {"W": lin.weight.detach().numpy().T}
    if bias:
        with torch.no_grad():
            lin.bias.normal_()
        params["b"] = lin.bias.detach().numpy().copy()
    x = rng.standard_normal(shape).astype(dtype)
    dy = rng.standard_normal(shape[:-1] + (4,)).astype(dtype)
    layer = F.Dense(6, 4, bias=bias)
    y, cache = layer.forward(params, x)
    dx, grads = layer.backward(params, cache, dy)

    xt = t(x, grad=True)
    yt = lin(xt)
    yt.backward(t(dy))
    close(y, yt, dtype)
    close(dx, xt.grad, dtype)
    close(grads["W"], lin.weight.grad.T, dtype)
    if bias:
        close(grads["b"], lin.bias.grad, dtype)
    else:
        assert set(grads) == {"W"}


# ---------------------------------------------------------------- activations
def _torch_fns():
    torch = _torch()
    fn = torch.nn.functional
    return {
        "sigmoid": (F.Sigmoid(), torch.sigmoid),
        "tanh": (F.Tanh(), torch.tanh),
        "relu": (F.ReLU(), torch.relu),
        "leaky_relu": (F.LeakyReLU(), lambda x: fn.leaky_relu(x, 0.01)),
        "leaky_relu_0.3": (F.LeakyReLU(0.3), lambda x: fn.leaky_relu(x, 0.3)),
        "elu": (F.ELU(), lambda x: fn.elu(x, 1.0)),
        "elu_0.5": (F.ELU(0.5), lambda x: fn.elu(x, 0.5)),
        "gelu": (F.GELU(), lambda x: fn.gelu(x, approximate="tanh")),
        "identity": (F.Identity(), lambda x: x * 1),
        "softmax": (F.Softmax(), lambda x: torch.softmax(x, dim=-1)),
        "flatten": (F.Flatten(), lambda x: torch.flatten(x, 1)),
    }


ACT_NAMES = ["sigmoid", "tanh", "relu", "leaky_relu", "leaky_relu_0.3", "elu", "elu_0.5", "gelu",
             "identity", "softmax", "flatten"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 7), (2, 3, 4)], ids=lambda s: f"x{s}")
@pytest.mark.parametrize("name", ACT_NAMES)
def test_activation_vs_torch(name, shape, dtype, rng):
    layer, fn = _torch_fns()[name]
    x = off_kinks(3 * rng.standard_normal(shape)).astype(dtype)
    y, cache = layer.forward({}, x)
    dy = rng.standard_normal(y.shape).astype(dtype)
    dx, grads = layer.backward({}, cache, dy)
    yt, dxt, _ = torch_grads(fn, x, dy)
    assert grads == {}
    close(y, yt, dtype)
    close(dx, dxt, dtype)


@pytest.mark.parametrize("name", ["relu", "leaky_relu", "leaky_relu_0.3", "elu", "elu_0.5"])
def test_kink_subgradient_matches_torch(name):
    """At exactly x = 0 the chosen subgradient is PyTorch's."""
    layer, fn = _torch_fns()[name]
    x = np.array([0.0, -0.0, 1.0, -1.0])
    y, cache = layer.forward({}, x)
    dy = np.array([1.0, 2.0, 3.0, 4.0])
    dx = layer.backward({}, cache, dy)[0]
    yt, dxt, _ = torch_grads(fn, x, dy)
    close(y, yt, np.float64)
    close(dx, dxt, np.float64)


# ---------------------------------------------------------------- maxout
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pieces", [1, 2, 3])
def test_maxout_vs_torch(pieces, dtype, rng):
    layer = F.Maxout(5, 4, pieces=pieces)
    params = {"W": rng.standard_normal((5, 4 * pieces)).astype(dtype),
              "b": rng.standard_normal(4 * pieces).astype(dtype)}
    x = rng.standard_normal((2, 3, 5)).astype(dtype)
    dy = rng.standard_normal((2, 3, 4)).astype(dtype)
    y, cache = layer.forward(params, x)
    dx, grads = layer.backward(params, cache, dy)

    def maxout(x, W, b):   # the P pieces of output o are contiguous: columns o·P .. o·P + P − 1
        z = x @ W + b
        return z.reshape(z.shape[:-1] + (4, pieces)).max(dim=-1).values

    yt, dxt, (dWt, dbt) = torch_grads(maxout, x, dy, params["W"], params["b"])
    close(y, yt, dtype)
    close(dx, dxt, dtype)
    close(grads["W"], dWt, dtype)
    close(grads["b"], dbt, dtype)


# ---------------------------------------------------------------- dropout, noisy relu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rate", [0.2, 0.5])
def test_dropout_vs_torch_with_same_mask(rate, dtype, rng):
    torch = _torch()
    x = rng.standard_normal((6, 9)).astype(dtype)
    dy = rng.standard_normal((6, 9)).astype(dtype)
    layer = F.Dropout(rate)
    y, cache = layer.forward({}, x, train=True, rng=np.random.default_rng(3))
    dx = layer.backward({}, cache, dy)[0]
    # the layer keeps unit i when u_i < 1 − rate, u = rng.random(n) in the input's dtype
    mask = np.random.default_rng(3).random(x.size, dtype=dtype).reshape(x.shape) < 1 - rate
    assert 0 < mask.sum() < mask.size
    m = torch.tensor(mask.astype(dtype))
    # what torch's dropout does with its Bernoulli mask: x · (mask / (1 − p))
    yt, dxt, _ = torch_grads(lambda a: a * (m / (1 - rate)), x, dy)
    close(y, yt, dtype)
    close(dx, dxt, dtype)
    # and torch's own dropout, eval mode, is the identity like ours
    close(layer.forward({}, x, train=False)[0],
          torch.nn.functional.dropout(t(x), rate, training=False), dtype)


def test_noisy_relu_vs_torch_with_same_noise(rng):
    torch = _torch()
    x = rng.standard_normal((5, 6))
    dy = rng.standard_normal((5, 6))
    layer = F.NoisyReLU(0.7)
    y, cache = layer.forward({}, x, train=True, rng=np.random.default_rng(8))
    dx = layer.backward({}, cache, dy)[0]
    noise = torch.tensor(0.7 * np.random.default_rng(8).standard_normal(30).reshape(5, 6))
    yt, dxt, _ = torch_grads(lambda a: torch.relu(a + noise), x, dy)
    close(y, yt, np.float64)
    close(dx, dxt, np.float64)


# ---------------------------------------------------------------- a whole network
def _mlp_pair(dtype, torch):
    tdtype = torch.float64 if dtype == np.float64 else torch.float32
    torch.manual_seed(1)
    tmodel = torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.ReLU(),
        torch.nn.Linear(16, 12), torch.nn.Tanh(),
        torch.nn.Linear(12, 10), torch.nn.GELU(approximate="tanh"),
        torch.nn.Linear(10, 6), torch.nn.LeakyReLU(0.1),
        torch.nn.Linear(6, 5), torch.nn.Softmax(dim=-1)).to(tdtype)
    model = F.Sequential(F.Dense(8, 16), F.ReLU(), F.Dense(16, 12), F.Tanh(), F.Dense(12, 10),
                         F.GELU(), F.Dense(10, 6), F.LeakyReLU(0.1), F.Dense(6, 5), F.Softmax())
    params = []
    for mod in tmodel:
        if isinstance(mod, torch.nn.Linear):
            params.append({"W": mod.weight.detach().numpy().T.copy(),
                           "b": mod.bias.detach().numpy().copy()})
        else:
            params.append({})
    return tmodel, model, params


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 8), (3, 4, 8)], ids=lambda s: f"x{s}")
def test_mlp_vs_torch(shape, dtype, rng):
    torch = _torch()
    tmodel, model, params = _mlp_pair(dtype, torch)
    x = rng.standard_normal(shape).astype(dtype)
    dy = rng.standard_normal(shape[:-1] + (5,)).astype(dtype)
    y, cache = F.forward(model, params, x)
    dx, grads = F.backward(model, params, cache, dy)

    xt = t(x, grad=True)
    yt = tmodel(xt)
    yt.backward(t(dy))
    close(y, yt, dtype)
    close(dx, xt.grad, dtype)
    linears = [i for i, m in enumerate(tmodel) if isinstance(m, torch.nn.Linear)]
    for i, mod in enumerate(tmodel):
        if i in linears:
            close(grads[i]["W"], mod.weight.grad.T, dtype)
            close(grads[i]["b"], mod.bias.grad, dtype)
        else:
            assert grads[i] == {}


def test_flatten_dense_network_vs_torch(rng):
    torch = _torch()
    torch.manual_seed(2)
    tmodel = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 4), torch.nn.ELU(),
                                 torch.nn.Dropout(0.5)).double()
    tmodel.eval()
    model = F.Sequential(F.Flatten(), F.Dense(12, 4), F.ELU(), F.Dropout(0.5))
    params = [{}, {"W": tmodel[1].weight.detach().numpy().T.copy(),
                   "b": tmodel[1].bias.detach().numpy().copy()}, {}, {}]
    x = rng.standard_normal((3, 2, 3, 2))
    dy = rng.standard_normal((3, 4))
    y, cache = F.forward(model, params, x, train=False)
    dx, grads = F.backward(model, params, cache, dy)
    xt = t(x, grad=True)
    yt = tmodel(xt)
    yt.backward(t(dy))
    close(y, yt, np.float64)
    close(dx, xt.grad, np.float64)
    close(grads[1]["W"], tmodel[1].weight.grad.T, np.float64)
    close(grads[1]["b"], tmodel[1].bias.grad, np.float64)
