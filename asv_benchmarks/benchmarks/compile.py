"""Compile latency, measured in fresh Python processes.

- ``track_first_step_warm_cache``: wall time of a whole fresh process (interpreter start,
  ``import fastbp``, one mlp_small training step) with the kernel cache already on disk.
  Target: <= 1.0 s.
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

WARMUP = "import fastbp.warmup as w; r = w.warmup(); print(r['seconds'])"


def _cache_env(path):
    return {"NUMBA_CACHE_DIR": path}


class CompileLatency:
    timeout = 900
    unit = "seconds"
    number = 1
    repeat = 1

    def setup(self):
        self.cold = tempfile.mkdtemp(prefix="fastbp-asv-cold-")
        self.warm = tempfile.mkdtemp(prefix="fastbp-asv-warm-")
        run_python(STEP, _cache_env(self.warm))        # fill the cache used by the warm runs

    def teardown(self):
        shutil.rmtree(self.cold, ignore_errors=True)
        shutil.rmtree(self.warm, ignore_errors=True)

    def track_first_step_warm_cache(self):
        return statistics.median(run_python(STEP, _cache_env(self.warm))[0] for _ in range(3))

    def track_import(self):
        return statistics.median(run_python("import fastbp", _cache_env(self.warm))[0]
                                 for _ in range(3))

    def track_first_step_cold_cache(self):
        shutil.rmtree(self.cold, ignore_errors=True)
        os.makedirs(self.cold)
        return run_python(STEP, _cache_env(self.cold))[0]


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
            raise NotImplementedError("FASTBP_ASV_SKIP_COLD_WARMUP is set")
        cache = tempfile.mkdtemp(prefix="fastbp-asv-warmup-")
        try:
            cold = run_python(WARMUP, _cache_env(cache), timeout=1800)[0]
            warm = run_python(WARMUP, _cache_env(cache), timeout=1800)[0]
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        return {"cold": cold, "warm": warm}

    def track_warmup_cold_cache(self, res):
        return res["cold"]

    def track_warmup_warm_cache(self, res):
        return res["warm"]
