"""Ahead-of-time compilation: ``fastbp.warmup()`` compiles every kernel in one go.

Numba compiles a kernel on its first call for each argument type signature. With
``cache=True`` the machine code is written to disk, so this is paid once per machine;
``warmup`` pays it up front (e.g. in a Docker build step or before a timing run) instead
of inside the first training step.

How: it runs small representative calls through the PUBLIC API (every layer in
``fastbp.layers.__all__``, every loss, every optimizer variant, a small ``Sequential``,
the element-wise math functions), for each dtype, once with every kernel forced to its
serial build and once forced to its parallel build. So it compiles exactly the signatures
real calls use, including those of kernel families added later, without a list of kernel
signatures to keep in sync. Families whose layers are not present are skipped.

It is not meant to run while other threads make fastbp calls: it temporarily replaces the
serial/parallel decision (``config.use_parallel``) for the whole process.
"""
from __future__ import annotations

import sys
import time

import numpy as np

from . import _jit, config

FAMILIES = ("dense", "activations", "dropout", "losses", "optim", "conv", "pool", "rnn", "lstm")

# layer class name -> (family, [(constructor args, constructor kwargs, input shape,
#                                forward kwargs), ...]). Names not listed here are tried
# as parameterless element-wise layers on a (3, 8) input ("activations").
_LAYERS = {
    "Dense": ("dense", [((6, 5), {}, (3, 6), {}), ((6, 5), {}, (3, 6), {"relu": True}),
                        ((6, 5), {"bias": False}, (2, 3, 6), {})]),
    "Maxout": ("dense", [((6, 4), {"pieces": 2}, (3, 6), {})]),
    "Identity": ("activations", [((), {}, (3, 8), {})]),
    "LeakyReLU": ("activations", [((0.1,), {}, (3, 8), {})]),
    "ELU": ("activations", [((), {}, (3, 8), {})]),
    "Softmax": ("activations", [((), {}, (3, 8), {}), ((), {}, (2, 3, 8), {})]),
    "NoisyReLU": ("activations", [((0.5,), {}, (3, 8), {})]),
    "Dropout": ("dropout", [((0.5,), {}, (3, 8), {})]),
    "Flatten": ("activations", [((), {}, (2, 3, 4), {})]),
    "Conv2D": ("conv", [((2, 3, 3), {}, (2, 2, 7, 7), {}),
                        ((2, 3, 3), {}, (2, 2, 7, 7), {"relu": True}),
                        ((2, 3, (3, 2)), {"stride": 2, "padding": 1, "bias": False},
                         (2, 2, 7, 6), {}),
                        ((2, 3, 3), {"stride": (1, 2), "padding": (1, 0)}, (1, 2, 6, 7), {}),
                        # larger calls take other code paths (conv: per-tap GEMMs,
                        # im2col + GEMM, and for one input channel the flipped-kernel dx)
                        ((1, 8, 3), {"padding": 1}, (2, 1, 16, 16), {}),
                        ((4, 8, 3), {"padding": 1}, (2, 4, 16, 16), {}),
                        ((4, 8, 3), {"padding": 1}, (2, 4, 16, 16), {"relu": True}),
                        ((4, 8, 3), {"stride": 2, "padding": 1}, (2, 4, 16, 16), {})]),
    "MaxPool2D": ("pool", [((2,), {}, (2, 3, 8, 8), {}), ((3,), {"stride": 2}, (2, 3, 9, 9), {})]),
    "AvgPool2D": ("pool", [((2,), {}, (2, 3, 8, 8), {}), ((3,), {"stride": 2}, (2, 3, 9, 9), {})]),
    "RNN": ("rnn", [((4, 5), {}, (3, 2, 4), {}), ((4, 5), {"return_sequences": False}, (3, 2, 4), {}),
                    ((4, 5), {"nonlinearity": "relu"}, (3, 2, 4), {})]),
    "LSTM": ("lstm", [((4, 5), {}, (3, 2, 4), {}),
                      ((4, 5), {"return_sequences": False}, (3, 2, 4), {})]),
}
_NOT_LAYERS = {"Layer", "final_state"}

_OPTIMIZERS = [("sgd", {}), ("sgd", {"momentum": 0.9}), ("sgd", {"momentum": 0.9, "nesterov": True}),
               ("sgd", {"weight_decay": 0.1}), ("adagrad", {}), ("rmsprop", {}),
               ("rmsprop", {"centered": True, "momentum": 0.9}), ("adam", {}),
               ("adam", {"amsgrad": True}), ("adamw", {})]


class _Run:
    def __init__(self, dtype, progress):
        self.dtype = np.dtype(dtype)
        self.rng = np.random.default_rng(0)
        self.progress = progress
        self.skipped = []     # (what, reason)
        self.calls = 0

    def x(self, shape):
        return self.rng.standard_normal(shape).astype(self.dtype)

    def attempt(self, what, fn):
        t = time.perf_counter()
        try:
            fn()
            self.calls += 1
        except Exception as e:  # a representative call that no longer fits the API
            self.skipped.append((what, f"{type(e).__name__}: {e}"))
        if self.progress and time.perf_counter() - t > 2.0:
            print(f"fastbp.warmup:   {what} {self.dtype.name}: {time.perf_counter() - t:.1f} s",
                  file=sys.stderr, flush=True)


def _layer_calls(run, name, cls, cases):
    for args, kwargs, shape, fkw in cases:
        def call(args=args, kwargs=kwargs, shape=shape, fkw=fkw):
            layer = cls(*args, **kwargs)
            params = layer.init(run.rng, run.dtype)
            x = run.x(shape)
            for train in (True, False):
                y, cache = layer.forward(params, x, train=train, rng=run.rng, **fkw)
                dy = run.x(np.shape(y))
                layer.backward(params, cache, dy, input_grad=True)
                layer.backward(params, cache, dy, input_grad=False)
        run.attempt(f"{name}{args}{kwargs or ''}", call)


def _layers(run, families):
    from . import layers
    for name in getattr(layers, "__all__", []):
        if name in _NOT_LAYERS or not isinstance(getattr(layers, name, None), type):
            continue
        family, cases = _LAYERS.get(name, ("activations", [((), {}, (3, 8), {})]))
        if family in families:
            _layer_calls(run, name, getattr(layers, name), cases)


def _network(run):
    import fastbp as F
    model = F.Sequential(F.Dense(6, 8), F.ReLU(), F.Dense(8, 3))
    x, labels = run.x((4, 6)), np.array([0, 1, 2, 1])

    def call():
        params = F.init(model, seed=0, dtype=run.dtype)
        out, cache = F.forward(model, params, x, train=True, seed=0)
        _, dout = F.losses.softmax_cross_entropy(out, labels)
        F.backward(model, params, cache, dout, input_grad=False)
        F.backward(model, params, cache, dout)
        F.predict(model, params, x)
    run.attempt("Sequential(Dense, ReLU, Dense)", call)

    def split():                    # the pieces of large chains on MKL (fastbp._mlp)
        from . import _mlp
        a, b, out = run.x((4, 6)), run.x((6, 64)), np.empty((4, 64), run.dtype)
        old = _mlp.SPLIT_MACS
        _mlp.SPLIT_MACS = 0
        try:
            _mlp.gemm(False, False, a, b, out, 2)      # column blocks, one-thread GEMMs
            _mlp.gemm(False, False, a, b, out, 1)      # one GEMM
        finally:
            _mlp.SPLIT_MACS = old
        db = np.empty(64, run.dtype)
        _mlp.D.bias_relu(out, db, True)
        _mlp.D.mask_colsum(out, out, True, True, db)
    run.attempt("Sequential(Dense, ...) on split GEMMs", split)


def _math(run):
    from .kernels import _math as fm
    x = run.x((16,))
    for f in (fm.exp, fm.tanh, fm.sigmoid):
        run.attempt(f"kernels._math.{f.__name__}", lambda f=f: f(x))


def _cells(run, families):
    """Kernel-level single-step functions of the recurrent families (not used by layers)."""
    import importlib
    N, D, H = 2, 4, 5
    x, h = run.x((N, D)), run.x((N, H))
    if "conv" in families:
        from .kernels import conv as K

        def conv_gemm():                # the im2col path ("auto" takes it without CBLAS)
            x, W, b = run.x((2, 4, 16, 16)), run.x((8, 4, 3, 3)), run.x((8,))
            for relu in (False, True):
                y = K.conv2d_forward(x, W, b, 1, 1, relu, "gemm")
                K.conv2d_backward(x, W, run.x(y.shape), 1, 1, True, True, y if relu else None,
                                  "gemm")
        run.attempt("kernels.conv im2col + GEMM, stride 1", conv_gemm)

        def conv_tap_rows():            # the split loops' body, reached only from them
            from . import _blas, _pool
            x, W, b = run.x((2, 2, 6, 6)), run.x((3, 2, 3, 3)), run.x((3,))
            Wk = np.ascontiguousarray(W.transpose(2, 0, 3, 1))
            S, g = K._tap_plan(x.shape, 3, 3, 3, 1, 1)
            G, mkl = -(-2 // g), _blas.mkl_one_thread_count()
            y = np.empty((2, 3, 6, 6), dtype=x.dtype)
            P = g * S + K.PITCH_PAD          # a group's entries per packed row, with the pad
            xbuf, tbuf = run.x((6 * P,)), run.x((3 * 3 * P,))
            none, nidx = K._no_pool(x.dtype)
            for mode in (0, 1, 2):
                K._tap_forward_rows(x, Wk, b, 1, 1, True, 0, 2, g, mode, xbuf, tbuf, y,
                                    mkl, K._NO_POOL, none, nidx)
                for size in (2, 3):             # fused max pooling: the 2×2 kernel, another
                    yp = np.empty((2, 3, 6 // size, 6 // size), dtype=x.dtype)
                    K._tap_forward_rows(x, Wk, b, 1, 1, True, 0, 2, g, mode, xbuf,
                                        tbuf, y, mkl, np.full(4, size, np.int64), yp,
                                        np.empty(yp.shape, np.int32))
            dWt, dbg = np.zeros((G, 3, 3, 2, 3), x.dtype), np.zeros((G, 3), x.dtype)
            K._tap_backward_rows(x, Wk, run.x(y.shape), y, True, 1, 1, 0, 2, g, True, xbuf,
                                 tbuf, run.x((6 * P,)), dWt, dbg, np.empty_like(x), mkl,
                                 nidx)
            yp = run.x((2, 3, 3, 3))            # behind a fused max pooling
            K._tap_backward_rows(x, Wk, run.x(yp.shape), yp, True, 1, 1, 0, 2, g, True, xbuf,
                                 tbuf, run.x((6 * P,)), dWt, dbg, np.empty_like(x), mkl,
                                 np.zeros(yp.shape, np.int32))
            q = yp.reshape(6, 9)                # reached from compiled code only
            K._dz_pooled(q, q, np.zeros(q.shape, np.int32), True, 0, 2, 8, 6, 6,
                         run.x((3, 96)), run.x((6,)), dbg, 0)
            _pool.claim(np.zeros(1, np.int64))
        if K._cblas.available:
            run.attempt("kernels.conv per-tap rows", conv_tap_rows)

        def conv_winograd():            # "auto" takes it from 16 channels only
            x, W, b = run.x((2, 2, 6, 6)), run.x((3, 2, 3, 3)), run.x((3,))
            for relu in (False, True):
                y = K.conv2d_forward(x, W, b, 1, 1, relu, "winograd")
                K.conv2d_backward(x, W, run.x(y.shape), 1, 1, True, True,
                                  y if relu else None, "winograd")
                for size in (2, 3):     # fused max pooling: the 2×2 kernel, another
                    yp, idx = K.conv2d_maxpool_forward(x, W, b, 1, 1, relu, size, None,
                                                       "winograd")
                    K.conv2d_maxpool_backward(x, W, run.x(yp.shape), idx, yp, 1, 1, size,
                                              None, True, True, relu, "winograd")
            U = K._wg.transform_weights(W)      # the claimed loops' bodies, called directly
            rb, v, mb, s4 = (run.x((k,)) for k in K._wg.scratch_sizes(2, 3, 6, 6))
            K._wg.forward_sample(x, 0, U, b, 1, 1, True, np.empty((3, 6, 6), x.dtype), rb, v,
                                 mb, s4)
            K._wg.products(x, 0, U, 1, 1, 3, 3, rb, v, mb)
            K._wg.transform_input(x, 0, 1, 1, 3, 3, rb, v)
            K._wg.forward_pool2_sample(x, 0, U, b, 1, 1, True, 6, 6,
                                       np.empty((3, 3, 3), x.dtype),
                                       np.empty((3, 3, 3), np.int32), rb, v, mb, s4)
            rb, v, g4, d = (run.x((k,)) for k in K._wg.gradient_sizes(2, 3, 6, 6))
            K._wg.dw_sample(x, run.x((2, 3, 6, 6)), 0, 1, 1, rb, v, g4, d,
                            np.zeros((16, 3, 2), x.dtype), 1)
        if K._cblas.available:
            run.attempt("kernels.conv Winograd", conv_winograd)
    if "rnn" in families:
        try:
            R = importlib.import_module("fastbp.kernels.rnn")
        except ImportError:
            R = None
        if hasattr(R, "rnn_cell_forward"):
            Wx, Wh, b = run.x((D, H)), run.x((H, H)), run.x((H,))

            def rnn(relu):
                h_new = R.rnn_cell_forward(x, h, Wx, Wh, b, relu=relu)
                h_new = h_new[0] if isinstance(h_new, tuple) else h_new
                R.rnn_cell_backward(x, h, h_new, Wx, Wh, run.x((N, H)), relu=relu)
            for relu in (False, True):
                run.attempt(f"kernels.rnn.rnn_cell(relu={relu})", lambda r=relu: rnn(r))
        if hasattr(R, "_rnn_forward_rows"):           # the batch-split chunks (_pool.py)
            def rnn_rows():
                T = 3
                xs, h0 = run.x((T, N, D)), run.x((N, H))
                Wx, Wh, b = run.x((D, H)), run.x((H, H)), run.x((H,))
                hs = np.empty((T, N, H), run.dtype)
                R._rnn_forward_rows(xs, h0, Wx, Wh, b, False, hs, 0, N)
                dx, dh0 = np.empty((T, N, D), run.dtype), np.empty((N, H), run.dtype)
                R._rnn_backward_rows(xs, h0, hs, Wx, np.ascontiguousarray(Wh.T), run.x((T, N, H)),
                                     run.x((N, H)), False, True, dx, dh0, 0, N)
            run.attempt("kernels.rnn batch-split chunks", rnn_rows)
    if "lstm" in families:
        try:
            L = importlib.import_module("fastbp.kernels.lstm")
        except ImportError:
            L = None
        if hasattr(L, "lstm_cell_forward"):
            Wx, Wh, b, c = run.x((D, 4 * H)), run.x((H, 4 * H)), run.x((4 * H,)), run.x((N, H))

            def lstm():
                h_new, c_new, gates = L.lstm_cell_forward(x, h, c, Wx, Wh, b)
                L.lstm_cell_backward(x, h, c, c_new, gates, Wx, Wh, run.x((N, H)), run.x((N, H)))
            run.attempt("kernels.lstm.lstm_cell", lstm)
        if hasattr(L, "_lstm_forward_rows"):
            def lstm_rows():
                T = 3
                xs, h0, c0 = run.x((T, N, D)), run.x((N, H)), run.x((N, H))
                Wx, Wh, b = run.x((D, 4 * H)), run.x((H, 4 * H)), run.x((4 * H,))
                g = np.empty((T, N, 4 * H), run.dtype)
                cs, hs = np.empty((T, N, H), run.dtype), np.empty((T, N, H), run.dtype)
                L._lstm_forward_rows(xs, h0, c0, Wx, Wh, b, g, cs, hs, 0, N)
                dx = np.empty((T, N, D), run.dtype)
                dh0, dc0 = np.empty((N, H), run.dtype), np.empty((N, H), run.dtype)
                L._lstm_backward_rows(xs, h0, c0, g, cs, hs, Wx, np.ascontiguousarray(Wh.T),
                                      run.x((T, N, H)), run.x((N, H)), run.x((N, H)), True, dx,
                                      dh0, dc0, 0, N)
            run.attempt("kernels.lstm batch-split chunks", lstm_rows)


def _losses(run):
    from . import losses as L
    z, z3 = run.x((4, 5)), run.x((2, 3, 5))
    lab, lab3 = np.array([0, 4, 2, 1]), np.array([[0, 1, 2], [3, 4, 0]])
    prob = np.full((4, 5), 0.2, run.dtype)
    t01 = run.rng.uniform(0, 1, (4, 5)).astype(run.dtype)
    cases = {"softmax_cross_entropy": [(z, lab), (z3, lab3), (z, prob)],
             "mse": [(z, t01)], "binary_cross_entropy": [(z, t01)],
             "hinge": [(z, lab), (z3, lab3)]}
    for name in getattr(L, "__all__", []):
        f = getattr(L, name, None)
        if callable(f):
            for args in cases.get(name, [(z, t01)]):
                run.attempt(f"losses.{name}", lambda f=f, args=args: f(*args))


def _optim(run):
    from . import optim as O
    params = [{"W": run.x((3, 4)), "b": run.x((4,))}, {}]
    grads = [{"W": run.x((3, 4)), "b": run.x((4,))}, {}]
    variants = list(_OPTIMIZERS)
    known = {n for n, _ in variants} | {"Optimizer", "global_norm", "clip_by_global_norm"}
    variants += [(n, {}) for n in getattr(O, "__all__", []) if n not in known]
    for name, kw in variants:
        factory = getattr(O, name, None)
        if not callable(factory):
            continue

        def call(factory=factory, kw=kw):
            opt = factory(**kw)
            if not (hasattr(opt, "init") and hasattr(opt, "update")):
                return
            state = opt.init(params)
            p, state = opt.update(params, grads, state)
            opt.update(p, grads, state)
        run.attempt(f"optim.{name}({kw})", call)
    for name in ("global_norm", "clip_by_global_norm"):
        f = getattr(O, name, None)
        if f is not None:
            args = (grads,) if name == "global_norm" else (grads, 1.0)
            run.attempt(f"optim.{name}", lambda f=f, args=args: f(*args))


def _check_families(families):
    if families is None:
        return set(FAMILIES)
    if isinstance(families, str):
        families = [families]
    bad = [f for f in families if f not in FAMILIES]
    if bad:
        raise ValueError(f"warmup: unknown kernel families {bad}; expected some of {list(FAMILIES)}")
    return set(families)


def _check_dtypes(dtypes):
    if isinstance(dtypes, (str, type, np.dtype)):
        dtypes = [dtypes]
    out = []
    for d in dtypes:
        try:
            dt = np.dtype(d)
        except TypeError:
            dt = None
        if dt not in (np.float32, np.float64):
            raise TypeError(f"warmup: dtypes must be float32 and/or float64, got {d!r}")
        out.append(dt)
    return out


def uncovered(families=None):
    """Compiled entry points (``_jit.all_dispatchers``) of ``families`` (``None``: all)
    that nothing has compiled in this process yet. A DualKernel counts as one entry,
    named without ``.serial``/``.parallel``, and is covered when either build is: some
    serial builds are only ever reached from inside other compiled code (the optimizers'
    ``*_multi`` loops), and warm-up forces both modes, so a reachable build is compiled."""
    fams = set(FAMILIES) if families is None else _check_families(families)
    seen = {}
    for name, fam, d in _jit.all_dispatchers():
        if fam not in fams and not (families is None and fam is None):
            continue
        key = name.rsplit(".", 1)[0] if name.endswith((".serial", ".parallel")) else name
        seen[key] = seen.get(key, False) or bool(d.signatures)
    return [k for k, ok in seen.items() if not ok]


def warmup(dtypes=("float32", "float64"), families=None, progress=False):
    """Compile (or load from the on-disk cache) every fastbp kernel, serial and parallel.

    dtypes: ``"float32"``, ``"float64"`` or both (default). families: ``None`` for all, or
    names from ``FAMILIES`` (e.g. ``["dense", "losses", "optim"]``). progress: print one
    line per family and dtype to stderr.

    Returns a dict: ``seconds`` (wall time), ``calls`` (representative calls made),
    ``skipped`` (list of ``(call, reason)`` for calls that failed, e.g. a family whose
    layers changed) and ``uncovered`` (kernels of the chosen families still without a
    compiled signature; empty when everything was reached).
    """
    dts = _check_dtypes(dtypes)
    fams = _check_families(families)
    t0 = time.perf_counter()
    calls, skipped = 0, []
    saved = config.use_parallel
    try:
        for parallel in (False, True):
            config.use_parallel = (lambda family, work, _p=parallel: _p)
            for dt in dts:
                run = _Run(dt, progress)
                steps = [("layers", lambda: _layers(run, fams)),
                         ("cells", lambda: _cells(run, fams))]
                if "dense" in fams:
                    steps.append(("network", lambda: _network(run)))
                if "activations" in fams:
                    steps.append(("math", lambda: _math(run)))
                if "losses" in fams:
                    steps.append(("losses", lambda: _losses(run)))
                if "optim" in fams:
                    steps.append(("optim", lambda: _optim(run)))
                for what, step in steps:
                    t = time.perf_counter()
                    step()
                    if progress:
                        print(f"fastbp.warmup: {what:<8} {dt.name} "
                              f"{'parallel' if parallel else 'serial  '} "
                              f"{time.perf_counter() - t:6.2f} s", file=sys.stderr, flush=True)
                calls += run.calls
                skipped += run.skipped
    finally:
        config.use_parallel = saved
    return {"seconds": time.perf_counter() - t0, "calls": calls, "skipped": skipped,
            "uncovered": uncovered(None if families is None else fams)}
