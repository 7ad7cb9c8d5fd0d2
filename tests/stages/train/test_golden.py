"""Golden logits: the training engine gives every method the numbers the code before it gave.

Recorded with the pre-engine trainers (``train_module``, ``train_filter``) on this tiny long-tailed
set, same seeds, one thread: the redesign keeps the order of random draws, so the same seed gives
bit-identical float32 logits. A change of a default or of a method's maths (the fidelity issue)
updates the method's entry of ``golden.npz`` in the commit that changes it, saying why:
``python -m tests.stages.train.test_golden NAME [NAME ...]`` re-records those entries.

Issue 11 made full-batch L-BFGS the default solver of the convex heads and gave the SGD heads
``cosine`` and ``ldam-drw`` a step budget: the pre-engine numbers stay pinned for ``solver: sgd``
and ``min_steps: 0``, the paths kept bit-identical, and the new defaults are pinned by value in
``golden_lbfgs.npz`` to the solver's tolerance (a converged solution depends neither on the
machine's rounding nor on the initial draw).
"""

from pathlib import Path

import numpy as np
import pytest
import torch

from longtail.stages.data import FeatureSet
from longtail.stages.registry import make_method

C, D = 5, 8


def data(counts, seed):
    rng = np.random.default_rng(seed)
    means = np.random.default_rng(99).normal(size=(C, D)) * 1.5
    y = np.repeat(np.arange(C), counts)
    x = (rng.normal(size=(len(y), D)) * 2 + 3 + means[y]).astype(np.float32)
    return FeatureSet(x, y, np.array(counts), tuple("abcde"), name="train")


train, val, test = data((80, 40, 20, 10, 5), 0), data((8,) * 5, 1), data((20,) * 5, 2)

#: float32 logits of every method on ``test`` (and the stage-1 CNN's weights, ``cnn.*``), recorded
#: with the pre-engine code (commit 8c0ece2) on one thread; the engine reproduces them bit for bit on
#: the machine that recorded them. Another CPU (another SIMD code path of the same kernels) rounds
#: differently, so the comparison allows float32 rounding noise, far below any change of maths.
GOLDEN = np.load(Path(__file__).with_name("golden.npz"))
METHODS = [k for k in GOLDEN.files if not k.startswith("cnn.")]
RTOL = ATOL = 1e-4


#: the heads whose default solver became full-batch L-BFGS (issue 11): their pinned pre-engine
#: numbers are those of ``solver: sgd``
LBFGS_BY_DEFAULT = ("ce", "balanced-softmax", "logit-adjust", "cb-ce", "focal", "crt", "tau-norm", "lws", "lade",
                    "ce+pc", "ce+ts", "dlsa+ce")
#: the heads that kept SGD but got a step budget (``min_steps``): ``min_steps: 0`` is the old path
MIN_STEPS_BY_DEFAULT = ("cosine", "ldam-drw", "heuristic-cala", "cala-no-u", "cala-no-v", "dynamic-la")


def _params(name):
    p = _default_params(name)
    if name in LBFGS_BY_DEFAULT:
        p["solver"] = "sgd"
    if name in MIN_STEPS_BY_DEFAULT:
        p["min_steps"] = 0
    return p


def _default_params(name):
    p = {"epochs": 4, "batch_size": 16, "seed": 3, "device": "cpu"}
    if name.startswith("dlsa"):
        p = {"epochs": 2, "batch_size": 16, "seed": 3, "device": "cpu",
             "dlsa": {"num_filters": 2, "num_clusters": 4, "flow_epochs": 2, "flow_hidden": 8, "flow_blocks": 1,
                      "device": "cpu"}}
    if "cala" in name and name != "cala-no-v":
        p["k"] = 5
    return p


@pytest.mark.parametrize("name", METHODS)
def test_logits_are_those_of_the_pre_engine_trainers(name):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        z = make_method(name, _params(name)).fit(train, val).logits(test.features)
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_allclose(z, GOLDEN[name], rtol=RTOL, atol=ATOL)


LBFGS_PINS = np.load(Path(__file__).with_name("golden_lbfgs.npz"))


def _fit_logits(params, name):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return make_method(name, params).fit(train, val).logits(test.features)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("name", [n for n in LBFGS_BY_DEFAULT if not n.startswith("dlsa")])
def test_lbfgs_defaults_give_the_pinned_converged_logits(name):
    pinned = LBFGS_PINS[name]
    z = _fit_logits(_default_params(name), name)
    np.testing.assert_allclose(z, pinned, atol=0.02)  # logits up to 18; seed-to-seed spread < 0.008
    assert np.array_equal(z.argmax(1), pinned.argmax(1))


@pytest.mark.parametrize("name", ["ce", "lws"])
def test_lbfgs_defaults_do_not_depend_on_the_initial_draw(name):
    z = _fit_logits(_default_params(name), name)
    other = _fit_logits({**_default_params(name), "seed": 8}, name)
    np.testing.assert_allclose(z, other, atol=0.02)


def test_the_stage_1_cnn_trains_to_the_weights_of_the_pre_engine_code():
    """The builtin backbone keeps its own loop (draw order and one-cycle schedule of the stores
    already made): the same seed gives the same weights, hence the same features and store key."""
    from longtail.stages.extract import train_small_cnn

    rng = np.random.default_rng(0)
    images = rng.normal(size=(150, 1, 8, 8)).astype(np.float32)
    labels = np.repeat(np.arange(5), (60, 40, 25, 15, 10))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        backbone = train_small_cnn(images, labels, 5, epochs=3, batch_size=32, width=8, seed=4, device="cpu")
    finally:
        torch.set_num_threads(threads)
    weights = backbone.module.state_dict()
    assert sorted("cnn." + k for k in weights) == sorted(k for k in GOLDEN.files if k.startswith("cnn."))
    for k, v in weights.items():
        np.testing.assert_allclose(v.numpy(), GOLDEN["cnn." + k], rtol=RTOL, atol=ATOL, err_msg=k)


if __name__ == "__main__":
    import sys

    torch.set_num_threads(1)
    entries = {k: GOLDEN[k] for k in GOLDEN.files}
    for name in sys.argv[1:]:
        entries[name] = np.ascontiguousarray(
            make_method(name, _params(name)).fit(train, val).logits(test.features), dtype=np.float32)
    np.savez(Path(__file__).with_name("golden.npz"), **entries)
