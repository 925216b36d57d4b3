"""Plain NumPy loop references for the RNN and LSTM, forward and BPTT backward.

Written for clarity, straight from the textbook formulas, with per-step weight-gradient
accumulation (no stored-then-GEMM trick) so they check the kernels independently.
Shapes: x (T, N, D), states (N, H); RNN Wx (D, H), Wh (H, H), b (H,);
LSTM Wx (D, 4H), Wh (H, 4H), b (4H,), gates in the order i, f, g, o.
"""
import numpy as np


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def rnn_forward(x, h0, Wx, Wh, b, relu=False):
    """Returns hs (T, N, H): h_t = f(x_t Wx + h_{t-1} Wh + b)."""
    hs = []
    h = h0
    for t in range(x.shape[0]):
        a = x[t] @ Wx + h @ Wh + b
        h = np.maximum(a, 0) if relu else np.tanh(a)
        hs.append(h)
    return np.stack(hs)


def rnn_backward(x, h0, hs, Wx, Wh, dhs, dhT, relu=False):
    """dhs (T, N, H) gradient at every h_t (zeros where unused), dhT at the final state.

    Returns dx, dh0, dWx, dWh, db."""
    T = x.shape[0]
    dx = np.zeros_like(x)
    dWx, dWh, db = np.zeros_like(Wx), np.zeros_like(Wh), np.zeros(Wx.shape[1], x.dtype)
    g = dhT.copy()
    for t in reversed(range(T)):
        g = g + dhs[t]
        h = hs[t]
        da = g * ((h > 0) if relu else (1 - h * h))
        hprev = hs[t - 1] if t > 0 else h0
        dWx += x[t].T @ da
        dWh += hprev.T @ da
        db += da.sum(0)
        dx[t] = da @ Wx.T
        g = da @ Wh.T
    return dx, g, dWx, dWh, db


def lstm_forward(x, h0, c0, Wx, Wh, b):
    """Returns hs, cs (T, N, H)."""
    H = h0.shape[1]
    h, c = h0, c0
    hs, cs = [], []
    for t in range(x.shape[0]):
        z = x[t] @ Wx + h @ Wh + b
        i, f = sigmoid(z[:, :H]), sigmoid(z[:, H:2 * H])
        g, o = np.tanh(z[:, 2 * H:3 * H]), sigmoid(z[:, 3 * H:])
        c = i * g + f * c
        h = o * np.tanh(c)
        hs.append(h)
        cs.append(c)
    return np.stack(hs), np.stack(cs)


def lstm_backward(x, h0, c0, Wx, Wh, b, dhs, dhT, dcT):
    """Recomputes the forward pass, then BPTT. Returns dx, dh0, dc0, dWx, dWh, db."""
    H = h0.shape[1]
    T = x.shape[0]
    hs, cs = lstm_forward(x, h0, c0, Wx, Wh, b)
    dx = np.zeros_like(x)
    dWx, dWh, db = np.zeros_like(Wx), np.zeros_like(Wh), np.zeros_like(b)
    gh, gc = dhT.copy(), dcT.copy()
    for t in reversed(range(T)):
        hprev = hs[t - 1] if t > 0 else h0
        cprev = cs[t - 1] if t > 0 else c0
        z = x[t] @ Wx + hprev @ Wh + b
        i, f = sigmoid(z[:, :H]), sigmoid(z[:, H:2 * H])
        g, o = np.tanh(z[:, 2 * H:3 * H]), sigmoid(z[:, 3 * H:])
        tc = np.tanh(cs[t])
        gh = gh + dhs[t]
        dc = gc + gh * o * (1 - tc ** 2)
        dz = np.concatenate([dc * g * i * (1 - i), dc * cprev * f * (1 - f),
                             dc * i * (1 - g ** 2), gh * tc * o * (1 - o)], axis=1)
        dWx += x[t].T @ dz
        dWh += hprev.T @ dz
        db += dz.sum(0)
        dx[t] = dz @ Wx.T
        gh = dz @ Wh.T
        gc = dc * f
    return dx, gh, gc, dWx, dWh, db
