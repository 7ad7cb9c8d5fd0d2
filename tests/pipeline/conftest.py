import numpy as np
import pytest
import yaml


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


@pytest.fixture
def feature_files(tmp_path):
    """Long-tailed train, balanced val/test .npz files with 4 classes."""
    paths = {}
    for name, counts, seed in (("train", [60, 25, 10, 4], 0), ("val", [15] * 4, 1), ("test", [30] * 4, 2)):
        x, y = gaussian_split(counts, seed=seed)
        paths[name] = tmp_path / f"{name}.npz"
        np.savez(paths[name], features=x, labels=y)
    return paths


@pytest.fixture
def write_config(tmp_path):
    def write(data, name="config.yaml"):
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data))
        return str(path)

    return write
