"""Embedded datasets: shapes, ranges, classes; train_test_split."""
import numpy as np
import pytest

import fastbp as F


def test_load_digits_flat():
    x, y = F.datasets.load_digits()
    assert x.shape == (1797, 64) and x.dtype == np.float32 and x.flags.c_contiguous
    assert y.shape == (1797,) and y.dtype == np.int64
    assert x.min() == 0.0 and x.max() == 1.0
    # pixel values were 0..16: after scaling every value is k/16
    np.testing.assert_array_equal(x * 16, np.round(x * 16))
    np.testing.assert_array_equal(np.unique(y), np.arange(10))
    counts = np.bincount(y)
    assert counts.min() > 150 and counts.sum() == 1797
    # not degenerate: images differ and have real content
    assert len(np.unique(x, axis=0)) > 1700
    assert 0.2 < x.mean() < 0.4


def test_load_digits_images_and_dtype():
    x, y = F.datasets.load_digits()
    xi, yi = F.datasets.load_digits(as_images=True)
    assert xi.shape == (1797, 1, 8, 8) and xi.dtype == np.float32 and xi.flags.c_contiguous
    np.testing.assert_array_equal(xi.reshape(1797, 64), x)
    np.testing.assert_array_equal(yi, y)
    x64, _ = F.datasets.load_digits(dtype=np.float64)
    assert x64.dtype == np.float64
    np.testing.assert_array_equal(x64, x.astype(np.float64))
    with pytest.raises(TypeError, match="load_digits: dtype must be float32 or float64"):
        F.datasets.load_digits(dtype=np.int32)


def test_load_digits_returns_fresh_arrays():
    x1, y1 = F.datasets.load_digits()
    x1[:] = -1
    y1[:] = -1
    x2, y2 = F.datasets.load_digits()
    assert x2.min() == 0.0 and y2.min() == 0


@pytest.mark.parametrize("fraction", [0.2, 0.5, 0.01])
def test_train_test_split_disjoint_and_complete(fraction):
    n = 1797
    x = np.arange(n)[:, None] * np.ones((1, 3))      # row i holds i: we can trace every sample
    y = np.arange(n)
    x0, y0 = x.copy(), y.copy()
    xtr, xte, ytr, yte = F.datasets.train_test_split(x, y, test_fraction=fraction, seed=3)
    assert len(xte) == round(n * fraction) and len(xtr) + len(xte) == n
    np.testing.assert_array_equal(xtr[:, 0], ytr)     # x and y stay paired
    np.testing.assert_array_equal(xte[:, 0], yte)
    assert set(ytr).isdisjoint(yte)
    np.testing.assert_array_equal(np.sort(np.concatenate([ytr, yte])), np.arange(n))
    assert not np.array_equal(ytr, np.sort(ytr))      # shuffled
    np.testing.assert_array_equal(x, x0)              # inputs unchanged
    np.testing.assert_array_equal(y, y0)
    # same seed, same split; other seed, other split
    again = F.datasets.train_test_split(x, y, test_fraction=fraction, seed=3)
    np.testing.assert_array_equal(again[3], yte)
    other = F.datasets.train_test_split(x, y, test_fraction=fraction, seed=4)
    assert not np.array_equal(other[3], yte)


def test_train_test_split_digits_keeps_all_classes():
    x, y = F.datasets.load_digits()
    xtr, xte, ytr, yte = F.datasets.train_test_split(x, y, seed=0)
    assert xtr.shape == (1438, 64) and xte.shape == (359, 64)
    assert set(ytr) == set(yte) == set(range(10))


def test_train_test_split_errors():
    with pytest.raises(ValueError, match="train_test_split: x has 5 samples but y has 4"):
        F.datasets.train_test_split(np.ones((5, 2)), np.ones(4))
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="test_fraction must be in \\(0, 1\\)"):
            F.datasets.train_test_split(np.ones((5, 2)), np.ones(5), test_fraction=bad)
