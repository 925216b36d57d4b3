"""fastbp.config: thresholds, their overrides, thread count, wait policy, cache dir, and
``fastbp info``. Settings read at import are checked in fresh subprocesses."""
import json
import os
import subprocess
import sys

import numba
import pytest

import fastbp
from fastbp import config


def run_py(code, **env):
    full = dict(os.environ)
    for k in ("FASTBP_PARALLEL_THRESHOLD", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT",
              "NUMBA_THREADING_LAYER", "NUMBA_CACHE_DIR", "OPENBLAS_THREAD_TIMEOUT"):
        full.pop(k, None)
    full.update(env)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full,
                       timeout=300)
    return p


PROBE = ("import os, json, fastbp; from fastbp import config; print(json.dumps({"
         "'thresholds': config.thresholds, 'policy': os.environ.get('OMP_WAIT_POLICY'), "
         "'spin': os.environ.get('GOMP_SPINCOUNT'), 'mkl_threads': fastbp._blas.dense_mkl, "
         "'user_set': config.USER_SET_WAIT_POLICY, 'layer': __import__('numba').config.THREADING_LAYER, "
         "'cache': config.CACHE_DIR, 'source': config.CACHE_SOURCE}))")


def probe(**env):
    p = run_py(PROBE, **env)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- threshold env parsing
def test_parse_single_int_applies_to_every_family():
    assert config._parse_threshold_env("123") == {k: 123 for k in config.DEFAULT_THRESHOLDS}


def test_parse_family_list():
    assert config._parse_threshold_env(" dense=5, losses = 7 ,") == {"dense": 5, "losses": 7}


def test_parse_empty():
    assert config._parse_threshold_env("  ") == {}


@pytest.mark.parametrize("value, match", [
    ("convv=5", "unknown kernel family 'convv'"),
    ("abc", "expected an integer"),
    ("dense=x", "dense: expected an integer"),
    ("-1", "must be >= 0"),
    ("dense=-3", "dense: must be >= 0"),
])
def test_parse_errors(value, match):
    with pytest.raises(ValueError, match=match):
        config._parse_threshold_env(value)


def test_env_threshold_in_fresh_process():
    got = probe(FASTBP_PARALLEL_THRESHOLD="losses=7,optim=0")
    expect = dict(config.DEFAULT_THRESHOLDS, losses=7, optim=0)
    assert got["thresholds"] == expect


def test_defaults_cover_every_family_and_are_positive():
    assert set(config.DEFAULT_THRESHOLDS) == {"dense", "activations", "dropout", "losses",
                                              "optim", "conv", "pool", "rnn", "lstm"}
    assert all(isinstance(v, int) and v > 0 for v in config.DEFAULT_THRESHOLDS.values())


# ------------------------------------------------------------ set_parallel_threshold
def test_set_parallel_threshold_changes_dispatch():
    saved = config.thresholds["losses"]
    try:
        config.set_parallel_threshold("losses", 100)
        if numba.get_num_threads() > 1:
            assert config.use_parallel("losses", 100)
        assert not config.use_parallel("losses", 99)
    finally:
        config.set_parallel_threshold("losses", saved)


@pytest.mark.parametrize("family, work, match", [
    ("nope", 1, "unknown kernel family 'nope'"),
    ("dense", -1, "work must be an int >= 0"),
    ("dense", 1.5, "work must be an int >= 0"),
    ("dense", True, "work must be an int >= 0"),
])
def test_set_parallel_threshold_errors(family, work, match):
    with pytest.raises(ValueError, match=match):
        fastbp.set_parallel_threshold(family, work)


# ------------------------------------------------------------------- set_num_threads
def test_set_num_threads_one_makes_everything_serial():
    n = fastbp.get_num_threads()
    try:
        fastbp.set_num_threads(1)
        assert fastbp.get_num_threads() == 1
        assert not config.use_parallel("dense", 1 << 60)
    finally:
        fastbp.set_num_threads(n)
    assert fastbp.get_num_threads() == n


@pytest.mark.parametrize("n", [0, -1, 10 ** 6, 1.5, True])
def test_set_num_threads_errors(n):
    with pytest.raises(ValueError, match="set_num_threads: n must be"):
        fastbp.set_num_threads(n)


# ------------------------------------------------------------ wait policy, threading
def test_wait_policy_passive_without_mkl_threads():
    """OpenBLAS alone: idle OpenMP workers sleep at once (they would spin against it)."""
    got = probe(FASTBP_MKL="0")
    assert got["policy"] == "PASSIVE" and got["spin"] is None and got["user_set"] is False
    assert got["mkl_threads"] is False
    got = probe(FASTBP_MKL_DENSE="0")
    assert got["policy"] == "PASSIVE" and got["mkl_threads"] is False
    assert got["thresholds"] == config.DEFAULT_THRESHOLDS


_MKL_USABLE = bool(config.mkl_rt_paths()) and fastbp._blas.numpy_lib is not None


@pytest.mark.skipif(not _MKL_USABLE, reason="the mkl extra is not installed")
def test_wait_policy_short_spin_with_mkl_threads():
    """MKL's threaded GEMMs share libgomp with Numba: its workers spin SPIN_COUNT rounds.
    (FASTBP_MKL_DENSE=1: by default MKL's threaded GEMMs run only on Intel CPUs.)"""
    got = probe(FASTBP_MKL_DENSE="1")
    assert got["mkl_threads"] is True and got["user_set"] is False
    assert got["policy"] is None and got["spin"] == str(config.SPIN_COUNT)
    # the families measured again under the short spin take those values
    assert got["thresholds"] == dict(config.DEFAULT_THRESHOLDS, **config.SPIN_THRESHOLDS)
    assert got["thresholds"]["optim"] < config.DEFAULT_THRESHOLDS["optim"]
    got = probe(FASTBP_MKL_DENSE="1", FASTBP_PARALLEL_THRESHOLD="optim=5")  # the user's wins
    assert got["thresholds"]["optim"] == 5


def test_settle_wait_policy_falls_back_to_passive(monkeypatch):
    """When MKL was expected from the files but does not run the threaded GEMMs, the short
    spin fastbp set becomes PASSIVE; a user's own setting, or MKL in use, is left alone."""
    monkeypatch.setattr(config, "MKL_THREADS", True)
    monkeypatch.setattr(config, "SET_BY_FASTBP", ["GOMP_SPINCOUNT", "OPENBLAS_THREAD_TIMEOUT"])
    monkeypatch.setattr(config, "thresholds", config.default_thresholds())
    monkeypatch.setattr(config, "ENV_THRESHOLDS", {})
    assert config.thresholds["optim"] == config.SPIN_THRESHOLDS["optim"]
    monkeypatch.setenv("GOMP_SPINCOUNT", "10000")
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    config.settle_wait_policy(True)                      # MKL in use: unchanged
    assert os.environ["GOMP_SPINCOUNT"] == "10000" and "OMP_WAIT_POLICY" not in os.environ
    config.settle_wait_policy(False)
    assert "GOMP_SPINCOUNT" not in os.environ and os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    assert config.SET_BY_FASTBP == ["OMP_WAIT_POLICY", "OPENBLAS_THREAD_TIMEOUT"]
    assert config.MKL_THREADS is False
    assert config.thresholds == config.DEFAULT_THRESHOLDS == config.default_thresholds()
    monkeypatch.setattr(config, "MKL_THREADS", True)     # the user's own spin count
    monkeypatch.setattr(config, "SET_BY_FASTBP", [])
    monkeypatch.setenv("GOMP_SPINCOUNT", "77")
    monkeypatch.delenv("OMP_WAIT_POLICY")
    config.settle_wait_policy(False)
    assert os.environ["GOMP_SPINCOUNT"] == "77" and "OMP_WAIT_POLICY" not in os.environ


@pytest.mark.parametrize("env", [{"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "1000"}])
def test_wait_policy_respects_user(env):
    got = probe(**env)
    assert got["user_set"] is True
    assert got["policy"] == env.get("OMP_WAIT_POLICY")


@pytest.mark.skipif(fastbp._blas.library is None, reason="SciPy's BLAS is not OpenBLAS")
def test_openblas_thread_timeout_short_unless_user_set():
    """OpenBLAS reads the spin time when it loads: fastbp's 2^20 cycles, the user's value
    when set, and OpenBLAS's own 28 when SciPy's BLAS was loaded before fastbp."""
    code = "import fastbp._blas as b; print(b.thread_timeout())"
    for env, want in (({}, 20), ({"OPENBLAS_THREAD_TIMEOUT": "12"}, 12)):
        p = run_py(code, **env)
        assert p.returncode == 0, p.stderr
        assert int(p.stdout.split()[-1]) == want, (env, p.stdout)
    p = run_py("import scipy.linalg; " + code)
    assert p.returncode == 0, p.stderr
    assert int(p.stdout.split()[-1]) == 28


def test_threading_layer_threadsafe_unless_user_set():
    assert probe()["layer"] == "threadsafe"
    assert probe(NUMBA_THREADING_LAYER="workqueue")["layer"] == "workqueue"


# --------------------------------------------------------------------------- cache
def test_cache_in_tree_by_default():
    got = probe()
    assert got["source"] == "in-tree"
    assert got["cache"] == os.path.join(os.path.dirname(fastbp.__file__), "kernels", "__pycache__")


def test_numba_cache_dir_respected(tmp_path):
    got = probe(NUMBA_CACHE_DIR=str(tmp_path))
    assert got["cache"] == str(tmp_path) and got["source"] == "NUMBA_CACHE_DIR"


# --------------------------------------------------------------------------- info
def test_info_prints_everything():
    p = run_py("import sys, fastbp.__main__ as m; sys.exit(m.main(['info']))",
               FASTBP_PARALLEL_THRESHOLD="pool=3")
    assert p.returncode == 0, p.stderr
    out = p.stdout
    for key in ("numba", "numpy", "scipy", "threading layer", "threads", "BLAS", "cache dir",
                "OpenMP idle workers", "OPENBLAS_THREAD_TIMEOUT", "parallel thresholds"):
        assert key in out, key
    for fam in config.DEFAULT_THRESHOLDS:
        assert f"  {fam} " in out
    assert "3  (env)" in out
    if fastbp._blas.dense_mkl:
        assert f"GOMP_SPINCOUNT={config.SPIN_COUNT} (set by fastbp)" in out
    else:
        assert "PASSIVE (set by fastbp)" in out
    p = run_py("import sys, fastbp.__main__ as m; sys.exit(m.main(['info']))", FASTBP_MKL="0")
    assert p.returncode == 0 and "PASSIVE (set by fastbp)" in p.stdout, p.stderr


def test_env_defaults_off_leaves_the_libraries_alone():
    """FASTBP_ENV_DEFAULTS=0 (how bench runs its peers): no PASSIVE, no OpenBLAS timeout."""
    code = ("import os, json, fastbp; from fastbp import config; print(json.dumps("
            "[os.environ.get('OMP_WAIT_POLICY'), os.environ.get('OPENBLAS_THREAD_TIMEOUT'), "
            "config.SET_BY_FASTBP]))")
    p = run_py(code, FASTBP_ENV_DEFAULTS="0")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout.strip().splitlines()[-1]) == [None, None, []]
    p = run_py(code, FASTBP_MKL="0")
    assert json.loads(p.stdout.strip().splitlines()[-1]) == \
        ["PASSIVE", "20", ["OMP_WAIT_POLICY", "OPENBLAS_THREAD_TIMEOUT"]]


# ---------------------------------------------------------------- the cache stamp
def test_sources_fingerprint_follows_every_compiled_file(tmp_path):
    (tmp_path / "kernels").mkdir()
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "kernels" / "k.py").write_text("y = 2\n")
    (tmp_path / "kernels" / "notes.txt").write_text("not code\n")
    names = ["a.py", "kernels"]
    fp = config.sources_fingerprint(str(tmp_path), names)
    assert fp == config.sources_fingerprint(str(tmp_path), names)
    (tmp_path / "kernels" / "notes.txt").write_text("changed\n")
    assert fp == config.sources_fingerprint(str(tmp_path), names)      # only *.py counts
    (tmp_path / "kernels" / "k.py").write_text("y = 3\n")
    fp2 = config.sources_fingerprint(str(tmp_path), names)
    assert fp2 != fp
    (tmp_path / "kernels" / "new.py").write_text("")
    assert config.sources_fingerprint(str(tmp_path), names) != fp2
    # the package's own list covers the files that hold compiled code
    assert "kernels" in config.COMPILED_SOURCES and "_cblas.py" in config.COMPILED_SOURCES


def test_drop_stale_cache_only_when_the_stamp_differs(tmp_path):
    d1, d2 = tmp_path / "pkg", tmp_path / "kernels"
    for d in (d1, d2):
        d.mkdir()
        (d / "f-1.py311.nbi").write_text("")
        (d / "f-1.py311.1.nbc").write_text("")
        (d / "keep.pyc").write_text("")
    dirs = [str(d1), str(d2)]
    assert config.drop_stale_cache(dirs, "aaa") == 4        # no stamp yet: dropped
    assert sorted(os.listdir(d1)) == ["keep.pyc"]
    assert (d2 / config.STAMP_NAME).read_text().strip() == "aaa"
    (d1 / "g-2.py311.nbi").write_text("")
    assert config.drop_stale_cache(dirs, "aaa") == 0        # same sources: kept
    assert (d1 / "g-2.py311.nbi").exists()
    assert config.drop_stale_cache(dirs, "bbb") == 1        # a source changed: dropped
    assert not (d1 / "g-2.py311.nbi").exists() and (d1 / "keep.pyc").exists()
    assert (d2 / config.STAMP_NAME).read_text().strip() == "bbb"
    assert config.drop_stale_cache([], "ccc") == 0


def test_cache_dirs_follow_numba_locators(tmp_path):
    pkg = os.path.dirname(os.path.abspath(fastbp.__file__))
    assert config.cache_dirs(str(tmp_path), "in-tree") == [
        os.path.join(pkg, "__pycache__"), os.path.join(pkg, "kernels", "__pycache__")]
    dirs = config.cache_dirs(str(tmp_path), "NUMBA_CACHE_DIR")
    assert [os.path.dirname(d) for d in dirs] == [str(tmp_path)] * 2
    assert os.path.basename(dirs[0]).startswith("fastbp_")
    assert os.path.basename(dirs[1]).startswith("kernels_")


def test_stale_kernels_dropped_in_a_fresh_process(tmp_path):
    """With a NUMBA_CACHE_DIR and a stamp that does not match, importing fastbp drops
    fastbp's cached kernels there and stamps the cache."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    code = ("import json, fastbp.config as c; "
            "print(json.dumps([c.STALE_KERNELS_DROPPED, c.cache_dirs()]))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True)
    _, dirs = json.loads(out.stdout.strip().splitlines()[-1])
    stamp = os.path.join(dirs[-1], config.STAMP_NAME)
    assert open(stamp).read().strip() == config.sources_fingerprint()
    os.makedirs(dirs[0], exist_ok=True)
    stale = os.path.join(dirs[0], "_cblas.gemm-1.py311.nbi")
    open(stale, "w").close()
    open(stamp, "w").write("old\n")
    cached = sum(f.endswith((".nbi", ".nbc")) for d in dirs if os.path.isdir(d)
                 for f in os.listdir(d))    # ours, and what the first import compiled
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1])[0] == cached >= 1
    assert not os.path.exists(stale)
    assert open(stamp).read().strip() == config.sources_fingerprint()
