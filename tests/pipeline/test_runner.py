"""The stage graph without Prefect: user backbones, interrupted extraction, cache keys."""

import numpy as np
import pytest
import torch
from torch import nn

from longtail.pipeline import extract, graph, methods, preflight
from longtail.pipeline.config import parse_config
from longtail.stages.errors import LongtailError
from longtail.storage.featurestore import open_store, store_status


def digits_net(hidden: int = 12):
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def _cfg(tmp_path, **over):
    data = {"store": str(tmp_path / "f.zarr"), "dataset": "digits-lt", "output": str(tmp_path / "out"),
            "backbone": {"kind": "python", "target": "tests.pipeline.test_runner:digits_net", "allow_code": True,
                         "classifier": "3"},
            "methods": [{"name": "ce", "params": {"epochs": 3}}]}
    data.update(over)
    return parse_config(data)


def test_python_backbone_extracts_classifier_inputs_and_is_reused(tmp_path):
    cfg = _cfg(tmp_path)
    info = extract.run_extract(cfg)
    assert not info.cached
    store = open_store(cfg.store)
    train = store.read("train")
    assert train.dim == 12 and len(train) == 353
    net = digits_net()
    from longtail.stages.datasets import digits_lt

    images = digits_lt().splits["train"].images
    with torch.no_grad():
        expected = net[:3](torch.as_tensor(images)).numpy()
    np.testing.assert_allclose(train.features, expected, rtol=1e-5, atol=1e-6)
    assert extract.run_extract(cfg).cached
    # another backbone (other kwargs, so other weights) never overwrites the complete store
    other = _cfg(tmp_path, backbone={"kind": "python", "target": "tests.pipeline.test_runner:digits_net", "allow_code": True,
                                     "kwargs": {"hidden": 8}, "classifier": "3"})
    with pytest.raises(LongtailError, match="never overwritten"):
        preflight.preflight(other)
    assert open_store(cfg.store).fingerprint == info.fingerprint


def test_interrupted_extraction_resumes_without_rewriting_finished_splits(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path)
    from longtail.storage import featurestore

    real_begin = featurestore.FeatureStoreWriter.begin_split

    def interrupt_at_test(self, name):
        if name == "test":
            raise KeyboardInterrupt
        return real_begin(self, name)

    monkeypatch.setattr(featurestore.FeatureStoreWriter, "begin_split", interrupt_at_test)
    with pytest.raises(KeyboardInterrupt):
        extract.run_extract(cfg)
    assert store_status(cfg.store) == "incomplete"
    with pytest.raises(LongtailError, match="interrupted"):
        open_store(cfg.store)

    begun = []

    def record(self, name):
        begun.append(name)
        return real_begin(self, name)

    monkeypatch.setattr(featurestore.FeatureStoreWriter, "begin_split", record)
    info = extract.run_extract(cfg)
    assert begun == ["test"]  # train and val were complete and kept
    fresh = _cfg(tmp_path / "b")
    monkeypatch.setattr(featurestore.FeatureStoreWriter, "begin_split", real_begin)
    assert extract.run_extract(fresh).fingerprint == info.fingerprint


def test_method_keys_follow_parameters_not_device(tmp_path):
    cfg = _cfg(tmp_path)
    spec = cfg.methods[0]
    m, p = methods.build_method(cfg, spec)
    k1 = methods.method_key("fp", spec, p, m)
    assert methods.method_key("fp", spec, dict(p, device="cuda"), m) == k1
    assert methods.method_key("fp", spec, dict(p, epochs=4), m) != k1
    assert methods.method_key("other-store", spec, p, m) != k1
    assert p["seed"] == cfg.seed and p["device"] == cfg.device


def test_parameter_change_refits_only_that_method(tmp_path, monkeypatch):
    methods = [{"name": "ce", "params": {"epochs": 3}}, {"name": "balanced-softmax", "params": {"epochs": 3}}]
    cfg = _cfg(tmp_path, methods=methods)
    graph.run_all(cfg)
    fitted = []
    from longtail.stages import base

    real_fit = base.Method.fit

    def spy(self, train, val=None):
        fitted.append(type(self).name)
        return real_fit(self, train, val)

    monkeypatch.setattr(base.Method, "fit", spy)
    methods[1]["params"]["epochs"] = 4
    graph.run_all(_cfg(tmp_path, methods=methods))
    assert fitted == ["balanced-softmax"]
