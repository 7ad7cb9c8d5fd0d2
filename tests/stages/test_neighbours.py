"""Neighbour tables: faiss against brute force, chunking, self exclusion, approximate indexes, errors."""

import numpy as np
import pytest
import torch

from longtail.stages.errors import LongtailError
from longtail.stages.neighbours import NeighbourTable, build_table, index_params


def clustered(n=600, dim=16, clusters=6, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim)) * 2
    return (centres[rng.integers(clusters, size=n)] + rng.normal(size=(n, dim))).astype(np.float32)


def torch_knn(x, k):
    """Brute-force cosine kNN, self excluded: (indices, similarities, the K+1-th similarity)."""
    t = torch.nn.functional.normalize(torch.from_numpy(x).double(), dim=1)
    s = t @ t.T
    s.fill_diagonal_(-float("inf"))
    vals, idx = torch.topk(s, k + 1, dim=1)
    return idx[:, :k].numpy(), vals[:, :k].numpy(), vals.numpy()


def test_flat_table_equals_brute_force_torch_knn():
    x = clustered()
    table = build_table(x, 7)
    idx, sims, top = torch_knn(x, 7)
    assert table.indices.shape == (600, 7) and table.indices.dtype == np.int64
    assert table.similarities.dtype == np.float32
    np.testing.assert_allclose(table.similarities, sims, atol=1e-5)
    # indices agree wherever the order is not decided by a near-tie (within float32 rounding)
    clear = (np.abs(np.diff(top, axis=1)) > 1e-5).all(axis=1)
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(table.indices[clear], idx[clear])
    # everywhere, the listed rows really have the listed similarities, and never the row itself
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    np.testing.assert_allclose(np.einsum("nd,nkd->nk", xn, xn[table.indices]), table.similarities, atol=1e-5)
    assert not (table.indices == np.arange(600)[:, None]).any()
    assert (np.diff(table.similarities, axis=1) <= 1e-6).all()
    assert table.recall is None and table.index == "flat" and table.metric == "cosine"


def test_chunking_gives_the_same_table_as_one_chunk():
    x = clustered(n=301)
    one = build_table(x, 5, chunk_rows=301)
    small = build_table(x, 5, chunk_rows=37)
    np.testing.assert_array_equal(one.indices, small.indices)
    np.testing.assert_array_equal(one.similarities, small.similarities)


def test_self_is_excluded_among_exact_duplicates():
    rng = np.random.default_rng(1)
    base = rng.normal(size=(20, 8)).astype(np.float32)
    x = np.repeat(base, 4, axis=0)  # four exact copies of every row: more than K + 1 = 3 at similarity 1
    table = build_table(x, 2)
    rows = np.arange(len(x))
    assert not (table.indices == rows[:, None]).any()
    np.testing.assert_array_equal(table.indices // 4, np.repeat(rows // 4, 2).reshape(-1, 2))  # its copies
    np.testing.assert_allclose(table.similarities, 1.0, atol=1e-5)


def test_zero_rows_are_kept_at_similarity_zero():
    x = clustered(n=50, dim=4)
    x[3] = 0
    table = build_table(x, 4)
    np.testing.assert_allclose(table.similarities[3], 0.0, atol=1e-6)
    assert 3 not in table.indices[3]


def test_approximate_indexes_report_high_recall_on_easy_data():
    x = clustered(n=3000, dim=4, clusters=8)
    exact = build_table(x, 10)
    hnsw = build_table(x, 10, index="hnsw", ef_search=128, seed=3)
    assert hnsw.index == "hnsw" and 0.97 <= hnsw.recall <= 1.0
    ivf = build_table(x, 10, index="ivf", nprobe=8, seed=3)
    assert 0.9 <= ivf.recall <= 1.0
    # every cell probed: IVF is exhaustive, so it finds the exact table (up to near-ties) and says so
    full = build_table(x, 10, index="ivf", nlist=16, nprobe=16)
    assert full.recall >= 0.999
    np.testing.assert_allclose(full.similarities, exact.similarities, atol=1e-5)


def test_ivf_rows_with_too_few_candidates_are_searched_exactly():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(90, 6)) + np.array([8, 0, 0, 0, 0, 0])
    b = rng.normal(size=(10, 6)) + np.array([0, 0, 0, 0, 0, 8])
    x = np.concatenate([a, b]).astype(np.float32)
    # two cells, one probed: the 10 rows of the small cluster find at most 9 others there, K = 15
    ivf = build_table(x, 15, index="ivf", nlist=2, nprobe=1)
    exact = build_table(x, 15)
    assert (ivf.indices >= 0).all()
    np.testing.assert_allclose(ivf.similarities[90:], exact.similarities[90:], atol=1e-5)


def test_index_parameter_defaults():
    assert index_params("ivf", 10_000, {}) == {"nlist": 256, "nprobe": 32}  # ~4 sqrt(N), N / 39 caps it
    assert index_params("ivf", 1_000_000, {"nprobe": 8}) == {"nlist": 4000, "nprobe": 8}
    assert index_params("ivf", 100, {}) == {"nlist": 2, "nprobe": 2}  # nprobe capped by nlist
    assert index_params("hnsw", 10, {"m": 16}) == {"m": 16, "ef_construction": 40, "ef_search": 64}


@pytest.mark.parametrize("k", [0, -1, 40, 41, 2.5, True])
def test_bad_k_is_one_error_naming_k_and_n(k):
    with pytest.raises(LongtailError, match=rf"K = {k!r} .*40 train rows"):
        build_table(clustered(n=40, dim=3), k)


@pytest.mark.parametrize("kwargs, needle", [
    ({"index": "lsh"}, "unknown index 'lsh'"),
    ({"index": "flat", "nprobe": 3}, "unknown parameter(s) nprobe"),
    ({"index": "hnsw", "m": 0}, "m = 0"),
    ({"index": "ivf", "nlist": 41}, "nlist = 41 exceeds"),
    ({"chunk_rows": 0}, "chunk_rows = 0"),
])
def test_bad_index_and_parameters(kwargs, needle):
    with pytest.raises(LongtailError) as e:
        build_table(clustered(n=40, dim=3), 3, **kwargs)
    assert needle in str(e.value)


def test_non_finite_features_are_refused():
    x = clustered(n=40, dim=3)
    x[5, 1] = np.nan
    x[7, 0] = np.inf
    with pytest.raises(LongtailError, match="2 row"):
        build_table(x, 3)
    with pytest.raises(LongtailError, match="shape"):
        build_table(np.zeros((0, 3), np.float32), 1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_cuda_is_a_user_error():
    with pytest.raises(LongtailError, match="CUDA is not available"):
        build_table(clustered(n=40, dim=3), 3, device="cuda")


def test_check_for_refuses_other_features():
    table = build_table(clustered(n=40, dim=3), 3, fingerprint="abc:train")
    table.check_for(40, "abc:train")
    table.check_for(40)
    with pytest.raises(LongtailError, match="built for other features"):
        table.check_for(40, "def:train")
    with pytest.raises(LongtailError, match="40 rows, the train split 41"):
        table.check_for(41)
    unknown = build_table(clustered(n=40, dim=3), 3)  # built outside the pipeline: no fingerprint
    with pytest.raises(LongtailError, match="fingerprint 'none'"):
        unknown.check_for(40, "abc:train")
    bad = NeighbourTable(np.full((40, 3), 45), np.zeros((40, 3)), 3)
    with pytest.raises(LongtailError, match="outside"):
        bad.check_for(40)
    with pytest.raises(LongtailError, match="not both"):
        NeighbourTable(np.zeros((40, 3), np.int64), np.zeros((40, 2)), 3)
