"""fastbp / PyTorch-eager time ratio per DESIGN.md workload (lower is better; < 1 means
fastbp is faster). Each side runs in its own subprocess through ``fastbp.bench`` (same
harness and thread settings as ``fastbp bench``, 2 threads), so the two thread pools
never meet. Skipped when torch is not installed or fastbp lacks the workload's layers."""
import importlib.util

from fastbp import bench

from . import require_torch, smoke


class TorchRatio:
    params = smoke([list(bench.WORKLOADS)])
    param_names = ["workload"]
    timeout = 600
    unit = "ratio"

    def setup(self, name):
        if importlib.util.find_spec("torch") is None:
            require_torch()
        a = bench.run_one("fastbp", name, 2, repeat=30, budget=1.0)
        if "median_s" not in a:
            raise NotImplementedError(f"fastbp: {a.get('error')}")
        b = bench.run_one("torch", name, 2, repeat=30, budget=1.0)
        if "median_s" not in b:
            raise NotImplementedError(f"torch: {b.get('error')}")
        self.ratio = a["median_s"] / b["median_s"]

    def track_ratio(self, name):
        return self.ratio
