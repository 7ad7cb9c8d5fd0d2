"""Meta-CALA's 42 training characteristics (paper 000, Table A-1; specification §2.3, special case
M5) on a six-row example computed by hand, group by group, and their invariants."""

import math

import numpy as np
import pytest
import torch

from longtail.stages.meta.characteristics import (
    NAMES,
    NUM_CHARACTERISTICS,
    TrainingCharacteristics,
    basic_characteristics,
    static_characteristics,
)
from longtail.stages.modules import LinearClassifier

# ---------------------------------------------------------------------- the six-row example
# Two classes; the head looks only at the first coordinate: z = (s h1, -s h1) with s = log(3) / 2,
# so q_0 = 3^h1 / (3^h1 + 1): 0.75 at h1 = 1, 0.9 at h1 = 2, 0.25 at h1 = -1.
S = math.log(3.0) / 2
H = [(1.0, 1.0), (2.0, 0.0), (1.0, -1.0), (-1.0, 1.0), (-1.0, -1.0), (1.0, 2.0)]
Y = [0, 0, 0, 1, 1, 1]  # row 5 (h1 = 1, q = (0.75, 0.25)) is misclassified
NB = [[1, 5], [0, 2], [1, 4], [4, 5], [3, 2], [0, 3]]  # K = 2, self excluded


def entropy(p):
    return -(p * math.log(p) + (1 - p) * math.log(1 - p))


# zeta 1-6 by hand: loss, true logit, ||e_y - q||, q_y, entropy, margin
# rows 0, 2 (h1 = 1, y = 0) and 3, 4 (h1 = -1, y = 1)
A = [math.log(4 / 3), S, 0.25 * math.sqrt(2), 0.75, entropy(0.75), 0.5]
B = [-math.log(0.9), 2 * S, 0.1 * math.sqrt(2), 0.9, entropy(0.9), 0.8]  # row 1 (h1 = 2, y = 0)
M = [math.log(4.0), -S, 0.75 * math.sqrt(2), 0.25, entropy(0.75), -0.5]  # row 5 (h1 = 1, y = 1)
BASIC = [A, B, A, A, A, M]


def head():
    module = LinearClassifier(2, 2)
    with torch.no_grad():
        module.weight.copy_(torch.tensor([[S, 0.0], [-S, 0.0]]))
        module.bias.zero_()
    return module


def extractor():
    return TrainingCharacteristics(torch.tensor(H), torch.tensor(Y), torch.tensor(NB))


def mean(u, v):
    return [(a + b) / 2 for a, b in zip(u, v)]


def cosine(u, v):
    norms = math.hypot(*u) * math.hypot(*v)
    return (u[0] * v[0] + u[1] * v[1]) / norms if norms else 0.0  # a zero vector: cosine 0


def test_basic_characteristics_by_hand():
    with torch.no_grad():
        z = head()(torch.tensor(H))
    np.testing.assert_allclose(basic_characteristics(z, torch.tensor(Y)).numpy(), BASIC, rtol=1e-6, atol=1e-7)


def test_six_row_example_every_group_by_hand():
    zeta = extractor()(head(), torch.arange(6)).numpy()
    assert zeta.shape == (6, NUM_CHARACTERISTICS) and len(NAMES) == NUM_CHARACTERISTICS
    # zeta 1-6: the row itself
    np.testing.assert_allclose(zeta[:, 0:6], BASIC, rtol=1e-6, atol=1e-7)
    # zeta 7-12: the mean over the two neighbours, each with its own label
    around = [mean(BASIC[j], BASIC[k]) for j, k in NB]
    assert around[0] == mean(B, M) and around[1] == A and around[3] == mean(A, M)
    np.testing.assert_allclose(zeta[:, 6:12], around, rtol=1e-6, atol=1e-7)
    # zeta 13-18: row minus neighbourhood, e.g. row 1: B - A
    np.testing.assert_allclose(zeta[:, 12:18], np.subtract(BASIC, around), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(zeta[1, 12:18], np.subtract(B, A), rtol=1e-6, atol=1e-6)
    # zeta 19-20: labels of the neighbours [0,1], [0,0], [0,1], [1,1], [1,0], [0,1]
    np.testing.assert_array_equal(zeta[:, 18], [0.5, 1.0, 0.5, 1.0, 0.5, 0.5])
    np.testing.assert_array_equal(zeta[:, 19], [0.5, 0.0, 0.5, 0.0, 0.5, 0.5])
    # zeta 21: cos(h_i, mean neighbour h); row 0: h = (1, 1), mean of (2, 0) and (1, 2) = (1.5, 1)
    assert cosine(H[0], mean(H[1], H[5])) == pytest.approx(2.5 / (math.sqrt(2) * math.sqrt(3.25)))
    # row 4: the neighbours (-1, 1) and (1, -1) average to the zero vector, whose cosine is 0
    assert zeta[4, 20] == 0.0
    np.testing.assert_allclose(zeta[:, 20], [cosine(H[i], mean(H[j], H[k])) for i, (j, k) in enumerate(NB)],
                               rtol=1e-6, atol=1e-7)
    # zeta 22-42: first visit of every row, so 0
    np.testing.assert_array_equal(zeta[:, 21:], 0.0)


def test_sequence_block_is_the_change_since_the_rows_previous_visit():
    chars = extractor()
    before = chars(head(), torch.tensor([0, 1, 2])).numpy()
    moved = head()
    with torch.no_grad():  # s -> 2 s: q_0 = 9^h1 / (9^h1 + 1)
        moved.weight.mul_(2.0)
    after = chars(moved, torch.arange(6)).numpy()
    # rows 0-2 were visited: zeta 22-42 = zeta 1-21 now minus then; rows 3-5: first visit, 0
    np.testing.assert_allclose(after[:3, 21:], after[:3, :21] - before[:, :21], atol=1e-6)
    np.testing.assert_array_equal(after[3:, 21:], 0.0)
    # by hand for row 1 (h1 = 2, y = 0): q_y goes from 0.9 to 81/82
    assert after[1, 21 + 3] == pytest.approx(81 / 82 - 0.9, abs=1e-6)
    # frozen features: zeta 40-42 (the changes of zeta 19-21) stay 0
    np.testing.assert_array_equal(after[:, 39:], 0.0)
    # the new values are remembered (a third visit at the same head: no change at all)
    np.testing.assert_allclose(chars(moved, torch.arange(6)).numpy()[:, 21:], 0.0, atol=1e-7)
    # without update nothing is remembered: the next visit still compares with the `moved` values
    chars(head(), torch.arange(6), update=False)
    np.testing.assert_allclose(chars(moved, torch.arange(6)).numpy()[:, 21:], 0.0, atol=1e-7)
    # reset forgets every visit
    chars.reset()
    assert not chars.visited.any()


def test_invariants_on_random_data():
    g = torch.Generator().manual_seed(0)
    n, d, c, k = 300, 8, 5, 7
    x = torch.randn(n, d, generator=g)
    y = torch.randint(c, (n,), generator=g)
    nb = torch.stack([torch.randperm(n - 1, generator=g)[:k] for _ in range(n)])
    nb = nb + (nb >= torch.arange(n)[:, None]).long()  # skip self
    module = LinearClassifier(d, c)
    module.reset_parameters(g)
    with torch.no_grad():
        module.weight.mul_(5.0)
    zeta = TrainingCharacteristics(x, y, nb)(module, torch.arange(n))
    assert torch.isfinite(zeta).all()
    torch.testing.assert_close(zeta[:, 0], -torch.log(zeta[:, 3]), rtol=1e-5, atol=1e-5)  # zeta1 = -log zeta4
    assert (zeta[:, 2] >= 0).all() and (zeta[:, 2] <= math.sqrt(2) + 1e-6).all()
    assert (zeta[:, 4] >= -1e-6).all() and (zeta[:, 4] <= math.log(c) + 1e-5).all()
    assert (zeta[:, 5].abs() <= 1 + 1e-6).all()
    torch.testing.assert_close(zeta[:, 12:18], zeta[:, 0:6] - zeta[:, 6:12])
    assert (zeta[:, 18] >= 0).all() and (zeta[:, 18] + zeta[:, 19] <= 1 + 1e-6).all()
    assert (zeta[:, 20].abs() <= 1 + 1e-6).all()
    # the static block equals a second, chunked computation (chunk boundaries change nothing)
    torch.testing.assert_close(static_characteristics(x, y, nb, chunk=7), zeta[:, 18:21])


def test_cached_neighbour_characteristics_are_the_exact_ones_when_refreshed_and_stale_otherwise():
    exact = extractor()
    cached = TrainingCharacteristics(torch.tensor(H), torch.tensor(Y), torch.tensor(NB), cached=True)
    # the first call fills the table at the current head: the same values as the exact computation
    rows = torch.tensor([0, 3])
    np.testing.assert_allclose(cached(head(), rows).numpy(), exact(head(), rows).numpy(), atol=1e-7)
    moved = head()
    with torch.no_grad():
        moved.weight.mul_(2.0)
    # rows 1 and 5 (row 0's neighbours) were not refreshed: row 0's zeta 7-12 still use the old head
    got = cached(moved, torch.tensor([0]))[0, 6:12].numpy()
    np.testing.assert_allclose(got, mean(B, M), rtol=1e-6, atol=1e-7)
    assert not np.allclose(exact(moved, torch.tensor([0]))[0, 6:12].numpy(), got)
    # once they are refreshed (in a batch at the moved head), row 0 sees their new values
    cached(moved, torch.tensor([1, 5]))
    np.testing.assert_allclose(cached(moved, torch.tensor([0]))[0, 6:12].numpy(),
                               exact(moved, torch.tensor([0]))[0, 6:12].numpy(), atol=1e-6)
