import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from longtail.flows.cli import app

FAST = {"epochs": 5, "batch_size": 64}


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_user_error(result, *needles):
    """Exit status 2, exactly one line on stderr naming every needle, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


def gaussian_split(n_per_class, dim=8, seed=0, shift=2.5):
    """Features of C Gaussian classes with means on scaled one-hot directions."""
    rng = np.random.default_rng(seed)
    feats, labels = [], []
    for c, n in enumerate(n_per_class):
        mean = np.zeros(dim)
        mean[c % dim] = shift
        feats.append(rng.normal(size=(n, dim)) + mean)
        labels.append(np.full(n, c))
    return np.concatenate(feats).astype(np.float32), np.concatenate(labels).astype(np.int64)


def write_feature_files(directory) -> dict:
    """Long-tailed train, balanced val/test .npz files with 4 classes in ``directory`` (a path)."""
    paths = {}
    for name, counts, seed in (("train", [60, 25, 10, 4], 0), ("val", [15] * 4, 1), ("test", [30] * 4, 2)):
        x, y = gaussian_split(counts, seed=seed)
        paths[name] = directory / f"{name}.npz"
        np.savez(paths[name], features=x, labels=y)
    return paths


@pytest.fixture
def feature_files(tmp_path):
    """Long-tailed train, balanced val/test .npz files with 4 classes."""
    return write_feature_files(tmp_path)


@pytest.fixture
def write_config(tmp_path):
    def write(data, name="config.yaml"):
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data))
        return str(path)

    return write


@pytest.fixture
def imported_run(tmp_path, feature_files, write_config):
    """A complete imported store and one finished run on it."""
    store = tmp_path / "store.zarr"
    r = invoke("import-features", "--train", feature_files["train"], "--val", feature_files["val"],
               "--test", feature_files["test"], "--out", store)
    assert r.exit_code == 0, r.output
    out = tmp_path / "out"
    cfg = write_config({"store": str(store), "output": str(out),
                        "methods": [{"name": "ce", "params": FAST}, {"name": "ce+pc", "params": FAST}]})
    r = invoke("run", cfg, "--no-prefect")
    assert r.exit_code == 0, r.output
    return {"store": store, "out": out, "config": cfg}
