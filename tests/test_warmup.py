"""fastbp.warmup: compiles every registered kernel, serial and parallel, both dtypes."""
import numpy as np
import pytest

from fastbp import _jit, config
from fastbp.warmup import FAMILIES, uncovered, warmup


def test_bad_arguments():
    with pytest.raises(TypeError, match="float32 and/or float64, got 'float16'"):
        warmup(dtypes="float16")
    with pytest.raises(ValueError, match="unknown kernel families \\['nope'\\]"):
        warmup(families=["nope"])


def test_one_family_one_dtype():
    r = warmup(dtypes="float32", families="losses")
    assert r["skipped"] == [] and r["uncovered"] == [] and r["calls"] > 0
    assert config.use_parallel.__name__ == "use_parallel"          # restored


@pytest.fixture(scope="module")
def full():
    return warmup()


def test_everything_compiled(full):
    assert full["skipped"] == [], full["skipped"]
    assert full["uncovered"] == [], full["uncovered"]
    assert uncovered() == []
    assert set(FAMILIES) == set(config.DEFAULT_THRESHOLDS)
    assert config.use_parallel.__name__ == "use_parallel"


def test_dual_kernels_have_both_dtypes(full):
    """Every DualKernel that takes float arrays is compiled for float32 and float64.

    Its parallel build is always called from Python, so warm-up (which forces parallel
    mode) must give it both dtypes. Some serial builds are only reached from inside other
    compiled code (the optimizers' ``*_multi`` loops); when such a caller is loaded from
    the on-disk cache the serial dispatcher itself records no signature, so a serial build
    counts through the union with its parallel twin."""
    builds = {}
    for name, fam, d in _jit.all_dispatchers():
        if name.endswith((".serial", ".parallel")):
            base, mode = name.rsplit(".", 1)
            builds.setdefault(base, {})[mode] = " ".join(str(s) for s in d.signatures)
    missing = []
    for base, b in builds.items():
        par, ser = b.get("parallel", ""), b.get("serial", "")
        if "float" not in par + ser:
            continue
        for dt in ("float32", "float64"):
            if dt not in par:
                missing.append((base + ".parallel", dt))
            if dt not in par + ser:
                missing.append((base, dt))
    assert missing == []


def test_warm_kernels_still_correct(full):
    import fastbp as F
    x = np.linspace(-2, 2, 10).astype(np.float32)
    y, _ = F.ReLU().forward({}, x)
    assert y.dtype == np.float32 and np.array_equal(y, np.maximum(x, 0))
