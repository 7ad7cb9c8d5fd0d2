"""Neighbour tables in the pipeline: one artifact per store and table parameters, reused, never stale."""

import numpy as np
import pytest
import torch

from longtail.pipeline import keys, runner, tables
from longtail.pipeline.config import MethodSpec, parse_config
from longtail.stages import base, neighbours
from longtail.stages.base import Method
from longtail.storage.artifacts import ArtifactStore, save_tensors
from tests.pipeline.conftest import assert_user_error, invoke


class TableHead(Method):
    """Test-only method that uses a neighbour table: nearest class mean, plus the share of each
    sample's neighbours with its own label (kept as state, so a test can compare it)."""

    name = "table-head"

    def __init__(self, k: int = 5, index: str = "flat", shrink: float = 0.0, seed: int = 0, device: str = "cpu"):
        self.k, self.index, self.shrink, self.seed, self.device = k, index, shrink, seed, device

    def table_params(self) -> dict | None:
        return None if self.k is None else {"k": self.k, "metric": "cosine", "index": self.index}

    def set_table(self, table) -> "TableHead":
        self.table_ = table
        return self

    def _fit(self, train, val):
        if not hasattr(self, "table_"):
            self.table_ = neighbours.build_table(train.features, self.k, index=self.index, seed=self.seed)
        self.table_.check_for(len(train))
        means = np.stack([train.features[train.labels == c].mean(0) for c in range(train.num_classes)])
        self.means_ = torch.from_numpy(means * (1 - self.shrink))
        self.agree_ = torch.from_numpy((train.labels[self.table_.indices] == train.labels[:, None]).mean(1))

    def _logits(self, features):
        return (torch.from_numpy(features) @ self.means_.T).numpy()

    def _state(self):
        return {"means": self.means_, "agree": self.agree_}

    def _load_state(self, state):
        self.means_, self.agree_ = state["means"], state["agree"]


class OtherTableHead(TableHead):
    name = "table-head-b"


@pytest.fixture
def table_head(monkeypatch):
    monkeypatch.setitem(base.METHODS, "table-head", TableHead)
    monkeypatch.setitem(base.METHODS, "table-head-b", OtherTableHead)


@pytest.fixture
def store(tmp_path, feature_files):
    out = tmp_path / "store.zarr"
    r = invoke("import-features", "--train", feature_files["train"], "--val", feature_files["val"],
               "--test", feature_files["test"], "--out", out)
    assert r.exit_code == 0, r.output
    return out


def config(store, out, *methods, seed=0):
    return parse_config({"store": str(store), "output": str(out), "seed": seed,
                         "artifacts": str(out.parent / "cache"), "methods": list(methods)})


@pytest.fixture
def count_builds(monkeypatch):
    calls = []
    real = tables.build_table

    def counting(features, **kw):
        calls.append(kw)
        return real(features, **kw)

    monkeypatch.setattr(tables, "build_table", counting)
    # the method must get the pipeline's table, never build its own
    monkeypatch.setattr(neighbours, "build_table", lambda *a, **kw: pytest.fail("method built its own table"))
    return calls


def test_one_table_serves_every_method_and_run(table_head, store, tmp_path, count_builds, monkeypatch):
    cfg = config(store, tmp_path / "o", {"name": "table-head", "params": {"k": 4}},
                 {"name": "table-head-b", "params": {"k": 4, "shrink": 0.1}},
                 {"name": "table-head+pc", "params": {"k": 4}})
    metrics = runner.run_all(cfg)
    assert len(count_builds) == 1 and count_builds[0]["k"] == 4
    assert set(metrics["methods"]) == {"table-head", "table-head-b", "table-head+pc"}
    # the state shows the method was fitted on the cached table of this store's train split
    train = runner.open_store(str(store)).read("train")
    fitted = runner.load_method(cfg, runner.run_method(cfg, cfg.methods[0], runner.existing_store(cfg)).key)
    exact = tables.load_table(cfg, tables.run_neighbour_table(cfg, cfg.methods[0], runner.existing_store(cfg)).key)
    assert exact.fingerprint == f"{runner.open_store(str(store)).fingerprint}:train"
    np.testing.assert_allclose(fitted.agree_.numpy(),
                               (train.labels[exact.indices] == train.labels[:, None]).mean(1))
    # a method with new parameters but the same table: refitted, the table reused (builds would raise)
    counting = tables.build_table
    monkeypatch.setattr(tables, "build_table", lambda *a, **kw: pytest.fail("table rebuilt"))
    res = runner.run_method(cfg, MethodSpec(name="table-head", params={"k": 4, "shrink": 0.5}),
                            runner.existing_store(cfg))
    assert not res.cached
    # another K is another table
    monkeypatch.setattr(tables, "build_table", counting)
    assert tables.run_neighbour_table(cfg, MethodSpec(name="table-head", params={"k": 3}),
                                      runner.existing_store(cfg)).cached is False


def test_table_key_follows_the_store_and_the_parameters(table_head, store, tmp_path, feature_files, count_builds):
    cfg = config(store, tmp_path / "o", {"name": "table-head", "params": {"k": 4}})
    info = runner.existing_store(cfg)
    first = tables.run_neighbour_table(cfg, cfg.methods[0], info)
    again = tables.run_neighbour_table(cfg, cfg.methods[0], info)
    assert again.cached and again.key == first.key and len(count_builds) == 1
    # the same train features with one row changed: another store fingerprint, another table
    data = dict(np.load(feature_files["train"]))
    data["features"][0, 0] += 1.0
    np.savez(tmp_path / "train2.npz", **data)
    other = tmp_path / "other.zarr"
    assert invoke("import-features", "--train", tmp_path / "train2.npz", "--test", feature_files["test"],
                  "--out", other).exit_code == 0
    cfg2 = config(other, tmp_path / "o", {"name": "table-head", "params": {"k": 4}})
    second = tables.run_neighbour_table(cfg2, cfg2.methods[0], runner.existing_store(cfg2))
    assert second.key != first.key and not second.cached and len(count_builds) == 2
    # the first store's table is refused for the second store's features
    with pytest.raises(runner.LongtailError, match="built for other features"):
        tables.load_table(cfg, first.key).check_for(99, neighbours.table_fingerprint(runner.existing_store(cfg2).fingerprint))
    # the seed decides approximate tables only; the device never
    build, decide = tables._table_args({"k": 4, "index": "flat", "device": "cpu"}, cfg, 99)
    assert decide == {"k": 4, "metric": "cosine", "index": "flat"} and build["device"] == "cpu"
    seeded = [tables._table_args({"k": 4, "index": ix}, config(store, tmp_path / "o", "ce", seed=s), 99)[1]
              for ix in ("flat", "ivf") for s in (0, 1)]
    assert seeded[0] == seeded[1] and seeded[2] != seeded[3] and seeded[2]["nlist"] == 2
    # an approximate table goes through the same artifact, with its recall
    ivf = tables.run_neighbour_table(cfg, MethodSpec(name="table-head", params={"k": 4, "index": "ivf"}), info)
    loaded = tables.load_table(cfg, ivf.key)
    assert ivf.key != first.key and loaded.index == "ivf" and 0 < loaded.recall <= 1
    assert ArtifactStore(cfg.artifacts_url).read_meta(tables.KIND, ivf.key)["recall"] == loaded.recall


def test_a_table_with_another_fingerprint_is_refused(table_head, store, tmp_path, count_builds):
    cfg = config(store, tmp_path / "o", {"name": "table-head", "params": {"k": 4}})
    info = runner.existing_store(cfg)
    _, decide = tables._table_args({"k": 4}, cfg, 99)
    key = tables.table_key(info.fingerprint, decide)
    rng = np.random.default_rng(0)
    idx = torch.from_numpy(rng.integers(0, 99, size=(99, 4)))
    ArtifactStore(cfg.artifacts_url).write(tables.KIND, key, {tables.FILE: save_tensors(
        {"indices": idx, "similarities": torch.zeros(99, 4)})},
        {"k": 4, "metric": "cosine", "index": "flat", "fingerprint": "0123:train", "recall": None,
         "build_seconds": 1.0})
    r = invoke("stage", "table-head", "--config", _yaml(tmp_path, cfg))
    assert_user_error(r, "built for other features", "0123:train")
    assert not ArtifactStore(cfg.artifacts_url).keys("method")  # nothing fitted on it
    assert count_builds == []


def _yaml(tmp_path, cfg):
    import yaml

    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"store": cfg.store, "output": cfg.output, "artifacts": cfg.artifacts_url,
                                    "methods": [{"name": s.name, "params": s.params} for s in cfg.methods]}))
    return path


@pytest.mark.parametrize("k, needle", [(0, "K = 0"), (99, "K = 99"), (150, "K = 150")])
def test_bad_k_fails_before_anything_is_fitted(table_head, store, tmp_path, k, needle):
    cfg = config(store, tmp_path / "o", {"name": "table-head", "params": {"k": k}})
    r = invoke("run", _yaml(tmp_path, cfg), "--no-prefect")
    assert_user_error(r, needle, "99 train rows")
    assert not ArtifactStore(cfg.artifacts_url).keys("method")
    assert not ArtifactStore(cfg.artifacts_url).keys(tables.KIND)


def test_table_specs_and_code_version(table_head, store, tmp_path, monkeypatch):
    cfg = config(store, tmp_path / "o", "ce", {"name": "table-head", "params": {"k": 4}},
                 {"name": "table-head-b", "params": {"k": 4, "shrink": 0.2}}, {"name": "table-head+pc", "params": {"k": 6}})
    assert [(s.name, s.params["k"]) for s in tables.table_specs(cfg)] == [("table-head", 4), ("table-head+pc", 6)]
    assert [tables.uses_table(cfg, s) for s in cfg.methods] == [False, True, True, True]
    assert not tables.uses_table(cfg, MethodSpec(name="table-head", params={"k": None}))  # asks for none
    # a method fitted on a table is refitted when the table code changes
    monkeypatch.setattr(keys, "files_version", lambda paths: sorted(p.name for p in paths))
    assert "neighbours.py" in keys.method_code_version(base.make_method("table-head+pc"))
    assert "neighbours.py" not in keys.method_code_version(base.make_method("ce"))
