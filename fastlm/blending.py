"""Weighted mixtures: which source each sample of a blend comes from.

:func:`blending_index` is Megatron-LM's BlendedDataset order (``build_blending_indices``): sample i goes
to the source whose error ``weight * max(i, 1) - samples drawn so far`` is largest (the first on ties).
At every prefix of the blend each source's count is within one sample of ``weight * length``; the order
depends only on the weights, so it is deterministic, and the state at any position is just the
per-source counts there, so a blend can be built in pieces or resumed from any position.
"""
import numbers

import numpy as np

from fastlm._kernels import load
from fastlm._validation import check_non_negative_int

_k = load("_blending")

# Source ids are int16, as in Megatron's index.
MAX_SOURCES = np.iinfo(np.int16).max


def normalized_weights(weights):
    """The weights as float64 summing to 1 (each divided by their sum, as Megatron's normalize does)."""
    if isinstance(weights, np.ndarray):
        numeric = weights.dtype.kind in "iuf"
    elif isinstance(weights, (str, bytes)) or not hasattr(weights, "__iter__"):
        numeric = False
    else:
        numeric = all(isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_)) for x in weights)
    if not numeric:
        raise TypeError(f"weights must be a sequence of numbers (not booleans), got {weights!r}")
    w = np.array(weights, dtype=np.float64)
    if w.ndim != 1 or not 1 <= w.shape[0] <= MAX_SOURCES:
        raise ValueError(f"weights must be a flat list of 1 to {MAX_SOURCES} numbers, got shape {w.shape}")
    if not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise ValueError(f"weights must be finite and > 0, got {w.tolist()}")
    with np.errstate(over="ignore"):
        total = w.sum()
    if not np.isfinite(total):
        raise ValueError(f"weights overflow when summed: {w.tolist()}")
    return w / total


def blending_index(weights, n_samples, *, start=0, counts=None):
    """The blend at positions start .. start + n_samples - 1: (source int16, sample int64, counts int64).

    ``source[j]`` is the source of position start + j and ``sample[j]`` its number among that source's
    samples (0, 1, 2, ... in blend order). ``counts`` is each source's number of samples before ``start``
    (None: start must be 0); the third result is the counts after the last position, to continue from.
    """
    w = normalized_weights(weights)
    n_samples = check_non_negative_int("n_samples", n_samples)
    start = check_non_negative_int("start", start)
    if counts is None:
        if start:
            raise ValueError("counts (each source's samples before start) are needed when start > 0")
        drawn = np.zeros(w.shape[0], dtype=np.int64)
    else:
        c = np.asarray(counts)
        if c.dtype.kind not in "iu" or c.shape != w.shape:
            raise ValueError(f"counts must be {w.shape[0]} integers (one per source), got {counts!r}")
        if np.any(c < 0) or int(c.sum()) != start:
            raise ValueError(f"counts must be non-negative and sum to start={start}, got {c.tolist()}")
        drawn = c.astype(np.int64)  # a copy: the kernel advances it
    source = np.empty(n_samples, dtype=np.int16)
    sample = np.empty(n_samples, dtype=np.int64)
    _k.fill_blending_index(w, start, drawn, source, sample)
    return source, sample, drawn
