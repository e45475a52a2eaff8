"""Print a plan, and write it as JSON, as the YAML file ``train`` and ``tune`` read, and as a plot."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from lisa_tune.errors import InputError
from lisa_tune.files import write_png_atomically
from lisa_tune.planner.memory_fit import MemoryFit
from lisa_tune.planner.search import Candidate, Plan
from lisa_tune.planner.speed import UTILIZATION
from lisa_tune.units import GB, GIB

SCHEMA = "lisa-tune/plan/v1"
TABLE_GAMMAS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 80)
"""Gammas displayed in the printed table when every gamma was searched; JSON lists all of them."""


def wide_console() -> Console:
    """Return a console that is 120 columns wide when the output is not a terminal, so table headers stay whole."""
    console = Console()
    return console if console.is_terminal else Console(width=120)


def check_plot_path(path: Path) -> None:
    """Reject a --plot path that does not end in .png, the only format written."""
    if path.suffix.lower() != ".png":
        raise InputError(f"--plot {path} must end in .png: the plot is written as PNG.")


def candidate_to_dict(candidate: Candidate) -> dict[str, Any]:
    """Return the JSON-ready form of one configuration."""
    return {
        "gamma": candidate.gamma,
        "micro_batch_size": candidate.micro_batch_size,
        "gradient_accumulation_steps": candidate.accumulation_steps,
        "effective_batch_size": candidate.effective_batch,
        "sequence_length": candidate.sequence_length,
        "precision": candidate.precision,
        "gradient_checkpointing": candidate.gradient_checkpointing,
        "predicted_peak_bytes": candidate.peak_bytes,
        "predicted_tensor_peak_bytes": candidate.tensor_peak_bytes,
        "estimated_tokens_per_second": round(candidate.tokens_per_second, 1),
    }


def plan_to_dict(plan: Plan, defaults_used: list[str]) -> dict[str, Any]:
    """Return the JSON-ready form of a plan."""
    budget = plan.budget
    return {
        "schema": SCHEMA,
        "model": plan.model_name,
        "layers": plan.num_layers,
        "budget": {
            "label": budget.label,
            "total_bytes": budget.total_bytes,
            "margin": plan.margin,
            "usable_bytes": plan.usable_bytes,
            "gpu_profile": budget.gpu.name,
            "gpu_profile_is_reference": budget.gpu_is_reference,
            "cuda_context_bytes": budget.context_bytes,
            "cublas_workspace_bytes": budget.cublas_bytes,
        },
        "sequences": plan.sequences,
        "fits": bool(plan.rows),
        "recommended": candidate_to_dict(plan.recommended) if plan.recommended else None,
        "alternatives": [candidate_to_dict(row) for row in plan.rows],
        "rejected": [{**candidate_to_dict(r.candidate), "reason": r.reason} for r in plan.rejections],
        "advice": plan.advice,
        "defaults_used": defaults_used,
        "speed_is_estimate": True,
        "speed_assumed_utilization": UTILIZATION,
    }


def plan_to_yaml_dict(plan: Plan, attention: str, adamw: str) -> dict[str, Any]:
    """Return the recommended configuration in the layout ``lisa-tune train --config`` and ``tune`` read."""
    chosen = plan.recommended
    assert chosen is not None
    return {
        "model": plan.model_name,
        "gamma": chosen.gamma,
        "micro_batch_size": chosen.micro_batch_size,
        "gradient_accumulation_steps": chosen.accumulation_steps,
        "sequence_length": chosen.sequence_length,
        "precision": chosen.precision,
        "gradient_checkpointing": chosen.gradient_checkpointing,
        "attention": attention,
        "optimizer_state_policy": "reset",
        "adamw": adamw,
        "prediction": {
            "peak_bytes": chosen.peak_bytes,
            "budget_bytes": plan.budget.total_bytes,
            "usable_bytes": plan.usable_bytes,
            "gpu_profile": plan.budget.gpu.name,
            "estimated_tokens_per_second": round(chosen.tokens_per_second, 1),
        },
    }


def check_writable(path: Path, option: str) -> None:
    """Fail before any work when ``path`` cannot be written."""
    parent = path.expanduser().resolve().parent
    if path.is_dir():
        raise InputError(f"{option} {path} is a directory; pass a file path.")
    if not parent.is_dir():
        raise InputError(f"{option} {path}: folder {parent} does not exist; create it or pick another path.")
    if not os.access(parent, os.W_OK):
        raise InputError(f"{option} {path}: folder {parent} is not writable; pick another path.")


def _gb(nbytes: float) -> str:
    return f"{nbytes / GB:.2f}"


def print_plan(plan: Plan, defaults_used: list[str], console: Console | None = None) -> None:
    """Print the recommendation, the table of alternatives and the rejected neighbours."""
    console = console or wide_console()
    budget = plan.budget
    if defaults_used:
        console.print(f"Defaults used: {', '.join(defaults_used)}.")
    console.print(
        f"Budget: {budget.label} = {_gb(budget.total_bytes)} GB ({budget.total_bytes / GIB:.2f} GiB); after the "
        f"{100 * plan.margin:.0f}% safety margin {_gb(plan.usable_bytes)} GB usable. CUDA context "
        f"{_gb(budget.context_bytes)} GB and cuBLAS workspace {budget.cublas_bytes / 2**20:.0f} MiB from the "
        f"{budget.gpu.name} profile{' (reference card for a size budget)' if budget.gpu_is_reference else ''}."
    )
    if plan.recommended is None:
        console.print(f"[bold red]Nothing fits[/bold red] {plan.model_name} in {_gb(plan.usable_bytes)} GB.")
        for line in plan.advice:
            console.print(f"  - {line}")
        return

    chosen = plan.recommended
    console.print(
        f"[bold]Recommended[/bold]: {plan.model_name}, gamma {chosen.gamma}, micro-batch {chosen.micro_batch_size} "
        f"x {chosen.accumulation_steps} accumulation, sequence {chosen.sequence_length}, {chosen.precision}, "
        f"checkpointing {'on' if chosen.gradient_checkpointing else 'off'}: peak {_gb(chosen.peak_bytes)} GB of "
        f"{_gb(plan.usable_bytes)} GB usable, about {chosen.tokens_per_second:,.0f} tokens/s (estimate)."
    )
    table = Table(title="Fastest fitting configuration per gamma", title_justify="left")
    for column in ("seq", "gamma", "micro-batch", "accum.", "ckpt", "precision", "peak GB", "budget GB", "tokens/s*"):
        table.add_column(column, justify="right")
    displayed = [row for row in plan.rows if len(plan.rows) <= 16 or row.gamma in TABLE_GAMMAS or row == chosen]
    for row in displayed:
        marker = " <" if row == chosen else ""
        table.add_row(
            str(row.sequence_length),
            f"{row.gamma}{marker}",
            str(row.micro_batch_size),
            str(row.accumulation_steps),
            "on" if row.gradient_checkpointing else "off",
            row.precision,
            _gb(row.peak_bytes),
            _gb(plan.usable_bytes),
            f"{row.tokens_per_second:,.0f}",
        )
    console.print(table)
    if len(displayed) < len(plan.rows):
        console.print(f"{len(displayed)} of {len(plan.rows)} rows displayed; --json lists every gamma.")
    console.print(
        f"* tokens/s is an estimate: step work over {100 * UTILIZATION:.0f}% of the {budget.gpu.name}'s dense bf16 "
        "peak plus a bandwidth-bound AdamW step; it ranks configurations, it is not a measurement."
    )
    for rejection in plan.rejections:
        candidate = rejection.candidate
        console.print(
            f"Rejected: gamma {candidate.gamma}, micro-batch {candidate.micro_batch_size}, {candidate.precision}, "
            f"checkpointing {'on' if candidate.gradient_checkpointing else 'off'} "
            f"needs {_gb(candidate.peak_bytes)} GB: "
            f"{rejection.reason}."
        )


def write_plot(plan: Plan, fit: MemoryFit, path: Path) -> None:
    """Draw the memory breakdown per gamma for the recommended settings as stacked bars against the budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = plan.recommended
    assert chosen is not None
    budget = plan.budget
    gammas = list(range(1, fit.num_layers + 1))
    parameters, states, other, context = [], [], [], []
    for gamma in gammas:
        tensor = fit.tensor_peak_bytes(gamma, chosen.micro_batch_size, chosen.sequence_length)
        state = 2 * fit.trainable_parameters(gamma) * fit.state_element_bytes
        parameters.append(fit.parameter_bytes / GB)
        states.append(state / GB)
        other.append(max(tensor - fit.parameter_bytes - state, 0) / GB)
        context.append((budget.context_bytes + budget.cublas_bytes) / GB)

    figure, axes = plt.subplots(figsize=(max(6.0, 0.28 * len(gammas) + 2), 4.5))
    bottom = [0.0] * len(gammas)
    for values, label in (
        (parameters, "parameters"),
        (states, "optimizer states"),
        (other, "activations, gradients, temporaries"),
        (context, "CUDA context + cuBLAS"),
    ):
        axes.bar(gammas, values, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    axes.axhline(budget.total_bytes / GB, color="black", linestyle="-", label=f"budget {budget.label}")
    axes.axhline(plan.usable_bytes / GB, color="black", linestyle="--", label="usable after margin")
    axes.set_xlim(0.4, len(gammas) + 0.6)
    axes.set_xlabel("gamma (active decoder layers)")
    axes.set_ylabel("predicted peak, GB (10^9 bytes)")
    axes.set_title(
        f"{plan.model_name}: micro-batch {chosen.micro_batch_size}, sequence {chosen.sequence_length}, "
        f"{chosen.precision}, checkpointing {'on' if chosen.gradient_checkpointing else 'off'}"
    )
    axes.legend(fontsize="small", loc="upper left")
    figure.tight_layout()
    write_png_atomically(path, figure)
    plt.close(figure)
