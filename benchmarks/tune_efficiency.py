"""Measure the tuner's per-trial overhead and how many trials it needs to find the best configuration of a grid.

Run: python benchmarks/tune_efficiency.py [--data FILE] [--model tiny-llama] [--replays 20]

1. Runs ``lisa-tune tune`` over a small space (gamma 1, 2, 3 x K 1, 2, 4 on tiny-llama, 64-token sequences) with as
   many trials as the space has configurations and the pruner off. The tuner never runs a configuration twice, so
   this evaluates the whole grid with real trials. It prints every trial's time split into process start, imports,
   set-up (model build and data preparation), training and evaluation, and the overhead share
   (start + imports + set-up) of the trial's wall time.
2. Replays the tuner's search on the measured grid: the same sampler settings and the same first trial (the planner's
   recommendation) as ``lisa-tune tune``, with each trial's held-out loss looked up instead of trained. Trial results
   are deterministic on the CPU (same data order, same weights, one thread), so the lookup returns what a real trial
   would. For several sampler seeds it reports the number of trials until a configuration with the grid's best
   held-out loss was first tried, against the grid's size.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import torch
import transformers

from lisa_tune.tune.report import overhead_share
from lisa_tune.tune.tuner import make_sampler

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca-libre" / "tasks_v1.jsonl"
GAMMAS = (1, 2, 3)
INTERVALS = (1, 2, 4)


def run_grid(data: Path, model: str, run_dir: Path) -> tuple[optuna.Study, float]:
    trials = len(GAMMAS) * len(INTERVALS)
    command = [
        sys.executable,
        "-m",
        "lisa_tune",
        "-q",
        "tune",
        "--model",
        model,
        "--data",
        str(data),
        "--run-dir",
        str(run_dir),
        "--gpu",
        "24GB",
        "--trials",
        str(trials),
        "--gamma",
        ",".join(map(str, GAMMAS)),
        "--interval",
        ",".join(map(str, INTERVALS)),
        "--seq",
        "64",
        "--batch",
        "4",
        "--threads",
        "1",
        "--pruner",
        "none",
    ]
    start = time.perf_counter()
    subprocess.run(command, check=True, env=dict(os.environ, HF_HUB_OFFLINE="1"), stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    study = optuna.load_study(study_name=run_dir.name, storage=f"sqlite:///{run_dir / 'study.db'}")
    return study, wall


def replay(grid: dict[tuple[int, int], float], first: dict[str, int], seed: int) -> int:
    """Return the number of trials the tuner's sampler needs to try a configuration with the grid's best loss."""
    best = min(grid.values())
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(direction="minimize", sampler=make_sampler(seed, len(grid)))
    study.enqueue_trial(first)
    tried: list[tuple[int, int]] = []
    while len(set(tried)) < len(grid):
        trial = study.ask()
        key = (
            int(trial.suggest_categorical("gamma", list(GAMMAS))),
            int(trial.suggest_categorical("interval", list(INTERVALS))),
        )
        study.tell(trial, grid[key])
        # Like the tuner, a repeated suggestion reuses the earlier result and does not count as a trial.
        if key not in tried:
            tried.append(key)
        if grid[key] <= best:
            return len(tried)
    return len(tried)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--replays", type=int, default=20)
    arguments = parser.parse_args()
    if not arguments.data.is_file():
        sys.exit(f"data file {arguments.data} not found; pass --data with a JSONL file of Alpaca records.")
    print(
        f"Configuration: {arguments.model}, data {arguments.data.name}, gamma {GAMMAS} x K {INTERVALS}, sequence 64, "
        f"batch 4, 12 steps per trial, 1 thread per trial; torch {torch.__version__}, transformers "
        f"{transformers.__version__}, optuna {optuna.__version__}, Python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs ({platform.machine()})"
    )
    with tempfile.TemporaryDirectory() as folder:
        study, wall = run_grid(arguments.data, arguments.model, Path(folder) / "grid")
    ran = [t for t in study.trials if t.user_attrs.get("counted")]
    grid: dict[tuple[int, int], float] = {}
    shares = []
    print(f"\nGrid: {len(ran)} trials in {wall:.0f} s (whole command)")
    print("trial gamma K  held-out  start imports set-up  train  (eval)  overhead share")
    for trial in ran:
        timings = trial.user_attrs["timings"]
        share = overhead_share(timings) or 0.0
        shares.append(share)
        grid[(trial.params["gamma"], trial.params["interval"])] = float(trial.value or 0.0)
        print(
            f"{trial.number:5d} {trial.params['gamma']:5d} {trial.params['interval']:2d} {trial.value:9.4f} "
            f"{timings['process_start']:6.2f} {timings['imports']:7.2f} {timings['setup']:6.2f} "
            f"{timings['train']:6.2f} ({timings['evaluation']:5.2f})  {share:6.1%}"
        )
    print(f"overhead share: median {statistics.median(shares):.1%}, range {min(shares):.1%} to {max(shares):.1%}")
    best = min(grid, key=lambda key: grid[key])
    print(f"grid best: gamma {best[0]}, K {best[1]}, held-out loss {grid[best]:.4f}")

    first = {"gamma": ran[0].params["gamma"], "interval": ran[0].params["interval"]}
    needed = [replay(grid, first, seed) for seed in range(arguments.replays)]
    print(
        f"\nReplay of the tuner's sampler on the measured grid, {arguments.replays} sampler seeds: trials to find the "
        f"grid's best out of {len(grid)}: median {statistics.median(needed):.1f}, mean {statistics.mean(needed):.1f}, "
        f"max {max(needed)}; found within half the grid in {sum(n <= len(grid) // 2 for n in needed)} of "
        f"{len(needed)} seeds"
    )
    print("per seed:", needed)
    print(f"for comparison, trying the grid in a uniformly random order needs {(len(grid) + 1) / 2:.1f} on average")


if __name__ == "__main__":
    main()
