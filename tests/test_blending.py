"""The blending kernel (fastlm.blending) against tests/reference.py, and the blend's guarantees."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastlm.blending import MAX_SOURCES, blending_index, normalized_weights
from tests.reference import ref_blending_index

weights_strategy = st.lists(st.floats(1e-3, 1e3), min_size=1, max_size=12)
# Integer weights give exact ties between sources, where the first source must win.
tied_weights = st.lists(st.integers(1, 4), min_size=1, max_size=12)
CONTAINERS = ["list", "array", "readonly", "float32"]


def as_container(weights, container):
    if container == "list":
        return list(weights)
    array = np.array(weights, dtype=np.float32 if container == "float32" else np.float64)
    if container == "readonly":
        array.setflags(write=False)
    return array


@settings(max_examples=200, deadline=None)
@given(weights=st.one_of(weights_strategy, tied_weights), n=st.integers(0, 300), container=st.sampled_from(CONTAINERS))
def test_blend_matches_reference(weights, n, container):
    weights = as_container(weights, container)
    source, sample, counts = blending_index(weights, n)
    ref_source, ref_sample, ref_counts = ref_blending_index(normalized_weights(weights).tolist(), n)
    assert source.dtype == np.int16 and sample.dtype == np.int64 and counts.dtype == np.int64
    assert source.tolist() == ref_source
    assert sample.tolist() == ref_sample
    assert counts.tolist() == ref_counts


def test_normalised_weights_are_each_weight_over_their_sum_in_float64():
    np.testing.assert_array_equal(normalized_weights([7, 3]), np.array([0.7, 0.3]))
    single = np.array([0.1, 0.2, 0.7], np.float32)
    wide = single.astype(np.float64)
    np.testing.assert_array_equal(normalized_weights(single), wide / wide.sum())


@settings(max_examples=150, deadline=None)
@given(weights=st.one_of(weights_strategy, tied_weights), n=st.integers(0, 300), data=st.data())
def test_a_blend_built_in_pieces_equals_one_built_at_once(weights, n, data):
    cuts = sorted(data.draw(st.lists(st.integers(0, n), max_size=4)))
    source, sample, counts = blending_index(weights, n)
    pieces, at, drawn = [], 0, None
    for stop in cuts + [n]:
        piece_source, piece_sample, drawn = blending_index(weights, stop - at, start=at, counts=drawn)
        pieces.append((piece_source, piece_sample))
        at = stop
    assert np.concatenate([p[0] for p in pieces]).tolist() == source.tolist()
    assert np.concatenate([p[1] for p in pieces]).tolist() == sample.tolist()
    assert drawn.tolist() == counts.tolist()


@settings(max_examples=150, deadline=None)
@given(weights=weights_strategy, n=st.integers(1, 400))
def test_no_source_is_ever_a_sample_ahead_of_its_share(weights, n):
    """The rule picks a source only when its deficit is the largest, so at least 0: after any prefix of m
    samples each count is below weight * m + 1. Two sources are then also never a sample behind."""
    w = normalized_weights(weights)
    source, _, _ = blending_index(weights, n)
    counts = np.zeros((n, len(w)))
    counts[np.arange(n), source] = 1
    ahead = counts.cumsum(0) - w * np.arange(1, n + 1)[:, None]
    assert ahead.max() < 1 + 1e-9
    if len(w) == 2:
        assert ahead.min() > -1 - 1e-9


def test_a_realised_mix_follows_the_weights_over_a_million_samples():
    weights = [0.5, 0.3, 0.15, 0.05]
    source, sample, counts = blending_index(weights, 1_000_000)
    assert counts.tolist() == [500_000, 300_000, 150_000, 50_000]
    # Each source's samples are numbered 0, 1, 2, ... in blend order.
    for s in range(4):
        assert np.array_equal(sample[source == s], np.arange(counts[s]))


@pytest.mark.parametrize("weights, error, match", [
    ([], ValueError, "1 to"),
    ([[0.5, 0.5]], TypeError, "numbers"),
    (np.ones((2, 2)), ValueError, "flat list"),
    ([0.5, 0.0], ValueError, "finite and > 0"),
    ([0.5, -1.0], ValueError, "finite and > 0"),
    ([0.5, float("nan")], ValueError, "finite and > 0"),
    ([1.0, float("inf")], ValueError, "finite and > 0"),
    ([1e308, 1e308], ValueError, "overflow"),
    ([True, 0.5], TypeError, "not booleans"),
    (np.array([True, False]), TypeError, "not booleans"),
    (["0.5"], TypeError, "numbers"),
    ("0.5", TypeError, "numbers"),
    (0.5, TypeError, "numbers"),
    ([1.0] * (MAX_SOURCES + 1), ValueError, "1 to"),
])
def test_bad_weights_are_refused(weights, error, match):
    with pytest.raises(error, match=match):
        blending_index(weights, 3)


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_samples=-1), "n_samples must be a non-negative integer"),
    (dict(n_samples=2.0), "n_samples must be a non-negative integer"),
    (dict(n_samples=True), "n_samples must be a non-negative integer"),
    (dict(n_samples=3, start=-1), "start must be"),
    (dict(n_samples=3, start=4), "counts .* are needed"),
    (dict(n_samples=3, start=4, counts=[1, 2]), "sum to start=4"),
    (dict(n_samples=3, start=4, counts=[5, -1]), "non-negative"),
    (dict(n_samples=3, start=4, counts=[4]), "one per source"),
    (dict(n_samples=3, start=4, counts=[2.0, 2.0]), "one per source"),
])
def test_bad_positions_and_counts_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        blending_index([0.7, 0.3], **kwargs)
