import pytest

from longtail.pipeline.config import demo_config, load_config, parse_config
from longtail.pipeline.keys import stable_hash
from longtail.stages.errors import LongtailError

BASE = {"store": "s.zarr", "output": "out", "methods": ["ce"]}


def test_methods_accept_names_and_mappings():
    cfg = parse_config(BASE | {"methods": ["ce", {"name": "logit-adjust", "params": {"tau": 2.0}}],
                               "dataset": "digits-lt"})
    assert [m.name for m in cfg.methods] == ["ce", "logit-adjust"]
    assert cfg.methods[1].params == {"tau": 2.0}
    assert cfg.dataset.name == "digits-lt" and cfg.dataset.imbalance_ratio == 20
    assert cfg.artifacts_url.endswith("cache")


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"colour": 1}, "unknown config key 'colour'"),
        ({"backbone": {"kind": "builtin", "epochz": 3}}, "unknown config key 'backbone.epochz'"),
        ({"evaluation": {"ece_binz": 3}}, "unknown config key 'evaluation.ece_binz'"),
        ({"methods": [{"name": "ce", "parmas": {}}]}, "unknown config key 'methods.0.parmas'"),
        ({"methods": []}, "methods"),
        ({"methods": ["ce", "ce"]}, "ce listed more than once"),
        ({"backbone": {"kind": "torchscript"}}, "backbone.path is required"),
        ({"backbone": {"kind": "onnx"}}, "backbone.kind"),
    ],
)
def test_bad_config_names_the_key(patch, message):
    with pytest.raises(LongtailError, match=message):
        parse_config(BASE | patch, source="cfg.yaml")


def test_missing_key_and_bad_files(tmp_path):
    with pytest.raises(LongtailError, match="missing config key 'store'"):
        parse_config({"output": "o", "methods": ["ce"]})
    with pytest.raises(LongtailError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("store: [unclosed\n")
    with pytest.raises(LongtailError, match="bad.yaml.*not valid YAML"):
        load_config(str(bad))
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(LongtailError, match="must be a YAML mapping"):
        load_config(str(listy))


def test_demo_config_runs_every_head_and_ce_pc():
    names = [m.name for m in demo_config("runs/x").methods]
    for expected in ["ce", "balanced-softmax", "logit-adjust", "cb-ce", "crt", "tau-norm", "lws",
                     "cosine", "focal", "ldam-drw", "lade", "ce+pc", "ce+ts", "dlsa+balanced-softmax"]:
        assert expected in names


def test_stable_hash():
    assert stable_hash({"a": 1, "b": [1, 2]}) == stable_hash({"b": [1, 2], "a": 1})
    assert stable_hash({"lr": 1}) == stable_hash({"lr": 1.0})
    assert stable_hash({"lr": 0.1}) != stable_hash({"lr": 0.10000001})
