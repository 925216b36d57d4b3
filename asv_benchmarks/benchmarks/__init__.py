"""asv benchmarks for fastbp: one module per kernel family, plus end-to-end training steps,
compile latency, thread hygiene, scaling, and fastbp/PyTorch ratios.

``FASTBP_ASV_SMOKE=1`` trims every benchmark to its first parameter values (see ``smoke``).

Conventions: every ``setup`` runs the code it times once first, so JIT compilation (or the
load from Numba's on-disk cache) stays out of the timings. A benchmark that cannot run
here (a layer family not implemented yet, PyTorch not installed) raises
``NotImplementedError`` in ``setup``, which asv reports as skipped.
"""
import os
import subprocess
import sys

import numpy as np


SMOKE = bool(os.environ.get("FASTBP_ASV_SMOKE"))


def smoke(params):
    """asv ``params`` as given, or only the first value of each parameter when the
    environment variable FASTBP_ASV_SMOKE is set: CI's smoke run (``asv run --quick``)
    then executes every benchmark once, on its smallest case, in a few minutes."""
    if not SMOKE:
        return params
    if isinstance(params, tuple):
        return tuple(list(v)[:1] for v in params)
    return [list(v)[:1] for v in params]


def rng():
    return np.random.default_rng(0)


def require(module_attr):
    """``getattr`` chain on fastbp, e.g. ``require("Conv2D")``; NotImplementedError when absent."""
    import fastbp
    obj = fastbp
    for part in module_attr.split("."):
        if not hasattr(obj, part):
            raise NotImplementedError(f"fastbp.{module_attr} is not available")
        obj = getattr(obj, part)
    return obj


def require_torch():
    try:
        import torch
    except ImportError:
        raise NotImplementedError("torch is not installed") from None
    return torch


def fastbp_step(name, batch=None, seq_len=None):
    """(model, params, x, y, step, fwd, bwd) for a DESIGN.md workload (``fastbp.bench``),
    float32, optionally with another batch size / sequence length. ``step`` is a full
    training step (forward, softmax cross-entropy, backward without input gradient,
    SGD update); ``fwd`` the forward pass; ``bwd`` the backward pass on a fixed cache."""
    import fastbp as F
    from fastbp import bench
    kind, spec, b = bench.WORKLOADS[name]
    b = batch or b
    r = rng()
    if kind == "mlp":
        layers = []
        for i, (a, c) in enumerate(zip(spec[:-1], spec[1:])):
            layers += [F.Dense(a, c)] + ([F.ReLU()] if i < len(spec) - 2 else [])
        x = r.standard_normal((b, spec[0]), dtype=np.float32)
    elif kind == "cnn_lenet":
        C = require
        layers = [C("Conv2D")(1, 8, 5), F.ReLU(), C("MaxPool2D")(2), C("Conv2D")(8, 16, 5),
                  F.ReLU(), C("MaxPool2D")(2), F.Flatten(), F.Dense(256, 10)]
        x = r.standard_normal((b, 1, 28, 28), dtype=np.float32)
    elif kind == "cnn_cifar":
        C = require
        layers = [C("Conv2D")(3, 32, 3, padding=1), F.ReLU(), C("Conv2D")(32, 32, 3, padding=1),
                  F.ReLU(), C("MaxPool2D")(2), F.Flatten(), F.Dense(8192, 10)]
        x = r.standard_normal((b, 3, 32, 32), dtype=np.float32)
    else:
        D, H, T, K = spec
        T = seq_len or T
        rec = require("RNN" if kind == "rnn" else "LSTM")(D, H, return_sequences=False)
        layers = [rec, F.Dense(H, K)]
        x = r.standard_normal((T, b, D), dtype=np.float32)
    model = F.Sequential(*layers)
    y = r.integers(0, 10, size=b)
    params = F.init(model, seed=0, dtype=np.float32)
    opt = F.optim.sgd(bench.LR)
    box = [params, opt.init(params)]
    loss = F.losses.softmax_cross_entropy

    def step():
        p, s = box
        out, cache = F.forward(model, p, x, train=True)
        _, dout = loss(out, y)
        _, g = F.backward(model, p, cache, dout, input_grad=False)
        box[0], box[1] = opt.update(p, g, s)

    out, cache = F.forward(model, params, x, train=True)
    _, dout = loss(out, y)

    def fwd():
        F.forward(model, params, x, train=True)

    def bwd():
        F.backward(model, params, cache, dout, input_grad=False)

    step(), fwd(), bwd()   # warm the JIT
    return step, fwd, bwd


def run_python(code, env_update=None, unset=(), timeout=900):
    """Run ``python -c code`` in a fresh process; returns (wall seconds, stdout, CPU
    seconds). CPU time (user + system) barely depends on other load on the machine.

    ``env_update`` is merged into the current environment; names in ``unset`` are removed.
    """
    import resource
    import time
    env = dict(os.environ)
    for k in unset:
        env.pop(k, None)
    env.update(env_update or {})
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=env, timeout=timeout)
    wall = time.perf_counter() - t
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
    if p.returncode != 0:
        raise RuntimeError(f"subprocess failed ({p.returncode}): {p.stderr.strip()[-2000:]}")
    return wall, p.stdout, cpu
