"""The one vocabulary of memory categories, used alike in code, tables, JSON output, logs and tests."""

from __future__ import annotations

import enum


class MemoryCategory(str, enum.Enum):
    """The use of a byte of GPU memory."""

    PARAMETERS = "parameters"
    """Model weights and buffers."""
    GRADIENTS = "gradients"
    """``.grad`` of trainable parameters."""
    OPTIMIZER_STATES = "optimizer_states"
    """AdamW's first and second moments (and its step counters when they live on the device)."""
    ACTIVATIONS = "activations"
    """Tensors made inside the model body's forward and still alive, mostly those saved for backward."""
    TEMPORARIES = "temporaries"
    """Everything else: logits, loss, gradients of activations, optimizer-step scratch, kernel workspaces."""
    CUDA_CONTEXT = "cuda_context"
    """The CUDA context and cuBLAS workspace: device memory outside the tensor allocator's pool (estimate)."""
    ALLOCATOR_RESERVE = "allocator_reserve"
    """Memory the caching allocator keeps reserved in its segments but no tensor uses (modelled)."""


TENSOR_CATEGORIES = (
    MemoryCategory.PARAMETERS,
    MemoryCategory.GRADIENTS,
    MemoryCategory.OPTIMIZER_STATES,
    MemoryCategory.ACTIVATIONS,
    MemoryCategory.TEMPORARIES,
)
