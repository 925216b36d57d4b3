"""Character-level text data for language-model examples, from a text shipped with Python.

``load_text`` reads the help topics of ``pydoc_data.topics`` (part of the standard library,
about 465k characters of English prose and Python code, 103 distinct characters), so the
examples need no download. ``CharVocab`` maps characters to ids and back; ``one_hot`` and
``tbptt_batches`` shape the data time-major for ``RNN``/``LSTM`` layers.
"""
from __future__ import annotations

import numpy as np

__all__ = ["load_text", "CharVocab", "one_hot", "tbptt_batches", "unigram_entropy"]


def load_text(max_chars=None, ascii_only=True):
    """The text of ``pydoc_data.topics`` (topics concatenated in sorted key order).

    max_chars: keep only the first this many characters (None: all). ascii_only: replace
    the few non-ASCII characters (curly quotes, dashes) by ``?`` for a smaller vocabulary.
    """
    from pydoc_data import topics
    text = "".join(topics.topics[k] for k in sorted(topics.topics))
    if ascii_only:
        text = "".join(ch if ord(ch) < 128 else "?" for ch in text)
    return text if max_chars is None else text[:int(max_chars)]


class CharVocab:
    """Sorted characters of a text, with ``encode(str) -> int64 ids`` and ``decode(ids) -> str``."""

    def __init__(self, text):
        self.chars = sorted(set(text))
        self.index = {ch: i for i, ch in enumerate(self.chars)}

    def __len__(self):
        return len(self.chars)

    def encode(self, text):
        try:
            return np.array([self.index[ch] for ch in text], dtype=np.int64)
        except KeyError as e:
            raise ValueError(f"CharVocab.encode: character {e.args[0]!r} is not in the "
                             "vocabulary") from None

    def decode(self, ids):
        return "".join(self.chars[int(i)] for i in np.asarray(ids).ravel())


def one_hot(ids, size, dtype=np.float32):
    """ids (...) int → (..., size) array with a 1 at each id."""
    ids = np.asarray(ids)
    out = np.zeros(ids.shape + (size,), dtype=dtype)
    np.put_along_axis(out, ids[..., None], 1, axis=-1)
    return out


def tbptt_batches(ids, batch_size, seq_len):
    """Split a long id stream into ``batch_size`` parallel streams, then consecutive windows.

    Yields ``(inputs, targets)`` of shape (seq_len, batch_size), time-major, with
    ``targets`` the next characters. Window k+1 of stream n continues window k of stream n,
    so a recurrent state carried from one batch to the next (truncated BPTT) stays valid.
    """
    ids = np.asarray(ids)
    per = (len(ids) - 1) // batch_size
    if per < seq_len:
        raise ValueError(f"tbptt_batches: {len(ids)} ids are too few for batch_size="
                         f"{batch_size} and seq_len={seq_len}")
    x = ids[:per * batch_size].reshape(batch_size, per).T        # (per, N)
    y = ids[1:per * batch_size + 1].reshape(batch_size, per).T
    for s in range(0, per - seq_len + 1, seq_len):
        yield x[s:s + seq_len], y[s:s + seq_len]


def unigram_entropy(ids, size):
    """Entropy in bits per character of the id frequencies: the loss of a model with no context."""
    p = np.bincount(np.asarray(ids).ravel(), minlength=size) / np.size(ids)
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())
