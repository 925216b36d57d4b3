"""``python -m fastbp.tune``: measure where parallel kernels start to pay off.

For each kernel family, representative public calls (a layer's forward or backward, a
loss, an optimizer update) run at a range of sizes, once with that family forced to its
serial builds and once forced to its parallel builds (the other families keep their
thresholds). The work values the calls pass to the serial/parallel decision are
recorded, so the crossover comes out in the same units as ``fastbp.config.thresholds``.

Timing: serial and parallel runs are interleaved (so a load change hits both), each
sample is a batch of calls lasting about 2 ms, and the median of ``--repeats`` samples
is used. The crossover of a call is the smallest measured work from which the parallel
build wins, and keeps winning at 80% of the larger sizes; the suggested family threshold is the geometric
median of its calls' crossovers, rounded to a power of two. Families whose layers are
missing, or that make no serial/parallel decision (Dense uses BLAS), are skipped.

    python -m fastbp.tune                       # all families, ~2-4 min on 2 vCPUs
    python -m fastbp.tune --families losses optim --repeats 41
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import numpy as np

from . import config

SIZES = [1 << k for k in range(8, 22, 1)]   # elements, for element-wise families


# ------------------------------------------------------------------ representative calls
def _x(shape, rng):
    return rng.standard_normal(shape).astype(np.float32)


def _layer_case(make_layer, shape_of, backward=False, fkw=None):
    """A maker: size -> zero-argument callable running the layer's forward (or backward)."""
    def make(size, rng):
        import fastbp as F
        layer = make_layer(F)
        params = layer.init(rng, np.float32)
        x = _x(shape_of(size), rng)
        kw = fkw or {}
        if not backward:
            return lambda: layer.forward(params, x, train=True, rng=rng, **kw)
        y, cache = layer.forward(params, x, train=True, rng=rng, **kw)
        dy = _x(np.shape(y), rng)
        return lambda: layer.backward(params, cache, dy, input_grad=True)
    return make


def _loss_case(name, kind):
    def make(size, rng):
        import fastbp as F
        f = getattr(F.losses, name)
        if kind == "index":
            z = _x((max(1, size // 10), 10), rng)
            y = rng.integers(0, 10, z.shape[0])
        else:
            z = _x((size,), rng)
            y = rng.uniform(0, 1, size).astype(np.float32)
        return lambda: f(z, y)
    return make


def _optim_case(name, **kw):
    def make(size, rng):
        import fastbp as F
        opt = getattr(F.optim, name)(**kw)
        params = [{"W": _x((size,), rng)}]
        grads = [{"W": _x((size,), rng)}]
        state = opt.update(params, grads, opt.init(params))[1]
        return lambda: opt.update(params, grads, state)
    return make


def _flat(size):
    return (max(1, size // 256), 256) if size >= 256 else (1, size)


def _img(c, hw):
    return lambda size: (max(1, size // (c * hw * hw)), c, hw, hw)


def _seq(T, D):
    return lambda size: (T, max(1, size // 4096), D)


# family -> [(label, maker, sizes)]. Sizes are element counts of the input (roughly).
CASES = {
    "activations": [
        ("ReLU.forward", _layer_case(lambda F: F.ReLU(), _flat), SIZES),
        ("Tanh.forward", _layer_case(lambda F: F.Tanh(), _flat), SIZES),
        ("Sigmoid.backward", _layer_case(lambda F: F.Sigmoid(), _flat, backward=True), SIZES),
        ("Softmax.forward", _layer_case(lambda F: F.Softmax(), _flat), SIZES),
    ],
    "dropout": [
        ("Dropout.forward", _layer_case(lambda F: F.Dropout(0.5), _flat), SIZES),
        ("Dropout.backward", _layer_case(lambda F: F.Dropout(0.5), _flat, backward=True), SIZES),
    ],
    "losses": [
        ("softmax_cross_entropy", _loss_case("softmax_cross_entropy", "index"), SIZES),
        ("mse", _loss_case("mse", "flat"), SIZES),
        ("binary_cross_entropy", _loss_case("binary_cross_entropy", "flat"), SIZES),
    ],
    "optim": [
        ("adam.update", _optim_case("adam"), SIZES),
        ("sgd(momentum).update", _optim_case("sgd", momentum=0.9), SIZES),
    ],
    "dense": [
        ("Dense+ReLU.forward", _layer_case(lambda F: F.Dense(256, 256), _flat,
                                           fkw={"relu": True}), SIZES[:11]),
        ("Maxout.forward", _layer_case(lambda F: F.Maxout(256, 64, pieces=4), _flat), SIZES[:11]),
    ],
    "conv": [
        ("Conv2D(8,16,3).forward", _layer_case(lambda F: F.Conv2D(8, 16, 3, padding=1),
                                               _img(8, 16)), SIZES[3:]),
        ("Conv2D(8,16,3).backward", _layer_case(lambda F: F.Conv2D(8, 16, 3, padding=1),
                                                _img(8, 16), backward=True), SIZES[3:]),
    ],
    "pool": [
        ("MaxPool2D(2).forward", _layer_case(lambda F: F.MaxPool2D(2), _img(8, 16)), SIZES[3:]),
        ("MaxPool2D(2).backward", _layer_case(lambda F: F.MaxPool2D(2), _img(8, 16),
                                              backward=True), SIZES[3:]),
        ("AvgPool2D(2).forward", _layer_case(lambda F: F.AvgPool2D(2), _img(8, 16)), SIZES[3:]),
    ],
    "rnn": [
        ("RNN(32,128).forward", _layer_case(lambda F: F.RNN(32, 128), _seq(10, 32)), SIZES[4:]),
        ("RNN(32,128).backward", _layer_case(lambda F: F.RNN(32, 128), _seq(10, 32),
                                             backward=True), SIZES[4:]),
    ],
    "lstm": [
        ("LSTM(32,128).forward", _layer_case(lambda F: F.LSTM(32, 128), _seq(10, 32)), SIZES[4:]),
        ("LSTM(32,128).backward", _layer_case(lambda F: F.LSTM(32, 128), _seq(10, 32),
                                              backward=True), SIZES[4:]),
    ],
}


# ------------------------------------------------------------------------- measuring
class _Forced:
    """Context: force ``family`` to serial/parallel and record the work it is asked about."""

    def __init__(self, family, parallel, log=None):
        self.family, self.parallel, self.log = family, parallel, log

    def __enter__(self):
        self.saved = saved = config.use_parallel
        fam, par, log = self.family, self.parallel, self.log

        def decide(family, work):
            if family != fam:
                return saved(family, work)
            if log is not None:
                log.append(work)
            return par
        config.use_parallel = decide

    def __exit__(self, *exc):
        config.use_parallel = self.saved


def _batch_time(fn, inner):
    t = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t) / inner


def measure(fn, family, repeats=21, target=2e-3):
    """(work, serial seconds, parallel seconds) for one call, medians of ``repeats``
    interleaved samples; ``work`` is the largest work value the call reported (None if
    the call made no serial/parallel decision for ``family``)."""
    log = []
    with _Forced(family, False, log):
        fn()                                   # compile / warm
        one = _batch_time(fn, 1)
    with _Forced(family, True):
        fn()
    if not log:
        return None, None, None
    inner = max(1, min(2000, int(target / max(one, 1e-7))))
    ser, par = [], []
    for _ in range(repeats):
        with _Forced(family, False):
            ser.append(_batch_time(fn, inner))
        with _Forced(family, True):
            par.append(_batch_time(fn, inner))
    return max(log), statistics.median(ser), statistics.median(par)


def crossover(rows, share=0.8):
    """Smallest work from which parallel keeps winning.

    rows: [(work, serial, parallel)] sorted by work. The crossover is the first size at
    which parallel wins and also wins at ``share`` (80%) of the larger sizes, so one noisy
    sample does not move it. Returns (threshold, note): the geometric mean of that size
    and the one below it, or the ends of the range when parallel always / never wins.
    """
    if not rows:
        return None, "no data"
    win = [p < s for _, s, p in rows]
    for i, w in enumerate(win):
        if w and sum(win[i:]) >= share * (len(win) - i):
            if i == 0:
                return rows[0][0], "parallel won at every size"
            return math.sqrt(rows[i - 1][0] * rows[i][0]), ""
    return 2 * rows[-1][0], "parallel never won"


def _pow2(x):
    return 1 << max(0, round(math.log2(max(x, 1))))


def tune_family(family, repeats=21, progress=print):
    """Measure every representative call of ``family``. Returns
    ``{"calls": {label: {"rows": [...], "crossover": w, "note": s}}, "threshold": t}``
    (threshold None when nothing could be measured)."""
    out = {"calls": {}, "threshold": None}
    rng = np.random.default_rng(0)
    for label, make, sizes in CASES.get(family, []):
        rows = []
        try:
            for size in sizes:
                fn = make(size, rng)
                work, s, p = measure(fn, family, repeats)
                if work is None:
                    break
                if rows and work == rows[-1][0]:
                    continue
                rows.append((work, s, p))
                progress(f"  {label:<26} work {work:>9}  serial {s * 1e6:9.1f} us  "
                         f"parallel {p * 1e6:9.1f} us  {s / p:5.2f}x")
        except (AttributeError, ImportError, NotImplementedError) as e:
            progress(f"  {label:<26} skipped ({type(e).__name__}: {e})")
            continue
        if not rows:
            progress(f"  {label:<26} skipped (no serial/parallel decision in family {family})")
            continue
        rows.sort()
        w, note = crossover(rows)
        out["calls"][label] = {"rows": rows, "crossover": w, "note": note}
        progress(f"  -> {label}: crossover ~{w:,.0f} {note}")
    xs = [c["crossover"] for c in out["calls"].values()]
    if xs:
        out["threshold"] = _pow2(math.exp(statistics.median([math.log(x) for x in xs])))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m fastbp.tune", description=__doc__.split("\n")[0])
    ap.add_argument("--families", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--repeats", type=int, default=21, help="samples per size and build (median)")
    args = ap.parse_args(argv)
    import numba
    import fastbp  # noqa: F401  (prepares threads and the cache)
    if numba.get_num_threads() < 2:
        print("fastbp.tune: only one thread available; nothing to tune", file=sys.stderr)
        return 1
    print(f"fastbp.tune: {numba.get_num_threads()} threads, layer "
          f"{numba.config.THREADING_LAYER}, repeats {args.repeats} (medians, interleaved)",
          flush=True)
    found = {}
    for fam in args.families:
        print(f"{fam}:", flush=True)
        res = tune_family(fam, args.repeats, progress=lambda s: print(s, flush=True))
        if res["threshold"] is not None:
            found[fam] = res["threshold"]
    spin = config.MKL_THREADS and "GOMP_SPINCOUNT" in config.SET_BY_FASTBP
    table = "SPIN_THRESHOLDS (libgomp workers spin briefly: the mkl extra)" if spin else \
        "DEFAULT_THRESHOLDS (PASSIVE, or the user's wait policy)"
    print(f"\nsuggested thresholds for {table} in fastbp/config.py; fastbp's current "
          "defaults for this policy in brackets:")
    defaults = config.default_thresholds()
    for fam in config.DEFAULT_THRESHOLDS:
        cur = defaults[fam]
        new = found.get(fam)
        shown = f"1 << {int(math.log2(new))}" if new else f"1 << {int(math.log2(cur))}  (not measured)"
        print(f'    "{fam}": {shown},  # [{cur}]')
    return 0


if __name__ == "__main__":
    sys.exit(main())
