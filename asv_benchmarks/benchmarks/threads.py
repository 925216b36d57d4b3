"""Thread-pool hygiene between Numba's OpenMP threads and OpenBLAS's threads: before/after.

When a parallel Numba region ends, libgomp's idle workers spin (busy-wait) for a while
before sleeping; OpenBLAS's GEMM, which runs next on its own threads, then shares the
2 cores with spinning threads. Without MKL fastbp sets ``OMP_WAIT_POLICY=PASSIVE`` at
import (unless the user set ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT``), so idle workers
sleep at once; with MKL's threaded GEMMs (the ``mkl`` extra) it sets
``GOMP_SPINCOUNT=10000`` instead (MKL and Numba then share libgomp's workers).

Each run is a fresh process (the policy is read when libgomp starts):
- ``PASSIVE``: fastbp's default without MKL (after).
- ``spin-10000``: fastbp's default with MKL.
- ``ACTIVE``: idle workers spin forever (before, worst case).
- ``libgomp-default``: what you get without fastbp's setting (spin ~300k iterations, then
  sleep); simulated by setting ``GOMP_SPINCOUNT=300000`` so fastbp leaves the policy alone.

Two workloads: ``pair`` = a parallel ReLU over 65,536 floats then a 256³ float32 GEMM
(Numba's np.dot, SciPy's OpenBLAS), alternating (µs per pair); ``mlp_mnist`` = one
training step of the mlp_mnist workload (ms), which alternates the same way.
"""
import statistics

from . import run_python, smoke

POLICIES = {"PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
            "spin-10000": {"GOMP_SPINCOUNT": "10000"},
            "ACTIVE": {"OMP_WAIT_POLICY": "ACTIVE"},
            "libgomp-default": {"GOMP_SPINCOUNT": "300000"}}

CODE = r"""
import time, numpy as np, numba
import fastbp
from fastbp.kernels.activations import relu_forward
from fastbp import bench

@numba.njit          # no cache=True: this source has no file
def gemm(a, b):
    return np.dot(a, b)

r = np.random.default_rng(0)
a = r.standard_normal((256, 256), dtype=np.float32)
x = r.standard_normal(1 << 16, dtype=np.float32)
out = np.empty_like(x)

def pair():
    relu_forward.parallel(x, out)
    gemm(a, a)

def median_time(f, budget=1.5, most=400):
    for _ in range(3):
        f()
    ts, end = [], time.perf_counter() + budget
    while len(ts) < 5 or (len(ts) < most and time.perf_counter() < end):
        t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
    return float(np.median(ts))

which = WHICH
f = pair if which == "pair" else bench.build_fastbp("mlp_mnist")
print(median_time(f))
"""


class WaitPolicy:
    params = smoke((list(POLICIES), ["pair", "mlp_mnist"]))
    param_names = ["OMP wait policy", "workload"]
    timeout = 300
    unit = "seconds"
    number = 1
    repeat = 1

    def track_time(self, policy, which):
        env = {"OMP_NUM_THREADS": "2", "NUMBA_NUM_THREADS": "2", "OPENBLAS_NUM_THREADS": "2"}
        env.update(POLICIES[policy])
        code = CODE.replace("WHICH", repr(which))
        runs = [float(run_python(code, env, unset=("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"))[1])
                for _ in range(2)]
        return statistics.median(runs)
