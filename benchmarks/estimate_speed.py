"""Time one LLaMA-2-7B estimate: library imports, meta-model build, traced step, and the process's peak memory.

Run: python benchmarks/estimate_speed.py

Target: model build plus trace under 2 seconds on a 2-core machine. Import time is reported apart because a
long-lived process (the planner's cache, a notebook) pays it once.
"""

from __future__ import annotations

import os
import platform
import resource
import time


def main() -> None:
    start = time.perf_counter()
    import torch
    import transformers

    # transformers loads each modeling module lazily; import it here so the build time excludes it.
    import transformers.models.llama.modeling_llama

    from lisa_tune.lisa.precision import Precision
    from lisa_tune.memory.simulator import SimulationConfig, simulate
    from lisa_tune.profiles import find_gpu_profile, resolve_model

    import_seconds = time.perf_counter() - start

    source = resolve_model("llama-2-7b")
    config = SimulationConfig(
        model_config=source.config,
        model_name=source.name,
        gamma=2,
        micro_batch_size=1,
        sequence_length=1024,
        precision=Precision.BF16,
        gpu=find_gpu_profile("rtx4090"),
    )
    runs = []
    for _ in range(3):
        run_start = time.perf_counter()
        estimate = simulate(config)
        runs.append((estimate.build_seconds, estimate.trace_seconds, time.perf_counter() - run_start))

    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"Configuration: llama-2-7b, gamma 2, micro-batch 1, sequence 1024, bf16, sdpa, CUDA target; "
        f"torch {torch.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()})"
    )
    print(f"import torch + transformers + lisa_tune: {import_seconds:.2f} s")
    for index, (build, trace, total) in enumerate(runs, start=1):
        print(
            f"run {index}: build meta model {build:.2f} s, traced step {trace:.2f} s, "
            f"build + trace {build + trace:.2f} s, whole simulate() {total:.2f} s"
        )
    print(f"peak resident memory of this process: {peak_rss_mib:.0f} MiB")
    print(f"predicted peak: {estimate.total_bytes / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
