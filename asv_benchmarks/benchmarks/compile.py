"""Compile latency, measured in fresh Python processes.

- ``track_first_step_warm_cache``: wall time of a whole fresh process (interpreter start,
  ``import fastbp``, one mlp_small training step) with the kernel cache already on disk.
  Target: <= 1.0 s. ``*_cpu`` variants give the process's CPU time (user + system),
  which hardly depends on other load: a good proxy for the wall time on a quiet machine.
- ``track_import``: the same for ``import fastbp`` alone.
- ``track_first_step_cold_cache``: the mlp_small step with an empty cache (compiles what
  that step needs).
- ``track_warmup_cold_cache``: ``fastbp.warmup()`` (every kernel, serial and parallel,
  float32 and float64) into an empty cache. Target: <= 90 s.
- ``track_warmup_warm_cache``: the same with the cache filled (loading only).
  Set ``FASTBP_ASV_SKIP_COLD_WARMUP=1`` to skip these two (1-2 min) in smoke runs.
"""
import os
import shutil
import statistics
import tempfile

from . import run_python

STEP = """
import numpy as np
import fastbp as F
m = F.Sequential(F.Dense(64, 128), F.ReLU(), F.Dense(128, 128), F.ReLU(), F.Dense(128, 10))
p = F.init(m, seed=0)
x = np.random.default_rng(0).standard_normal((32, 64), dtype=np.float32)
y = np.arange(32) % 10
opt = F.optim.sgd(0.01)
s = opt.init(p)
out, cache = F.forward(m, p, x, train=True)
_, d = F.losses.softmax_cross_entropy(out, y)
_, g = F.backward(m, p, cache, d, input_grad=False)
p, s = opt.update(p, g, s)
"""

WARMUP = "from fastbp.warmup import warmup; print(warmup()['seconds'])"


def _cache_env(path):
    # Bytecode (.pyc) is allowed, as in a normal install, but kept out of the source tree.
    return {"NUMBA_CACHE_DIR": path, "PYTHONPYCACHEPREFIX": os.path.join(path, "pyc")}


def _run(code, cache, timeout=900):
    return run_python(code, _cache_env(cache), unset=("PYTHONDONTWRITEBYTECODE",),
                      timeout=timeout)


class CompileLatency:
    timeout = 900
    unit = "seconds"
    number = 1
    repeat = 1

    def setup(self):
        self.cold = tempfile.mkdtemp(prefix="fastbp-asv-cold-")
        self.warm = tempfile.mkdtemp(prefix="fastbp-asv-warm-")
        _run(STEP, self.warm)        # fill the cache used by the warm runs

    def teardown(self):
        shutil.rmtree(self.cold, ignore_errors=True)
        shutil.rmtree(self.warm, ignore_errors=True)

    def track_first_step_warm_cache(self):
        return statistics.median(_run(STEP, self.warm)[0] for _ in range(3))

    def track_first_step_warm_cache_cpu(self):
        return statistics.median(_run(STEP, self.warm)[2] for _ in range(3))

    def track_import(self):
        return statistics.median(_run("import fastbp", self.warm)[0] for _ in range(3))

    def track_first_step_cold_cache(self):
        shutil.rmtree(self.cold, ignore_errors=True)
        os.makedirs(self.cold)
        return _run(STEP, self.cold)[0]


class WarmupAll:
    """fastbp.warmup() for both dtypes: cold cache (the compile budget), then warm."""
    timeout = 1800
    unit = "seconds"
    number = 1
    repeat = 1

    def setup_cache(self):
        # asv runs setup_cache once per benchmark class, before the track_ methods.
        # The cold compile takes 1-2 min on 2 vCPUs; a CI smoke run may skip it.
        if os.environ.get("FASTBP_ASV_SKIP_COLD_WARMUP"):
            return None                      # setup() then skips (setup_cache may not)
        cache = tempfile.mkdtemp(prefix="fastbp-asv-warmup-")
        try:
            cold = _run(WARMUP, cache, timeout=1800)
            warm = _run(WARMUP, cache, timeout=1800)
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        return {"cold": cold[0], "cold_cpu": cold[2], "warm": warm[0]}

    def setup(self, *_):
        if os.environ.get("FASTBP_ASV_SKIP_COLD_WARMUP"):
            raise NotImplementedError("FASTBP_ASV_SKIP_COLD_WARMUP is set")

    def track_warmup_cold_cache(self, res):
        return res["cold"]

    def track_warmup_cold_cache_cpu(self, res):
        return res["cold_cpu"]

    def track_warmup_warm_cache(self, res):
        return res["warm"]
