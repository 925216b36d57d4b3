"""The command line as a new user meets it: ``fastbp demo`` (all three models) and ``info``."""
import os
import re
import subprocess
import sys

import pytest

from fastbp import demo


def _run(*args, timeout=300):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    p = subprocess.run([sys.executable, "-m", "fastbp", *args], capture_output=True,
                       text=True, timeout=timeout, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    return p


def test_cnn_demo_is_the_default_and_reaches_98_percent():
    p = _run("demo", "--no-progress")
    lines = p.stdout.strip().splitlines()
    assert "LeNet-style CNN" in lines[0]
    assert len([ln for ln in lines if ln.startswith("epoch ")]) == demo.EPOCHS["cnn"]
    assert "val_accuracy" in p.stdout
    m = re.fullmatch(r"test accuracy: (0\.\d{3}|1\.000)", lines[-1])
    assert m, lines[-1]
    assert float(m.group(1)) >= 0.98
    assert p.stderr.strip() == ""                      # no progress bar when asked


def test_demo_progress_bar_goes_to_stderr():
    p = _run("demo", "--model", "mlp", "--epochs", "2")
    assert "step/s" in p.stderr
    assert p.stdout.strip().splitlines()[-1].startswith("test accuracy: ")


def test_mlp_demo():
    p = _run("demo", "--model", "mlp", "--no-progress")
    acc = float(p.stdout.strip().splitlines()[-1].split(": ")[1])
    assert acc >= 0.95


def test_lstm_demo_beats_unigram_and_samples():
    p = _run("demo", "--model", "lstm", "--epochs", "2", "--no-progress")
    out = p.stdout
    m = re.search(r"test bits per character: ([\d.]+) \(unigram ([\d.]+)\)\s*$", out)
    assert m, out[-500:]
    bits, unigram = float(m.group(1)), float(m.group(2))
    assert bits < unigram - 1.0
    sample = out.split("sample:\n", 1)[1].rsplit("\ntest bits", 1)[0]
    assert sample.startswith("The ") and len(sample) >= 200


def test_demo_bad_model():
    p = subprocess.run([sys.executable, "-m", "fastbp", "demo", "--model", "vgg"],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "invalid choice: 'vgg'" in p.stderr
    with pytest.raises(ValueError, match="model must be one of"):
        demo.run("vgg")


def test_info_prints_threads_blas_cache_thresholds():
    out = _run("info").stdout
    for key in ("threading layer", "threads", "BLAS", "cache dir", "parallel thresholds",
                "conv", "lstm"):
        assert key in out, key
