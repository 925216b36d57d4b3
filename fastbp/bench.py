"""``fastbp bench``: fastbp against PyTorch eager and JAX on the DESIGN.md workloads.

Every (peer, workload) pair runs in its own subprocess with the thread count fixed through
the environment, so thread pools never fight. Each worker builds the workload, warms up
(JIT compile), then times single float32 training steps (forward, softmax cross-entropy,
backward without the input gradient, SGD update) and reports the median. On Linux each
worker also records the share of CPU time the hypervisor gave to other guests ("steal",
from /proc/stat) while it timed, and the table flags workloads measured under steal.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

# name: (kind, spec, batch); spec documented by the builders below
WORKLOADS = {
    "mlp_small": ("mlp", (64, 128, 128, 10), 32),
    "mlp_mnist": ("mlp", (784, 256, 256, 10), 128),
    "mlp_large": ("mlp", (1024, 2048, 2048, 10), 256),
    "cnn_lenet": ("cnn_lenet", None, 64),
    "cnn_cifar": ("cnn_cifar", None, 32),
    "rnn_seq": ("rnn", (32, 128, 50, 10), 32),       # D, H, T, classes
    "lstm_seq": ("lstm", (32, 128, 50, 10), 32),
    "lstm_tiny": ("lstm", (8, 32, 100, 10), 1),
}
TARGETS = {"mlp_small": 0.5, "mlp_mnist": 0.8, "mlp_large": 1.0, "cnn_lenet": 0.5,
           "cnn_cifar": 0.9, "rnn_seq": 0.8, "lstm_seq": 0.8, "lstm_tiny": 0.5}
PEERS = ("fastbp", "torch", "jax")
LR = 0.01


def step_flops(name):
    """GEMM-dominated FLOPs of one training step (forward 1×, backward 2× minus the first
    layer's input gradient), or None where the count is not a plain GEMM count."""
    kind, spec, batch = WORKLOADS[name]
    if kind == "mlp":
        pairs = list(zip(spec[:-1], spec[1:]))
        fwd = sum(2 * batch * a * b for a, b in pairs)
        return 3 * fwd - 2 * batch * pairs[0][0] * pairs[0][1]
    if kind in ("rnn", "lstm"):
        D, H, T, K = spec
        G = H if kind == "rnn" else 4 * H
        fwd = T * 2 * batch * (D * G + H * G) + 2 * batch * H * K
        return 3 * fwd - T * 2 * batch * D * G
    return None


# ---------------------------------------------------------------------------- builders
def _data(name, rng):
    kind, spec, batch = WORKLOADS[name]
    if kind == "mlp":
        x = rng.standard_normal((batch, spec[0]), dtype=np.float32)
    elif kind == "cnn_lenet":
        x = rng.standard_normal((batch, 1, 28, 28), dtype=np.float32)
    elif kind == "cnn_cifar":
        x = rng.standard_normal((batch, 3, 32, 32), dtype=np.float32)
    else:
        D, H, T, K = spec
        x = rng.standard_normal((T, batch, D), dtype=np.float32)
    y = rng.integers(0, 10, size=batch)
    return x, y


def build_fastbp(name):
    import fastbp
    kind, spec, batch = WORKLOADS[name]
    F = fastbp
    if kind == "mlp":
        layers = []
        for i, (a, b) in enumerate(zip(spec[:-1], spec[1:])):
            layers += [F.Dense(a, b)] + ([F.ReLU()] if i < len(spec) - 2 else [])
        model = F.Sequential(*layers)
    elif kind == "cnn_lenet":
        model = F.Sequential(F.Conv2D(1, 8, 5), F.ReLU(), F.MaxPool2D(2), F.Conv2D(8, 16, 5),
                             F.ReLU(), F.MaxPool2D(2), F.Flatten(), F.Dense(256, 10))
    elif kind == "cnn_cifar":
        model = F.Sequential(F.Conv2D(3, 32, 3, padding=1), F.ReLU(),
                             F.Conv2D(32, 32, 3, padding=1), F.ReLU(), F.MaxPool2D(2),
                             F.Flatten(), F.Dense(8192, 10))
    else:
        D, H, T, K = spec
        rec = F.RNN(D, H, return_sequences=False) if kind == "rnn" else \
            F.LSTM(D, H, return_sequences=False)
        model = F.Sequential(rec, F.Dense(H, K))
    params = F.init(model, seed=0, dtype=np.float32)
    opt = F.optim.sgd(LR)
    state = opt.init(params)
    x, y = _data(name, np.random.default_rng(0))
    loss = F.losses.softmax_cross_entropy
    box = [params, state]

    def step():
        p, s = box
        out, cache = F.forward(model, p, x, train=True)
        _, dout = loss(out, y)
        _, g = F.backward(model, p, cache, dout, input_grad=False)
        box[0], box[1] = opt.update(p, g, s)
    return step


def build_torch(name):
    import torch
    import torch.nn as nn
    kind, spec, batch = WORKLOADS[name]
    torch.manual_seed(0)
    if kind == "mlp":
        layers = []
        for i, (a, b) in enumerate(zip(spec[:-1], spec[1:])):
            layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(spec) - 2 else [])
        model = nn.Sequential(*layers)
    elif kind == "cnn_lenet":
        model = nn.Sequential(nn.Conv2d(1, 8, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 5),
                              nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(256, 10))
    elif kind == "cnn_cifar":
        model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
                              nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                              nn.Flatten(), nn.Linear(8192, 10))
    else:
        D, H, T, K = spec
        rnn = nn.RNN(D, H) if kind == "rnn" else nn.LSTM(D, H)
        head = nn.Linear(H, K)

        class Last(nn.Module):
            def __init__(self):
                super().__init__()
                self.rnn, self.head = rnn, head

            def forward(self, x):
                return self.head(self.rnn(x)[0][-1])
        model = Last()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    x, y = _data(name, np.random.default_rng(0))
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    lossf = nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        lossf(model(x), y).backward()
        opt.step()
    return step


def build_jax(name):
    import jax
    import jax.numpy as jnp
    kind, spec, batch = WORKLOADS[name]
    rng = np.random.default_rng(0)

    def dense(a, b):
        lim = np.sqrt(6.0 / (a + b))
        return [jnp.asarray(rng.uniform(-lim, lim, (a, b)).astype(np.float32)),
                jnp.zeros(b, jnp.float32)]

    def conv(c, f, k):
        return [jnp.asarray((rng.standard_normal((f, c, k, k)) * np.sqrt(2 / (c * k * k))).astype(np.float32)),
                jnp.zeros(f, jnp.float32)]

    def conv_apply(p, h, pad):
        out = jax.lax.conv_general_dilated(h, p[0], (1, 1), [(pad, pad), (pad, pad)],
                                           dimension_numbers=("NCHW", "OIHW", "NCHW"))
        return out + p[1][None, :, None, None]

    def pool(h):
        return jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 1, 2, 2), (1, 1, 2, 2), "VALID")

    if kind == "mlp":
        params = [dense(a, b) for a, b in zip(spec[:-1], spec[1:])]

        def apply(p, h):
            for i, (W, b) in enumerate(p):
                h = h @ W + b
                if i < len(p) - 1:
                    h = jax.nn.relu(h)
            return h
    elif kind == "cnn_lenet":
        params = [conv(1, 8, 5), conv(8, 16, 5), dense(256, 10)]

        def apply(p, h):
            h = pool(jax.nn.relu(conv_apply(p[0], h, 0)))
            h = pool(jax.nn.relu(conv_apply(p[1], h, 0)))
            return h.reshape(h.shape[0], -1) @ p[2][0] + p[2][1]
    elif kind == "cnn_cifar":
        params = [conv(3, 32, 3), conv(32, 32, 3), dense(8192, 10)]

        def apply(p, h):
            h = jax.nn.relu(conv_apply(p[0], h, 1))
            h = pool(jax.nn.relu(conv_apply(p[1], h, 1)))
            return h.reshape(h.shape[0], -1) @ p[2][0] + p[2][1]
    else:
        D, H, T, K = spec
        G = H if kind == "rnn" else 4 * H
        params = [[dense(D, G)[0], dense(H, G)[0], jnp.zeros(G, jnp.float32)], dense(H, K)]

        def apply(p, xs):
            Wx, Wh, b = p[0]
            n = xs.shape[1]
            if kind == "rnn":
                def cell(h, xt):
                    h = jnp.tanh(xt @ Wx + h @ Wh + b)
                    return h, None
                h, _ = jax.lax.scan(cell, jnp.zeros((n, H), jnp.float32), xs)
            else:
                def cell(hc, xt):
                    h, c = hc
                    z = xt @ Wx + h @ Wh + b
                    i, f, g, o = jnp.split(z, 4, axis=-1)
                    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
                    h = jax.nn.sigmoid(o) * jnp.tanh(c)
                    return (h, c), None
                (h, _), _ = jax.lax.scan(cell, (jnp.zeros((n, H), jnp.float32),) * 2, xs)
            return h @ p[1][0] + p[1][1]

    def loss(p, x, y):
        logits = apply(p, x)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))

    @jax.jit
    def train_step(p, x, y):
        g = jax.grad(loss)(p, x, y)
        return jax.tree_util.tree_map(lambda a, b: a - LR * b, p, g)

    x, y = _data(name, np.random.default_rng(0))
    x, y = jnp.asarray(x), jnp.asarray(y)
    box = [params]

    def step():
        box[0] = jax.block_until_ready(train_step(box[0], x, y))
    return step


BUILDERS = {"fastbp": build_fastbp, "torch": build_torch, "jax": build_jax}


# ---------------------------------------------------------------------------- worker
def _time_steps(step, repeat, budget):
    for _ in range(3):
        step()
    times, t_end = [], time.perf_counter() + budget
    while len(times) < repeat and (len(times) < 5 or time.perf_counter() < t_end):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def gemm_peak(n=2048, repeat=10):
    """float32 GEMM GFLOP/s from NumPy's BLAS on an n×n product: the best of ``repeat``
    (a peak is a best case; on a shared machine a median would count other load)."""
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    a @ a
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        a @ a
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / min(times) / 1e9


def cpu_times(path="/proc/stat"):
    """The machine's aggregate CPU time counters (the ``cpu`` line of /proc/stat: user,
    nice, system, idle, iowait, irq, softirq, steal, ...) as ints, or None off Linux."""
    try:
        with open(path) as f:
            fields = f.readline().split()
    except OSError:
        return None
    if len(fields) < 9 or fields[0] != "cpu":
        return None
    return tuple(int(v) for v in fields[1:])


def steal_share(before, after):
    """The share of CPU time a hypervisor gave to other guests ("steal") between two
    ``cpu_times`` readings: Δsteal / Δ(user + nice + system + idle + iowait + irq + softirq
    + steal), over all CPUs; None when unknown. On a shared VM a high share means the
    timings in between were disturbed."""
    if before is None or after is None:
        return None
    d = [b - a for a, b in zip(before[:8], after[:8])]
    total = sum(d)
    return d[7] / total if total > 0 else None


def _worker(peer, name, repeat, budget):
    if peer == "peak":
        return {"gflops": gemm_peak()}
    try:
        step = BUILDERS[peer](name)
    except ImportError as e:
        return {"error": f"not installed ({e.name})"}
    except AttributeError as e:
        return {"error": f"not implemented ({e})"}
    before = cpu_times()
    times = _time_steps(step, repeat, budget)
    out = {"median_s": float(np.median(times)), "q25_s": float(np.percentile(times, 25)),
           "q75_s": float(np.percentile(times, 75)), "n": len(times)}
    steal = steal_share(before, cpu_times())
    if steal is not None:
        out["steal"] = steal
    return out


def _thread_env(threads, peer="fastbp"):
    """The environment of a worker process. PyTorch and JAX get the user's environment
    without what fastbp filled in (``config.SET_BY_FASTBP``: OMP_WAIT_POLICY=PASSIVE slows
    PyTorch's OpenMP) and without fastbp's optional MKL, as if fastbp were not there."""
    env = dict(os.environ)
    if peer not in ("fastbp", "peak"):
        from . import config
        for var in config.SET_BY_FASTBP:
            env.pop(var, None)
        env["FASTBP_ENV_DEFAULTS"] = "0"
        env["FASTBP_MKL"] = "0"
    for var in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    if threads == 1:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                            " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1").strip()
    env.setdefault("JAX_PLATFORMS", "cpu")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return env


def run_one(peer, name, threads, repeat, budget, timeout=900):
    """Run one (peer, workload) measurement in a fresh subprocess; returns its result dict."""
    cmd = [sys.executable, "-m", "fastbp.bench", "--worker", peer, "--workloads", name,
           "--repeat", str(repeat), "--budget", str(budget)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=_thread_env(threads, peer),
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": "timeout"}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"failed: {tail[:200]}"}
    return json.loads(lines[-1])


def available_peers():
    import importlib.util
    return ["fastbp"] + [p for p in ("torch", "jax") if importlib.util.find_spec(p)]


def machine_info():
    import numba

    from . import _blas
    blas = f"OpenBLAS ({_blas.name})" if _blas.name else "Numba's np.dot"
    if _blas.dense_mkl:
        blas = f"MKL (threaded GEMMs; one-thread GEMMs from 32 rows) + {blas} (thinner ones)"
    elif _blas.mkl is not None:
        blas += " + MKL (one-thread GEMMs)"
    return {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.machine(),
            "cpus": os.cpu_count(), "python": platform.python_version(),
            "numpy": np.__version__, "numba": numba.__version__, "fastbp_blas": blas}


def _measure(peer, name, threads, repeat, budget, max_steal, retries, progress, tag):
    """``run_one``, repeated up to ``retries`` times while its CPU steal exceeds
    ``max_steal``; keeps the least disturbed measurement (with ``"tries"`` when repeated)."""
    best, tries = None, 0
    while True:
        r = run_one(peer, name, threads, repeat, budget)
        tries += 1
        if progress:
            msg = f"{r['median_s'] * 1e3:.3f} ms" if "median_s" in r else r["error"]
            if "steal" in r:
                msg += f", steal {r['steal']:.0%}"
            progress(f"  {name:<10} {peer:<7} {msg}{tag}")
        ok = "median_s" in r
        if best is None or (ok and ("median_s" not in best
                                    or r.get("steal", 0) < best.get("steal", 0))):
            best = r
        if max_steal is None or not ok or r.get("steal", 0) <= max_steal or tries > retries:
            break
    if tries > 1:
        best = dict(best, tries=tries)
    return best


def run(workloads, threads, repeat=200, budget=3.0, peers=None, progress=print, rounds=1,
        max_steal=None, retries=2):
    """Measure ``workloads`` for every installed peer. Returns the result dict.

    With ``rounds`` > 1 every (workload, peer) is measured that many times, the peer order
    rotating from round to round (on a shared machine the process that runs right after
    another one measured up to 30% slower). Each peer's ``median_s`` is then the median of
    its per-round medians, ``rounds_s`` lists them, and ``ratios`` holds fastbp / best
    peer of each round; ``q25_s``/``q75_s`` are those of the median round.

    ``max_steal`` (a share, e.g. 0.05): a measurement during which the hypervisor took more
    CPU time than that (see ``steal_share``) is repeated, up to ``retries`` more times, and
    the least disturbed one is kept.
    """
    peers = peers or available_peers()
    rounds = max(1, int(rounds))
    res = {"info": machine_info(), "threads": threads, "rounds": rounds, "results": {}}
    if max_steal is not None:
        res["max_steal"] = max_steal
    res["gemm_peak_gflops"] = run_one("peak", "mlp_small", threads, 1, 1).get("gflops")
    for name in workloads:
        per_round = []
        for k in range(rounds):
            order = peers[k % len(peers):] + peers[:k % len(peers)]
            tag = f" (round {k + 1})" if rounds > 1 else ""
            got = {}
            for peer in order:
                got[peer] = _measure(peer, name, threads, repeat, budget, max_steal, retries,
                                     progress, tag)
            per_round.append(got)
        res["results"][name] = _combine(per_round, peers)
    return res


def _combine(per_round, peers):
    """One workload's per-round results -> {peer: result} (+ "ratios" when rounds > 1)."""
    if len(per_round) == 1:
        return per_round[0]
    out, ratios = {}, []
    for peer in peers:
        ok = [r[peer] for r in per_round if "median_s" in r[peer]]
        if not ok:
            out[peer] = per_round[0][peer]
            continue
        meds = [r["median_s"] for r in ok]
        mid = ok[int(np.argsort(meds)[(len(meds) - 1) // 2])]     # the median round
        out[peer] = {"median_s": float(np.median(meds)), "rounds_s": meds,
                     "n": sum(r["n"] for r in ok)}
        out[peer].update({k: mid[k] for k in ("q25_s", "q75_s") if k in mid})
        steals = [r["steal"] for r in ok if "steal" in r]
        if steals:
            out[peer]["steal_rounds"] = steals
        if any(r.get("tries", 1) > 1 for r in ok):
            out[peer]["tries_rounds"] = [r.get("tries", 1) for r in ok]
    for r in per_round:
        others = [v["median_s"] for p, v in r.items() if p != "fastbp" and "median_s" in v]
        if "median_s" in r.get("fastbp", {}) and others:
            ratios.append(r["fastbp"]["median_s"] / min(others))
    if ratios:
        out["ratios"] = ratios
    return out


def _steals(r):
    """Every steal share measured for one workload's result (all peers, all rounds)."""
    out = []
    for v in r.values():
        if isinstance(v, dict):
            out += v.get("steal_rounds", [v["steal"]] if "steal" in v else [])
    return out


STEAL_NOTE = 0.05   # the table flags workloads measured while the hypervisor took more


def format_table(res) -> str:
    """The results as a Markdown table. The "CPU steal" column is the largest share of CPU
    time taken by other guests while any of the workload's steps were timed (Linux)."""
    peers = [p for p in PEERS if any(p in r for r in res["results"].values())]
    ranged = res.get("rounds", 1) > 1
    stolen = any(_steals(r) for r in res["results"].values())
    head = "| workload | " + " | ".join(f"{p} (ms)" for p in peers) + \
        " | fastbp / best peer |" + (" per-round ratios |" if ranged else "") + \
        " target | fastbp % of GEMM peak |" + (" CPU steal |" if stolen else "")
    lines = [head, "|" + "---|" * (len(peers) + 4 + ranged + stolen)]
    flagged = []
    peak = res.get("gemm_peak_gflops")
    for name, r in res["results"].items():
        cells, med = [], {}
        for p in peers:
            if "median_s" in r.get(p, {}):
                med[p] = r[p]["median_s"]
                cells.append(f"{med[p] * 1e3:.3f}")
            else:
                cells.append(r.get(p, {}).get("error", "-"))
        others = [v for k, v in med.items() if k != "fastbp"]
        ratio = f"{med['fastbp'] / min(others):.2f}" if "fastbp" in med and others else "-"
        flops = step_flops(name)
        frac = f"{flops / med['fastbp'] / 1e9 / peak:.0%}" if flops and peak and "fastbp" in med else "-"
        spread = ""
        if ranged:
            rs = r.get("ratios", [])
            spread = f" {min(rs):.2f}-{max(rs):.2f} |" if rs else " - |"
        steal = ""
        if stolen:
            st = _steals(r)
            steal = f" {max(st):.0%} |" if st else " - |"
            if st and max(st) > STEAL_NOTE:
                flagged.append(name)
        lines.append(f"| {name} | " + " | ".join(cells) +
                     f" | {ratio} |{spread} ≤ {TARGETS[name]} | {frac} |{steal}")
    if flagged:
        lines.append(f"\nThe hypervisor took more than {STEAL_NOTE:.0%} of the CPU time while "
                     f"{', '.join(flagged)} ran: those timings were disturbed by other guests.")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="fastbp bench", description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", default=",".join(WORKLOADS),
                    help="comma-separated subset of: " + ", ".join(WORKLOADS))
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--repeat", type=int, default=200, help="max timed steps per measurement")
    ap.add_argument("--budget", type=float, default=3.0, help="seconds of timed steps per measurement")
    ap.add_argument("--rounds", type=int, default=1,
                    help="measure every pair this many times, rotating the peer order")
    ap.add_argument("--peers", default=None, help="comma-separated subset of fastbp,torch,jax")
    ap.add_argument("--max-steal", type=float, default=None, metavar="SHARE",
                    help="repeat a measurement (up to --retries times) while the hypervisor "
                         "took more than this share of CPU time during it, e.g. 0.05")
    ap.add_argument("--retries", type=int, default=2, help="see --max-steal")
    ap.add_argument("--json", default=None, help="write the results to this file")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.max_steal is not None and not 0 <= args.max_steal < 1:
        ap.error(f"--max-steal must be a share in [0, 1), got {args.max_steal}")
    if args.retries < 0:
        ap.error(f"--retries must be >= 0, got {args.retries}")
    names = [w.strip() for w in args.workloads.split(",") if w.strip()]
    bad = [w for w in names if w not in WORKLOADS]
    if bad:
        ap.error(f"unknown workload(s) {bad}; choose from {list(WORKLOADS)}")
    if args.worker:
        print(json.dumps(_worker(args.worker, names[0], args.repeat, args.budget)))
        return 0
    peers = args.peers.split(",") if args.peers else None
    print(f"fastbp bench: {len(names)} workload(s), {args.threads} thread(s), peers "
          f"{', '.join(peers or available_peers())}", flush=True)
    res = run(names, args.threads, args.repeat, args.budget, peers,
              progress=lambda m: print(m, flush=True), rounds=args.rounds,
              max_steal=args.max_steal, retries=args.retries)
    info = res["info"]
    print(f"\nmeasured {info['date']} on {info['cpus']}-CPU {info['machine']}, Python "
          f"{info['python']}, numba {info['numba']}, fastbp on {info.get('fastbp_blas', '?')}; "
          "float32 GEMM peak "
          f"{res['gemm_peak_gflops']:.0f} GFLOP/s; medians of single training steps"
          + (f", median over {res['rounds']} rounds" if res["rounds"] > 1 else "") + "\n")
    print(format_table(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
