"""Render a ``MemoryEstimate`` as a table for people and as a stable JSON object for scripts.

The JSON layout is documented in ``docs/estimate-json.md``; ``SCHEMA`` changes when a field changes meaning.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from lisa_tune.memory.categories import MemoryCategory
from lisa_tune.memory.simulator import MemoryEstimate
from lisa_tune.units import GB, GIB

SCHEMA = "lisa-tune/estimate/v1"

_CATEGORY_LABELS = {
    MemoryCategory.PARAMETERS: "parameters",
    MemoryCategory.GRADIENTS: "gradients",
    MemoryCategory.OPTIMIZER_STATES: "optimizer states",
    MemoryCategory.ACTIVATIONS: "activations",
    MemoryCategory.TEMPORARIES: "temporaries",
    MemoryCategory.CUDA_CONTEXT: "CUDA context + cuBLAS",
    MemoryCategory.ALLOCATOR_RESERVE: "allocator reserve",
}

# The basis of each figure, so the output marks which ones are estimates.
_CATEGORY_BASIS = {
    MemoryCategory.PARAMETERS: "traced",
    MemoryCategory.GRADIENTS: "traced",
    MemoryCategory.OPTIMIZER_STATES: "traced",
    MemoryCategory.ACTIVATIONS: "traced",
    MemoryCategory.TEMPORARIES: "traced + kernel workspace model",
    MemoryCategory.CUDA_CONTEXT: "estimate from GPU profile",
    MemoryCategory.ALLOCATOR_RESERVE: "caching-allocator model",
}


def estimate_to_dict(estimate: MemoryEstimate) -> dict[str, Any]:
    """Return the JSON-ready form of ``estimate``; every byte figure is an integer count of bytes."""
    config = estimate.config
    peak = estimate.peak
    device = estimate.device
    return {
        "schema": SCHEMA,
        "model": {
            "name": config.model_name,
            "model_type": config.model_config.get("model_type"),
            "parameters": estimate.parameter_count,
            "layers": estimate.num_layers,
        },
        "config": {
            "gamma": config.gamma,
            "full_fine_tuning": config.gamma is None,
            "micro_batch_size": config.micro_batch_size,
            "sequence_length": config.sequence_length,
            "precision": config.precision.value,
            "gradient_checkpointing": config.gradient_checkpointing,
            "attention": config.attention,
            "optimizer_state_policy": config.policy.value,
            "periods": config.periods,
            "target_device": config.target_device,
            "adamw_implementation": config.adamw_implementation.value,
            "freeze_embedding": config.freeze_embedding,
            "gpu": config.gpu.name if config.gpu else None,
        },
        "trainable_parameters": estimate.trainable_parameter_count,
        "total_bytes": estimate.total_bytes,
        "breakdown_bytes": {category.value: value for category, value in estimate.breakdown().items()},
        "breakdown_basis": {category.value: basis for category, basis in _CATEGORY_BASIS.items()},
        "peak": {
            "tensor_bytes": peak.peak_bytes,
            "step": peak.context.step,
            "phase": peak.context.phase,
            "module": peak.context.module,
            "operator": peak.context.operator,
            "phase_peaks_bytes": dict(peak.phase_peaks),
        },
        "device": None
        if device is None
        else {
            "allocated_bytes": device.allocated_bytes,
            "reserved_bytes": device.reserved_bytes,
            "cuda_context_bytes": device.cuda_context_bytes,
            "cublas_workspace_bytes": device.cublas_workspace_bytes,
            "total_bytes": device.total_bytes,
        },
        "optimizer_state": {
            "bytes_at_end": estimate.optimizer_state_bytes_at_end,
            "layers_with_state": estimate.layers_with_optimizer_state,
            "visited_layers": estimate.visited_layers,
        },
        "timing_seconds": {"build": round(estimate.build_seconds, 3), "trace": round(estimate.trace_seconds, 3)},
        "notes": list(estimate.notes),
    }


def print_estimate(estimate: MemoryEstimate, console: Console | None = None) -> None:
    """Print the breakdown table, the peak's location and what the figures include."""
    console = console or Console()
    if not console.is_terminal:
        console = Console(width=120)
    config = estimate.config
    gamma = "all layers (full fine-tuning)" if config.gamma is None else f"{config.gamma} of {estimate.num_layers}"
    title = (
        f"{config.model_name}: LISA gamma {gamma}, micro-batch {config.micro_batch_size}, "
        f"sequence {config.sequence_length}, {config.precision.value}, "
        f"checkpointing {'on' if config.gradient_checkpointing else 'off'}, attention {config.attention}, "
        f"target {config.target_device}"
    )
    table = Table(title=title, title_justify="left")
    table.add_column("category")
    table.add_column("GiB", justify="right")
    table.add_column("GB", justify="right")
    table.add_column("share", justify="right")
    table.add_column("how obtained")
    breakdown = estimate.breakdown()
    total = estimate.total_bytes
    for category, value in breakdown.items():
        if config.target_device == "cpu" and category in (
            MemoryCategory.CUDA_CONTEXT,
            MemoryCategory.ALLOCATOR_RESERVE,
        ):
            continue
        share = f"{100 * value / total:.1f}%" if total else "-"
        basis = _CATEGORY_BASIS[category]
        if category is MemoryCategory.CUDA_CONTEXT and config.gpu is None:
            basis = "not included: pass --gpu"
        table.add_row(_CATEGORY_LABELS[category], f"{value / GIB:.2f}", f"{value / GB:.2f}", share, basis)
    table.add_row(
        "[bold]total at peak[/bold]", f"[bold]{total / GIB:.2f}[/bold]", f"[bold]{total / GB:.2f}[/bold]", "100%", ""
    )
    console.print(table)

    peak = estimate.peak
    where = peak.context.module or "outside any module"
    console.print(f"Peak in step {peak.context.step}, {peak.context.phase}, {where} ({peak.context.operator}).")
    if estimate.device is not None:
        device = estimate.device
        console.print(
            f"max_memory_allocated {device.allocated_bytes / GIB:.2f} GiB, max_memory_reserved "
            f"{device.reserved_bytes / GIB:.2f} GiB (caching-allocator model); CUDA context "
            f"{device.cuda_context_bytes / GIB:.2f} GiB and cuBLAS workspace "
            f"{device.cublas_workspace_bytes / 2**20:.0f} MiB are estimates from the GPU profile. "
            "Before raising out-of-memory, PyTorch frees cached segments and retries, so a card whose free memory "
            "lies between the allocated and reserved figures may still fit, with more allocator calls."
        )
    console.print(
        f"Trainable parameters this period: {estimate.trainable_parameter_count:,} of {estimate.parameter_count:,}; "
        f"AdamW {config.adamw_implementation.value}, optimizer-state policy {config.policy.value}."
    )
    for note in estimate.notes:
        console.print(f"Note: {note}")
