"""Time `lisa-tune plan` against `lisa-tune estimate`, each as a whole command with process start.

Run: python benchmarks/plan_speed.py [--repeats N]

The plan searches LLaMA-2-7B over gamma 1 to 32, micro-batch 1 to 64, four sequence lengths, checkpointing on and
off, and bf16 and amp-bf16. Targets: the first plan (empty cache) takes at most 1.5 times one estimate; a repeated
plan (fits cached on disk) takes under 1 second.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

ESTIMATE = ["lisa-tune", "-q", "estimate", "--model", "llama-2-7b", "--gamma", "2", "--batch", "1", "--seq", "1024"]
PLAN = [
    "lisa-tune",
    "-q",
    "plan",
    "--gpu",
    "24GB",
    "--model",
    "llama-2-7b",
    "--seq",
    "512,1024,2048,4096",
    "--max-batch",
    "64",
]


def timed(command: list[str], environment: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, env=environment, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    repeats = parser.parse_args().repeats
    environment = dict(os.environ, HF_HUB_OFFLINE="1")
    estimates, cold, warm = [], [], []
    for _ in range(repeats):
        cache = Path(tempfile.mkdtemp(prefix="lisa-tune-bench-"))
        environment["LISA_TUNE_CACHE_DIR"] = str(cache)
        estimates.append(timed(ESTIMATE, environment))
        cold.append(timed(PLAN, environment))
        warm.append(timed(PLAN, environment))
        shutil.rmtree(cache)

    estimate, first, repeated = (statistics.median(values) for values in (estimates, cold, warm))
    print(
        f"Machine: {os.cpu_count()} CPUs ({platform.machine()}), Python {platform.python_version()}; "
        f"median of {repeats} runs, each a whole command with process start."
    )
    print(f"estimate: {' '.join(ESTIMATE)}")
    print(f"plan:     {' '.join(PLAN)}")
    print(f"one estimate            {estimate:6.2f} s   runs {', '.join(f'{v:.2f}' for v in estimates)}")
    print(
        f"first plan (no cache)   {first:6.2f} s   runs {', '.join(f'{v:.2f}' for v in cold)}"
        f"   = {first / estimate:.2f} x the estimate (target <= 1.5)"
    )
    print(f"repeated plan (cached)  {repeated:6.2f} s   runs {', '.join(f'{v:.2f}' for v in warm)}   (target < 1 s)")


if __name__ == "__main__":
    main()
