"""Training precisions: the dtype of weights, gradients and AdamW state, and the autocast dtype."""

from __future__ import annotations

import enum

import torch


class Precision(str, enum.Enum):
    """The storage and compute dtypes of a training step."""

    BF16 = "bf16"
    """Weights, gradients and AdamW state in bf16 (the LISA paper's memory figure)."""
    AMP_BF16 = "amp-bf16"
    """fp32 weights, gradients and AdamW state, with forward matrix products under bf16 autocast."""
    FP32 = "fp32"
    """Everything in fp32."""

    @property
    def parameter_dtype(self) -> torch.dtype:
        """The dtype of weights, and so of gradients and AdamW state."""
        return torch.bfloat16 if self is Precision.BF16 else torch.float32

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The autocast dtype of the forward pass, or None when autocast is off."""
        return torch.bfloat16 if self is Precision.AMP_BF16 else None
