"""Recurrent layers learn, tried as a new user would: the adding problem and a character LM.

Small sizes so each test stays well under ~40 s on a 2-vCPU machine.
"""
import numpy as np

import fastbp as F
from fastbp import textdata as TD


def adding_problem(rng, T, N):
    """x (T, N, 2): values U(0, 1) and a marker channel with two 1s (one in each half);
    y (N, 1): the sum of the two marked values. Predicting the mean 1 gives MSE 1/6 ≈ 0.167."""
    v = rng.random((T, N)).astype(np.float32)
    m = np.zeros((T, N), np.float32)
    cols = np.arange(N)
    m[rng.integers(0, T // 2, N), cols] = 1
    m[rng.integers(T // 2, T, N), cols] = 1
    return np.stack([v, m], axis=-1), (v * m).sum(0)[:, None]


def test_lstm_learns_adding_problem_T50():
    T = 50
    rng = np.random.default_rng(0)
    model = F.Sequential(F.LSTM(2, 32, return_sequences=False), F.Dense(32, 1))
    params = F.init(model, seed=0)
    opt = F.optim.adam(1e-2)
    state = opt.init(params)
    x_test, y_test = adding_problem(np.random.default_rng(1), T, 500)
    for step in range(600):
        x, y = adding_problem(rng, T, 64)
        out, cache = F.forward(model, params, x)
        _, dout = F.losses.mse(out, y)
        _, grads = F.backward(model, params, cache, dout, input_grad=False)
        grads, _ = F.optim.clip_by_global_norm(grads, 1.0)
        params, state = opt.update(params, grads, state)
    test_mse = F.losses.mse(F.predict(model, params, x_test), y_test)[0]
    assert test_mse < 0.167 / 5, test_mse          # well below predicting the mean


def test_char_lstm_beats_unigram_and_samples():
    text = TD.load_text(max_chars=60_000)
    vocab = TD.CharVocab(text)
    V = len(vocab)
    ids = vocab.encode(text)
    train, test = ids[:-5_000], ids[-5_000:]
    unigram = TD.unigram_entropy(train, V)

    model = F.Sequential(F.LSTM(V, 64), F.Dense(64, V))
    params = F.init(model, seed=0)
    opt = F.optim.adam(1e-2)
    opt_state = opt.init(params)
    for epoch in range(3):
        state = None                                   # truncated BPTT: carry the state
        for xb, yb in TD.tbptt_batches(train, batch_size=32, seq_len=32):
            logits, cache = F.forward(model, params, (TD.one_hot(xb, V), state))
            _, dlogits = F.losses.softmax_cross_entropy(logits, yb)
            _, grads = F.backward(model, params, cache, dlogits, input_grad=False)
            grads, _ = F.optim.clip_by_global_norm(grads, 5.0)
            params, opt_state = opt.update(params, grads, opt_state)
            state = F.final_state(cache)

    logits, _ = F.forward(model, params, TD.one_hot(test[:-1, None], V))
    bits = F.losses.softmax_cross_entropy(logits, test[1:, None])[0] / np.log(2)
    assert bits < unigram - 1.0, (bits, unigram)      # unigram ≈ 4.6 bits per character

    # sample 200 characters, one step at a time, carrying the state
    rng = np.random.default_rng(0)
    rec, head = model[0], model[1]
    ch, state, out = vocab.encode("d"), None, []
    for _ in range(200):
        h, cache = rec.forward(params[0], (TD.one_hot(ch[None], V), state))
        state = F.final_state(cache)
        z = head.forward(params[1], h[0])[0][0].astype(np.float64)
        p = np.exp(z - z.max())
        ch = rng.choice(V, size=1, p=p / p.sum())
        out.append(int(ch[0]))
    sample = vocab.decode(out)
    assert len(sample) == 200
    assert sample.count(" ") > 10                      # word-like text with spaces
