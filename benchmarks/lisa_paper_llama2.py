"""Put the simulator's LLaMA-2-7B figures beside the LISA paper's memory chart.

Run: python benchmarks/lisa_paper_llama2.py

The LISA paper (Pan et al. 2024, arXiv 2403.17919) charts the GPU memory of LLaMA-2-7B fine-tuning at batch size 1
with no gradient checkpointing and no flash attention, weights and AdamW state in bf16. It reads about 60 GB for
full fine-tuning and about 23 GB for LISA with gamma 2. The paper's abstract also states that a 7B model needs at
least 60 GB for full-parameter training; the 23 GB is a reading of the chart, not checked against the paper's text.
Those readings come with no sequence length, allocator settings or statement of whether the figure is allocated,
reserved or the device's used memory, so this prints the prediction at several sequence lengths with each of those
figures.
"""

from __future__ import annotations

import time

from lisa_tune.lisa.optim import AdamWImplementation
from lisa_tune.lisa.precision import Precision
from lisa_tune.memory.simulator import SimulationConfig, simulate
from lisa_tune.profiles import find_gpu_profile, resolve_model
from lisa_tune.units import GB

PAPER_GB = {"full": 60.0, "lisa-gamma-2": 23.0}


def main() -> None:
    source = resolve_model("llama-2-7b")
    gpu = find_gpu_profile("a100-80gb")
    print("LLaMA-2-7B, batch 1, bf16 weights/gradients/AdamW state, no checkpointing, eager attention (no flash),")
    print(f"AdamW foreach, reset policy, CUDA context and cuBLAS workspace of the {gpu.display_name} profile.")
    print()
    print(
        "| method | AdamW | seq | paper GB | tensor peak GB | allocated GB | reserved GB | device total GB "
        "| gap (total) | peak at |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    runs = [
        ("full", None, AdamWImplementation.FOREACH),
        ("full", None, AdamWImplementation.FUSED),
        ("lisa-gamma-2", 2, AdamWImplementation.FOREACH),
        ("lisa-gamma-2", 2, AdamWImplementation.FUSED),
    ]
    for method, gamma, adamw in runs:
        for sequence in (512, 1024, 2048):
            start = time.perf_counter()
            estimate = simulate(
                SimulationConfig(
                    model_config=source.config,
                    model_name=source.name,
                    gamma=gamma,
                    micro_batch_size=1,
                    sequence_length=sequence,
                    precision=Precision.BF16,
                    attention="eager",
                    adamw=adamw,
                    gpu=gpu,
                )
            )
            device = estimate.device
            assert device is not None
            paper = PAPER_GB[method]
            gap = 100 * (device.total_bytes / GB - paper) / paper
            seconds = time.perf_counter() - start
            context = estimate.peak.context
            print(
                f"| {method} | {adamw.value} | {sequence} | {paper:.0f} | {estimate.tensor_peak_bytes / GB:.1f} "
                f"| {device.allocated_bytes / GB:.1f} | {device.reserved_bytes / GB:.1f} "
                f"| {device.total_bytes / GB:.1f} | {gap:+.0f}% | {context.phase} ({seconds:.1f} s) |",
                flush=True,
            )


if __name__ == "__main__":
    main()
