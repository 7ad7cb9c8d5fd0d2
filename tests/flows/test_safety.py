"""Issue 14, item 4: safe by default. Deployment runs accept no config override unless the deployment
allows it; python backbones only where allowed; status and deploy --dry-run never import a python
backbone; method names from a run directory cannot write outside it; compose binds to loopback and
requires the API auth string."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml

from longtail.stages.errors import LongtailError
from tests.pipeline.conftest import FAST, assert_user_error, feature_files, imported_run, invoke, write_config  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------- deployments
def test_deployment_records_whether_it_accepts_overrides(imported_run):
    from longtail.flows.deploy import build_deployment
    from longtail.pipeline.config import load_config

    cfg = load_config(imported_run["config"])
    assert build_deployment(cfg, "0 3 * * *", "n").parameters["allow_config_override"] is False
    assert build_deployment(cfg, "0 3 * * *", "n", allow_override=True).parameters["allow_config_override"] is True
    r = invoke("deploy", imported_run["config"], "--cron", "0 3 * * *", "--dry-run")
    assert r.exit_code == 0 and '"allow_config_override": false' in r.stdout


def test_a_flow_run_that_overrides_the_deployment_config_is_refused(imported_run, monkeypatch):
    from longtail.flows import pipeline_flow as pf
    from longtail.flows.deploy import deployment_parameters
    from longtail.pipeline.config import load_config

    stored = deployment_parameters(load_config(imported_run["config"]))
    evil = json.loads(json.dumps(stored["config"]))
    evil["backbone"] = {"kind": "python", "target": "os:system", "kwargs": {"command": "touch /tmp/pwned"},
                        "allow_code": True}
    ran = []
    monkeypatch.setattr(pf, "stages_flow", type("S", (), {"with_options": lambda *a, **k: lambda cfg: ran.append(cfg)}))
    monkeypatch.setattr(pf, "deployment_defaults", lambda: stored)
    with pytest.raises(LongtailError, match="does not accept config overrides"):
        pf.longtail_flow.fn(evil)
    with pytest.raises(LongtailError, match="does not accept config overrides"):  # the run's own flag does not count
        pf.longtail_flow.fn(evil, allow_config_override=True)
    assert ran == []
    pf.longtail_flow.fn(stored["config"])  # the deployment's own config runs
    assert len(ran) == 1
    monkeypatch.setattr(pf, "deployment_defaults", lambda: {**stored, "allow_config_override": True})
    monkeypatch.delenv("LONGTAIL_ALLOW_CODE", raising=False)
    with pytest.raises(LongtailError, match="allow_code"):  # an allowed override cannot allow code itself
        pf.longtail_flow.fn(evil)
    assert len(ran) == 1
    monkeypatch.setattr(pf, "deployment_defaults", lambda: None)  # `longtail run`: no deployment
    pf.longtail_flow.fn(stored["config"])
    assert len(ran) == 2


# ---------------------------------------------------------------------------------------- python backbones
@pytest.fixture
def tripwire(tmp_path, monkeypatch):
    """A python backbone module that leaves a file behind when it is imported."""
    mark = tmp_path / "imported"
    pkg = tmp_path / "tripkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(f"open({str(mark)!r}, 'a').write('pkg ')\n")
    (pkg / "net.py").write_text(
        f"open({str(mark)!r}, 'a').write('module ')\n"
        "import torch\n"
        "def build():\n"
        "    torch.manual_seed(0)\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 6), torch.nn.ReLU(), torch.nn.Linear(6, 10))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return mark


def _python_cfg(tmp_path, write_config, **backbone):
    return write_config({"store": str(tmp_path / "f.zarr"), "dataset": "digits-lt", "output": str(tmp_path / "o"),
                         "backbone": {"kind": "python", "target": "tripkg.net:build", "classifier": "3", **backbone},
                         "evaluation": {"shift_ratios": []},
                         "methods": [{"name": "ce", "params": FAST}]})


def test_a_python_backbone_needs_allow_code(tmp_path, write_config, tripwire, monkeypatch):
    monkeypatch.delenv("LONGTAIL_ALLOW_CODE", raising=False)
    cfg = _python_cfg(tmp_path, write_config)
    for args in (("run", cfg, "--no-prefect"), ("status", cfg), ("deploy", cfg, "--cron", "0 3 * * *", "--dry-run")):
        assert_user_error(invoke(*args), "allow_code")
    assert not tripwire.exists()
    monkeypatch.setenv("LONGTAIL_ALLOW_CODE", "1")  # the machine's flag
    assert invoke("status", cfg).exit_code == 0


def test_status_and_dry_run_hash_the_file_and_never_import_it(tmp_path, write_config, tripwire):
    import sys

    cfg = _python_cfg(tmp_path, write_config, allow_code=True)
    r = invoke("status", cfg)
    assert r.exit_code == 0, r.output
    r = invoke("deploy", cfg, "--cron", "0 3 * * *", "--dry-run")
    assert r.exit_code == 0, r.output
    assert not tripwire.exists() and "tripkg" not in sys.modules
    r = invoke("run", cfg, "--no-prefect")
    assert r.exit_code == 0, r.output
    assert tripwire.read_text() == "pkg module "  # a run builds it (once imported, cached by Python)
    r = invoke("status", cfg, "--json")
    stages = json.loads(r.stdout)["stages"]
    assert stages["extract"]["state"] == "cached" and "blake2b" in stages["extract"]["reason"]
    assert {v["state"] for v in stages.values()} == {"cached"}


# ---------------------------------------------------------------------------------------- plot names
def test_method_names_from_a_crafted_run_directory_stay_inside_it(imported_run, tmp_path):
    from longtail.pipeline.evaluate import EVALUATE_COMMIT, EVALUATE_FILES
    from longtail.pipeline.io import write_commit

    out = imported_run["out"]
    metrics = json.loads((out / "metrics.json").read_text())
    evil = "../../../escaped"
    metrics["methods"] = {evil: metrics["methods"]["ce"], "a/b": metrics["methods"]["ce"]}
    (out / "metrics.json").write_text(json.dumps(metrics))
    with np.load(out / "evaluation.npz") as d:
        details = {k: d[k] for k in d.files}
    details[f"logits/{evil}"] = details["logits/ce"]
    details["logits/a/b"] = details["logits/ce"]
    np.savez(out / "evaluation.npz", **details)
    write_commit(out, EVALUATE_COMMIT, metrics["lineage"]["evaluate"]["key"], EVALUATE_FILES)
    before = {p for p in tmp_path.rglob("*.png")}
    r = invoke("report", out)
    assert r.exit_code == 0, r.output
    new = {p for p in tmp_path.rglob("*.png")} - before
    assert new and all(p.resolve().parent == (out / "plots").resolve() for p in new), new
    assert not (tmp_path / "escaped.png").exists()
    names = sorted(p.name for p in new)
    assert len(names) == len(set(names)) and any("escaped" in n for n in names)


def test_a_plots_link_out_of_the_run_directory_is_refused(imported_run, tmp_path):
    out = imported_run["out"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    import shutil

    shutil.rmtree(out / "plots")
    os.symlink(elsewhere, out / "plots")
    assert_user_error(invoke("report", out), "plots")
    assert list(elsewhere.iterdir()) == []


# ---------------------------------------------------------------------------------------- compose
def test_compose_binds_the_server_to_loopback_and_requires_an_auth_string():
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    for name, svc in compose["services"].items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)
    server = compose["services"]["prefect-server"]
    assert server["ports"] == ["127.0.0.1:4200:4200"]
    auth = server["environment"]["PREFECT_SERVER_API_AUTH_STRING"]
    assert auth.startswith("${PREFECT_API_AUTH_STRING:?"), auth  # compose refuses to start without it
    for name, svc in compose["services"].items():
        if name == "prefect-server":
            continue
        env = svc["environment"]
        assert env["PREFECT_API_AUTH_STRING"].startswith("${PREFECT_API_AUTH_STRING:?"), name
        assert env.get("LONGTAIL_ALLOW_CODE", "${LONGTAIL_ALLOW_CODE:-0}") == "${LONGTAIL_ALLOW_CODE:-0}", name
    # the health check stays unauthenticated (Prefect exempts GET /api/health)
    assert "/api/health" in " ".join(server["healthcheck"]["test"])
