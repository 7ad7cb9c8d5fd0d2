"""Device resolution: every tensor op follows the configured device."""

from __future__ import annotations

import torch

from longtail.stages.errors import LongtailError


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Map a configured device string to a ``torch.device``.

    ``"auto"`` is CUDA when present, else CPU. An explicit ``"cuda"`` on a machine without CUDA is
    a user error, not a silent fallback.
    """
    if isinstance(device, torch.device):
        return device
    name = str(device).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise LongtailError(f"device: unknown device {device!r} (use auto, cpu, cuda or cuda:N)") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LongtailError(f"device: {device!r} was asked for but CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        # CUDA would fail later, mid-fit, with "invalid device ordinal"; CUDA_VISIBLE_DEVICES renumbers
        raise LongtailError(f"device: {device!r} was asked for but this machine shows "
                            f"{torch.cuda.device_count()} CUDA device(s) (cuda:0 .. cuda:"
                            f"{torch.cuda.device_count() - 1}; CUDA_VISIBLE_DEVICES renumbers them from 0)")
    if dev.type not in ("cpu", "cuda"):
        raise LongtailError(f"device: {device!r} is not supported (use auto, cpu, cuda or cuda:N)")
    return dev
