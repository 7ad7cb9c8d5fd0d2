"""Losses for stage-2 heads, one module per family (``classic``: the re-balancing losses)."""

from stages.losses.classic import (
    balanced_softmax_loss,
    class_balanced_weights,
    cross_entropy,
    focal_loss,
    ldam_loss,
    ldam_margins,
    log_prior,
    logit_adjusted_loss,
)

__all__ = [
    "balanced_softmax_loss",
    "class_balanced_weights",
    "cross_entropy",
    "focal_loss",
    "ldam_loss",
    "ldam_margins",
    "log_prior",
    "logit_adjusted_loss",
]
