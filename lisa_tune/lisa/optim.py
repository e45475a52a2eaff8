"""AdamW as lisa-tune builds it, for the trainer and the simulator alike."""

from __future__ import annotations

import enum

import torch
from torch import nn


class AdamWImplementation(str, enum.Enum):
    """The AdamW implementation of PyTorch that runs the step. They differ in temporary memory."""

    FOREACH = "foreach"
    """Multi-tensor kernels; PyTorch's default for CUDA parameters. Allocates temporaries per parameter group."""
    FUSED = "fused"
    """One fused kernel per group of tensors; no per-step temporaries of parameter size."""
    FOR_LOOP = "for-loop"
    """One parameter at a time; PyTorch's default for CPU parameters."""

    @classmethod
    def default_for(cls, device_type: str) -> AdamWImplementation:
        """Return PyTorch's default implementation for parameters on ``device_type``."""
        return cls.FOREACH if device_type == "cuda" else cls.FOR_LOOP


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, object]]:
    """Split parameters into a decayed group (matrices) and an undecayed one (biases and norm weights).

    This is the grouping the Hugging Face Trainer uses. Every parameter is included, frozen or not, so a layer
    that LISA activates later is already known to the optimizer; AdamW skips parameters whose grad is None.
    """
    decayed: list[nn.Parameter] = []
    undecayed: list[nn.Parameter] = []
    seen: set[int] = set()
    for parameter in model.parameters():
        if id(parameter) in seen:
            continue
        seen.add(id(parameter))
        (decayed if parameter.ndim >= 2 else undecayed).append(parameter)
    return [
        {"params": decayed, "weight_decay": weight_decay},
        {"params": undecayed, "weight_decay": 0.0},
    ]


def build_adamw(
    model: nn.Module,
    *,
    lr: float = 1e-5,
    weight_decay: float = 0.0,
    implementation: AdamWImplementation = AdamWImplementation.FOR_LOOP,
) -> torch.optim.AdamW:
    """Build AdamW over every parameter of ``model`` with the requested implementation."""
    groups = parameter_groups(model, weight_decay)
    return torch.optim.AdamW(
        groups,  # type: ignore[arg-type]
        lr=lr,
        foreach=implementation is AdamWImplementation.FOREACH,
        fused=implementation is AdamWImplementation.FUSED,
    )
