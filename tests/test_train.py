"""fit / evaluate / EarlyStopping: learning, history, progress bar, dropout modes, errors."""
import numpy as np
import pytest

import fastbp as F
from fastbp.train import EarlyStopping, StopTraining, evaluate, fit

CE = F.losses.softmax_cross_entropy


def separable(n=200, seed=0):
    """Two Gaussian blobs far apart in 2-D: linearly separable."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.normal(size=(n, 2)) * 0.5 + np.where(y[:, None] == 1, 3.0, -3.0)
    return x, y


def test_linearly_separable_reaches_100_percent():
    x, y = separable()
    model = F.Sequential(F.Dense(2, 2))
    params = F.init(model, seed=0)
    params, hist = fit(model, params, x, y, loss=CE, optimizer=F.optim.sgd(0.1), epochs=20,
                       batch_size=16, progress=False)
    assert evaluate(model, params, x, y, loss=CE)["accuracy"] == 1.0
    assert hist["accuracy"][-1] == 1.0
    assert hist["loss"][-1] < hist["loss"][0]


def test_digits_mlp_reaches_97_percent():
    x, y = F.datasets.load_digits()
    xtr, xte, ytr, yte = F.datasets.train_test_split(x, y, test_fraction=0.2, seed=0)
    model = F.Sequential(F.Dense(64, 128), F.ReLU(), F.Dense(128, 10))
    params = F.init(model, seed=0)
    params, hist = fit(model, params, xtr, ytr, loss=CE, optimizer=F.optim.adam(2e-3),
                       epochs=20, batch_size=32, progress=False, validation_data=(xte, yte))
    m = evaluate(model, params, xte, yte, loss=CE, batch_size=100)
    assert m["accuracy"] >= 0.97
    assert set(hist) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert all(len(v) == 20 for v in hist.values())
    assert hist["val_accuracy"][-1] == pytest.approx(m["accuracy"])
    assert hist["val_loss"][-1] == pytest.approx(m["loss"], rel=1e-5)


def test_fit_does_not_modify_inputs_and_is_deterministic():
    x, y = separable(64)
    model = F.Sequential(F.Dense(2, 8), F.ReLU(), F.Dropout(0.3), F.Dense(8, 2))
    params = F.init(model, seed=1)
    before = [{k: v.copy() for k, v in p.items()} for p in params]
    x0 = x.copy()
    kw = dict(loss=CE, optimizer=F.optim.adam(1e-2), epochs=3, batch_size=10, seed=5,
              progress=False)
    p1, h1 = fit(model, params, x, y, **kw)
    p2, h2 = fit(model, params, x, y, **kw)
    for a, b in zip(params, before):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    np.testing.assert_array_equal(x, x0)
    assert h1 == h2
    for a, b in zip(p1, p2):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


def test_batch_gradient_is_gradient_of_mean_loss():
    """One full-batch SGD step equals p - lr * dmean(L)/dp computed by hand."""
    x, y = separable(12)
    model = F.Sequential(F.Dense(2, 2))
    params = F.init(model, seed=0, dtype=np.float64)
    out, cache = F.forward(model, params, x)
    _, dout = CE(out, y)
    _, grads = F.backward(model, params, cache, dout)
    new, _ = fit(model, params, x, y, loss=CE, optimizer=F.optim.sgd(0.5), epochs=1,
                 batch_size=12, shuffle=False, progress=False)
    np.testing.assert_allclose(new[0]["W"], params[0]["W"] - 0.5 * grads[0]["W"])
    np.testing.assert_allclose(new[0]["b"], params[0]["b"] - 0.5 * grads[0]["b"])


def test_data_converted_to_params_dtype():
    x, y = separable(20)                       # float64 data, float32 params
    model = F.Sequential(F.Dense(2, 2))
    p32, _ = fit(model, F.init(model), x, y, loss=CE, optimizer=F.optim.sgd(0.1), epochs=1,
                 progress=False)
    assert p32[0]["W"].dtype == np.float32
    p64, _ = fit(model, F.init(model, dtype=np.float64), x.astype(np.float32), y, loss=CE,
                 optimizer=F.optim.sgd(0.1), epochs=1, progress=False)
    assert p64[0]["W"].dtype == np.float64


def test_progress_bar_on_and_off(capsys):
    x, y = separable(40)
    model = F.Sequential(F.Dense(2, 2))
    params = F.init(model)
    kw = dict(loss=CE, optimizer=F.optim.sgd(0.1), epochs=2, batch_size=8)
    fit(model, params, x, y, progress=False, **kw)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""
    fit(model, params, x, y, progress=True, **kw)
    err = capsys.readouterr().err
    assert "10/10" in err and "loss=" in err and "samples_per_s=" in err


def test_callbacks_get_epoch_logs_params_grads_and_can_stop():
    x, y = separable(40)
    model = F.Sequential(F.Dense(2, 2))
    seen = []

    def cb(epoch, logs, params, grads):
        seen.append((epoch, sorted(logs), params[0]["W"].shape, grads[0]["W"].shape))
        return epoch == 2

    def stopper(epoch, logs, params, grads):
        if epoch == 4:
            raise StopTraining

    _, hist = fit(model, F.init(model), x, y, loss=CE, optimizer=F.optim.sgd(0.1), epochs=10,
                  progress=False, callbacks=[cb], validation_data=(x, y))
    assert [s[0] for s in seen] == [0, 1, 2] and len(hist["loss"]) == 3
    assert seen[0][1] == ["accuracy", "loss", "val_accuracy", "val_loss"]
    assert seen[0][2] == seen[0][3] == (2, 2)
    _, hist = fit(model, F.init(model), x, y, loss=CE, optimizer=F.optim.sgd(0.1), epochs=10,
                  progress=False, callbacks=[stopper])
    assert len(hist["loss"]) == 5


def test_early_stopping_keeps_best_params():
    x, y = separable(60)
    xv, yv = separable(60, seed=1)
    model = F.Sequential(F.Dense(2, 2))
    es = EarlyStopping("val_loss", patience=1)
    # a huge learning rate with lr decay to 0 after step 10: val_loss stops improving
    lr = F.optim.schedules.step_decay(0.5, 0.0, every=10)
    _, hist = fit(model, F.init(model), x, y, loss=CE, optimizer=F.optim.sgd(lr), epochs=50,
                  batch_size=60, progress=False, validation_data=(xv, yv), callbacks=[es])
    assert len(hist["val_loss"]) < 50
    assert es.stopped_epoch == len(hist["val_loss"]) - 1
    assert es.best == min(hist["val_loss"])
    assert evaluate(model, es.best_params, xv, yv, loss=CE)["loss"] == pytest.approx(es.best)
    with pytest.raises(ValueError, match="no 'val_loss'"):
        fit(model, F.init(model), x, y, loss=CE, optimizer=F.optim.sgd(0.1), epochs=1,
            progress=False, callbacks=[EarlyStopping()])


def test_lr_schedule_through_optimizer():
    x, y = separable(40)
    model = F.Sequential(F.Dense(2, 2))
    params = F.init(model)
    # lr 0 after the first step: 5 epochs equal 1 epoch of batch_size=40 (one step)
    lr = F.optim.schedules.step_decay(0.1, 0.0, every=1)
    p5, _ = fit(model, params, x, y, loss=CE, optimizer=F.optim.sgd(lr), epochs=5,
                batch_size=40, shuffle=False, progress=False)
    p1, _ = fit(model, params, x, y, loss=CE, optimizer=F.optim.sgd(0.1), epochs=1,
                batch_size=40, shuffle=False, progress=False)
    np.testing.assert_array_equal(p5[0]["W"], p1[0]["W"])


def test_dropout_train_vs_eval():
    model = F.Sequential(F.Dropout(0.5))
    x = np.ones((1000, 20), np.float32)
    y_eval, _ = F.forward(model, [{}], x, train=False)
    np.testing.assert_array_equal(y_eval, x)                 # identity at test time
    y_train, _ = F.forward(model, [{}], x, train=True, seed=0)
    assert set(np.unique(y_train)) == {0.0, 2.0}              # kept units scaled by 1/p
    assert abs(y_train.mean() - 1.0) < 0.05                   # same expectation


def test_evaluate_uses_inference_mode():
    """evaluate runs train=False: dropout off, so the result is deterministic."""
    x, y = separable(50)
    model = F.Sequential(F.Dense(2, 16), F.ReLU(), F.Dropout(0.9), F.Dense(16, 2))
    params = F.init(model, seed=0)
    a = evaluate(model, params, x, y, loss=CE)
    b = evaluate(model, params, x, y, loss=CE, batch_size=7)
    out = F.predict(model, params, x)
    assert a["loss"] == pytest.approx(CE(out, y)[0], rel=1e-6)
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    assert a["accuracy"] == b["accuracy"] == np.mean(out.argmax(1) == y)


def test_accuracy_kinds():
    x, y = separable(50)
    model = F.Sequential(F.Dense(2, 2))
    params = F.init(model, seed=0)
    onehot = np.eye(2)[y]
    a = evaluate(model, params, x, y, loss=CE)["accuracy"]
    assert evaluate(model, params, x, onehot, loss=CE)["accuracy"] == a
    # regression: no accuracy, and no accuracy in history
    reg = F.Sequential(F.Dense(2, 1))
    t = x[:, :1] * 2.0
    assert evaluate(reg, F.init(reg), x, t, loss=F.losses.mse)["accuracy"] is None
    _, hist = fit(reg, F.init(reg), x, t, loss=F.losses.mse, optimizer=F.optim.sgd(0.01),
                  epochs=2, progress=False, validation_data=(x, t))
    assert set(hist) == {"loss", "val_loss"}
    # binary cross-entropy on one logit
    p, hist = fit(reg, F.init(reg), x, y[:, None].astype(float),
                  loss=F.losses.binary_cross_entropy, optimizer=F.optim.sgd(0.5), epochs=10,
                  progress=False)
    assert hist["accuracy"][-1] == 1.0


def test_time_major_sequences_batch_axis():
    """x (T, N, D) with batch_axis=1: samples are sliced along axis 1, labels (N,) along 0."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 40, 2))
    y = (x[-1, :, 0] > 0).astype(int)
    model = F.Sequential(F.Dense(2, 2))          # per time step → (T, N, 2)

    class Last:                                  # keep the last time step
        def init(self, rng, dtype):
            return {}

        def forward(self, params, x, *, train=False, rng=None):
            return x[-1], x.shape

        def backward(self, params, cache, dy, *, input_grad=True):
            dx = np.zeros(cache, dy.dtype)
            dx[-1] = dy
            return dx, {}

    seq = F.Sequential(model, Last())
    params, hist = fit(seq, F.init(seq), x, y, loss=CE, optimizer=F.optim.sgd(0.5), epochs=30,
                       batch_size=8, progress=False, batch_axis=1)
    assert hist["accuracy"][-1] >= 0.95
    m = evaluate(seq, params, x, y, loss=CE, batch_axis=1, batch_size=7)
    assert m["accuracy"] >= 0.95
    # per-time-step labels (T, N) are batched along axis 1 too
    yt = (x[..., 0] > 0).astype(int)
    _, hist = fit(model, F.init(model), x, yt, loss=CE, optimizer=F.optim.sgd(0.5), epochs=5,
                  batch_size=8, progress=False, batch_axis=1)
    assert hist["accuracy"][-1] >= 0.9
    with pytest.raises(ValueError, match="same number of samples"):
        fit(seq, F.init(seq), x, y, loss=CE, optimizer=F.optim.sgd(0.5), epochs=1,
            progress=False)                      # forgot batch_axis=1: 3 vs 40


# ---------------------------------------------------------------------------- errors
@pytest.fixture
def small():
    x, y = separable(30)
    model = F.Sequential(F.Dense(2, 2))
    return model, F.init(model), x, y


def test_mismatched_lengths(small):
    model, params, x, y = small
    with pytest.raises(ValueError, match=r"fit: x and y must have the same number of samples.*30.*29"):
        fit(model, params, x, y[:-1], loss=CE, optimizer=F.optim.sgd(0.1), progress=False)
    with pytest.raises(ValueError, match="evaluate: x and y must have the same number"):
        evaluate(model, params, x[:5], y, loss=CE)
    with pytest.raises(ValueError, match="validation_data.*same number"):
        fit(model, params, x, y, loss=CE, optimizer=F.optim.sgd(0.1), progress=False,
            validation_data=(x, y[:3]))


@pytest.mark.parametrize("bs", [0, -1, 2.5, "8", None, True])
def test_bad_batch_size(small, bs):
    model, params, x, y = small
    with pytest.raises(ValueError, match="fit: batch_size must be a positive int"):
        fit(model, params, x, y, loss=CE, optimizer=F.optim.sgd(0.1), batch_size=bs,
            progress=False)


def test_bad_epochs_optimizer_callbacks(small):
    model, params, x, y = small
    with pytest.raises(ValueError, match="fit: epochs must be an int >= 0"):
        fit(model, params, x, y, loss=CE, optimizer=F.optim.sgd(0.1), epochs=-1)
    with pytest.raises(TypeError, match="fit: optimizer must have init and update"):
        fit(model, params, x, y, loss=CE, optimizer=0.1)
    with pytest.raises(TypeError, match="fit: callbacks must be callables"):
        fit(model, params, x, y, loss=CE, optimizer=F.optim.sgd(0.1), callbacks=[1])
    with pytest.raises(TypeError, match="fit: model must implement"):
        fit(params, params, x, y, loss=CE, optimizer=F.optim.sgd(0.1))
    with pytest.raises(ValueError, match="fit: no samples"):
        fit(model, params, x[:0], y[:0], loss=CE, optimizer=F.optim.sgd(0.1))


def test_loss_that_does_not_match_labels(small):
    model, params, x, y = small
    with pytest.raises(ValueError, match=r"fit: the loss mse does not accept these targets"):
        fit(model, params, x, y, loss=F.losses.mse, optimizer=F.optim.sgd(0.1), progress=False)
    with pytest.raises(TypeError, match=r"fit: the loss softmax_cross_entropy .*integer class labels"):
        fit(model, params, x, y.astype(np.float32), loss=CE, optimizer=F.optim.sgd(0.1),
            progress=False)
    y_bad = y.copy()
    y_bad[-1] = 7                               # only in the last batch: still caught up front
    with pytest.raises(ValueError, match=r"fit: labels must be in \[0, 2\) .* got 7"):
        fit(model, params, x, y_bad, loss=CE, optimizer=F.optim.sgd(0.1), batch_size=4,
            progress=False)
    with pytest.raises(ValueError, match="evaluate: labels must be in"):
        evaluate(model, params, x, y_bad, loss=CE, batch_size=4)


def test_non_finite_loss_is_reported(small):
    model, params, x, y = small

    def exploding(out, t):
        return float("inf"), np.zeros_like(out)

    with pytest.raises(FloatingPointError, match="fit: the loss became inf at epoch 1, step 1"):
        fit(model, params, x, y, loss=exploding, optimizer=F.optim.sgd(0.1), progress=False)


def test_epochs_zero_returns_params_unchanged(small):
    model, params, x, y = small
    p, hist = fit(model, params, x, y, loss=CE, optimizer=F.optim.sgd(0.1), epochs=0)
    assert hist == {"loss": [], "accuracy": []}
    np.testing.assert_array_equal(p[0]["W"], params[0]["W"])
