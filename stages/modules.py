"""The ``nn.Module`` families of the trained heads (pure factories; parameters drawn by
``reset_parameters(generator)`` from the fit's seeded generator)."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn


class LinearClassifier(nn.Module):
    """``z = x W^T + b``, ``W`` of shape ``(C, D)``."""

    no_decay: ClassVar[tuple[str, ...]] = ()

    def __init__(self, dim: int, num_classes: int, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_classes, dim))
        if bias:
            self.bias = nn.Parameter(torch.zeros(num_classes))
        else:
            self.register_parameter("bias", None)

    def reset_parameters(self, generator: torch.Generator) -> None:
        """``torch.nn.Linear``'s uniform initialisation, drawn from ``generator``."""
        bound = 1.0 / math.sqrt(self.weight.shape[1])  # guarded: dim >= 1 (FeatureSet rejects 0)
        with torch.no_grad():
            self.weight.uniform_(-bound, bound, generator=generator)
            if self.bias is not None:
                self.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class CosineClassifier(nn.Module):
    """``z_c = s * cos(x, w_c)``: features and class weights normalised to unit length.

    ``s`` is a learnable parameter (not weight-decayed, which would only shrink it) or a fixed
    buffer.
    """

    no_decay: ClassVar[tuple[str, ...]] = ("scale",)

    def __init__(self, dim: int, num_classes: int, scale: float, learn_scale: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_classes, dim))
        value = torch.tensor(float(scale))
        if learn_scale:
            self.scale = nn.Parameter(value)
        else:
            self.register_buffer("scale", value)
        self._init_scale = float(scale)

    def reset_parameters(self, generator: torch.Generator) -> None:
        bound = 1.0 / math.sqrt(self.weight.shape[1])  # guarded: dim >= 1
        with torch.no_grad():
            self.weight.uniform_(-bound, bound, generator=generator)
            self.scale.fill_(self._init_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.normalize divides by max(||v||, 1e-12): guards all-zero feature rows and weight rows
        return self.scale * F.linear(F.normalize(x, dim=1), F.normalize(self.weight, dim=1))


class ScaledClassifier(nn.Module):
    """Learnable weight scaling (Kang et al.): ``z_c = s_c * (w_c . x + b_c)``."""

    no_decay: ClassVar[tuple[str, ...]] = ("scales",)

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.linear = LinearClassifier(dim, num_classes, bias=True)
        self.scales = nn.Parameter(torch.ones(num_classes))

    def reset_parameters(self, generator: torch.Generator) -> None:
        self.linear.reset_parameters(generator)
        with torch.no_grad():
            self.scales.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * self.scales
