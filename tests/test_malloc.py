"""fastbp keeps freed large blocks in the heap (fastbp/_malloc.py): a repeated kernel-sized
allocation must not page-fault afresh each time. Runs in subprocesses, since the setting
is per process."""
import json
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="mallopt settings are glibc-specific")

SCRIPT = r"""
import json, resource
import numpy as np
import fastbp
from fastbp import _malloc
from fastbp.kernels import lstm
T, N, D, H = 50, 32, 32, 128
rng = np.random.default_rng(0)
x = rng.standard_normal((T, N, D), dtype=np.float32)
Wx = rng.standard_normal((D, 4 * H), dtype=np.float32) * np.float32(0.1)
Wh = rng.standard_normal((H, 4 * H), dtype=np.float32) * np.float32(0.1)
b = np.zeros(4 * H, np.float32)
h0 = np.zeros((N, H), np.float32)
for _ in range(3):
    lstm.lstm_forward(x, h0, h0, Wx, Wh, b)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    lstm.lstm_forward(x, h0, h0, Wx, Wh, b)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"state": _malloc.state, "faults": faults}))
"""


def _run(**env):
    e = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "FASTBP_MALLOC"))}
    e.update(env)
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=e, capture_output=True,
                         text=True, timeout=300, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_freed_blocks_are_reused_without_page_faults():
    on = _run()
    assert on["state"].startswith("mmap threshold 32 MiB"), on
    # 10 LSTM forwards allocate ~8 MB each; fresh mmaps would fault ~2000 pages per call
    assert on["faults"] < 500, on


def test_opt_out_leaves_malloc_alone_and_shows_the_difference():
    off = _run(FASTBP_MALLOC="default")
    assert off["state"] == "left as is (FASTBP_MALLOC=default)"
    user = _run(MALLOC_MMAP_THRESHOLD_="131072")
    assert user["state"] == "left as is (MALLOC_*_THRESHOLD_ set)"
    # the user's fixed 128 KiB threshold: every call maps and faults its arrays again
    assert user["faults"] > 5000, user
