import numpy as np
import pytest

from longtail.stages.datasets import digits_lt, exponential_profile, load_dataset
from longtail.stages.errors import LongtailError


def test_exponential_profile_by_hand():
    # n_c = 100 * 10 ** (-c / 2) -> 100, 31.6 -> 32, 10
    assert exponential_profile(100, 3, 10.0).tolist() == [100, 32, 10]
    assert exponential_profile(50, 4, 1.0).tolist() == [50, 50, 50, 50]


def test_digits_lt_splits_are_balanced_disjoint_and_long_tailed():
    d = digits_lt(imbalance_ratio=20, test_per_class=50, val_per_class=20, seed=0)
    test, val, train = d.splits["test"], d.splits["val"], d.splits["train"]
    assert np.bincount(test.labels, minlength=10).tolist() == [50] * 10
    assert np.bincount(val.labels, minlength=10).tolist() == [20] * 10
    counts = np.bincount(train.labels, minlength=10)
    # the smallest digit class has 174 images, so the train pool is 174 - 70 = 104 per class
    assert counts.tolist() == exponential_profile(104, 10, 20.0).tolist()
    assert counts[0] / counts[-1] == pytest.approx(20, rel=0.05)
    assert all(np.diff(counts) <= 0)
    ids = [set(s.index.tolist()) for s in (train, val, test)]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    assert train.images.shape[1:] == (1, 8, 8) and 0 <= train.images.min() and train.images.max() <= 1


def test_digits_lt_is_seeded_and_reproducible():
    a, b, c = digits_lt(seed=0), digits_lt(seed=0), digits_lt(seed=1)
    assert a.fingerprint == b.fingerprint
    assert np.array_equal(a.splits["train"].index, b.splits["train"].index)
    assert a.fingerprint != c.fingerprint
    assert not np.array_equal(a.splits["train"].index, c.splits["train"].index)
    assert digits_lt(imbalance_ratio=10).fingerprint != a.fingerprint


def test_bad_dataset_parameters():
    with pytest.raises(LongtailError, match="imbalance_ratio"):
        digits_lt(imbalance_ratio=0.5)
    with pytest.raises(LongtailError, match="no train images"):
        digits_lt(test_per_class=100, val_per_class=100)
    with pytest.raises(LongtailError, match="unknown dataset 'cifar'"):
        load_dataset("cifar")
