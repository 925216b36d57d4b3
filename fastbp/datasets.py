"""Small datasets that ship inside the package (no network needed).

``load_digits`` — UCI Optical Recognition of Handwritten Digits (CC BY 4.0); see
``fastbp/data/README.md`` for source and licence.
"""
from __future__ import annotations

from importlib import resources

import numpy as np

__all__ = ["load_digits", "train_test_split"]


def load_digits(*, as_images: bool = False, dtype=np.float32):
    """The handwritten digits data: 1,797 samples, 10 classes.

    Returns ``(x, y)``:
    - ``x``: ``(1797, 64)`` (or ``(1797, 1, 8, 8)`` NCHW with ``as_images=True``),
      pixel values scaled from 0..16 to [0, 1] in ``dtype`` (float32 by default);
    - ``y``: ``(1797,)`` int64 labels in 0..9.
    """
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise TypeError(f"load_digits: dtype must be float32 or float64, got {dtype}")
    with resources.files("fastbp").joinpath("data/digits.npz").open("rb") as f:
        data = np.load(f)
        images, labels = data["images"], data["labels"]
    x = images.astype(dtype) / dtype.type(16)
    x = x[:, None, :, :] if as_images else x.reshape(len(x), -1)
    return np.ascontiguousarray(x), labels.astype(np.int64)


def train_test_split(x, y, *, test_fraction: float = 0.2, seed: int = 0):
    """Shuffle ``(x, y)`` with ``seed`` and split off the last ``test_fraction`` of samples.

    Returns ``x_train, x_test, y_train, y_test`` (copies; the inputs are not modified).
    """
    x, y = np.asarray(x), np.asarray(y)
    if len(x) != len(y):
        raise ValueError(f"train_test_split: x has {len(x)} samples but y has {len(y)}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"train_test_split: test_fraction must be in (0, 1), got {test_fraction}")
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = max(1, int(round(len(x) * test_fraction)))
    tr, te = order[:-n_test], order[-n_test:]
    return x[tr], x[te], y[tr], y[te]
