"""One optimizer step of LISA (gamma 2) against full fine-tuning and LoRA, on the CPU: time and peak memory.

Run: pip install peft && python benchmarks/step_lisa_full_lora.py

Same model (bundled small-llama, 33.7M parameters, random weights, fp32), batch and sequence for all three. LoRA is
rank 128 on every linear layer (peft, alpha 256, no dropout). Time is the median of the timed steps after warm-up
steps that create the optimizer state. Peak memory is the live tensor bytes before the step (weights, optimizer
state) plus the highest increase during the step, read from the PyTorch profiler's allocator events.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

from lisa_tune.lisa.controller import LisaController
from lisa_tune.lisa.optim import build_adamw
from lisa_tune.lisa.step import train_step
from lisa_tune.memory.measure_cpu import measure_peak_live_bytes
from lisa_tune.modeling import build_model
from lisa_tune.profiles import resolve_model

BATCH, SEQUENCE, WARMUP, TIMED = 4, 256, 2, 5


def live_tensor_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    storages: dict[int, int] = {}
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    tensors += [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    for tensor in tensors:
        storage = tensor.untyped_storage()
        storages[storage._cdata] = storage.nbytes()
    return sum(storages.values())


class PhaseClock:
    """Accumulates wall time per phase of a step; ``mark`` starts the next phase."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}
        self.current: str | None = None
        self.since = 0.0

    def mark(self, phase: str | None) -> None:
        now = time.perf_counter()
        if self.current is not None:
            self.totals[self.current] = self.totals.get(self.current, 0.0) + now - self.since
        self.current, self.since = phase, now


def benchmark(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: Callable[[], None], clock: PhaseClock
) -> dict[str, float]:
    for _ in range(WARMUP):
        step()
        clock.mark(None)
    clock.totals.clear()
    times = []
    for _ in range(TIMED):
        start = time.perf_counter()
        step()
        clock.mark(None)
        times.append(time.perf_counter() - start)
    phases = {f"{phase} s": total / TIMED for phase, total in clock.totals.items()}
    resident = live_tensor_bytes(model, optimizer)
    increase = measure_peak_live_bytes(step).peak_bytes
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"seconds": statistics.median(times), "peak_bytes": resident + increase, "trainable": trainable, **phases}


def main() -> None:
    import peft

    torch.manual_seed(0)
    config = resolve_model("small-llama").config
    generator = torch.Generator().manual_seed(0)
    batch = torch.randint(0, config["vocab_size"], (BATCH, SEQUENCE), generator=generator)
    inputs = {"input_ids": batch, "labels": batch}
    results: dict[str, dict[str, float]] = {}

    for name, gamma in (("full fine-tuning", None), ("LISA gamma 2", 2)):
        torch.manual_seed(0)
        model = build_model(config, device="cpu", dtype=torch.float32)
        # A period longer than the run keeps the same layers active, so every timed step does the same work.
        controller = LisaController(model, gamma=gamma, interval=10**9)
        optimizer = build_adamw(model, lr=1e-4)
        clock = PhaseClock()

        def step(
            model: torch.nn.Module = model,
            optimizer: torch.optim.Optimizer = optimizer,
            controller: LisaController = controller,
            clock: PhaseClock = clock,
        ) -> None:
            train_step(model, optimizer, controller, [inputs], on_phase=lambda phase: clock.mark(phase.value))

        results[name] = benchmark(model, optimizer, step, clock)
        del model, optimizer, controller

    torch.manual_seed(0)
    base = build_model(config, device="cpu", dtype=torch.float32)
    lora = peft.get_peft_model(
        base,
        peft.LoraConfig(r=128, lora_alpha=256, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    lora_optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-4)

    lora_clock = PhaseClock()

    def lora_step() -> None:
        lora_clock.mark("forward")
        loss = lora(**inputs).loss
        lora_clock.mark("backward")
        loss.backward()
        lora_clock.mark("optimizer step")
        lora_optimizer.step()
        lora_clock.mark("zero_grad")
        lora_optimizer.zero_grad(set_to_none=True)

    results["LoRA rank 128"] = benchmark(lora, lora_optimizer, lora_step, lora_clock)

    full = results["full fine-tuning"]
    print(
        f"small-llama (33.7M parameters), fp32, batch {BATCH} x sequence {SEQUENCE}, CPU: {os.cpu_count()} cores "
        f"({platform.machine()}), {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
        f"peft {peft.__version__}; median of {TIMED} steps after {WARMUP} warm-up steps"
    )
    print(
        "| method | trainable parameters | step time s | time vs full | forward s | backward s | optimizer s "
        "| peak tensor MB | memory vs full |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, result in results.items():
        print(
            f"| {name} | {int(result['trainable']):,} | {result['seconds']:.3f} | "
            f"{result['seconds'] / full['seconds']:.2f} | {result.get('forward s', 0):.3f} | "
            f"{result.get('backward s', 0):.3f} | {result.get('optimizer step s', 0):.3f} | "
            f"{result['peak_bytes'] / 1e6:.1f} | {result['peak_bytes'] / full['peak_bytes']:.2f} |"
        )


if __name__ == "__main__":
    main()
