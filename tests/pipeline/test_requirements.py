"""Declared shared artifacts in the pipeline: one artifact per store and requirement, built once
(whatever the number of methods that declare it), attached before the fit, reused by later runs."""

import numpy as np
import pytest
import torch

from longtail.pipeline import graph, methods, plan, requirements
from longtail.pipeline.config import MethodSpec, parse_config
from longtail.stages import registry
from longtail.stages.base import Method, Requirement
from longtail.storage.artifacts import ArtifactStore
from longtail.storage.featurestore import open_store
from tests.pipeline.conftest import invoke

BUILDS: list[dict] = []


def class_sums(features: np.ndarray, labels: np.ndarray, scale: float) -> np.ndarray:
    """The test artifact: per-class feature sums times ``scale``, (C, D) float64."""
    C = int(labels.max()) + 1
    return np.stack([features[labels == c].astype(np.float64).sum(0) for c in range(C)]) * scale


class SumsHead(Method):
    """Test-only method that declares a shared artifact (scaled class sums of the train split) and
    scores by the dot product with the sums it was handed, shrunk by ``shrink``."""

    name = "sums-head"

    def __init__(self, scale: float | None = 1.0, shrink: float = 0.0, seed: int = 0, device: str = "cpu"):
        self.scale, self.shrink, self.seed, self.device = scale, shrink, seed, device

    def _requirements(self):
        if self.scale is None:
            return []

        def build(train):
            BUILDS.append({"rows": len(train), "scale": self.scale})
            return class_sums(train.features, train.labels, self.scale)

        return [Requirement(kind="test-sums", params={"scale": self.scale, "device": self.device},
                            modules=(__name__,), build=build,
                            save=lambda sums: ({"sums": torch.from_numpy(sums)}, {"shape": list(sums.shape)}),
                            load=lambda tensors, meta: tensors["sums"].numpy().reshape(meta["shape"]),
                            attach=self._attach)]

    def _attach(self, sums):
        self.sums = sums  # handed over before the fit; not learned state

    def _fit(self, train, val, ctx):
        sums = getattr(self, "sums", None)
        if sums is None:
            sums = class_sums(train.features, train.labels, self.scale or 1.0)
        self.weights_ = torch.from_numpy(sums * (1 - self.shrink))

    def _logits(self, features):
        return (torch.from_numpy(features).double() @ self.weights_.T).float().numpy()

    def _state(self):
        return {"weights": self.weights_}

    def _load_state(self, state):
        self.weights_ = state["weights"]


class OtherSumsHead(SumsHead):
    name = "sums-head-b"


@pytest.fixture
def sums_head(monkeypatch):
    monkeypatch.setitem(registry.METHODS, "sums-head", SumsHead)
    monkeypatch.setitem(registry.METHODS, "sums-head-b", OtherSumsHead)
    BUILDS.clear()
    yield
    BUILDS.clear()


@pytest.fixture
def store(tmp_path, feature_files):
    out = tmp_path / "store.zarr"
    r = invoke("import-features", "--train", feature_files["train"], "--val", feature_files["val"],
               "--test", feature_files["test"], "--out", out)
    assert r.exit_code == 0, r.output
    return out


def config(store, out, *specs, seed=0):
    return parse_config({"store": str(store), "output": str(out), "seed": seed,
                         "artifacts": str(out.parent / "cache"), "methods": list(specs)})


def test_one_artifact_serves_every_method_and_run(sums_head, store, tmp_path):
    cfg = config(store, tmp_path / "o", {"name": "sums-head", "params": {"scale": 2.0}},
                 {"name": "sums-head-b", "params": {"scale": 2.0, "shrink": 0.1}},
                 {"name": "sums-head+pc", "params": {"scale": 2.0}})
    metrics = graph.run_all(cfg)
    assert BUILDS == [{"rows": 99, "scale": 2.0}]  # once, on the full train split
    assert set(metrics["methods"]) == {"sums-head", "sums-head-b", "sums-head+pc"}
    train = open_store(str(store)).read("train")
    info = methods.StoreInfo(str(store), open_store(str(store)).fingerprint, True)
    fitted = methods.load_method(cfg, methods.run_method(cfg, cfg.methods[1], info).key)
    np.testing.assert_allclose(fitted.weights_.numpy(), class_sums(train.features, train.labels, 2.0) * 0.9)
    # new method parameters, same artifact: refitted, not rebuilt
    res = methods.run_method(cfg, MethodSpec(name="sums-head", params={"scale": 2.0, "shrink": 0.5}), info)
    assert not res.cached and len(BUILDS) == 1
    # other artifact parameters: another artifact
    methods.run_method(cfg, MethodSpec(name="sums-head", params={"scale": 3.0}), info)
    assert [b["scale"] for b in BUILDS] == [2.0, 3.0]
    assert len(ArtifactStore(cfg.artifacts_url).keys("test-sums")) == 2
    graph.run_all(cfg)  # a second run builds and fits nothing
    assert len(BUILDS) == 2


def test_plan_dedupes_requirements_and_orders_wrapped_methods(sums_head, store, tmp_path):
    cfg = config(store, tmp_path / "o", "ce", {"name": "sums-head", "params": {"scale": 2.0}},
                 {"name": "sums-head-b", "params": {"scale": 2.0, "shrink": 0.2, "device": "cuda"}},
                 {"name": "sums-head+pc", "params": {"scale": 4.0}}, "ce+pc")
    p = plan.method_plan(cfg)
    assert [(r.spec.name, r.kind) for r in p.requirements] == [("sums-head", "test-sums"), ("sums-head+pc", "test-sums")]
    assert p.needs["sums-head"] == p.needs["sums-head-b"] != p.needs["sums-head+pc"]  # the device decides nothing
    assert p.needs["ce"] == p.needs["ce+pc"] == []
    assert [s.name for s in p.heads] == ["ce", "sums-head", "sums-head-b"]
    assert [s.name for s in p.wrapped] == ["sums-head+pc", "ce+pc"]


def test_requirement_key_follows_store_params_and_code_not_device(sums_head, monkeypatch):
    req = registry.make_method("sums-head", {"scale": 2.0}).requirements()[0]
    on_gpu = registry.make_method("sums-head", {"scale": 2.0, "device": "cuda"}).requirements()[0]
    other = registry.make_method("sums-head", {"scale": 3.0}).requirements()[0]
    k = requirements.requirement_key(req, "fp")
    assert requirements.requirement_key(on_gpu, "fp") == k
    assert requirements.requirement_key(other, "fp") != k
    assert requirements.requirement_key(req, "another-store") != k
    monkeypatch.setattr(requirements, "code_version", lambda modules: "edited")
    assert requirements.requirement_key(req, "fp") != k


def test_a_wrapper_of_a_cached_base_needs_no_artifact_of_its_own(sums_head, store, tmp_path):
    cfg = config(store, tmp_path / "o", {"name": "sums-head+pc", "params": {"scale": 2.0}})
    info = methods.StoreInfo(str(store), open_store(str(store)).fingerprint, True)
    methods.run_method(cfg, cfg.methods[0], info)  # fits sums-head (with the artifact), then pc on it frozen
    assert len(BUILDS) == 1
    assert registry.make_method("sums-head", {"scale": None}).requirements() == []
