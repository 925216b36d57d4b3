"""Scaling: training-step time against batch size and sequence length (both should grow
linearly), and the speed-up from 1 to 2 threads on the large workloads.

``track_*_linearity`` report ``t(largest) / (k · t(smallest))`` where ``k`` is the size
ratio: 1.0 is exactly linear, below 1 means the larger size is relatively cheaper (small
sizes pay fixed overheads), above 1 super-linear.
"""
import statistics
import time

from fastbp import bench

from . import fastbp_step, smoke


def _median(f, repeat=15):
    f()
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


class BatchSize:
    params = smoke((["mlp_mnist", "lstm_seq"], [16, 64, 256]))
    param_names = ["workload", "batch"]
    timeout = 300

    def setup(self, name, batch):
        self.step = fastbp_step(name, batch=batch)[0]

    def time_step(self, name, batch):
        self.step()


class SequenceLength:
    params = smoke((["rnn_seq", "lstm_seq"], [25, 50, 100]))
    param_names = ["workload", "T"]
    timeout = 300

    def setup(self, name, T):
        self.step = fastbp_step(name, seq_len=T)[0]

    def time_step(self, name, T):
        self.step()


class BatchLinearity:
    params = smoke([["mlp_mnist", "lstm_seq"]])
    param_names = ["workload"]
    timeout = 300
    unit = "t(256) / (8 t(32))"

    def setup(self, name):
        small, large = fastbp_step(name, batch=32)[0], fastbp_step(name, batch=256)[0]
        self.ratio = _median(large) / (8 * _median(small))

    def track_batch_linearity(self, name):
        return self.ratio


class SeqLenLinearity:
    params = smoke([["rnn_seq", "lstm_seq"]])
    param_names = ["workload"]
    timeout = 300
    unit = "t(T=160) / (8 t(T=20))"

    def setup(self, name):
        small, large = fastbp_step(name, seq_len=20)[0], fastbp_step(name, seq_len=160)[0]
        self.ratio = _median(large) / (8 * _median(small))

    def track_seq_len_linearity(self, name):
        return self.ratio


class ThreadSpeedup:
    """t(1 thread) / t(2 threads) of a training step, each in a fresh process with every
    thread pool (Numba, OpenMP, OpenBLAS) set to that count (``fastbp.bench.run_one``)."""
    params = smoke([["mlp_large", "cnn_cifar", "lstm_seq"]])
    param_names = ["workload"]
    timeout = 600
    unit = "speed-up"

    def setup(self, name):
        one = bench.run_one("fastbp", name, 1, repeat=20, budget=1.5)
        two = bench.run_one("fastbp", name, 2, repeat=20, budget=1.5)
        if "median_s" not in one or "median_s" not in two:
            raise NotImplementedError(one.get("error") or two.get("error"))
        self.speedup = one["median_s"] / two["median_s"]

    def track_speedup(self, name):
        return self.speedup
