"""Recurrent layers: ``RNN`` and ``LSTM`` over time-major sequences ``x (T, N, D)``.

Both run a whole sequence in one compiled call (``fastbp.kernels.rnn`` / ``.lstm``) and
backpropagate through time in one more. The output is every hidden state ``(T, N, H)``, or
only the last one ``(N, H)`` with ``return_sequences=False``. Params ``{"Wx", "Wh", "b"}``.

Initial states and truncated BPTT
---------------------------------
The input is either a plain array ``x`` (zero initial states) or a pair ``(x, state)``,
where ``state`` is ``h0 (N, H)`` for the RNN, ``(h0, c0)`` for the LSTM, or ``None`` (zeros).
The output is always the plain ``y`` array, so the layer still composes in a ``Sequential``
(a ``Sequential`` hands its input to its first layer unchanged).

- ``final_state(cache)`` returns the state after the last step (``hT`` or ``(hT, cT)``),
  from the layer's cache or from a ``Sequential``'s cache (its first recurrent layer).
  Feed it to the next batch as ``(x_next, state)``: truncated BPTT.
- When the input was a pair, backward returns the pair ``(dx, dstate0)``: the gradients
  w.r.t. ``x`` and the initial state (``dh0``, or ``(dh0, dc0)``).
- ``dy`` may also be a pair ``(dy, dstate_T)``: ``dstate_T`` is a gradient at the final
  state from outside the layer (for example an encoder whose final state feeds a decoder).

With ``input_grad=False`` backward returns ``None`` for the whole input gradient (both parts).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .. import initializers
from .._validate import as_float_array, check_dtype, check_param, check_same_shape
from ..kernels import lstm as KL
from ..kernels import rnn as KR
from .core import Layer, _dtype, _positive_int

__all__ = ["RNN", "LSTM", "final_state"]


class RNNCache(NamedTuple):
    """What ``RNN.backward`` needs: O(T·N·H) numbers besides the input itself.

    x (T, N, D) the input (C-contiguous), h0 (N, H), hs (T, N, H) every hidden state,
    has_state: the input was an ``(x, state)`` pair."""
    x: np.ndarray
    h0: np.ndarray
    hs: np.ndarray
    has_state: bool


class LSTMCache(NamedTuple):
    """What ``LSTM.backward`` needs: 6·T·N·H numbers besides the input itself.

    x (T, N, D), h0, c0 (N, H), gates (T, N, 4H) the activated i, f, g, o, cs and
    hs (T, N, H) every cell and hidden state, has_state: the input was a pair."""
    x: np.ndarray
    h0: np.ndarray
    c0: np.ndarray
    gates: np.ndarray
    cs: np.ndarray
    hs: np.ndarray
    has_state: bool


def final_state(cache):
    """The state after the last time step, to start the next batch from (truncated BPTT).

    cache: from ``RNN.forward``/``LSTM.forward``, or from a ``Sequential`` (nested lists are
    searched in layer order; the first recurrent layer's cache is used; pass ``cache[i]``
    for another layer). Returns ``hT (N, H)`` for an RNN, ``(hT, cT)`` for an LSTM (copies).
    """
    if isinstance(cache, RNNCache):
        return cache.hs[-1].copy()
    if isinstance(cache, LSTMCache):
        return cache.hs[-1].copy(), cache.cs[-1].copy()
    if isinstance(cache, list):
        for c in cache:
            if isinstance(c, (RNNCache, LSTMCache, list)):
                try:
                    return final_state(c)
                except ValueError:
                    continue
    raise ValueError("final_state: no RNN or LSTM cache found (pass the cache returned by "
                     "forward of a model with a recurrent layer)")


class _Recurrent(Layer):
    """Shared validation for RNN and LSTM (subclasses set ``_gates`` and ``_nstates``)."""

    _gates = 1
    _nstates = 1

    def __str__(self):
        return f"{type(self).__name__}({self.input_size}, {self.hidden_size})"

    def init(self, rng, dtype=np.float32):
        """Wx: ``init`` per gate block (fan_in D, fan_out H); Wh: ``recurrent_init`` per
        gate block (orthogonal by default); b: zeros (LSTM: ``forget_bias`` in the f block)."""
        dtype = _dtype(dtype)
        D, H = self.input_size, self.hidden_size
        wx = initializers.get(self.weight_init)
        wh = initializers.get(self.recurrent_init)
        Wx = np.concatenate([wx(rng, (D, H), dtype, D, H) for _ in range(self._gates)], axis=1)
        Wh = np.concatenate([wh(rng, (H, H), dtype, H, H) for _ in range(self._gates)], axis=1)
        b = np.zeros(self._gates * H, dtype=dtype)
        return {"Wx": np.ascontiguousarray(Wx, dtype=dtype),
                "Wh": np.ascontiguousarray(Wh, dtype=dtype), "b": b}

    def _params(self, params):
        D, H, G = self.input_size, self.hidden_size, self._gates * self.hidden_size
        where = self                     # formatted only when an error is raised
        Wx = check_param(where, params, "Wx", (D, G))
        Wh = check_param(where, params, "Wh", (H, G))
        b = check_param(where, params, "b", (G,))
        check_dtype(where, Wh, Wx.dtype, name="parameter 'Wh'", other="parameter 'Wx'")
        check_dtype(where, b, Wx.dtype, name="parameter 'b'", other="parameter 'Wx'")
        return Wx, Wh, b

    def _split_input(self, x):
        """x or (x, state) -> (x, [state arrays or None], has_state)."""
        if isinstance(x, tuple):
            if len(x) != 2:
                raise ValueError(f"{self}: expected input x or a pair (x, state), got a tuple "
                                 f"of {len(x)}")
            x, state = x
            if state is None:
                return x, [None] * self._nstates, True
            if self._nstates == 1:
                return x, [state], True
            if not isinstance(state, (tuple, list)) or len(state) != 2:
                raise ValueError(f"{self}: expected state as a pair (h0, c0) or None, got "
                                 f"{type(state).__name__}")
            return x, list(state), True
        return x, [None] * self._nstates, False

    def _check_x(self, x, dtype):
        x = as_float_array(self, x)
        if x.ndim != 3 or x.shape[2] != self.input_size or x.shape[0] < 1 or x.shape[1] < 1:
            raise ValueError(f"{self}: expected input (T, N, {self.input_size}) with T, N >= 1 "
                             f"(time-major), got {x.shape}")
        check_dtype(self, x, dtype)
        return np.ascontiguousarray(x)

    def _check_state(self, s, name, N, dtype):
        H = self.hidden_size
        if s is None:
            return np.zeros((N, H), dtype=dtype)
        s = as_float_array(self, s, name)
        if s.shape != (N, H):
            raise ValueError(f"{self}: expected {name} of shape ({N}, {H}), got {s.shape}")
        check_dtype(self, s, dtype, name=name)
        return np.ascontiguousarray(s)

    def _split_dy(self, dy, T, N, dtype):
        """dy or (dy, dstate_T) -> (dhs (T or 0, N, H), [dstate_T arrays])."""
        H = self.hidden_size
        extra = [None] * self._nstates
        if isinstance(dy, tuple):
            if len(dy) != 2:
                raise ValueError(f"{self}: expected output gradient dy or a pair (dy, dstate), "
                                 f"got a tuple of {len(dy)}")
            dy, ds = dy
            if ds is not None:
                extra = [ds] if self._nstates == 1 else list(ds)
        names = ["gradient of the final h", "gradient of the final c"]
        extra = [self._check_state(s, names[k], N, dtype) for k, s in enumerate(extra)]
        if dy is None:                   # only the final state is used downstream
            return np.zeros((0, N, H), dtype=dtype), extra
        dy = as_float_array(self, dy, "output gradient")
        check_same_shape(self, dy, (T, N, H) if self.return_sequences else (N, H))
        check_dtype(self, dy, dtype, name="output gradient")
        if self.return_sequences:
            return np.ascontiguousarray(dy), extra
        extra[0] = extra[0] + dy
        return np.zeros((0, N, H), dtype=dtype), extra

    def _out(self, hs):
        return hs if self.return_sequences else hs[-1]


def _init_args(self, input_size, hidden_size, return_sequences, init, recurrent_init):
    where = f"{type(self).__name__}({input_size}, {hidden_size})"
    object.__setattr__(self, "input_size", _positive_int(where, "input_size", input_size))
    object.__setattr__(self, "hidden_size", _positive_int(where, "hidden_size", hidden_size))
    object.__setattr__(self, "return_sequences", bool(return_sequences))
    initializers.get(init)              # fail early on an unknown name
    initializers.get(recurrent_init)
    object.__setattr__(self, "weight_init", init)
    object.__setattr__(self, "recurrent_init", recurrent_init)


# ---------------------------------------------------------------------------- RNN
@dataclass(frozen=True, init=False)
class RNN(_Recurrent):
    """Simple (Elman) RNN: ``h_t = f(x_t Wx + h_{t-1} Wh + b)``, f = tanh or relu.

    x (T, N, D) (time-major) or ``(x, h0)`` → y (T, N, H), or (N, H) = h_{T-1} when
    ``return_sequences=False``. Wx (D, H), Wh (H, H), b (H,). Backward is BPTT; the weight
    gradients are summed over time. Cache: x, h0 and every h_t, O(T·N·H).
    See the module docstring for initial states and truncated BPTT.
    """
    input_size: int
    hidden_size: int
    nonlinearity: str = "tanh"
    return_sequences: bool = True
    weight_init: object = "glorot_uniform"
    recurrent_init: object = "orthogonal"

    def __init__(self, input_size, hidden_size, nonlinearity="tanh", return_sequences=True,
                 init="glorot_uniform", recurrent_init="orthogonal"):
        _init_args(self, input_size, hidden_size, return_sequences, init, recurrent_init)
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"RNN({input_size}, {hidden_size}): nonlinearity must be 'tanh' "
                             f"or 'relu', got {nonlinearity!r}")
        object.__setattr__(self, "nonlinearity", nonlinearity)

    def forward(self, params, x, *, train=False, rng=None):
        Wx, Wh, b = self._params(params)
        x, (h0,), has_state = self._split_input(x)
        x = self._check_x(x, Wx.dtype)
        h0 = self._check_state(h0, "h0", x.shape[1], Wx.dtype)
        hs = KR.rnn_forward(x, h0, Wx, Wh, b, self.nonlinearity == "relu")
        return self._out(hs), RNNCache(x, h0, hs, has_state)

    def backward(self, params, cache, dy, *, input_grad=True):
        Wx, Wh, _ = self._params(params)
        if not isinstance(cache, RNNCache):
            raise ValueError(f"{self}: cache does not come from RNN.forward")
        x, h0, hs, has_state = cache
        T, N, _ = x.shape
        dhs, (dhT,) = self._split_dy(dy, T, N, Wx.dtype)
        dx, dh0, dWx, dWh, db = KR.rnn_backward(x, h0, hs, Wx, Wh, dhs, dhT,
                                                self.nonlinearity == "relu", input_grad)
        grads = {"Wx": dWx, "Wh": dWh, "b": db}
        if not input_grad:
            return None, grads
        return ((dx, dh0) if has_state else dx), grads


# ---------------------------------------------------------------------------- LSTM
@dataclass(frozen=True, init=False)
class LSTM(_Recurrent):
    """Long short-term memory, gates in the order i, f, g, o (one fused 4H matrix):
    ``z = x_t Wx + h_{t-1} Wh + b``, ``c_t = σ(z_i)⊙tanh(z_g) + σ(z_f)⊙c_{t-1}``,
    ``h_t = σ(z_o)⊙tanh(c_t)``.

    x (T, N, D) (time-major) or ``(x, (h0, c0))`` → y (T, N, H), or (N, H) = h_{T-1} when
    ``return_sequences=False``. Wx (D, 4H), Wh (H, 4H), b (4H,). ``forget_bias`` is the
    initial value of the f block of b (1.0 helps gradients flow early in training; use 0
    for PyTorch's convention). Cache: the gates, every c_t and h_t, O(T·N·H).
    See the module docstring for initial states and truncated BPTT.
    """
    input_size: int
    hidden_size: int
    return_sequences: bool = True
    weight_init: object = "glorot_uniform"
    recurrent_init: object = "orthogonal"
    forget_bias: float = 1.0

    _gates = 4
    _nstates = 2

    def __init__(self, input_size, hidden_size, return_sequences=True, init="glorot_uniform",
                 recurrent_init="orthogonal", forget_bias=1.0):
        _init_args(self, input_size, hidden_size, return_sequences, init, recurrent_init)
        object.__setattr__(self, "forget_bias", float(forget_bias))

    def init(self, rng, dtype=np.float32):
        params = super().init(rng, dtype)
        H = self.hidden_size
        params["b"][H:2 * H] = self.forget_bias
        return params

    def forward(self, params, x, *, train=False, rng=None):
        Wx, Wh, b = self._params(params)
        x, (h0, c0), has_state = self._split_input(x)
        x = self._check_x(x, Wx.dtype)
        h0 = self._check_state(h0, "h0", x.shape[1], Wx.dtype)
        c0 = self._check_state(c0, "c0", x.shape[1], Wx.dtype)
        gates, cs, hs = KL.lstm_forward(x, h0, c0, Wx, Wh, b)
        return self._out(hs), LSTMCache(x, h0, c0, gates, cs, hs, has_state)

    def backward(self, params, cache, dy, *, input_grad=True):
        Wx, Wh, _ = self._params(params)
        if not isinstance(cache, LSTMCache):
            raise ValueError(f"{self}: cache does not come from LSTM.forward")
        x, h0, c0, gates, cs, hs, has_state = cache
        T, N, _ = x.shape
        dhs, (dhT, dcT) = self._split_dy(dy, T, N, Wx.dtype)
        dx, dh0, dc0, dWx, dWh, db = KL.lstm_backward(x, h0, c0, gates, cs, hs, Wx, Wh,
                                                      dhs, dhT, dcT, input_grad)
        grads = {"Wx": dWx, "Wh": dWh, "b": db}
        if not input_grad:
            return None, grads
        return ((dx, (dh0, dc0)) if has_state else dx), grads
