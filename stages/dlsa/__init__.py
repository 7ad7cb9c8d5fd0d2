"""DLSA: Gaussian Mixture Flow Filters and Cluster-aided Classifiers (paper 004, Xu et al., ECCV 2022).

Dynamic Label Space Adjustment on cached features, in four modules:

* :mod:`~longtail.stages.dlsa.flow`: the Gaussian Mixture Flow Filter (Sec. 3.3) and its training
  objective, eq. 11, on the shared training loop;
* :mod:`~longtail.stages.dlsa.cascade`: :class:`FlowCascade` (Sec. 3.2-3.3, Fig. 4), filters in a
  row with likelihood thresholds, and its parameters :class:`CascadeParams`;
* :mod:`~longtail.stages.dlsa.diagnostics`: head-tail separability of a fitted cascade, on train
  and on any other labelled split (val, test);
* :mod:`~longtail.stages.dlsa.wrapper`: :class:`DLSA`, the prefix wrapper ``dlsa`` (``dlsa+ce``,
  ...), one classifier per group: cluster-aided classifiers (Sec. 3.4) built from the wrapped head
  through the public head protocol, and the head itself past the last filter.

Every choice made from data is made on the val split (issue 11): the flows stop on val likelihood,
``classifier_input: auto`` keeps ``x`` or ``[x, z]`` by val balanced accuracy, and the gate gives a
group back to the head where its cluster-aided classifier is not better on the val samples routed
there.
"""

from longtail.stages.dlsa.cascade import (
    CASCADE_PARAMS,
    DEFAULTS,
    CascadeParams,
    FlowCascade,
    Routing,
    auto_num_clusters,
    cluster_prior,
    default_sigma,
    filter_sizes,
    fingerprint,
    quantile_threshold,
)
from longtail.stages.dlsa.diagnostics import TAIL_THRESHOLD, diagnostics, flow_stopping, separation, tail_auc
from longtail.stages.dlsa.flow import (
    ROUTE_CHUNK,
    FlowObjective,
    GaussianMixtureFlowFilter,
    MomentumPosterior,
    PairSampler,
    ValLikelihood,
    build_maf,
    train_filter,
    val_class_weights,
    val_objective,
)
from longtail.stages.dlsa.wrapper import CLASSIFIER_INPUTS, DLSA, ClusterAidedModule

__all__ = [
    "CASCADE_PARAMS", "CLASSIFIER_INPUTS", "DEFAULTS", "DLSA", "ROUTE_CHUNK", "TAIL_THRESHOLD", "CascadeParams", "ClusterAidedModule",
    "FlowCascade", "FlowObjective", "GaussianMixtureFlowFilter", "MomentumPosterior", "PairSampler", "Routing",
    "auto_num_clusters", "build_maf", "cluster_prior", "default_sigma", "diagnostics", "filter_sizes",
    "fingerprint", "flow_stopping", "quantile_threshold", "separation", "tail_auc", "train_filter",
    "ValLikelihood", "val_class_weights", "val_objective",
]
