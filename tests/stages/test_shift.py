"""Shifted test sets (paper 002, Sec. 4.3): sizes, ratios, priors, order, reproducibility."""

import numpy as np
import pytest

from longtail.stages.errors import LongtailError
from longtail.stages.shift import RATIOS, shifted_counts, shifted_subsets, train_rank

C = 10
# train counts in a scrambled class order: the most frequent class is 3, then 7, ...
TRAIN = np.array([40, 5, 90, 500, 12, 60, 3, 300, 20, 150])
RANK = [3, 7, 9, 2, 5, 0, 8, 4, 1, 6]  # by hand, most frequent first


@pytest.fixture(scope="module")
def test_labels():
    """A balanced test split of 50 per class, shuffled."""
    return np.random.default_rng(5).permutation(np.repeat(np.arange(C), 50))


def test_classes_are_ranked_by_train_count():
    assert train_rank(TRAIN).tolist() == RANK
    assert train_rank([5, 7, 7, 1]).tolist() == [1, 2, 0, 3]  # a tie keeps the lower index first


def test_counts_follow_the_exponential_profile_by_hand():
    fwd = shifted_counts(50, TRAIN, 50, "forward")
    # N mu^(-(j-1)/(C-1)), floored: 50 * 50^(-1/9) = 32.4, ..., the tail 50/50 = 1
    assert fwd[RANK].tolist() == [50, 32, 20, 13, 8, 5, 3, 2, 1, 1]
    assert shifted_counts(50, TRAIN, 2, "forward")[RANK].tolist() == [50, 46, 42, 39, 36, 34, 31, 29, 27, 25]
    for mu in (25, 10, 5, 2):
        counts = shifted_counts(50, TRAIN, mu, "forward")[RANK]
        assert counts[0] == 50 and counts[-1] == 50 // mu  # head-to-tail ratio exactly mu
        assert (np.diff(counts) <= 0).all()
    assert shifted_counts(50, TRAIN, 1, "uniform").tolist() == [50] * C


def test_backward_is_forward_reversed():
    for mu in (50, 25, 10, 5, 2):
        fwd = shifted_counts(50, TRAIN, mu, "forward")[RANK]
        bwd = shifted_counts(50, TRAIN, mu, "backward")[RANK]
        assert bwd.tolist() == fwd[::-1].tolist()
    assert shifted_counts(50, TRAIN, 50, "backward")[3] == 1  # the train head is the backward tail


def test_a_ratio_above_the_per_class_count_keeps_every_class():
    counts = shifted_counts(10, TRAIN, 50, "forward")
    assert counts.min() == 1 and counts.max() == 10  # 10 / 50 floored would be 0: kept at 1


def test_subsets_have_the_right_sizes_priors_and_order(test_labels):
    subsets = shifted_subsets(test_labels, TRAIN, seed=0)
    names = [s.name for s in subsets]
    assert names == ["forward-50", "forward-25", "forward-10", "forward-5", "forward-2", "uniform",
                     "backward-2", "backward-5", "backward-10", "backward-25", "backward-50"]
    assert RATIOS == (50, 25, 10, 5, 2, 1)
    for s in subsets:
        expected = shifted_counts(50, TRAIN, s.ratio, s.direction)
        got = np.bincount(test_labels[s.indices], minlength=C)
        assert got.tolist() == expected.tolist(), s.name
        assert len(np.unique(s.indices)) == len(s.indices) == expected.sum()
        assert (np.diff(s.indices) > 0).all() and s.indices.dtype == np.int64
        np.testing.assert_allclose(s.prior, got / got.sum(), rtol=0, atol=1e-15)
        assert s.prior.sum() == pytest.approx(1.0, abs=1e-12) and (s.prior > 0).all()
        if s.direction != "uniform":
            assert got.max() / got.min() == s.ratio
    uniform = subsets[5]
    assert uniform.direction == "uniform" and len(uniform.indices) == len(test_labels)
    # forward-50 resembles the train distribution: its prior is largest for the train head class 3
    assert subsets[0].prior.argmax() == 3 and subsets[-1].prior.argmin() == 3


def test_subsets_are_seeded_and_nested(test_labels):
    a = shifted_subsets(test_labels, TRAIN, ratios=(10, 2), seed=3)
    b = shifted_subsets(test_labels, TRAIN, ratios=(10, 2), seed=3)
    c = shifted_subsets(test_labels, TRAIN, ratios=(10, 2), seed=4)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.indices, y.indices)
    assert not np.array_equal(a[0].indices, c[0].indices)
    assert [s.name for s in a] == ["forward-10", "forward-2", "backward-2", "backward-10"]
    # the forward-10 set is a subset of the forward-2 set (one permutation per class)
    assert np.isin(a[0].indices, a[1].indices).all()


def test_an_unbalanced_test_split_uses_its_smallest_class():
    labels = np.repeat(np.arange(4), [30, 25, 40, 33])
    subsets = shifted_subsets(labels, [100, 50, 20, 10], ratios=(5, 1), seed=0)
    assert np.bincount(labels[subsets[0].indices], minlength=4).tolist() == [25, 14, 8, 5]
    assert np.bincount(labels[subsets[1].indices], minlength=4).tolist() == [25] * 4


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"ratios": (50, 0.5)}, "ratio 0.5 must be a number >= 1"),
        ({"ratios": (10, 10)}, "repeated imbalance ratio"),
        ({"ratios": ()}, "no imbalance ratio"),
        ({"seed": -1}, "seed -1"),
        ({"class_counts": [1, 2, 3]}, r"class indices in \[0, 3\)"),
        ({"class_counts": [5, -1] + [1] * 8}, "non-negative train counts"),
    ],
)
def test_bad_input(test_labels, kwargs, match):
    args = {"labels": test_labels, "class_counts": TRAIN} | kwargs
    with pytest.raises(LongtailError, match=match):
        shifted_subsets(**args)


def test_a_class_without_test_sample_is_an_error():
    with pytest.raises(LongtailError, match="class 2 has no test sample"):
        shifted_subsets(np.array([0, 1, 3, 0, 1, 3]), [10, 5, 3, 1])
