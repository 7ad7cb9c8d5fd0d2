"""``longtail doctor``: the report, the end-to-end smoke job, its failure and bad-argument paths."""

import json

import numpy as np
import pytest
import torch

from longtail.pipeline import doctor, methods
from longtail.stages.device import resolve_device
from longtail.stages.errors import LongtailError
from tests.pipeline.conftest import assert_user_error, invoke

STEPS = ["imports", "store", "fit", "logits", "knn", "metrics"]


def test_doctor_runs_every_step_on_cpu():
    r = invoke("doctor", "--device", "cpu", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["ok"] is True
    assert [s["name"] for s in res["steps"]] == STEPS
    assert all(s["status"] == "pass" for s in res["steps"]), res["steps"]
    env = res["environment"]
    assert env["device"] == "cpu"
    assert env["torch"] == torch.__version__
    assert env["cuda"]["available"] == torch.cuda.is_available()
    assert env["faiss"]["version"] and env["faiss"]["gpus"] >= 0
    assert env["python"].startswith("3.11")


def test_doctor_text_and_quick():
    r = invoke("doctor", "--quick")
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert [line.split()[1] for line in lines if line.startswith(("PASS", "FAIL", "SKIPPED"))] == ["imports"]
    assert lines[-1].startswith("doctor: all 1 step(s) passed on ")
    assert any(line.startswith("faiss") for line in lines) and any(line.startswith("device") for line in lines)


def test_a_failing_step_fails_the_command_and_skips_the_rest(monkeypatch):
    # chunked logits that disagree with the whole split: the logits step must catch it
    monkeypatch.setattr(methods, "split_logits", lambda method, fs, split, rows=None: np.zeros((50, 5), np.float32))
    r = invoke("doctor", "--device", "cpu")
    assert r.exit_code == 1, r.output
    status = {line.split()[1]: line.split()[0] for line in r.stdout.splitlines()
              if line.startswith(("PASS", "FAIL", "SKIPPED"))}
    assert status == {"imports": "PASS", "store": "PASS", "fit": "PASS", "logits": "FAIL",
                      "knn": "SKIPPED", "metrics": "SKIPPED"}
    assert "chunked logits differ" in r.stdout
    assert r.stdout.splitlines()[-1] == "doctor: FAILED: logits, knn, metrics on cpu"


def test_a_missing_module_fails_imports(monkeypatch):
    monkeypatch.setattr(doctor, "MODULES", doctor.MODULES + ("no_such_module_xyz",))
    res = doctor.run_doctor("cpu", quick=True)
    assert res["ok"] is False
    assert res["steps"][0]["status"] == "fail" and "no_such_module_xyz" in res["steps"][0]["detail"]


@pytest.mark.parametrize("device, needle", [("foo", "unknown device 'foo'"), ("mps", "'mps' is not supported")])
def test_bad_device_is_a_user_error(device, needle):
    assert_user_error(invoke("doctor", "--device", device), needle)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_a_user_error():
    assert_user_error(invoke("doctor", "--device", "cuda", "--quick"), "'cuda'", "CUDA is not available")


def test_cuda_index_beyond_the_visible_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(LongtailError, match="'cuda:2' was asked for but this machine shows 2 CUDA device"):
        resolve_device("cuda:2")


def test_sanitised_url_drops_credentials():
    assert doctor._sanitised_url("http://user:secret@prefect:4200/api") == "http://prefect:4200/api"
    assert doctor._sanitised_url("http://prefect-server:4200/api") == "http://prefect-server:4200/api"
    assert doctor._sanitised_url(None) is None
