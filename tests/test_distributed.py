"""fastbp.distributed.fit on a real Dask LocalCluster (processes, 2 workers, 1 thread each).

No mocks: the workers are separate processes that import fastbp and run its kernels.
Equality with ``fastbp.fit`` is checked in float64; a worker process is killed mid-epoch and
the result must equal the uninterrupted run.
"""
import os

import numpy as np
import pytest

pytest.importorskip("dask.distributed")
da = pytest.importorskip("dask.array")

import fastbp  # noqa: E402
from fastbp import _tree  # noqa: E402
from fastbp import distributed as fd  # noqa: E402
from fastbp.losses import mse, softmax_cross_entropy  # noqa: E402
from dask.distributed import Client, LocalCluster  # noqa: E402

pytestmark = pytest.mark.timeout(180)     # honoured when pytest-timeout is installed


def _cluster(n_workers=2):
    return LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                        dashboard_address=":0", silence_logs=50)


@pytest.fixture(scope="module")
def client():
    with _cluster() as cluster, Client(cluster) as c:
        c.wait_for_workers(2, timeout=60)
        yield c


def _data(n=203, d=8, k=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    y = (x[:, :k].argmax(1) + (rng.random(n) < 0.2)) % k      # learnable, a little noisy
    return x, y


def _mlp(d=8, k=3):
    return fastbp.Sequential(fastbp.Dense(d, 16), fastbp.Tanh(), fastbp.Dense(16, 16),
                             fastbp.ReLU(), fastbp.Dense(16, k))


def _maxdiff(a, b):
    return max(float(np.max(np.abs(u - v))) for u, v in zip(_tree.leaves(a), _tree.leaves(b)))


def _assert_history_close(h1, h2, tol=1e-9):
    assert h1.keys() == h2.keys()
    for k in h1:
        np.testing.assert_allclose(h1[k], h2[k], rtol=tol, atol=tol, err_msg=k)


# ----------------------------------------------------------------------------- equality
def test_batch_order_matches_fit():
    """batch_order duplicates fit's shuffling; record the batches fit really uses."""
    n, bs = 23, 5
    x = np.arange(n, dtype=np.float64)[:, None]
    seen = []

    def recorder(out, y):
        seen.append(y[:, 0].astype(int).tolist())
        return mse(out, y)

    model = fastbp.Sequential(fastbp.Dense(1, 1))
    p = fastbp.init(model, dtype=np.float64)
    for shuffle in (True, False):
        seen.clear()
        fastbp.fit(model, p, x, x.copy(), loss=recorder, optimizer=fastbp.optim.sgd(0.0),
                   epochs=3, batch_size=bs, shuffle=shuffle, seed=7, progress=False)
        ours = [idx.tolist() for _, _, idx in fd.batch_order(n, bs, 3, shuffle, 7)]
        assert seen[-len(ours):] == ours          # fit may probe the loss first


@pytest.mark.parametrize("opt", [lambda: fastbp.optim.sgd(0.1, momentum=0.9),
                                 lambda: fastbp.optim.adam(1e-2)], ids=["sgd_momentum", "adam"])
def test_equals_fit_float64(client, opt):
    x, y = _data()
    model = _mlp()
    p0 = fastbp.init(model, seed=1, dtype=np.float64)
    kw = dict(loss=softmax_cross_entropy, epochs=3, batch_size=32, seed=3, progress=False,
              validation_data=(x[:50], y[:50]))
    p_ref, h_ref = fastbp.fit(model, p0, x, y, optimizer=opt(), **kw)
    p_d, h_d = fd.fit(model, p0, x, y, client=client, optimizer=opt(), **kw)
    assert _maxdiff(p_ref, p_d) < 1e-6
    assert _maxdiff(p_ref, p_d) < 1e-12        # in practice: rounding only
    _assert_history_close(h_ref, h_d)
    assert _maxdiff(p0, fastbp.init(model, seed=1, dtype=np.float64)) == 0   # not mutated


def test_equals_fit_dask_array_uneven_chunks(client, monkeypatch):
    """dask.array input, chunks of unequal size (5 shards on 2 workers); params scattered
    (as for models over 4 MB) rather than sent inside the tasks."""
    monkeypatch.setattr(fd, "_INLINE_BYTES", 0)
    x, y = _data(n=150)
    model = _mlp()
    p0 = fastbp.init(model, seed=2, dtype=np.float64)
    kw = dict(loss=softmax_cross_entropy, epochs=2, batch_size=40, progress=False)
    for shuffle in (False, True):
        p_ref, h_ref = fastbp.fit(model, p0, x, y, optimizer=fastbp.optim.sgd(0.05),
                                  shuffle=shuffle, **kw)
        xd = da.from_array(x, chunks=((20, 40, 30, 50, 10), (8,)))
        yd = da.from_array(y, chunks=37)                  # re-aligned with x's chunks
        p_d, h_d = fd.fit(model, p0, xd, yd, client=client, optimizer=fastbp.optim.sgd(0.05),
                          shuffle=shuffle, **kw)
        assert _maxdiff(p_ref, p_d) < 1e-12
        _assert_history_close(h_ref, h_d)


def test_equals_fit_time_major_batch_axis(client):
    """Samples on axis 1: x (T, N, D), per-time-step labels y (T, N)."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 45, 6))
    y = rng.integers(0, 3, (4, 45))
    model = fastbp.Sequential(fastbp.Dense(6, 8), fastbp.Tanh(), fastbp.Dense(8, 3))
    p0 = fastbp.init(model, seed=0, dtype=np.float64)
    kw = dict(loss=softmax_cross_entropy, epochs=2, batch_size=16, batch_axis=1,
              progress=False)
    p_ref, h_ref = fastbp.fit(model, p0, x, y, optimizer=fastbp.optim.adam(1e-2), **kw)
    p_d, h_d = fd.fit(model, p0, x, y, client=client, optimizer=fastbp.optim.adam(1e-2), **kw)
    assert _maxdiff(p_ref, p_d) < 1e-12
    _assert_history_close(h_ref, h_d)


def test_float32_close_to_fit(client):
    x, y = _data()
    model = _mlp()
    p0 = fastbp.init(model, seed=1)                      # float32
    kw = dict(loss=softmax_cross_entropy, epochs=2, batch_size=32, progress=False)
    p_ref, _ = fastbp.fit(model, p0, x, y, optimizer=fastbp.optim.sgd(0.1), **kw)
    p_d, h = fd.fit(model, p0, x, y, client=client, optimizer=fastbp.optim.sgd(0.1), **kw)
    assert all(a.dtype == np.float32 for a in _tree.leaves(p_d))
    assert _maxdiff(p_ref, p_d) < 1e-5
    assert np.isfinite(h["loss"]).all()


# ----------------------------------------------------------------------------- local SGD
def test_local_steps_single_shard_equals_fit(client):
    """With one shard there is nothing to average: local SGD must equal fit exactly, which
    checks the step counter, the optimizer state round trip and the batch grouping."""
    x, y = _data(n=130)
    model = _mlp()
    p0 = fastbp.init(model, seed=4, dtype=np.float64)
    kw = dict(loss=softmax_cross_entropy, epochs=2, batch_size=16, seed=9, progress=False)
    p_ref, h_ref = fastbp.fit(model, p0, x, y, optimizer=fastbp.optim.adam(1e-2), **kw)
    xd, yd = da.from_array(x, chunks=-1), da.from_array(y, chunks=-1)
    p_d, h_d = fd.fit(model, p0, xd, yd, client=client, optimizer=fastbp.optim.adam(1e-2),
                      local_steps=3, **kw)
    assert _maxdiff(p_ref, p_d) < 1e-12
    _assert_history_close(h_ref, h_d)


def test_local_steps_learns(client):
    x, y = _data(n=400)
    model = _mlp()
    p0 = fastbp.init(model, seed=0, dtype=np.float64)
    _, h = fd.fit(model, p0, x, y, client=client, loss=softmax_cross_entropy,
                  optimizer=fastbp.optim.sgd(0.1, momentum=0.9), epochs=6, batch_size=32,
                  local_steps=4, progress=False)
    assert len(h["loss"]) == 6
    assert h["loss"][-1] < 0.7 * h["loss"][0]
    assert h["accuracy"][-1] > 0.6


def test_dropout_reproducible(client):
    x, y = _data()
    model = fastbp.Sequential(fastbp.Dense(8, 16), fastbp.ReLU(), fastbp.Dropout(0.3),
                              fastbp.Dense(16, 3))
    p0 = fastbp.init(model, seed=0, dtype=np.float64)
    kw = dict(client=client, loss=softmax_cross_entropy, optimizer=fastbp.optim.sgd(0.1),
              epochs=2, batch_size=32, progress=False)
    a, _ = fd.fit(model, p0, x, y, seed=1, **kw)
    b, _ = fd.fit(model, p0, x, y, seed=1, **kw)
    c, _ = fd.fit(model, p0, x, y, seed=2, **kw)
    assert _maxdiff(a, b) == 0
    assert _maxdiff(a, c) > 0


def test_callbacks_and_early_stop(client):
    x, y = _data()
    model = _mlp()
    p0 = fastbp.init(model, dtype=np.float64)
    seen = []

    def cb(epoch, logs, params, grads):
        seen.append((epoch, sorted(logs), _tree.same_structure(params, grads)))
        return epoch == 1

    _, h = fd.fit(model, p0, x, y, client=client, loss=softmax_cross_entropy,
                  optimizer=fastbp.optim.sgd(0.1), epochs=5, batch_size=64, progress=False,
                  callbacks=[cb])
    assert seen == [(0, ["accuracy", "loss"], True), (1, ["accuracy", "loss"], True)]
    assert len(h["loss"]) == 2


# ----------------------------------------------------------------------------- threads
def test_worker_threads(client):
    import numba
    cores = client.run(fd._cores)
    auto = fd.worker_threads(client)
    assert set(auto) == set(cores)
    for a, k in auto.items():          # 2 workers × 1 task thread on one host
        assert 1 <= k and k * 2 <= max(cores[a], 2)
    assert set(fd.worker_threads(client, numba_threads=1).values()) == {1}
    with pytest.raises(ValueError, match="numba_threads"):
        fd.worker_threads(client, numba_threads=0)

    def probe(threads):
        fd._use_threads(threads)
        return numba.get_num_threads()
    addr = sorted(auto)[0]
    assert client.submit(probe, {addr: 1}, workers=[addr], pure=False).result() == 1


# ----------------------------------------------------------------------------- errors
def test_length_mismatch(client):
    x, y = _data()
    model, p0 = _mlp(), fastbp.init(_mlp(), dtype=np.float64)
    kw = dict(client=client, loss=softmax_cross_entropy, optimizer=fastbp.optim.sgd(0.1),
              epochs=1, progress=False)
    with pytest.raises(ValueError, match="same number of samples.*203.*202"):
        fd.fit(model, p0, x, y[:-1], **kw)
    with pytest.raises(ValueError, match="same number of samples.*203.*202"):
        fd.fit(model, p0, da.from_array(x, chunks=50), da.from_array(y[:-1], chunks=50), **kw)


def test_bad_arguments(client):
    x, y = _data()
    model, p0 = _mlp(), fastbp.init(_mlp(), dtype=np.float64)
    kw = dict(loss=softmax_cross_entropy, optimizer=fastbp.optim.sgd(0.1), progress=False)
    with pytest.raises(TypeError, match="dask.distributed.Client"):
        fd.fit(model, p0, x, y, client="tcp://127.0.0.1:8786", **kw)
    with pytest.raises(ValueError, match="local_steps"):
        fd.fit(model, p0, x, y, client=client, local_steps=0, **kw)
    with pytest.raises(ValueError, match="out of range|labels must be in"):
        fd.fit(model, p0, x, y + 5, client=client, **kw)


def test_error_in_model_raises_on_client(client):
    """An exception inside a worker task is the task's own error: raised, not retried."""
    x, y = _data()
    model = _mlp()
    p0 = fastbp.init(model, dtype=np.float64)
    calls = []

    def bad_loss(out, yb):
        from distributed import get_worker
        try:
            get_worker()
        except ValueError:
            calls.append(1)                  # the client-side probe: fine
            return softmax_cross_entropy(out, yb)
        raise ArithmeticError("boom in the loss")

    with pytest.raises(ArithmeticError, match="boom"):
        fd.fit(model, p0, x, y, client=client, loss=bad_loss,
               optimizer=fastbp.optim.sgd(0.1), epochs=1, progress=False)


def test_no_workers():
    with LocalCluster(n_workers=0, processes=True, dashboard_address=":0",
                      silence_logs=50) as cluster, Client(cluster) as c:
        x, y = _data()
        model = _mlp()
        with pytest.raises(RuntimeError, match="no workers"):
            fd.fit(model, fastbp.init(model), x, y, client=c, loss=softmax_cross_entropy,
                   optimizer=fastbp.optim.sgd(0.1), progress=False)


# ----------------------------------------------------------------------------- faults
def _killer(marker, after):
    """A softmax_cross_entropy that, on a worker, kills that worker's process (os._exit)
    on its ``after``-th call, once per test (the marker file records that it happened)."""
    counter = "FASTBP_TEST_CALLS_" + str(abs(hash(marker)))

    def loss(out, yb):
        from distributed import get_worker
        try:
            get_worker()
        except ValueError:
            return softmax_cross_entropy(out, yb)
        calls = int(os.environ.get(counter, "0")) + 1
        os.environ[counter] = str(calls)
        if calls == after:
            try:
                fd_ = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pass
            else:
                os.close(fd_)
                os._exit(1)                  # the worker process dies mid-task
        return softmax_cross_entropy(out, yb)
    return loss


@pytest.mark.parametrize("kind", ["numpy", "dask"])
def test_worker_killed_mid_epoch(client, tmp_path, kind, monkeypatch):
    if kind == "dask":     # also cover params scattered to the workers (not inline)
        monkeypatch.setattr(fd, "_INLINE_BYTES", 0)
    x, y = _data(n=224)                      # 7 steps per epoch
    model = _mlp()
    p0 = fastbp.init(model, seed=1, dtype=np.float64)
    kw = dict(optimizer=fastbp.optim.adam(1e-2), epochs=3, batch_size=32, seed=5,
              progress=False)
    p_ref, h_ref = fastbp.fit(model, p0, x, y, loss=softmax_cross_entropy, **kw)
    marker = tmp_path / "killed"
    if kind == "dask":
        x, y = da.from_array(x, chunks=56), da.from_array(y, chunks=56)
    # The module's cluster (these tests run last): its nanny restarts the killed worker.
    # Warm-up is call 1 on each worker; call 10 on one worker falls in epoch 2.
    client.wait_for_workers(2, timeout=60)
    p_d, h_d = fd.fit(model, p0, x, y, client=client, loss=_killer(str(marker), 10), **kw)
    assert marker.exists(), "no worker was killed"
    assert _maxdiff(p_ref, p_d) < 1e-12
    _assert_history_close(h_ref, h_d)


# ----------------------------------------------------------------------------- README
def test_readme_cluster_example_runs_as_a_script(tmp_path):
    """The README's cluster example, pasted into a file and run with python, as a new user
    would (worker processes re-import the file, so it must run as a real script)."""
    import pathlib
    import re
    import subprocess
    import sys
    readme = pathlib.Path(__file__).resolve().parents[1] / "README.md"
    blocks = [b for b in re.findall(r"```python\n(.*?)```", readme.read_text(), flags=re.S)
              if "fastbp.distributed.fit" in b]
    if not blocks:
        pytest.skip("README has no fastbp.distributed example yet")
    script = tmp_path / "train_on_cluster.py"
    script.write_text(blocks[0])
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    acc = float(re.search(r"test accuracy: ([0-9.]+)", r.stdout).group(1))
    assert acc > 0.9
