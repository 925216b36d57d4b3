"""The compile cache when the package directory is read-only: fastbp falls back to a
user cache directory, kernels still run, and a second process loads them from there.

The package is copied to a temporary directory. "Read-only" is made by replacing
``kernels/__pycache__`` with a plain file (works even as root, where chmod does not stop
writes) and by removing write permission from the copy.
"""
import json
import os
import shutil
import stat
import subprocess
import sys

import pytest

import fastbp

PKG = os.path.dirname(fastbp.__file__)

CODE = r"""
import json, numpy as np
import fastbp
from fastbp import config
from fastbp.kernels.activations import relu_forward
x = np.linspace(-1, 1, 8).astype(np.float32)
y, _ = fastbp.ReLU().forward({}, x)
assert np.array_equal(y, np.maximum(x, 0))
st = relu_forward.serial.stats
print(json.dumps({"file": fastbp.__file__, "cache": config.CACHE_DIR, "source": config.CACHE_SOURCE,
                  "hits": sum(st.cache_hits.values()), "misses": sum(st.cache_misses.values())}))
"""


def _readonly_copy(root):
    dst = os.path.join(root, "site", "fastbp")
    shutil.copytree(PKG, dst, ignore=shutil.ignore_patterns("__pycache__", "*.nbi", "*.nbc"))
    with open(os.path.join(dst, "kernels", "__pycache__"), "w") as f:
        f.write("not a directory\n")
    for d, dirs, files in os.walk(dst):
        for name in files:
            os.chmod(os.path.join(d, name), stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
        os.chmod(d, stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP)
    return os.path.dirname(dst)


def _restore_write(root):
    for d, dirs, files in os.walk(root):
        os.chmod(d, stat.S_IRWXU)


def _run(site, **env):
    full = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "PYTHONPATH")}
    full.update(PYTHONPATH=site, PYTHONDONTWRITEBYTECODE="1", **env)
    p = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, env=full,
                       cwd=site, timeout=600)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.fixture
def site(tmp_path):
    s = _readonly_copy(str(tmp_path))
    yield s
    _restore_write(str(tmp_path))


def test_readonly_package_uses_fallback_cache(site, tmp_path):
    xdg = tmp_path / "xdg"
    first = _run(site, XDG_CACHE_HOME=str(xdg))
    assert first["file"].startswith(site)                  # the read-only copy was imported
    assert first["source"].startswith("fallback")
    assert first["cache"] == str(xdg / "fastbp" / "numba")
    written = [f for _, _, fs in os.walk(first["cache"]) for f in fs]
    assert any(f.endswith(".nbi") for f in written) and any(f.endswith(".nbc") for f in written)
    second = _run(site, XDG_CACHE_HOME=str(xdg))           # a new process loads, no compile
    assert second["hits"] >= 1 and second["misses"] == 0


def test_numba_cache_dir_wins_over_fallback(site, tmp_path):
    mine = tmp_path / "mine"
    got = _run(site, XDG_CACHE_HOME=str(tmp_path / "xdg"), NUMBA_CACHE_DIR=str(mine))
    assert got["cache"] == str(mine) and got["source"] == "NUMBA_CACHE_DIR"
    assert any(f.endswith(".nbi") for _, _, fs in os.walk(mine) for f in fs)
    assert not (tmp_path / "xdg" / "fastbp").exists()
