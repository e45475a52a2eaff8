"""Check the simulator against a real CPU run of the same training step.

``measure_cpu_step`` builds the model on the CPU with random weights and runs the same ``train_step`` the simulator
traces, for the same number of steps and the same sampled layers, inside ``measure_peak_live_bytes``. That
measurement reads the PyTorch profiler's allocator events, a mechanism independent of the simulator's dispatch
tracker. ``compare_with_cpu`` puts the two side by side.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from lisa_tune.lisa.controller import LisaController
from lisa_tune.lisa.optim import build_adamw
from lisa_tune.lisa.step import train_step
from lisa_tune.memory.measure_cpu import measure_peak_live_bytes
from lisa_tune.memory.simulator import STEPS_PER_PERIOD, SimulationConfig, simulate, worst_case_layers
from lisa_tune.modeling import build_model


@dataclass(frozen=True)
class CpuComparison:
    """A prediction for the CPU and the peak measured by running the step for real."""

    config: SimulationConfig
    predicted_bytes: int
    measured_bytes: int

    @property
    def relative_error(self) -> float:
        """(predicted - measured) / measured; positive means the prediction is higher."""
        return (self.predicted_bytes - self.measured_bytes) / self.measured_bytes


def measure_cpu_step(config: SimulationConfig, data_seed: int = 0) -> int:
    """Run the traced number of training steps of ``config`` on the CPU and return the measured peak bytes."""
    if config.periods != 1:
        raise ValueError("the CPU comparison runs one period; set periods=1")
    vocab_size = int(config.model_config.get("vocab_size", 0))
    generator = torch.Generator().manual_seed(data_seed)

    def run() -> None:
        model = build_model(
            config.model_config,
            device="cpu",
            dtype=config.precision.parameter_dtype,
            attn_implementation=config.attention,
            gradient_checkpointing=config.gradient_checkpointing,
        )
        controller = LisaController(
            model,
            gamma=config.gamma,
            interval=2**62,
            policy=config.policy,
            seed=config.seed,
            freeze_embedding=config.freeze_embedding,
            layers_path=config.layers_path,
        )
        optimizer = build_adamw(model, implementation=config.adamw_implementation)
        # The same placement the simulator traces.
        if config.active_layers is not None:
            controller.place(list(config.active_layers), optimizer)
        elif config.worst_case_layers and not controller.full_fine_tuning:
            controller.place(worst_case_layers(controller, config.freeze_embedding), optimizer)
        forward_context = (
            (lambda: torch.autocast("cpu", dtype=config.precision.autocast_dtype))
            if config.precision.autocast_dtype is not None
            else None
        )
        for _ in range(STEPS_PER_PERIOD):
            micro_batches = []
            for _ in range(config.gradient_accumulation_steps):
                input_ids = torch.randint(
                    0, vocab_size, (config.micro_batch_size, config.sequence_length), generator=generator
                )
                micro_batches.append({"input_ids": input_ids, "labels": input_ids})
            if forward_context is None:
                train_step(model, optimizer, controller, micro_batches)
            else:
                train_step(model, optimizer, controller, micro_batches, forward_context=forward_context)
            del micro_batches, input_ids

    return measure_peak_live_bytes(run).peak_bytes


def compare_with_cpu(config: SimulationConfig) -> CpuComparison:
    """Predict ``config`` for the CPU and measure it for real."""
    cpu_config = replace(config, target_device="cpu", gpu=None)
    predicted = simulate(cpu_config).tensor_peak_bytes
    measured = measure_cpu_step(cpu_config)
    return CpuComparison(cpu_config, predicted, measured)
