"""``fastbp demo``: small end-to-end trainings on data that ship with fastbp or Python.

- ``cnn`` (default): a LeNet-style CNN on the 8x8 handwritten digits images;
- ``mlp``: a two-layer perceptron on the same digits, as flat 64-vectors;
- ``lstm``: a character-level LSTM language model on ``pydoc_data.topics`` (a text shipped
  with Python), trained with truncated BPTT; it prints bits per character against the
  unigram entropy and samples text.

Each prints per-epoch figures and ends with one summary line (``test accuracy: 0.9xx`` for
the classifiers, ``test bits per character: ...`` for the language model).
"""
from __future__ import annotations

import time

import numpy as np

from . import datasets, losses, optim, textdata
from .layers import LSTM, Conv2D, Dense, Dropout, Flatten, MaxPool2D, ReLU, final_state
from .network import Sequential, backward, forward, init, predict
from .train import evaluate, fit

EPOCHS = {"cnn": 20, "mlp": 30, "lstm": 6}


def _say(line):
    """Print a line without breaking an active progress bar."""
    from tqdm import tqdm
    tqdm.write(line)


def _digits(as_images):
    x, y = datasets.load_digits(as_images=as_images)
    xtr, xte, ytr, yte = datasets.train_test_split(x, y, test_fraction=0.2, seed=0)
    xtr, xva, ytr, yva = datasets.train_test_split(xtr, ytr, test_fraction=0.1, seed=1)
    return xtr, ytr, xva, yva, xte, yte


def _classifier(kind, epochs, seed, progress):
    xtr, ytr, xva, yva, xte, yte = _digits(as_images=kind == "cnn")
    if kind == "cnn":
        model = Sequential(
            Conv2D(1, 32, 3, padding=1), ReLU(), MaxPool2D(2),        # 32 x 4 x 4
            Conv2D(32, 64, 3, padding=1), ReLU(), MaxPool2D(2),       # 64 x 2 x 2
            Flatten(), Dropout(0.2), Dense(256, 10))
        bs, lr, what = 16, 3e-3, "LeNet-style CNN"
    else:
        model = Sequential(Dense(64, 128), ReLU(), Dropout(0.1), Dense(128, 10))
        bs, lr, what = 32, 2e-3, "MLP"
    steps = epochs * -(-len(xtr) // bs)
    opt = optim.adam(optim.schedules.cosine(lr, total_steps=max(1, steps)))
    print(f"fastbp demo: {what} on the handwritten digits ({len(xtr)} train, {len(xva)} "
          f"validation, {len(xte)} test)\n{model}", flush=True)
    params = init(model, seed=seed)
    loss = losses.softmax_cross_entropy

    def report(epoch, logs, params, grads):
        _say(f"epoch {epoch + 1:>2}: loss {logs['loss']:.4f}  val_loss {logs['val_loss']:.4f}"
             f"  val_accuracy {logs['val_accuracy']:.3f}")
    t0 = time.perf_counter()
    params, _ = fit(model, params, xtr, ytr, loss=loss, optimizer=opt, epochs=epochs,
                    batch_size=bs, seed=seed, validation_data=(xva, yva), progress=progress,
                    callbacks=[report])
    acc = evaluate(model, params, xte, yte, loss=loss)["accuracy"]
    print(f"trained in {time.perf_counter() - t0:.1f} s")
    print(f"test accuracy: {acc:.3f}")
    return 0


def _lstm(epochs, seed, progress, max_chars=120_000, hidden=128, seq_len=32, batch_size=32):
    text = textdata.load_text(max_chars=max_chars)
    vocab = textdata.CharVocab(text)
    V = len(vocab)
    ids = vocab.encode(text)
    n_test = max(2_000, len(ids) // 20)
    train, test = ids[:-n_test], ids[-n_test:]
    unigram = textdata.unigram_entropy(train, V)
    model = Sequential(LSTM(V, hidden), Dense(hidden, V))
    print(f"fastbp demo: character-level LSTM on pydoc_data.topics ({len(train)} train and "
          f"{len(test)} test characters, {V} symbols; unigram entropy {unigram:.2f} "
          f"bits/char)\n{model}", flush=True)
    params = init(model, seed=seed)
    opt = optim.adam(5e-3)
    opt_state = opt.init(params)
    ce = losses.softmax_cross_entropy
    steps = (len(train) - 1) // batch_size // seq_len
    bar = None
    if progress:
        from .train import _progress_bar
        bar = _progress_bar(epochs * steps)

    def test_bits():
        logits = predict(model, params, textdata.one_hot(test[:-1, None], V))
        return ce(logits, test[1:, None])[0] / np.log(2)
    t0 = time.perf_counter()
    try:
        for epoch in range(epochs):
            state, total, n = None, 0.0, 0       # truncated BPTT: the state carries over
            for xb, yb in textdata.tbptt_batches(train, batch_size, seq_len):
                logits, cache = forward(model, params, (textdata.one_hot(xb, V), state),
                                        train=True)
                lval, dlogits = ce(logits, yb)
                _, grads = backward(model, params, cache, dlogits, input_grad=False)
                grads, _ = optim.clip_by_global_norm(grads, 5.0)
                params, opt_state = opt.update(params, grads, opt_state)
                state = final_state(cache)
                total, n = total + lval, n + 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(bits=f"{lval / np.log(2):.3f}", refresh=False)
            _say(f"epoch {epoch + 1:>2}: train {total / n / np.log(2):.3f} bits/char  "
                 f"test {test_bits():.3f} bits/char")
    finally:
        if bar is not None:
            bar.close()
    print(f"trained in {time.perf_counter() - t0:.1f} s; sample:")
    print(_sample(model, params, vocab, "The ", 240, seed))
    print(f"test bits per character: {test_bits():.3f} (unigram {unigram:.3f})")
    return 0


def _sample(model, params, vocab, prompt, n, seed, temperature=0.8):
    """Text continued from ``prompt`` one character at a time, carrying the LSTM state."""
    rng = np.random.default_rng(seed)
    V = len(vocab)
    rec, head = model[0], model[1]
    ids = vocab.encode(prompt)
    h, cache = rec.forward(params[0], (textdata.one_hot(ids[:, None], V), None))
    out = list(prompt)
    for _ in range(n):
        state = final_state(cache)
        z = head.forward(params[1], h[-1])[0][0].astype(np.float64) / temperature
        p = np.exp(z - z.max())
        ch = int(rng.choice(V, p=p / p.sum()))
        out.append(vocab.chars[ch])
        h, cache = rec.forward(params[0], (textdata.one_hot(np.array([[ch]]), V), state))
    return "".join(out)


def run(model="cnn", epochs=None, seed=0, progress=True):
    """Run one demo; ``epochs=None`` takes the demo's default (``EPOCHS``). Returns 0."""
    if model not in EPOCHS:
        raise ValueError(f"demo: model must be one of {sorted(EPOCHS)}, got {model!r}")
    epochs = EPOCHS[model] if epochs is None else int(epochs)
    if model == "lstm":
        return _lstm(epochs, seed, progress)
    return _classifier(model, epochs, seed, progress)
