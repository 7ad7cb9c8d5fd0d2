"""Losses for stage-2 heads, one module per family (``classic``: the re-balancing losses)."""

from longtail.stages.losses import classic
from longtail.stages.losses.classic import *  # noqa: F401,F403  (the family's public functions)

__all__ = list(classic.__all__)
