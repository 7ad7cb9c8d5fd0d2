import numpy as np
import pytest
import torch
from torch import nn

from longtail.stages import extract as ex
from longtail.stages.errors import LongtailError


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(16, 6), nn.ReLU())
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(self.body(x))


def make_net():
    return Net()


def not_a_module():
    return 42


def _images(n=20):
    return np.random.default_rng(0).random((n, 1, 4, 4), dtype=np.float32)


def test_python_backbone_takes_the_classifier_input():
    bb = ex.load_python("tests.stages.test_extract:make_net", classifier="fc")
    x = _images()
    feats = np.concatenate(list(ex.extract_chunks(bb, x, batch_size=7, device="cpu")))
    net = make_net()
    with torch.no_grad():
        expected = net.body(torch.as_tensor(x)).numpy()
    assert feats.shape == (20, 6)
    np.testing.assert_allclose(feats, expected, rtol=1e-6)
    assert bb.identity["target"] == "tests.stages.test_extract:make_net"


def test_chunks_follow_the_batch_size():
    bb = ex.load_python("tests.stages.test_extract:make_net", classifier="fc")
    sizes = [len(c) for c in ex.extract_chunks(bb, _images(20), batch_size=7, device="cpu")]
    assert sizes == [7, 7, 6]


def test_torchscript_backbone_round_trip(tmp_path):
    net = make_net()
    scripted = torch.jit.script(net.body)
    path = tmp_path / "body.pt"
    scripted.save(str(path))
    bb = ex.load_torchscript(str(path))
    x = _images(5)
    feats = np.concatenate(list(ex.extract_chunks(bb, x, device="cpu")))
    with torch.no_grad():
        np.testing.assert_allclose(feats, net.body(torch.as_tensor(x)).numpy(), rtol=1e-6)
    assert bb.weights_hash == ex.hash_file(str(path))


def test_small_cnn_features_are_the_classifier_input():
    rng = np.random.default_rng(0)
    x = rng.random((30, 1, 8, 8), dtype=np.float32)
    y = np.arange(30) % 3
    bb = ex.train_small_cnn(x, y, 3, epochs=2, batch_size=16, width=4, device="cpu")
    feats = np.concatenate(list(ex.extract_chunks(bb, x, device="cpu")))
    net = bb.module.net
    assert feats.shape == (30, 16)
    with torch.no_grad():
        logits = net(torch.as_tensor(x)).numpy()
    w, b = net.classifier.weight.detach().numpy(), net.classifier.bias.detach().numpy()
    np.testing.assert_allclose(feats @ w.T + b, logits, rtol=1e-4, atol=1e-5)
    # trained weights survive the safetensors round trip used by the backbone cache
    again = ex.load_small_cnn(ex.save_small_cnn(net))
    with torch.no_grad():
        np.testing.assert_allclose(again.features(torch.as_tensor(x)).numpy(), feats, rtol=1e-5, atol=1e-6)


def test_small_cnn_training_is_seeded():
    rng = np.random.default_rng(0)
    x = rng.random((20, 1, 8, 8), dtype=np.float32)
    y = np.arange(20) % 2
    a = ex.train_small_cnn(x, y, 2, epochs=2, width=4, seed=3, device="cpu")
    b = ex.train_small_cnn(x, y, 2, epochs=2, width=4, seed=3, device="cpu")
    c = ex.train_small_cnn(x, y, 2, epochs=2, width=4, seed=4, device="cpu")
    assert a.weights_hash == b.weights_hash != c.weights_hash


def test_small_cnn_training_draws_from_its_own_generators_and_logs_each_epoch():
    rng = np.random.default_rng(0)
    y = np.arange(40) % 2
    x = rng.random((40, 1, 8, 8), dtype=np.float32) * 0.5
    x[y == 1, :, :4] += 0.5  # class 1: a bright top half
    before = torch.random.get_rng_state()
    bb = ex.train_small_cnn(x, y, 2, epochs=15, batch_size=8, width=4, seed=0, device="cpu")
    assert torch.equal(torch.random.get_rng_state(), before)  # the global generator is not touched
    losses = [row["loss"] for row in bb.train_log]
    assert [row["epoch"] for row in bb.train_log] == list(range(15))
    assert losses[-1] < 0.5 * losses[0]  # it learns the bright-top-half rule


def test_shift_images_moves_the_content_by_one_pixel_with_zero_padding():
    x = torch.arange(9.0).reshape(1, 1, 3, 3)
    assert torch.equal(ex.shift_images(x, 0, 0), x)
    # dx = 1: each pixel shows its right neighbour, the last column is padding
    assert ex.shift_images(x, 1, 0)[0, 0].tolist() == [[1, 2, 0], [4, 5, 0], [7, 8, 0]]
    assert ex.shift_images(x, 0, -1)[0, 0].tolist() == [[0, 0, 0], [0, 1, 2], [3, 4, 5]]


def test_bad_backbones(tmp_path):
    with pytest.raises(LongtailError, match="does not exist"):
        ex.load_torchscript(str(tmp_path / "missing.pt"))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torchscript archive")
    with pytest.raises(LongtailError, match="junk.pt.*not a readable TorchScript"):
        ex.load_torchscript(str(junk))
    with pytest.raises(LongtailError, match="package.module:function"):
        ex.load_python("nocolon")
    with pytest.raises(LongtailError, match="cannot import"):
        ex.load_python("no_such_module_xyz:f")
    with pytest.raises(LongtailError, match="not an nn.Module"):
        ex.load_python("tests.stages.test_extract:not_a_module")
    with pytest.raises(LongtailError, match="no submodule 'head'"):
        ex.load_python("tests.stages.test_extract:make_net", classifier="head")


def test_non_finite_features_are_refused():
    class Bad(nn.Module):
        def forward(self, x):
            return x.flatten(1) / 0.0

    bb = ex.Backbone(ex.FeaturesOf(Bad(), None), {"kind": "python"}, "x")
    with pytest.raises(LongtailError, match="NaN or infinite"):
        list(ex.extract_chunks(bb, _images(3), device="cpu"))
