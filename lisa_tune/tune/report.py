"""The tuner's outputs: the trial table, best.yaml and the PNG plots."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from rich.table import Table

from lisa_tune.files import write_png_atomically
from lisa_tune.planner.output import wide_console
from lisa_tune.tune.tuner import StudySettings, best_trial, format_bytes

HISTORY_PLOT = "history.png"
MAP_PLOT = "gamma_k.png"
OVERHEAD = ("process_start", "imports", "setup")
"""Parts of a trial's time that are not training or evaluation: interpreter start, imports, model and data set-up."""


def _outcome(trial: FrozenTrial) -> str:
    if trial.state == TrialState.FAIL and "outcome" not in trial.user_attrs:
        return "failed (worker stopped)"
    outcome = str(trial.user_attrs.get("outcome", trial.state.name.lower()))
    if "repeat_of" in trial.user_attrs:
        outcome = f"repeat of {trial.user_attrs['repeat_of']}"
    return outcome


def overhead_share(timings: dict[str, float]) -> float | None:
    """Return the share of a trial process's time spent in ``OVERHEAD``, or None without timings."""
    overhead = sum(float(timings.get(key, 0.0)) for key in OVERHEAD)
    total = overhead + float(timings.get("train", 0.0))
    return overhead / total if total > 0 else None


def trial_rows(study: optuna.Study) -> list[dict[str, Any]]:
    """Return one row per trial with the figures the table and the documentation show."""
    rows = []
    for trial in study.get_trials(deepcopy=False):
        share = overhead_share(trial.user_attrs.get("timings") or {})
        # Repeats never set "counted": they did not run, so they have no duration of their own.
        ran = trial.user_attrs.get("counted")
        duration = trial.duration.total_seconds() if ran and trial.duration is not None else None
        rows.append(
            {
                "number": trial.number,
                "gamma": trial.params.get("gamma"),
                "interval": trial.params.get("interval"),
                "micro_batch_size": trial.params.get("micro_batch_size"),
                "learning_rate": trial.params.get("learning_rate"),
                "outcome": _outcome(trial),
                "held_out_loss": trial.value if trial.state == TrialState.COMPLETE else None,
                "tokens_per_second": trial.user_attrs.get("tokens_per_second"),
                "predicted_peak_bytes": trial.user_attrs.get("predicted_peak_bytes"),
                "measured_peak_bytes": trial.user_attrs.get("measured_peak_bytes"),
                "seconds": round(duration, 1) if duration is not None else None,
                "overhead_share": round(share, 3) if share is not None else None,
            }
        )
    return rows


def print_table(study: optuna.Study, settings: StudySettings) -> None:
    """Print every trial of the study, the best marked."""
    best = best_trial(study)
    table = Table(title=f"Trials of study {study.study_name} ({settings.tokens_per_trial:,} training tokens each)")
    for header in (
        "#",
        "gamma",
        "K",
        "micro-batch",
        "lr",
        "outcome",
        "held-out loss",
        "tokens/s",
        "predicted",
        "measured",
        "seconds",
    ):
        table.add_column(header, justify="left" if header == "outcome" else "right")
    for row in trial_rows(study):
        mark = " *" if best is not None and row["number"] == best.number else ""
        table.add_row(
            f"{row['number']}{mark}",
            str(row["gamma"]),
            str(row["interval"]),
            str(row["micro_batch_size"] or settings.space.micro_batches[0]),
            f"{row['learning_rate'] or settings.space.learning_rate.low:.1e}",
            row["outcome"],
            "-" if row["held_out_loss"] is None else f"{row['held_out_loss']:.4f}",
            "-" if row["tokens_per_second"] is None else f"{row['tokens_per_second']:.0f}",
            format_bytes(row["predicted_peak_bytes"]),
            format_bytes(row["measured_peak_bytes"]),
            "-" if row["seconds"] is None else f"{row['seconds']:.0f}",
        )
    console = wide_console()
    console.print(table)
    console.print(
        "* best. predicted: the planner's device peak for the budget's GPU. measured: "
        + ("max_memory_allocated on the GPU" if _on_gpu() else "the trial process's peak resident memory")
        + "; the two are not the same quantity on a CPU."
    )


def _on_gpu() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def write_plots(study: optuna.Study, run_dir: Path) -> list[Path]:
    """Write the optimisation history and a gamma-by-K map of held-out loss as PNG files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    # Repeats carry an earlier trial's result and would plot it twice.
    trials = [t for t in study.get_trials(deepcopy=False) if "repeat_of" not in t.user_attrs]
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    pruned = [t for t in trials if t.user_attrs.get("outcome") == "pruned" and t.intermediate_values]
    figure, axes = plt.subplots(figsize=(7, 4))
    values = [float(t.value or 0.0) for t in complete]
    best_so_far = [min(values[: i + 1]) for i in range(len(values))]
    axes.scatter([t.number for t in complete], values, label="held-out loss of a trial", zorder=3)
    if pruned:
        axes.scatter(
            [t.number for t in pruned],
            [t.intermediate_values[max(t.intermediate_values)] for t in pruned],
            marker="x",
            color="tab:gray",
            label="pruned trial (its last report)",
            zorder=3,
        )
    axes.step([t.number for t in complete], best_so_far, where="post", color="tab:red", label="best so far")
    axes.set_xlabel("trial")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_ylabel("held-out loss (nats per token)")
    axes.set_title(f"Study {study.study_name}")
    axes.legend()
    figure.tight_layout()
    history = run_dir / HISTORY_PLOT
    write_png_atomically(history, figure)
    plt.close(figure)
    return [history, _write_map(complete, pruned, run_dir / MAP_PLOT)]


def _write_map(complete: list[FrozenTrial], pruned: list[FrozenTrial], path: Path) -> Path:
    import matplotlib.pyplot as plt

    gammas = sorted({int(t.params["gamma"]) for t in complete + pruned})
    intervals = sorted({int(t.params["interval"]) for t in complete + pruned})
    grid = [[math.nan] * len(gammas) for _ in intervals]
    for trial in complete:
        row, column = intervals.index(int(trial.params["interval"])), gammas.index(int(trial.params["gamma"]))
        value = float(trial.value or 0.0)
        grid[row][column] = value if math.isnan(grid[row][column]) else min(value, grid[row][column])
    figure, axes = plt.subplots(figsize=(1.2 * len(gammas) + 3, 0.8 * len(intervals) + 2))
    image = axes.imshow(grid, cmap="viridis_r", aspect="auto")
    axes.set_xticks(range(len(gammas)), [str(g) for g in gammas])
    axes.set_yticks(range(len(intervals)), [str(k) for k in intervals])
    axes.set_xlabel("gamma (layers trained per period)")
    axes.set_ylabel("K (optimizer steps per period)")
    finite = [value for line in grid for value in line if not math.isnan(value)]
    low, high = (min(finite), max(finite)) if finite else (0.0, 1.0)
    for row, line in enumerate(grid):
        for column, value in enumerate(line):
            if not math.isnan(value):
                # Low losses are drawn light, so their label is dark.
                light = high == low or (value - low) / (high - low) < 0.5
                axes.text(column, row, f"{value:.3f}", ha="center", va="center", color="black" if light else "white")
    for trial in pruned:
        row, column = intervals.index(int(trial.params["interval"])), gammas.index(int(trial.params["gamma"]))
        if math.isnan(grid[row][column]):
            axes.text(column, row, "pruned", ha="center", va="center", color="tab:gray")
    figure.colorbar(image, ax=axes, label="best held-out loss")
    axes.set_title("Held-out loss by gamma and K")
    figure.tight_layout()
    write_png_atomically(path, figure)
    plt.close(figure)
    return path
