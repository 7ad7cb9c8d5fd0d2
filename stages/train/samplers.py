"""Samplers: which rows one epoch visits, drawn from a seeded ``torch.Generator`` on its device."""

from __future__ import annotations

import torch

from longtail.stages.errors import LongtailError


class InstanceSampler:
    """Instance-balanced sampling: one random permutation of ``[0, N)`` per epoch."""

    def epoch_order(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randperm(n, generator=generator, device=generator.device)


class Segments:
    """Rows grouped by an integer key (sorted keys, stable within a key): the rows of key ``k`` are
    ``order[offsets[k] : offsets[k] + counts[k]]``. :meth:`member` draws one row uniformly within
    each requested key's segment. Shared by class-balanced sampling and DLSA's purity pairs."""

    def __init__(self, keys: torch.Tensor, num_keys: int | None = None):
        if num_keys is None:
            self.keys, self.counts = torch.unique(keys, return_counts=True)  # present keys only
        else:
            self.counts = torch.bincount(keys, minlength=num_keys)
            self.keys = torch.arange(num_keys, device=keys.device)
        self.order = torch.argsort(keys, stable=True)  # row indices grouped by key
        self.offsets = torch.cumsum(self.counts, 0) - self.counts  # where each key starts in ``order``

    def member(self, which: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One row, uniformly, of each segment in ``which`` ``(P,)`` (positions into ``keys``)."""
        u = torch.rand(which.shape[0], generator=generator, device=generator.device, dtype=torch.float64)
        n = self.counts[which]
        within = torch.minimum((u * n).long(), n - 1)  # minimum guards u * n rounding up to n
        return self.order[self.offsets[which] + within]


class ClassBalancedSampler:
    """Class-balanced sampling (Kang et al., ICLR 2020: ``p_j ∝ n_j^q`` with ``q = 0``) over
    ``strata`` ``(N,)``: each draw picks a stratum uniformly, then one of its rows uniformly; one
    epoch draws ``N`` rows with replacement. Every stratum in ``[0, num_strata)`` needs a row."""

    def __init__(self, strata: torch.Tensor, num_strata: int | None = None):
        num_strata = int(strata.max()) + 1 if num_strata is None else int(num_strata)
        self.segments = Segments(strata, num_strata)
        if bool((self.segments.counts == 0).any()):
            missing = torch.nonzero(self.segments.counts == 0).flatten().tolist()
            raise LongtailError(f"class-balanced sampling: class(es) {missing[:5]} have no train sample")
        self.num_strata = num_strata

    def epoch_order(self, n: int, generator: torch.Generator) -> torch.Tensor:
        cls = torch.randint(self.num_strata, (n,), generator=generator, device=generator.device)
        return self.segments.member(cls, generator)
