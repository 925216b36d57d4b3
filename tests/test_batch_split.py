"""The recurrent sequence kernels' batch split (fastbp/_pool.py): the rows of a batch run
their whole recurrence on separate threads. It must give what the unsplit kernels give,
deterministically, with every option (initial states, per-step gradients, input_grad)."""
import numpy as np
import pytest

import fastbp
from fastbp import _pool
from fastbp.kernels import lstm as KL, rnn as KR


@pytest.fixture
def force_split(monkeypatch):
    monkeypatch.setattr(_pool, "SPLIT_MACS", 0)
    monkeypatch.setattr(_pool, "MIN_ROWS", 1)


def _no_split(monkeypatch):
    monkeypatch.setattr(_pool, "SPLIT_MACS", 1 << 62)


def _rnn_case(rng, T, N, D, H, dt, per_step):
    x = rng.standard_normal((T, N, D)).astype(dt)
    h0 = rng.standard_normal((N, H)).astype(dt)
    Wx = (rng.standard_normal((D, H)) * 0.3).astype(dt)
    Wh = (rng.standard_normal((H, H)) * 0.3).astype(dt)
    b = rng.standard_normal(H).astype(dt)
    dhs = rng.standard_normal((T if per_step else 0, N, H)).astype(dt)
    dhT = rng.standard_normal((N, H)).astype(dt)
    return x, h0, Wx, Wh, b, dhs, dhT


def _run_rnn(case, relu, input_grad):
    x, h0, Wx, Wh, b, dhs, dhT = case
    hs = KR.rnn_forward(x, h0, Wx, Wh, b, relu)
    return (hs,) + tuple(KR.rnn_backward(x, h0, hs, Wx, Wh, dhs, dhT, relu, input_grad))


def _run_lstm(case, c0, input_grad):
    x, h0, Wx, Wh, b, dhs, dhT = case
    out = KL.lstm_forward(x, h0, c0, Wx, Wh, b)
    return tuple(out) + tuple(KL.lstm_backward(x, h0, c0, *out, Wx, Wh, dhs, dhT, c0,
                                               input_grad))


def _lstm_case(rng, T, N, D, H, dt, per_step):
    x, h0, Wx, Wh, b, dhs, dhT = _rnn_case(rng, T, N, D, 4 * H, dt, per_step)
    Wh = (rng.standard_normal((H, 4 * H)) * 0.3).astype(dt)
    h0 = rng.standard_normal((N, H)).astype(dt)
    dhs = rng.standard_normal((T if per_step else 0, N, H)).astype(dt)
    dhT = rng.standard_normal((N, H)).astype(dt)
    c0 = rng.standard_normal((N, H)).astype(dt)
    return (x, h0, Wx, Wh, b, dhs, dhT), c0


@pytest.mark.parametrize("kind", ["rnn_tanh", "rnn_relu", "lstm"])
@pytest.mark.parametrize("T,N", [(1, 2), (5, 3), (4, 7), (6, 16)])
@pytest.mark.parametrize("per_step", [False, True])
@pytest.mark.parametrize("input_grad", [False, True])
def test_split_equals_unsplit_float64(monkeypatch, kind, T, N, per_step, input_grad):
    rng = np.random.default_rng(T * 100 + N)
    D, H = 3, 5
    if kind == "lstm":
        case, c0 = _lstm_case(rng, T, N, D, H, np.float64, per_step)
        run = lambda: _run_lstm(case, c0, input_grad)  # noqa: E731
    else:
        case = _rnn_case(rng, T, N, D, H, np.float64, per_step)
        run = lambda: _run_rnn(case, kind == "rnn_relu", input_grad)  # noqa: E731
    _no_split(monkeypatch)
    ref = run()
    monkeypatch.setattr(_pool, "SPLIT_MACS", 0)
    monkeypatch.setattr(_pool, "MIN_ROWS", 1)
    assert _pool.row_chunks(N, 1) is not None or fastbp.get_num_threads() < 2 or N < 2
    got = run()
    assert len(got) == len(ref)
    for a, r in zip(got, ref):
        assert a.shape == r.shape and a.dtype == r.dtype
        np.testing.assert_allclose(a, r, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["rnn", "lstm"])
def test_split_is_deterministic_and_float32_stays_float32(force_split, kind):
    rng = np.random.default_rng(0)
    if kind == "lstm":
        case, c0 = _lstm_case(rng, 8, 9, 4, 6, np.float32, True)
        run = lambda: _run_lstm(case, c0, True)  # noqa: E731
    else:
        case = _rnn_case(rng, 8, 9, 4, 6, np.float32, True)
        run = lambda: _run_rnn(case, False, True)  # noqa: E731
    first, second = run(), run()
    for a, b in zip(first, second):
        assert a.dtype == np.float32
        np.testing.assert_array_equal(a, b)


def test_row_chunks(monkeypatch):
    monkeypatch.setattr(_pool, "SPLIT_MACS", 100)
    monkeypatch.setattr(_pool, "MIN_ROWS", 4)
    threads = fastbp.get_num_threads()
    assert _pool.row_chunks(64, 99) is None                 # too little work
    assert _pool.row_chunks(7, 10 ** 6) is None             # fewer than 2 x MIN_ROWS rows
    chunks = _pool.row_chunks(9, 10 ** 6)
    if threads < 2:
        assert chunks is None
    else:
        assert chunks[0][0] == 0 and chunks[-1][1] == 9
        assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))
        assert all(n1 - n0 >= 4 for n0, n1 in chunks)
    fastbp.set_num_threads(1)
    try:
        assert _pool.row_chunks(64, 10 ** 6) is None        # set_num_threads(1): never split
    finally:
        fastbp.set_num_threads(threads)


def test_an_error_in_a_chunk_is_raised_after_all_chunks_finish():
    done = []

    def fn(n0, n1):
        done.append(n0)
        if n0 == 0:
            raise ValueError("chunk 0 failed")
        return n1

    with pytest.raises(ValueError, match="chunk 0 failed"):
        _pool.run(fn, [(0, 1), (1, 2), (2, 3)])
    assert sorted(done) == [0, 1, 2]
    assert _pool.run(lambda a, b: b - a, [(0, 2), (2, 5)]) == [2, 3]


def test_layers_use_the_split_and_agree(monkeypatch):
    """The LSTM/RNN layers through the split path match the unsplit path (float64)."""
    for layer in (fastbp.LSTM(4, 6, return_sequences=False), fastbp.RNN(4, 6)):
        model = fastbp.Sequential(layer, fastbp.Dense(6, 3))
        params = fastbp.init(model, seed=1, dtype=np.float64)
        x = np.random.default_rng(2).standard_normal((5, 20, 4))
        res = []
        for macs, rows in ((1 << 62, 16), (0, 2)):
            monkeypatch.setattr(_pool, "SPLIT_MACS", macs)
            monkeypatch.setattr(_pool, "MIN_ROWS", rows)
            out, cache = fastbp.forward(model, params, x)
            _, grads = fastbp.backward(model, params, cache, np.ones_like(out))
            res.append((out, grads))
        np.testing.assert_allclose(res[0][0], res[1][0], rtol=1e-12, atol=1e-12)
        for g0, g1 in zip(res[0][1], res[1][1]):
            for k in g0:
                np.testing.assert_allclose(g0[k], g1[k], rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- the caller's spin wait
def test_spin_until_sees_another_threads_write():
    """The compiled spin re-reads the flag (an atomic load, never hoisted out of the loop):
    a value written by another Python thread while it spins ends the wait; an unreached
    target ends it after the given rounds with False."""
    import threading
    import time
    flags = np.zeros(2, np.int64)
    assert _pool._spin_until(flags, 0, 1, 1000) is False
    flags[1] = 5
    assert _pool._spin_until(flags, 1, 5, 0) is True and _pool._spin_until(flags, 1, 4, 0)

    def later():
        time.sleep(0.02)
        flags[0] = 3
    t = threading.Thread(target=later)
    t.start()
    t0 = time.perf_counter()
    assert _pool._spin_until(flags, 0, 3, 1 << 32)          # about a minute if unseen
    assert time.perf_counter() - t0 < 30
    t.join()


@pytest.mark.parametrize("spins", [0, 1, 1 << 16])
def test_pool_results_and_errors_with_any_wait(monkeypatch, spins):
    """run and run_items give every result and re-raise errors whether the caller spins
    (long enough, or one round and then blocks) or blocks at once."""
    import time
    monkeypatch.setattr(_pool, "WAIT_SPINS", spins)

    def slow(n0, n1):
        time.sleep(0.002 * n0)                  # the pool's chunks finish after the caller's
        return list(range(n0, n1))
    assert _pool.run(slow, [(0, 2), (2, 3), (3, 7)]) == [[0, 1], [2], [3, 4, 5, 6]]
    seen = []
    _pool.run_items(lambda i: (time.sleep(0.001), seen.append(i)), 9, 2)
    assert sorted(seen) == list(range(9))

    def boom(n0, n1):
        time.sleep(0.002 * n0)
        if n0 == 2:
            raise ValueError("chunk 2 failed")
    with pytest.raises(ValueError, match="chunk 2 failed"):
        _pool.run(boom, [(0, 2), (2, 3)])

    def boom_item(i):
        time.sleep(0.001)
        if i == 5:
            raise RuntimeError("item 5")
    with pytest.raises(RuntimeError, match="item 5"):
        _pool.run_items(boom_item, 12, 2)
    # the pool is still usable afterwards
    assert _pool.run(lambda a, b: b - a, [(0, 2), (2, 5)]) == [2, 3]


# ---------------------------------------------------------------- the pool threads' poll
def test_poll_until_sees_another_threads_write_and_gives_up():
    """The pool threads' poll (pause, with a sched_yield every few rounds) ends on another
    thread's write, and returns False after its rounds when nothing comes; it first marks
    the thread idle (the mark the caller of a split waits for)."""
    import threading
    import time
    flags = np.zeros(1, np.int64)
    mark = np.zeros(1, np.int64)
    assert _pool._poll_until(flags, 0, 1, 1000, 64, mark, 7, 0) is False
    assert mark[0] == 7
    assert _pool._poll_until(flags, 0, 0, 0, 64, mark, 8, 100) is True
    assert mark[0] == 8

    def later():
        time.sleep(0.02)
        flags[0] = 2
    t = threading.Thread(target=later)
    t.start()
    assert _pool._poll_until(flags, 0, 2, 1 << 40, 4, mark, 9, 16)   # hours if unseen
    assert mark[0] == 9
    t.join()


def test_split_returns_once_its_pool_threads_are_back_in_their_poll(monkeypatch):
    """A caller that spins waits for the pool threads' idle marks, not just the results:
    when run_items returns, every pool thread it used has let go of the GIL (its idle
    mark has caught up with the jobs it was given), and the results are all there."""
    monkeypatch.setattr(_pool, "WAIT_SPINS", 1 << 40)
    for _ in range(50):
        seen = []
        _pool.run_items(lambda i: seen.append(i), 6, 2)
        assert sorted(seen) == list(range(6))
        for w in _pool._pool(1):
            assert w.idle[0] == w.posted[0]


def test_run_split_prepares_on_each_thread_before_its_kernel():
    """run_split: every thread runs kernel(*prepare()) with its own prepare() result; the
    caller prepares before any pool job is handed out; errors (from prepare or the kernel,
    on either thread) are raised once both threads are done."""
    import threading
    import time
    order = []

    def prepare():
        order.append(("prepare", threading.current_thread().name))
        return (threading.current_thread().name,)

    ran = []

    def kernel(name):
        assert name == threading.current_thread().name
        time.sleep(0.002)
        ran.append(name)

    orig = _pool._Worker.submit

    def submit(self, fn):
        order.append(("submit", None))
        return orig(self, fn)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_pool._Worker, "submit", submit)
        for _ in range(5):
            order.clear()
            ran.clear()
            _pool.run_split(prepare, kernel, 2)
            me = threading.current_thread().name
            assert order[0] == ("prepare", me) and order[1] == ("submit", None)
            assert sorted(ran) == sorted([me, "fastbp-0"])
    done = []

    def slow(name):
        time.sleep(0.01)
        done.append(name)

    def boom(name):
        if name.startswith("fastbp-"):
            raise RuntimeError("pool kernel failed")
        slow(name)
    with pytest.raises(RuntimeError, match="pool kernel failed"):
        _pool.run_split(prepare, boom, 2)

    def boom_caller(name):
        if not name.startswith("fastbp-"):
            raise ValueError("caller kernel failed")
        slow(name)
    done.clear()
    with pytest.raises(ValueError, match="caller kernel failed"):
        _pool.run_split(prepare, boom_caller, 2)
    assert done == ["fastbp-0"]             # the pool job had finished before the raise
    ran.clear()
    _pool.run_split(prepare, kernel, 1)     # one thread: just the caller
    assert ran == [threading.current_thread().name]


@pytest.mark.parametrize("worker_spins", [0, 1, 1 << 20])
def test_pool_threads_pick_up_jobs_whether_polling_or_asleep(monkeypatch, worker_spins):
    """Jobs reach a pool thread that is polling, one that gives up at once and sleeps, and
    one that slept in between calls; each call gets all its own results."""
    import time
    monkeypatch.setattr(_pool, "WORKER_SPINS", worker_spins)
    for pause in (0.0, 0.01):
        time.sleep(pause)                       # the pool thread may have gone to sleep
        seen = []
        _pool.run_items(lambda i: seen.append(i), 40, 2)
        assert sorted(seen) == list(range(40))
        assert _pool.run(lambda a, b: list(range(a, b)), [(0, 3), (3, 5)]) == \
            [[0, 1, 2], [3, 4]]


@pytest.mark.timeout(120)
def test_a_split_started_on_a_pool_thread_runs_there():
    """run_items/run called from inside a pool job run serially on that thread instead of
    queueing behind the job that waits for them (which would never finish)."""
    import threading
    import time
    threads = []

    def outer(i):
        time.sleep(0.002)                       # let the pool thread claim items too
        if threading.current_thread().name.startswith("fastbp-"):
            inner = []
            _pool.run_items(lambda j: inner.append((j, threading.current_thread())), 6, 2)
            assert sorted(j for j, _ in inner) == list(range(6))
            assert {t for _, t in inner} == {threading.current_thread()}
            assert _pool.run(lambda a, b: b - a, [(0, 2), (2, 7)]) == [2, 5]
            threads.append(threading.current_thread())
    for _ in range(20):                         # the pool thread takes an item in most calls
        _pool.run_items(outer, 8, 2)
    assert threads, "the pool thread never ran an item in 20 calls"


@pytest.mark.timeout(120)
def test_concurrent_callers_share_the_pool():
    """Several Python threads splitting at once each get exactly their own items."""
    import threading
    results, errors = {}, []

    def caller(c):
        try:
            for _ in range(20):
                seen = []
                _pool.run_items(lambda i: seen.append(c * 1000 + i), 16, 2)
                assert sorted(seen) == [c * 1000 + i for i in range(16)]
            results[c] = True
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)
    ts = [threading.Thread(target=caller, args=(c,)) for c in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert not errors and len(results) == 4


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork")
def test_pool_works_in_a_forked_child():
    """A forked child has none of the parent's pool threads; it starts its own."""
    import multiprocessing as mp
    _pool.run_items(lambda i: None, 4, 2)        # the parent's pool thread exists
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_forked_split, args=(q,))
    p.start()
    p.join(60)
    assert p.exitcode == 0 and q.get(timeout=5) == list(range(10))


def _forked_split(q):
    seen = []
    _pool.run_items(seen.append, 10, 2)
    q.put(sorted(seen))


# ---------------------------------------------------------------- compiled work claiming
def test_claim_hands_out_every_number_once_across_threads():
    """``_pool.claim`` is one atomic fetch-and-add: compiled loops on several threads at
    once (GIL released) claim 0, 1, 2, ... with no number lost or given twice."""
    import threading
    from numba import njit

    @njit(nogil=True)
    def grab(counter, n, got):
        k = 0
        while True:
            i = _pool.claim(counter)
            if i >= n:
                return k
            got[i] += 1
            for _ in range(50):                 # a little work between claims
                k += 1

    n = 200_000
    counter = np.zeros(1, np.int64)
    got = np.zeros(n, np.int64)
    grab(np.zeros(1, np.int64), 0, got)          # compile first
    ts = [threading.Thread(target=grab, args=(counter, n, got)) for _ in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert (got == 1).all()
    assert counter[0] >= n


def test_a_job_that_raises_does_not_kill_its_pool_thread():
    """A job escaping with an error (the pool's own jobs never do) leaves the thread alive
    for the next calls."""
    w = _pool._pool(1)[0]
    ran = []

    def bad():
        raise RuntimeError("escaped")
    w.submit(bad)
    w.submit(lambda: ran.append(1))
    for _ in range(2000):
        if ran:
            break
        import time
        time.sleep(0.001)
    assert ran == [1] and w.thread.is_alive()
    seen = []
    _pool.run_items(seen.append, 10, 2)
    assert sorted(seen) == list(range(10))
