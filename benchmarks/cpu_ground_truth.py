"""Compare the simulator's CPU prediction with the peak measured by running the same step on the CPU.

Run: python benchmarks/cpu_ground_truth.py [--attention sdpa|eager|both]

Prints one Markdown row per configuration, then the median and the largest absolute error. The measurement
reads the PyTorch profiler's allocator events (``lisa_tune.memory.measure_cpu``), independent of the simulator's
dispatch tracker.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
import transformers

from lisa_tune.memory.groundtruth_cases import ground_truth_cases
from lisa_tune.memory.validation import compare_with_cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attention", choices=("sdpa", "eager", "both"), default="both")
    arguments = parser.parse_args()
    attentions = ("sdpa", "eager") if arguments.attention == "both" else (arguments.attention,)

    print(
        f"# CPU ground truth: torch {torch.__version__}, transformers {transformers.__version__}, "
        f"Python {platform.python_version()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads"
    )
    print()
    print("| model | attention | gamma | ckpt | precision | batch x seq | predicted bytes | measured bytes | error |")
    print("|---|---|---|---|---|---|---:|---:|---:|")
    errors: list[float] = []
    start = time.perf_counter()
    for attention in attentions:
        for case in ground_truth_cases(attention=attention):
            comparison = compare_with_cpu(case)
            errors.append(comparison.relative_error)
            gamma = "all" if case.gamma is None else str(case.gamma)
            print(
                f"| {case.model_name} | {attention} | {gamma} | {'on' if case.gradient_checkpointing else 'off'} "
                f"| {case.precision.value} | {case.micro_batch_size} x {case.sequence_length} "
                f"| {comparison.predicted_bytes:,} | {comparison.measured_bytes:,} "
                f"| {100 * comparison.relative_error:+.3f}% |",
                flush=True,
            )
    absolute = [abs(error) for error in errors]
    print()
    print(
        f"{len(errors)} configurations in {time.perf_counter() - start:.0f} s: median absolute error "
        f"{100 * statistics.median(absolute):.3f}%, largest {100 * max(absolute):.3f}%"
    )


if __name__ == "__main__":
    main()
