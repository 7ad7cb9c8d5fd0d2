#!/usr/bin/env python
"""DLSA: the authors' code against the product on the same features (issue 13), timed on one thread.

Usage (from the repository root; the script downloads nothing)::

    python benchmarks/dlsa_authors.py --authors-repo PATH

``PATH`` is a checkout of github.com/silicx/DLSA (the code of paper 004, Xu et al., ECCV 2022,
"Constructing Balance from Imbalance for Long-tailed Image Recognition"); its commit is read with
``git`` when the checkout has a ``.git``, else give it with ``--authors-commit``. A script, not a
test: nothing here asserts a time.

What runs, on ``synthetic-100`` (``dlsa_study.make_study_sets()``, seed 0: 100 Gaussian classes,
D = 64, 6,540 train rows 300 -> 3, val 10 and test 30 per class), with ``torch.set_num_threads(1)``:

(a) **The authors' pipeline** at their ImageNet-LT defaults for a CE backbone
    (``config/BaseConfig.yaml`` overridden by ``config/ImgNet_CE_R50_bsm.yaml``, as their
    ``parse_args`` does): one FlowGMM filter (``max_depth: 1``; MAF, 2 blocks, 1 hidden layer of
    ``D`` units, batch norm, 500 clusters, centre std 0.05), 50 epochs of SGD at lr 0.2, batch
    1024, q = 2, lambda_lh 2 / balance 1 / purity 0.02, momentum 0.7, soft-CE purity; the 30% of
    the train samples with the highest likelihood (``llh_proportion: 0.3``) go to the linear
    cluster-aided classifier (``inputs: XZP``: ``W1 x + W2 [z, P(y|k)]``, where their ``main`` passes
    the features themselves as ``z``, so it sees ``x`` and the cluster prior, not the flow's latent),
    the rest to the linear regular classifier on ``x``; both Balanced Softmax, 150 epochs of SGD at lr 0.01, batch 128, evaluated
    every 5 epochs. Their ``train_dlsa.divide_and_conquer`` runs unchanged; the adapter imports
    their modules from the checkout (``sys.path``) and only builds the config and the data.
(b) **The product**: ``FlowCascade`` at its defaults (fitted once, stopped on val likelihood), the
    plain heads ``ce`` and ``balanced-softmax`` at their defaults, and ``dlsa+ce`` /
    ``dlsa+balanced-softmax`` at their defaults on that cascade and those heads (``Frozen``), as
    ``dlsa_study.py`` fits them; and ``dlsa+X`` with ``gate: false, classifier_input: x``, the
    product read the way the authors' code runs (every group classified by its cluster-aided
    classifier on ``x`` and the cluster prior). A ``dlsa+X`` row's time is cascade + head + its
    classifiers.

Test balanced accuracy is the mean over classes of the per-class test accuracy (the test split is
class-balanced, so it equals plain accuracy here).

Adaptations of the authors' code (all in this adapter; none of their files is edited):

1. **Config.** Their ``parse_args`` reads ``config/cls/BaseConfig.yaml``, a path that is not in
   their repository (it is ``config/BaseConfig.yaml``), and takes ``--cfg`` from the command line:
   the adapter builds the same ``ConfigManager`` from ``config/BaseConfig.yaml`` and
   ``config/ImgNet_CE_R50_bsm.yaml`` and fills in what ``parse_args`` and ``main`` add
   (``num_class`` = 100, ``feat_dim`` = 64, no pretrained flow weights, ``only_cluster`` off).
2. **Device** ``cuda`` -> ``cpu`` (this machine has no GPU; every op in their linear path runs on
   the CPU as is).
3. **Data loading.** ``read_h5_data`` reads ``feature_{train,val}.h5`` files; the adapter hands
   ``divide_and_conquer`` the same structure (float features, labels) from memory. Their "test"
   split is the one their classifiers pick their best epoch on (every 5 epochs, by accuracy): the
   adapter passes our **val** split there, so that no choice is made on test, and then evaluates
   the fitted models on our **test** split with their own functions (``finetuned_results``,
   ``divide_samples`` with the train likelihood threshold their run set, the cluster priors,
   ``eval_cluster_aided_classifier``, ``eval_regular_classifier``), combining the two groups as
   ``divide_and_conquer`` does. That final evaluation is timed separately and not counted in the
   training time.
4. **One core.** The flow's ``DataLoader`` has ``num_workers: 8`` in their config; it is 0 here
   (the brief allows one core; the workers would only parallelise their per-sample Python
   sampling, which is part of the cost measured).
5. **Logging.** Their ``main`` opens a TensorBoard ``SummaryWriter``; the adapter passes a writer
   whose ``add_scalar`` / ``add_histogram`` do nothing, and saves their checkpoints into a
   temporary directory. Their prints go to stderr so that stdout keeps the table.
6. **Packages.** ``easydict`` is not installed in the project's environment: when it is missing the
   adapter registers a minimal ``EasyDict`` (a ``dict`` with attribute access, all their code uses).
7. **Seeds.** Their script seeds nothing; the adapter seeds Python's, NumPy's and torch's global
   generators with ``--seed`` (default 0) before their run.

``--flow-epochs`` / ``--classifier-epochs`` lower their epoch counts (smoke runs, or a machine where
their defaults take too long): the table then marks their row as measured at fewer epochs and adds
the time extrapolated to their defaults (per-epoch seconds x their epochs, plus the measured
evaluation and set-up time), labelled as extrapolated.

Errors: a missing ``--authors-repo``, a path that is not a checkout of their code (the files the
adapter imports are missing, or do not define what it calls), or their code failing to import
print one line on stderr and exit with status 2.

Last measured
-------------
2026-12-05, a 2-core machine (Intel(R) Xeon(R) Processor, CPU model name as /proc/cpuinfo gives it)
with the other core busy with other work, one torch thread, under ``nice -n 10``; the authors' code is
a checkout of github.com/silicx/DLSA at commit 9559ab64a2eb331ea5b20a89a87ba81b83147d40 (their
whole history: "initial", 2022-07-20). Command::

    nice -n 10 python benchmarks/dlsa_authors.py --authors-repo PATH

    synthetic-100 (6,540 x 64 train, val 10 / test 30 per class), seed 0, torch threads 1, Intel(R) Xeon(R) Processor, 2026-12-05. Authors' code: github.com/silicx/DLSA at 9559ab64a2eb331ea5b20a89a87ba81b83147d40.

    | what | wall s | CPU s | test balanced acc. (%) | authors / this (wall) |
    |---|---:|---:|---:|---:|
    | authors' DLSA, their ImageNet-LT CE config (500 clusters, flow 50 ep., classifiers 150 ep., BSM) | 326 | 325 | 55.1 | |
    | product `FlowCascade` (defaults; flows ran 8, 8, 8 epochs, K = 320) | 3.4 | 3.4 | | 95.7x |
    | product `ce` head alone | 0.2 | 0.1 | 64.7 | |
    | product `dlsa+ce` = cascade + head + classifiers (0.6 s; input x, 0 of 3 groups use their classifier) | 4.1 | 4.1 | 64.7 | 79.3x |
    | product `dlsa+ce`, `gate: false`, `classifier_input: x` (the authors' routing: every group uses its classifier; classifiers 0.3 s) | 3.9 | 3.8 | 54.7 | 84.5x |
    | product `balanced-softmax` head alone | 0.2 | 0.2 | 76.2 | |
    | product `dlsa+balanced-softmax` = cascade + head + classifiers (0.6 s; input x, 0 of 3 groups use their classifier) | 4.1 | 4.1 | 76.2 | 78.9x |
    | product `dlsa+balanced-softmax`, `gate: false`, `classifier_input: x` (the authors' routing: every group uses its classifier; classifiers 0.3 s) | 3.9 | 3.8 | 63.9 | 84.1x |

    Authors' time split: flow 317 s (6.34 s/epoch), cluster-aided classifier 2.6 s (0.017 s/epoch), regular classifier 4.5 s (0.030 s/epoch), the rest (routing, priors, saving) 1.3 s; evaluation on test (not counted) 1.6 s. Their split sent 30.1% of the test samples to the cluster-aided classifier (train: 30%). Their classifiers pick their best epoch on our val split.

Their defaults ran in full (no extrapolation). An earlier run of the same command, before the
``gate: false`` rows were added, measured the authors' pipeline at 341 s wall (339 s CPU) with the
same 55.1%, and the product's cascade at 3.6 s (its third filter stopped after 7 epochs instead of
8; the gated ``dlsa+X`` accuracies were the same). Reading the table:

* Time: the authors' flow is 97% of their time (6.3 s an epoch x 50: 500 clusters, batch 1024,
  an ``(B, K, D)`` temporary in every forward pass, two forward passes per step, an evaluation of
  the train split every epoch); the product's cascade stops its three filters on val likelihood
  after 8 epochs. Every product DLSA row is about 80x faster than the authors' pipeline.
* Accuracy is not equal, and not in the authors' favour: their pipeline reaches 55.1% against the
  product's 76.2% (``dlsa+balanced-softmax``, which their Balanced-Softmax config corresponds to).
  On this set the product's val gate sends no group to a cluster-aided classifier, so that
  figure is its ``balanced-softmax`` head's. The like-for-like reading, every group classified by
  its cluster-aided classifier as the authors' code does (``gate: false``, ``classifier_input: x``),
  gives 63.9%, still 8.8 points above theirs at 1/84 of the time. Both of their classifiers kept
  their last epoch (150) as their best on val, i.e. at lr 0.01 without momentum and without the
  backbone-classifier initialisation their other configs load, they were still improving: more of
  their epochs would cost more time still.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import types

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

#: the authors' config files the adapter reads, relative to their checkout
BASE_CONFIG = "config/BaseConfig.yaml"
IMAGENET_CONFIG = "config/ImgNet_CE_R50_bsm.yaml"
#: the files of their checkout the adapter imports or reads
REQUIRED_FILES = ("train_dlsa.py", "models/FlowGMM.py", "models/Flows.py", "models/Classifiers.py",
                  "models/losses.py", "solvers/cluster_aided_classifier.py", "solvers/regular_classifier.py",
                  "utils/datasets.py", "utils/io.py", "utils/utils.py", BASE_CONFIG, IMAGENET_CONFIG)
#: what the adapter calls in their ``train_dlsa`` module
REQUIRED_NAMES = ("divide_and_conquer", "finetune_representations", "finetuned_results", "divide_samples",
                  "FlowGMM", "get_classifier", "make_tensor_dataloader", "eval_cluster_aided_classifier",
                  "eval_regular_classifier", "train_cluster_aided_classifier", "train_regular_classifier",
                  "numpy2torch")
#: their top-level module names (cleared from ``sys.modules`` before importing a checkout)
THEIR_MODULES = ("train_dlsa", "models", "solvers", "utils")
HEADS = ("ce", "balanced-softmax")
#: the product's DLSA read as the authors' code runs it: every group uses its cluster-aided
#: classifier (no val gate), on ``x`` and the cluster prior (their ``XZP`` with ``Z = X``)
UNGATED = {"gate": False, "classifier_input": "x"}
SEED = 0


class AdapterError(Exception):
    """A user mistake in the adapter's input: main prints it on one line and exits with status 2."""


# ============================================================================== the authors' code
def check_checkout(path: str | None) -> str:
    """The absolute path of a checkout of github.com/silicx/DLSA, or AdapterError saying what is wrong."""
    if not path:
        raise AdapterError("--authors-repo is required: a checkout of github.com/silicx/DLSA")
    root = os.path.abspath(path)
    if not os.path.isdir(root):
        raise AdapterError(f"--authors-repo {path}: no such directory")
    missing = [f for f in REQUIRED_FILES if not os.path.isfile(os.path.join(root, f))]
    if missing:
        raise AdapterError(f"--authors-repo {path} is not a checkout of github.com/silicx/DLSA "
                           f"(missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''})")
    return root


def _easydict_shim() -> None:
    """Register a minimal ``easydict`` module when the package is not installed (adaptation 6)."""
    try:
        import easydict  # noqa: F401
    except ImportError:
        class EasyDict(dict):
            """A ``dict`` whose keys are also attributes (all that the authors' code uses)."""

            def __getattr__(self, name):
                try:
                    return self[name]
                except KeyError:
                    raise AttributeError(name) from None

            def __setattr__(self, name, value):
                self[name] = value

        module = types.ModuleType("easydict")
        module.EasyDict = EasyDict
        sys.modules["easydict"] = module


def import_authors(root: str):
    """Their ``train_dlsa`` module and ``utils.io.ConfigManager``, imported from the checkout."""
    _easydict_shim()
    _forget_authors()
    sys.path.insert(0, root)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            try:
                import train_dlsa
            except ImportError as e:
                raise AdapterError(f"--authors-repo {root}: their code does not import here ({e})") from None
            if not os.path.abspath(train_dlsa.__file__).startswith(root + os.sep):
                raise AdapterError(f"--authors-repo {root}: train_dlsa resolved to {train_dlsa.__file__}, "
                                   "not the checkout")
            missing = [n for n in REQUIRED_NAMES if not hasattr(train_dlsa, n)]
            if missing:
                raise AdapterError(f"--authors-repo {root}: train_dlsa.py lacks {', '.join(missing[:3])}"
                                   f"{' ...' if len(missing) > 3 else ''}; not the DLSA code this adapter "
                                   "was written for")
            try:
                from utils.io import ConfigManager
            except ImportError as e:
                raise AdapterError(f"--authors-repo {root}: their utils/io.py does not import here ({e})") from None
    except AdapterError:
        _forget_authors()
        raise
    finally:
        sys.path.remove(root)
    return train_dlsa, ConfigManager


def _forget_authors() -> None:
    """Drop their top-level modules (``train_dlsa``, ``models``, ``solvers``, ``utils``) from ``sys.modules``."""
    for name in list(sys.modules):
        if name.split(".")[0] in THEIR_MODULES:
            del sys.modules[name]


def authors_commit(root: str) -> str:
    try:
        out = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def authors_config(ConfigManager, root: str, num_class: int, feat_dim: int, flow_epochs: int | None,
                   classifier_epochs: int | None):
    """Their BaseConfig overridden by their ImageNet-LT CE config, plus what ``parse_args`` and
    ``main`` add (adaptations 1, 2, 4); ``*_epochs`` lower their epoch counts when given."""
    cfg = ConfigManager.init_with_yaml(os.path.join(root, BASE_CONFIG))
    cfg.override_with_yaml(os.path.join(root, IMAGENET_CONFIG))
    override = {"device": "cpu", "gmflow": {"data": {"num_workers": 0}}}
    if flow_epochs is not None:
        override["gmflow"]["optim"] = {"epoch": flow_epochs}
    if classifier_epochs is not None:
        override["cacls"] = {"optim": {"epoch": classifier_epochs}}
        override["regcls"] = {"optim": {"epoch": classifier_epochs}}
    cfg.override_with_dict(override)
    for key, value in (("name", "dlsa-authors"), ("cfg", IMAGENET_CONFIG), ("force", True),
                       ("only_cluster", False), ("ft_model_weight", []), ("num_class", int(num_class)),
                       ("feat_dim", int(feat_dim))):
        cfg.update(key, value)
    return cfg


class _NullWriter:
    """Stands in for their TensorBoard ``SummaryWriter`` (adaptation 5)."""

    def add_scalar(self, *args, **kwargs) -> None:
        pass

    def add_histogram(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


class _Timed:
    """Wraps one of their functions: wall seconds of every call, summed (``seconds``)."""

    def __init__(self, module, name: str):
        self.module, self.name, self.original, self.seconds, self.calls = module, name, getattr(module, name), 0.0, 0
        setattr(module, name, self)

    def __call__(self, *args, **kwargs):
        t = time.perf_counter()
        try:
            return self.original(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t
            self.calls += 1

    def restore(self) -> None:
        setattr(self.module, self.name, self.original)


def run_authors(train_dlsa, ConfigManager, root: str, sets, seed: int, flow_epochs: int | None,
                classifier_epochs: int | None) -> dict:
    """Their ``divide_and_conquer`` on (train, val as their "test"), then their models on our test."""
    import numpy as np
    import torch
    from benchlib import own_cpu_s

    train, val, test = sets
    cfg = authors_config(ConfigManager, root, train.num_classes, train.dim, flow_epochs, classifier_epochs)
    E = sys.modules["easydict"].EasyDict
    features = E(train=torch.from_numpy(np.ascontiguousarray(train.features, dtype=np.float32)),
                 test=torch.from_numpy(np.ascontiguousarray(val.features, dtype=np.float32)))
    labels = E(train=torch.from_numpy(train.labels.astype(np.float32)),  # read_h5_data gives float labels
               test=torch.from_numpy(val.labels.astype(np.float32)))
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    timers = [_Timed(train_dlsa, n) for n in ("finetune_representations", "train_cluster_aided_classifier",
                                              "train_regular_classifier")]
    save_dir = tempfile.mkdtemp(prefix="dlsa-authors-")
    try:
        with contextlib.redirect_stdout(sys.stderr):
            cpu0, t0 = own_cpu_s(), time.perf_counter()
            train_dlsa.divide_and_conquer(features, features, labels, cfg, save_dir, _NullWriter(),
                                          max_depth=cfg.max_depth)
            wall, cpu = time.perf_counter() - t0, own_cpu_s() - cpu0
            t1 = time.perf_counter()
            pred, routed = _authors_test_predictions(train_dlsa, cfg, save_dir, train, test)
            eval_s = time.perf_counter() - t1
    finally:
        for t in timers:
            t.restore()
        shutil.rmtree(save_dir, ignore_errors=True)
    flow_t, cacls_t, regcls_t = timers
    per_class = [float((pred[test.labels == c] == c).mean()) for c in np.unique(test.labels)]
    out = {"wall": wall, "cpu": cpu, "eval_s": eval_s, "flow_s": flow_t.seconds, "cacls_s": cacls_t.seconds,
           "regcls_s": regcls_t.seconds, "test_bacc": float(np.mean(per_class)), "test_routed": routed,
           "flow_epochs": int(cfg.gmflow.optim.epoch), "cacls_epochs": int(cfg.cacls.optim.epoch),
           "regcls_epochs": int(cfg.regcls.optim.epoch), "clusters": int(cfg.gmflow.model.num_cluster),
           "llh_thres": float(cfg.filter.llh_thres)}
    return out


def _authors_test_predictions(train_dlsa, cfg, save_dir: str, train, test):
    """Their fitted flow and classifiers (the checkpoints their run saved) applied to our test split
    by their functions, combined as ``divide_and_conquer`` combines its two groups (adaptation 3).
    Returns the predictions and the share of test samples sent to the cluster-aided classifier."""
    import numpy as np
    import torch

    E = sys.modules["easydict"].EasyDict
    feats = E(train=torch.from_numpy(np.ascontiguousarray(train.features, dtype=np.float32)),
              test=torch.from_numpy(np.ascontiguousarray(test.features, dtype=np.float32)))
    labs = E(train=torch.from_numpy(train.labels.astype(np.int64)), test=torch.from_numpy(test.labels.astype(np.int64)))

    def load(name):
        return torch.load(os.path.join(save_dir, name), map_location="cpu", weights_only=True)["model"]

    ft_model = train_dlsa.FlowGMM(cfg)
    ft_model.load_state_dict(load("ft_models_D1.t7"))
    _, class_labels, cluster_labels, sample_llh, _ = train_dlsa.finetuned_results(ft_model, feats, labs, cfg)
    classify_index, labelmap_index, cluster_prior = train_dlsa.divide_samples(class_labels, cluster_labels,
                                                                              sample_llh, cfg)
    prior = np.zeros((cfg.gmflow.model.num_cluster, cfg.num_class), dtype=np.float32)
    for k, dist in cluster_prior.items():
        for c, v in dist.items():
            prior[k, c] = v
    priors = E(train=prior[cluster_labels.train], test=prior[cluster_labels.test])
    cacls = train_dlsa.get_classifier(cfg.cacls.model, cfg)
    cacls.load_state_dict(load("cacls_models_D1.t7"))
    regcls = train_dlsa.get_classifier(cfg.regcls.model, cfg)
    regcls.load_state_dict(load("regcls_models_D1.t7"))
    map_pred, _, _ = train_dlsa.eval_cluster_aided_classifier(cacls, cfg, train_dlsa.make_tensor_dataloader(
        [feats, feats, priors, labs], None, "test", cfg.cacls.data.batchsize, shuffle=False))
    cls_pred, _, _ = train_dlsa.eval_regular_classifier(regcls, cfg, train_dlsa.make_tensor_dataloader(
        [feats, feats, labs], None, "test", cfg.regcls.data.batchsize, shuffle=False))
    pred = np.full(len(test), -1, dtype=np.int64)
    pred[labelmap_index.test] = map_pred[labelmap_index.test]
    pred[classify_index.test] = cls_pred[classify_index.test]
    if (pred < 0).any():  # the two groups are complements in their code
        raise RuntimeError("authors' test routing left samples without a prediction")
    return pred, float(np.mean(labelmap_index.test))


# ============================================================================== the product
def run_product(sets, seed: int) -> dict:
    from benchlib import own_cpu_s
    from dlsa_study import balanced

    import longtail.stages.dlsa as dlsa
    from longtail.stages.base import Frozen
    from longtail.stages.registry import make_method

    train, val, test = sets

    def timed(fn):
        cpu0, t0 = own_cpu_s(), time.perf_counter()
        out = fn()
        return out, {"wall": time.perf_counter() - t0, "cpu": own_cpu_s() - cpu0}

    base = {"seed": seed, "device": "cpu"}
    cascade, t_cascade = timed(lambda: dlsa.FlowCascade(**base).fit(train, val))
    out = {"cascade": t_cascade, "flow_epochs": [f["epochs_run"] for f in dlsa.flow_stopping(cascade)],
           "k": cascade.num_clusters_}
    for name in HEADS:
        head, t_head = timed(lambda: make_method(name, base).fit(train, val))
        method = make_method(f"dlsa+{name}", {**base, "dlsa": dict(base)})
        method, t_cls = timed(lambda: method.with_base(Frozen(head)).set_cascade(cascade).fit(train, val))
        sel = method.selection()
        ungated = make_method(f"dlsa+{name}", {**base, "dlsa": {**base, **UNGATED}})
        ungated, t_ungated = timed(lambda: ungated.with_base(Frozen(head)).set_cascade(cascade).fit(train, val))
        out[name] = {"head": t_head, "classifiers": t_cls, "head_bacc": balanced(head, test),
                     "dlsa_bacc": balanced(method, test), "input": sel["classifier_input"]["chosen"],
                     "open": sum(g["uses"] == "classifier" for g in sel["groups"]), "groups": len(sel["groups"]),
                     "ungated": t_ungated, "ungated_bacc": balanced(ungated, test)}
    return out


# ============================================================================== report
def _s(x: float) -> str:
    return f"{x:.1f}" if x < 100 else f"{x:,.0f}"


def render(a: dict, p: dict, meta: dict) -> str:
    reduced = a["flow_epochs"] != meta["their_flow_epochs"] or a["cacls_epochs"] != meta["their_cls_epochs"]
    flow_per_epoch = a["flow_s"] / a["flow_epochs"]
    cacls_per_epoch = a["cacls_s"] / a["cacls_epochs"]
    regcls_per_epoch = a["regcls_s"] / a["regcls_epochs"]
    rest = a["wall"] - a["flow_s"] - a["cacls_s"] - a["regcls_s"]
    extrapolated = (rest + flow_per_epoch * meta["their_flow_epochs"]
                    + (cacls_per_epoch + regcls_per_epoch) * meta["their_cls_epochs"])
    authors_s = extrapolated if reduced else a["wall"]

    def total(name, part="classifiers"):
        return {k: p["cascade"][k] + p[name]["head"][k] + p[name][part][k] for k in ("wall", "cpu")}

    lines = [
        f"synthetic-100 (6,540 x 64 train, val 10 / test 30 per class), seed {meta['seed']}, "
        f"torch threads 1, {meta['cpu']}, {meta['date']}. Authors' code: github.com/silicx/DLSA at {meta['commit']}.",
        "",
        "| what | wall s | CPU s | test balanced acc. (%) | authors / this (wall) |",
        "|---|---:|---:|---:|---:|",
    ]
    label = (f"authors' DLSA, their ImageNet-LT CE config ({a['clusters']} clusters, flow "
             f"{a['flow_epochs']} ep., classifiers {a['cacls_epochs']} ep., BSM)")
    if reduced:
        label += " **measured at reduced epochs**"
    lines.append(f"| {label} | {_s(a['wall'])} | {_s(a['cpu'])} | {100 * a['test_bacc']:.1f} | |")
    if reduced:
        lines.append(f"| authors' DLSA **extrapolated** to their {meta['their_flow_epochs']} flow / "
                     f"{meta['their_cls_epochs']} classifier epochs | {_s(extrapolated)} | | n/a | |")
    lines.append(f"| product `FlowCascade` (defaults; flows ran {', '.join(map(str, p['flow_epochs']))} epochs, "
                 f"K = {p['k']}) | {_s(p['cascade']['wall'])} | {_s(p['cascade']['cpu'])} | | "
                 f"{authors_s / p['cascade']['wall']:.1f}x |")
    for name in HEADS:
        h, t = p[name], total(name)
        lines.append(f"| product `{name}` head alone | {_s(h['head']['wall'])} | {_s(h['head']['cpu'])} | "
                     f"{100 * h['head_bacc']:.1f} | |")
        lines.append(f"| product `dlsa+{name}` = cascade + head + classifiers ({_s(h['classifiers']['wall'])} s; "
                     f"input {h['input']}, {h['open']} of {h['groups']} groups use their classifier) | "
                     f"{_s(t['wall'])} | {_s(t['cpu'])} | {100 * h['dlsa_bacc']:.1f} | "
                     f"{authors_s / t['wall']:.1f}x |")
        t = total(name, "ungated")
        lines.append(f"| product `dlsa+{name}`, `gate: false`, `classifier_input: x` (the authors' routing: every "
                     f"group uses its classifier; classifiers {_s(h['ungated']['wall'])} s) | {_s(t['wall'])} | "
                     f"{_s(t['cpu'])} | {100 * h['ungated_bacc']:.1f} | {authors_s / t['wall']:.1f}x |")
    lines += [
        "",
        f"Authors' time split: flow {_s(a['flow_s'])} s ({flow_per_epoch:.2f} s/epoch), cluster-aided classifier "
        f"{_s(a['cacls_s'])} s ({cacls_per_epoch:.3f} s/epoch), regular classifier {_s(a['regcls_s'])} s "
        f"({regcls_per_epoch:.3f} s/epoch), the rest (routing, priors, saving) {_s(rest)} s; evaluation on test "
        f"(not counted) {_s(a['eval_s'])} s. Their split sent {100 * a['test_routed']:.1f}% of the test samples "
        f"to the cluster-aided classifier (train: 30%). Their classifiers pick their best epoch on our val split.",
    ]
    return "\n".join(lines)


# ============================================================================== main
def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--authors-repo", help="a checkout of github.com/silicx/DLSA (nothing is downloaded)")
    p.add_argument("--authors-commit", help="the checkout's commit when it has no .git (read with git otherwise)")
    p.add_argument("--seed", type=int, default=SEED, help="seeds both sides (the data stay those of seed 0)")
    p.add_argument("--flow-epochs", type=int, help="lower the authors' flow epochs (their default: 50)")
    p.add_argument("--classifier-epochs", type=int,
                   help="lower the authors' classifier epochs (their default: 150; at least their eval_freq, 5)")
    p.add_argument("--skip-product", action="store_true", help="run the authors' side only (smoke runs)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    try:
        root = check_checkout(args.authors_repo)
        if args.flow_epochs is not None and args.flow_epochs < 1:
            raise AdapterError(f"--flow-epochs {args.flow_epochs}: must be at least 1")
        if args.classifier_epochs is not None and args.classifier_epochs < 5:
            raise AdapterError(f"--classifier-epochs {args.classifier_epochs}: must be at least 5 "
                               "(their classifiers keep the best of the evaluations every 5 epochs)")
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        os.environ.setdefault("MKL_NUM_THREADS", "1")
        import torch

        torch.set_num_threads(1)
        train_dlsa, ConfigManager = import_authors(root)
    except AdapterError as e:
        print(f"dlsa_authors: error: {e}", file=sys.stderr)
        return 2
    for path in (REPO, HERE):
        if path not in sys.path:
            sys.path.insert(0, path)

    from benchlib import cpu_name
    from dlsa_study import make_study_sets

    their = ConfigManager.init_with_yaml(os.path.join(root, BASE_CONFIG))
    their.override_with_yaml(os.path.join(root, IMAGENET_CONFIG))
    meta = {"seed": args.seed, "cpu": cpu_name(), "date": time.strftime("%Y-%m-%d"),
            "commit": args.authors_commit or authors_commit(root),
            "their_flow_epochs": int(their.gmflow.optim.epoch), "their_cls_epochs": int(their.cacls.optim.epoch)}
    sets = make_study_sets(SEED)
    print(f"[authors] {os.path.basename(root)} at {meta['commit']} ...", file=sys.stderr, flush=True)
    a = run_authors(train_dlsa, ConfigManager, root, sets, args.seed, args.flow_epochs, args.classifier_epochs)
    print(f"[authors] {a['wall']:.1f} s, test balanced accuracy {100 * a['test_bacc']:.1f}%", file=sys.stderr, flush=True)
    if args.skip_product:
        print(f"authors: wall {a['wall']:.1f} s, CPU {a['cpu']:.1f} s, test balanced accuracy "
              f"{100 * a['test_bacc']:.1f}% (flow {a['flow_s']:.1f} s, cacls {a['cacls_s']:.1f} s, "
              f"regcls {a['regcls_s']:.1f} s)")
        return 0
    print("[product] cascade, heads, dlsa+X ...", file=sys.stderr, flush=True)
    p = run_product(sets, args.seed)
    print(render(a, p, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
