"""Shared test fixtures: a seeded ``rng``, serial/parallel kernel switching, hypothesis profiles."""
import os

import numpy as np
import pytest

# The kernels' BLAS is NumPy's bundled OpenBLAS when fastbp is imported before NumPy (the
# CLI, ``fastbp bench``); pytest imports NumPy first, which would pick SciPy's. Test the
# NumPy path here; tests/test_blas.py runs the SciPy path in a subprocess.
os.environ.setdefault("FASTBP_BLAS", "numpy")

from fastbp import config  # noqa: E402

try:                                     # hypothesis is a test extra; only test_properties needs it
    from hypothesis import HealthCheck, settings
except ImportError:                      # pragma: no cover
    settings = None

if settings is not None:
    # Fewer examples on CI (env CI set); deadline off: the first call of a kernel compiles it.
    common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])
    settings.register_profile("dev", max_examples=25, **common)
    settings.register_profile("ci", max_examples=10, derandomize=True, **common)
    settings.register_profile("thorough", max_examples=1000, **common)   # --hypothesis-profile=thorough
    settings.load_profile("ci" if os.environ.get("CI") else "dev")


@pytest.fixture
def rng():
    """A fresh generator with a fixed seed, so every test is reproducible."""
    return np.random.default_rng(20240531)


@pytest.fixture
def parallel_mode():
    """``parallel_mode(True)`` makes the named kernel families always pick their parallel build,
    ``parallel_mode(False)`` always the serial one. The thresholds are restored afterwards."""
    saved = dict(config.thresholds)

    def set_mode(parallel, families=("activations", "dropout")):
        for fam in families:
            config.set_parallel_threshold(fam, 0 if parallel else 1 << 62)

    yield set_mode
    config.thresholds.clear()
    config.thresholds.update(saved)
