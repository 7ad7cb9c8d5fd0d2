"""Chunked evaluation: logits come from the store chunk by chunk, and only a method that says so
(``needs_full_split``) gets the whole train split in memory. Also: a cached fit is loaded on the
run's device, not on the device it was fitted on."""

import numpy as np
import pytest

from longtail.pipeline import keys, methods, stores
from longtail.pipeline.config import MethodSpec, parse_config
from longtail.stages.base import Frozen
from longtail.stages.registry import make_method, needs_full_split
from longtail.stages.calibrate import post_compensate
from longtail.stages.errors import LongtailError
from longtail.storage.artifacts import ArtifactStore, save_tensors
from longtail.storage.featurestore import FeatureStore, FeatureStoreWriter, open_store
from tests.pipeline.conftest import FAST, gaussian_split

CHUNK = 7  # rows per stored chunk: every split spans several chunks, the last one partial
COUNTS = {"train": [60, 25, 10, 4], "val": [6] * 4, "test": [12] * 4}


@pytest.fixture
def store(tmp_path):
    url = str(tmp_path / "store.zarr")
    data = {s: gaussian_split(c, seed=i) for i, (s, c) in enumerate(COUNTS.items())}
    w = FeatureStoreWriter(url, class_names=list("abcd"), class_counts=COUNTS["train"],
                           backbone={"kind": "imported"}, backbone_hash="none", dataset_fingerprint="test",
                           feature_dim=8, splits={s: len(y) for s, (_, y) in data.items()}, chunk_rows=CHUNK)
    for s, (x, y) in data.items():
        w.begin_split(s)
        w.write_chunk(s, x, y)
        w.end_split(s)
    fp = w.finish()
    return {"url": url, "data": data, "info": stores.StoreInfo(url, fp, cached=True)}


def _cfg(tmp_path, store, device="cpu"):
    return parse_config({"store": store["url"], "output": str(tmp_path / "out"), "device": device,
                         "methods": [{"name": "ce", "params": FAST}, {"name": "ce+pc", "params": FAST}]})


@pytest.fixture
def counting(monkeypatch):
    """Records the rows of every block a store materialises, per split; ``forbid`` makes a whole-split
    ``read`` of the named splits fail."""
    seen: dict[str, list[int]] = {}
    forbidden: set[str] = set()
    original_block, original_read = FeatureStore._feature_set, FeatureStore.read

    def block(self, split, name, start, stop):
        fs = original_block(self, split, name, start, stop)
        seen.setdefault(split, []).append(len(fs))
        return fs

    def read(self, split):
        if split in forbidden:
            raise AssertionError(f"split {split!r} was read whole")
        return original_read(self, split)

    monkeypatch.setattr(FeatureStore, "_feature_set", block)
    monkeypatch.setattr(FeatureStore, "read", read)
    return seen, forbidden


def test_split_logits_equal_logits_at_once(store, counting):
    seen, _ = counting
    fs = open_store(store["url"])
    head = make_method("ce", FAST | {"device": "cpu"}).fit(fs.read("train"))
    x_test = store["data"]["test"][0]
    seen.clear()
    chunked = methods.split_logits(head, fs, "test")  # the stored chunk size
    assert seen["test"] == [7] * 6 + [6]  # 48 rows: never more than one chunk at a time
    np.testing.assert_allclose(chunked, head.logits(x_test), rtol=1e-6, atol=1e-6)
    seen.clear()
    np.testing.assert_allclose(methods.split_logits(head, fs, "test", rows=5), head.logits(x_test), rtol=1e-6, atol=1e-6)
    assert max(seen["test"]) == 5 and sum(seen["test"]) == 48


def test_run_method_never_reads_the_test_split_whole(tmp_path, store, counting):
    seen, forbidden = counting
    forbidden.add("test")
    cfg = _cfg(tmp_path, store)
    res = methods.run_method(cfg, cfg.methods[0], store["info"])
    assert max(seen["test"]) <= CHUNK and sum(seen["test"]) == 48
    head = methods.load_method(cfg, res.key)
    np.testing.assert_allclose(methods.method_logits(cfg, res.key, "test"), head.logits(store["data"]["test"][0]),
                               rtol=1e-6, atol=1e-6)


def test_needs_full_split():
    ce = make_method("ce", FAST)
    assert ce.needs_full_split and needs_full_split(ce)
    pc = make_method("ce+pc", FAST)
    assert not type(pc).needs_full_split
    assert needs_full_split(pc)  # its base is not fitted yet: fitting pc fits ce on every row
    assert needs_full_split(make_method("dlsa+ce", FAST))
    x, y = gaussian_split([20, 10, 5, 3])
    from longtail.stages.data import FeatureSet

    pc.base.fit(FeatureSet(x, y, np.bincount(y), list("abcd")))
    assert needs_full_split(pc)  # a fitted base that is not frozen is refitted
    assert not needs_full_split(pc.with_base(Frozen(pc.base)))  # only the prior is left to fit
    assert needs_full_split(make_method("ce+ts+pc", FAST))


def test_fit_split_class_means_by_hand(store, counting):
    seen, forbidden = counting
    forbidden.add("train")
    fs = open_store(store["url"])
    pc = make_method("ce+pc", FAST)
    pc = pc.with_base(Frozen(pc.base))  # only the wrapper's own fit is left
    means = methods.fit_split(pc, fs, rows=CHUNK)
    x, y = store["data"]["train"]
    np.testing.assert_allclose(means.features, np.stack([x[y == c].mean(0) for c in range(4)]), rtol=1e-6)
    assert means.labels.tolist() == [0, 1, 2, 3]
    assert means.class_counts.tolist() == COUNTS["train"]
    np.testing.assert_allclose(means.prior, np.array(COUNTS["train"]) / 99)
    assert max(seen["train"]) <= CHUNK


def test_wrapper_of_a_cached_base_never_reads_train_whole(tmp_path, store, counting):
    seen, forbidden = counting
    cfg = _cfg(tmp_path, store)
    base = methods.run_method(cfg, cfg.methods[0], store["info"])
    forbidden.update({"train", "test"})
    seen.clear()
    res = methods.run_method(cfg, cfg.methods[1], store["info"])  # ce+pc on the cached ce
    assert max(seen["train"]) <= CHUNK and sum(seen["train"]) == 99
    # PC-Softmax (paper 002, eq. 4) of the cached head's logits: f - log p_s + log p_t, p_t uniform
    ce = methods.load_method(cfg, base.key)
    expected = post_compensate(methods.method_logits(cfg, base.key, "test"), ce.logit_prior())
    np.testing.assert_allclose(methods.method_logits(cfg, res.key, "test"), expected, rtol=1e-5, atol=1e-5)


def test_fit_split_names_a_class_without_train_rows(tmp_path):
    url = str(tmp_path / "s.zarr")
    x, y = gaussian_split([5, 5, 5])
    # the counts attribute says class c has 1 sample, but no row has label c: a store edited by hand
    w = FeatureStoreWriter(url, class_names=["a", "b", "c"], class_counts=[5, 5, 5], backbone={"kind": "imported"},
                           backbone_hash="none", dataset_fingerprint="t", feature_dim=8, splits={"train": 15},
                           chunk_rows=CHUNK)
    w.begin_split("train")
    w.write_chunk("train", x, y)
    w.end_split("train")
    w.finish()
    fs = open_store(url)
    fs._attrs["class_counts"] = [5, 5, 5, 0]
    fs._attrs["class_names"] = ["a", "b", "c", "d"]
    pc = make_method("ce+pc", FAST)
    pc = pc.with_base(Frozen(pc.base))
    with pytest.raises(LongtailError, match="class\\(es\\) with no train sample: d"):
        methods.fit_split(pc, fs)


def test_cached_fit_loads_on_the_runs_device(tmp_path, store):
    """The method key leaves the device out (a GPU fit is the same artifact): a fit whose metadata
    says cuda must load on a CPU-only run instead of failing for want of CUDA."""
    cfg = _cfg(tmp_path, store)
    fs = open_store(store["url"])
    pc = make_method("ce+pc", FAST | {"device": "cpu"}).fit(fs.read("train"))
    params = FAST | {"device": "cuda:0", "pc": {"target_prior": None}}
    ArtifactStore(cfg.artifacts_url).write("method", "abcdef01", {"state.safetensors": save_tensors(pc.state_dict())},
                                           {"name": "ce+pc", "params": params})
    loaded = methods.load_method(cfg, "abcdef01")
    assert loaded.base.device == "cpu"
    np.testing.assert_array_equal(loaded.logits(store["data"]["test"][0]), pc.logits(store["data"]["test"][0]))
    assert keys.with_device({"a": 1, "device": "cuda", "dlsa": {"device": "cuda:1", "k": 2}}, "cpu") == \
        {"a": 1, "device": "cpu", "dlsa": {"device": "cpu", "k": 2}}
