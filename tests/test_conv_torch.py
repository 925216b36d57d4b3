"""PyTorch conv2d / max_pool2d / avg_pool2d autograd as an oracle (skipped without torch)."""
import numpy as np
import pytest

from fastbp.kernels import conv as K
from fastbp.layers import AvgPool2D, Conv2D, MaxPool2D

torch = pytest.importorskip("torch")
TF = torch.nn.functional

TOL = {np.float64: dict(rtol=1e-10, atol=1e-11), np.float32: dict(rtol=1e-4, atol=1e-4)}
DTYPES = [np.float64, np.float32]


def _t(a, grad=False):
    return torch.tensor(np.array(a), requires_grad=grad)


def close(a, b, dtype):
    assert a.dtype == dtype
    np.testing.assert_allclose(a, b.detach().numpy(), **TOL[dtype])


CONV_CASES = [
    # N, C, F, (H, W), kernel, stride, padding
    (2, 1, 4, (9, 9), 3, 1, 0),
    (3, 3, 5, (8, 11), (3, 2), 2, 1),
    (1, 5, 2, (7, 6), (1, 4), (2, 1), (0, 2)),
    (4, 8, 6, (10, 10), 5, 1, 2),
    (2, 16, 8, (6, 7), 3, 3, 1),
    (2, 4, 3, (5, 5), 5, 1, 0),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["auto", "direct", "gemm"])
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"N{c[0]}C{c[1]}F{c[2]}k{c[4]}s{c[5]}p{c[6]}")
def test_conv2d_vs_torch(case, method, dtype, rng):
    N, C, F, (H, W), k, s, p = case
    layer = Conv2D(C, F, k, stride=s, padding=p)
    params = layer.init(rng, dtype)
    params["b"] = rng.standard_normal(F).astype(dtype)
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    if method == "auto":
        y, cache = layer.forward(params, x)
        dy = rng.standard_normal(y.shape).astype(dtype)
        dx, grads = layer.backward(params, cache, dy)
        dW, db = grads["W"], grads["b"]
    else:
        y = K.conv2d_forward(x, params["W"], params["b"], s, p, False, method)
        dy = rng.standard_normal(y.shape).astype(dtype)
        dx, dW, db = K.conv2d_backward(x, params["W"], dy, s, p, True, True, None, method)
    xt, Wt, bt = _t(x, True), _t(params["W"], True), _t(params["b"], True)
    yt = TF.conv2d(xt, Wt, bt, stride=s, padding=p)
    yt.backward(_t(dy))
    close(y, yt, dtype)
    close(dx, xt.grad, dtype)
    close(dW, Wt.grad, dtype)
    close(db, bt.grad, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size,stride", [(2, None), (3, 2), ((2, 3), (1, 2)), (2, 1)])
def test_pools_vs_torch(size, stride, dtype, rng):
    # small integers: many ties, so the arg-max choice is tested against PyTorch's
    x = rng.integers(0, 3, size=(2, 3, 8, 7)).astype(dtype)
    for layer, fn in ((MaxPool2D(size, stride), TF.max_pool2d), (AvgPool2D(size, stride), TF.avg_pool2d)):
        y, cache = layer.forward({}, x)
        dy = rng.standard_normal(y.shape).astype(dtype)
        dx, _ = layer.backward({}, cache, dy)
        xt = _t(x, True)
        yt = fn(xt, size, stride)
        yt.backward(_t(dy))
        close(y, yt, dtype)
        close(dx, xt.grad, dtype)


def test_maxpool_nan_vs_torch():
    x = np.arange(32.0).reshape(1, 2, 4, 4)
    x[0, 0, 0, 1] = x[0, 0, 1, 0] = np.nan
    x[0, 1, 2, 2] = np.nan
    layer = MaxPool2D(2)
    y, cache = layer.forward({}, x)
    dx, _ = layer.backward({}, cache, np.ones_like(y))
    xt = _t(x, True)
    yt = TF.max_pool2d(xt, 2)
    yt.backward(torch.ones_like(yt))
    np.testing.assert_array_equal(np.isnan(y), np.isnan(yt.detach().numpy()))
    np.testing.assert_array_equal(dx, xt.grad.numpy())
