"""A user's own method from a module of their own (``target: pkg.module:Class``), end to end
through ``longtail run``: fitted, cached, in status and the report like a built-in one."""

import json
import textwrap
import uuid

import pytest
import yaml

from tests.pipeline.conftest import assert_user_error, invoke

SOURCE = '''
"""A head whose loss weights each row by its position in the train split (uses batch.rows)."""
import torch
import torch.nn.functional as F

from longtail.stages.heads import TrainedHead
from longtail.stages.train.objective import Objective, StepOutput


class RowWeighted(Objective):
    def __init__(self, alpha):
        self.alpha = alpha

    def loss(self, module, batch, state):
        z = module(batch.x)
        n = state.data.y.shape[0]
        w = 1.0 + self.alpha * batch.rows.to(z.dtype) / n   # row indices into the train split
        ROWS_SEEN.append(int(batch.rows.max()))
        return StepOutput((w * F.cross_entropy(z, batch.y, reduction="none")).mean(), logits=z)


ROWS_SEEN = []


class RowWeightedHead(TrainedHead):
    def __init__(self, *, alpha: float = 0.5, epochs: int = 100, lr: float = 0.1, batch_size: int = 128,
                 weight_decay: float = 5e-4, seed: int = 0, device: str = "auto"):
        super().__init__(epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=weight_decay,
                         seed=seed, device=device)
        self.alpha = alpha

    def objective(self, ctx):
        return RowWeighted(float(self.alpha))


NOT_A_METHOD = object
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    pkg = f"userpkg_{uuid.uuid4().hex[:8]}"
    (tmp_path / pkg).mkdir()
    (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / pkg / "losses.py").write_text(SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return pkg, tmp_path / pkg / "losses.py"


def _config(tmp_path, imported_run, methods):
    path = tmp_path / "user.yaml"
    path.write_text(yaml.safe_dump({"store": str(imported_run["store"]), "output": str(tmp_path / "u"),
                                    "artifacts": str(tmp_path / "u-cache"), "methods": methods}))
    return path


def test_a_user_method_runs_end_to_end_like_a_built_in(imported_run, tmp_path, user_module):
    pkg, source = user_module
    target = f"{pkg}.losses:RowWeightedHead"
    methods = [{"name": "row-weighted", "target": target, "params": {"alpha": 1.0, "epochs": 4}},
               {"name": "row-weighted+pc", "target": target, "params": {"alpha": 1.0, "epochs": 4}}]
    cfg = _config(tmp_path, imported_run, methods)
    r = invoke("run", cfg, "--no-prefect")
    assert r.exit_code == 0, r.output
    import importlib

    mod = importlib.import_module(f"{pkg}.losses")
    assert mod.ROWS_SEEN and max(mod.ROWS_SEEN) == 98  # rows of the 99-row train split reached the loss
    metrics = json.loads((tmp_path / "u" / "metrics.json").read_text())
    assert set(metrics["methods"]) == {"row-weighted", "row-weighted+pc"}
    assert 0.25 < metrics["methods"]["row-weighted"]["overall"] <= 1.0
    assert "row-weighted" in (tmp_path / "u" / "report.md").read_text()
    # cached: a second run fits nothing
    seen = len(mod.ROWS_SEEN)
    assert invoke("run", cfg, "--no-prefect").exit_code == 0 and len(mod.ROWS_SEEN) == seen
    status = json.loads(invoke("status", cfg, "--json").output)["stages"]
    assert status["method:row-weighted"]["state"] == "cached"
    # the target's source is in its key: editing it makes both stale
    source.write_text(source.read_text() + "\n# tuned\n")
    status = json.loads(invoke("status", cfg, "--json").output)["stages"]
    assert status["method:row-weighted"]["state"] == "stale"
    assert "method code changed" in status["method:row-weighted"]["reason"]
    assert status["method:row-weighted+pc"]["state"] == "stale"


@pytest.mark.parametrize("target, params, needle", [
    ("{pkg}.nowhere:RowWeightedHead", {}, "cannot import"),
    ("{pkg}.losses:NOT_A_METHOD", {}, "is not a method class"),
    ("{pkg}.losses:Missing", {}, "has no 'Missing'"),
    ("{pkg}.losses:RowWeightedHead", {"beta": 1}, "beta"),
])
def test_a_bad_target_is_one_line_naming_it(imported_run, tmp_path, user_module, target, params, needle):
    pkg, _ = user_module
    target = target.format(pkg=pkg)
    cfg = _config(tmp_path, imported_run, [{"name": "mine", "target": target, "params": params}])
    assert_user_error(invoke("run", cfg, "--no-prefect"), target, needle)
    assert not (tmp_path / "u").exists()  # before any work
