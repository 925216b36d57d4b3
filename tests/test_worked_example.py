"""The classic worked backprop example, checked against chain-rule arithmetic written out
by hand: 3 inputs -> 2 ReLU units -> 2 sigmoid units -> 1 identity output, no biases,
squared error on one data point, then one SGD step."""
import math

import numpy as np

import fastbp as F

X = (1.0, 0.5, -1.0)
T = 0.25                               # target
W1 = ((0.1, -0.3), (0.2, 0.4), (-0.5, 0.6))   # (3, 2): unit 2 ends up inactive (z < 0)
W2 = ((0.7, -0.2), (0.3, 0.9))               # (2, 2)
W3 = ((1.5,), (-1.1,))                       # (2, 1)
LR = 0.1


def sig(z):
    return 1.0 / (1.0 + math.exp(-z))


def by_hand():
    x1, x2, x3 = X
    # forward, one scalar at a time
    z11 = x1 * W1[0][0] + x2 * W1[1][0] + x3 * W1[2][0]
    z12 = x1 * W1[0][1] + x2 * W1[1][1] + x3 * W1[2][1]
    h11, h12 = max(z11, 0.0), max(z12, 0.0)
    z21 = h11 * W2[0][0] + h12 * W2[1][0]
    z22 = h11 * W2[0][1] + h12 * W2[1][1]
    h21, h22 = sig(z21), sig(z22)
    y = h21 * W3[0][0] + h22 * W3[1][0]
    loss = (y - T) ** 2
    # backward: local gradient times upstream gradient, layer by layer
    dy = 2.0 * (y - T)
    dW3 = ((h21 * dy,), (h22 * dy,))
    dh21, dh22 = W3[0][0] * dy, W3[1][0] * dy
    dz21, dz22 = dh21 * h21 * (1 - h21), dh22 * h22 * (1 - h22)
    dW2 = ((h11 * dz21, h11 * dz22), (h12 * dz21, h12 * dz22))
    dh11 = W2[0][0] * dz21 + W2[0][1] * dz22        # gradients add at the branch
    dh12 = W2[1][0] * dz21 + W2[1][1] * dz22
    dz11 = dh11 * (1.0 if z11 > 0 else 0.0)
    dz12 = dh12 * (1.0 if z12 > 0 else 0.0)
    dW1 = ((x1 * dz11, x1 * dz12), (x2 * dz11, x2 * dz12), (x3 * dz11, x3 * dz12))
    return dict(z1=(z11, z12), y=y, loss=loss, dW1=dW1, dW2=dW2, dW3=dW3)


def model_and_params():
    model = F.Sequential(F.Dense(3, 2, bias=False), F.ReLU(), F.Dense(2, 2, bias=False),
                         F.Sigmoid(), F.Dense(2, 1, bias=False), F.Identity())
    params = [{"W": np.array(W1)}, {}, {"W": np.array(W2)}, {}, {"W": np.array(W3)}, {}]
    return model, params


def test_setup_has_an_inactive_relu():
    z1 = by_hand()["z1"]
    assert z1[0] > 0 > z1[1]


def test_forward_backward_match_hand_arithmetic():
    hand = by_hand()
    model, params = model_and_params()
    x = np.array([X])
    y, cache = F.forward(model, params, x)
    loss, dy = F.losses.mse(y, np.array([[T]]))
    np.testing.assert_allclose(y[0, 0], hand["y"], rtol=1e-14)
    np.testing.assert_allclose(loss, hand["loss"], rtol=1e-14)
    _, grads = F.backward(model, params, cache, dy)
    np.testing.assert_allclose(grads[0]["W"], hand["dW1"], rtol=1e-13, atol=1e-16)
    np.testing.assert_allclose(grads[2]["W"], hand["dW2"], rtol=1e-13, atol=1e-16)
    np.testing.assert_allclose(grads[4]["W"], hand["dW3"], rtol=1e-13, atol=1e-16)
    # the inactive ReLU unit gets no gradient into its incoming weights
    assert np.all(grads[0]["W"][:, 1] == 0.0)


def test_one_sgd_step_updates_every_weight_as_the_arithmetic_says():
    hand = by_hand()
    model, params = model_and_params()
    y, cache = F.forward(model, params, np.array([X]))
    _, dy = F.losses.mse(y, np.array([[T]]))
    _, grads = F.backward(model, params, cache, dy)
    opt = F.optim.sgd(LR)
    new, _ = opt.update(params, grads, opt.init(params))
    for layer, (W, dW) in {0: (W1, hand["dW1"]), 2: (W2, hand["dW2"]), 4: (W3, hand["dW3"])}.items():
        expected = [[w - LR * g for w, g in zip(rw, rg)] for rw, rg in zip(W, dW)]
        np.testing.assert_allclose(new[layer]["W"], expected, rtol=1e-14)
    np.testing.assert_array_equal(params[0]["W"], np.array(W1))   # update is pure
    # and the step lowers the loss on this data point
    y2, _ = F.forward(model, new, np.array([X]))
    assert (y2[0, 0] - T) ** 2 < hand["loss"]


def test_gradcheck_agrees():
    model, params = model_and_params()
    rep = F.gradcheck(model, params, np.array([X]), np.array([[T]]), F.losses.mse)
    assert rep.passed(1e-7), str(rep)
