"""The tensor peak of one real training step on the CPU, for comparison with the memory simulator.

The simulator's CPU prediction counts every tensor live during the step: the parameters, buffers, optimizer state
and inputs that exist before it, and everything the step allocates. ``measure_peak_live_bytes`` records only the
allocations made during the call, so the bytes of the tensors that exist before the step are added to its peak.
``lisa_tune.memory.validation.measure_cpu_step`` counts the same tensors by building them inside the measurement.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lisa_tune.memory.measure_cpu import measure_peak_live_bytes


@dataclass(frozen=True)
class StepMemory:
    """The measured tensor peak of one optimizer step on the CPU."""

    step: int
    """The optimizer step that was measured, counted from 1."""
    active_layers: tuple[int, ...]
    """Decoder layers trained in that step."""
    existing_bytes: int
    """CPU storage that existed before the step: parameters, buffers, gradients, optimizer state, micro-batches."""
    step_peak_bytes: int
    """Peak of the bytes that the step allocated and had not yet freed, from the profiler's allocator events."""

    @property
    def peak_bytes(self) -> int:
        """Peak of live CPU tensor bytes during the step."""
        return self.existing_bytes + self.step_peak_bytes


def cpu_storage_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Return the bytes of the distinct CPU storages behind ``tensors``, counting a shared storage once."""
    sizes: dict[int, int] = {}
    for tensor in tensors:
        if tensor is None or tensor.device.type != "cpu":
            continue
        storage = tensor.untyped_storage()
        sizes[storage.data_ptr()] = storage.nbytes()
    return sum(sizes.values())


def existing_step_tensors(
    model: nn.Module, optimizer: torch.optim.Optimizer, micro_batches: Sequence[Mapping[str, torch.Tensor]]
) -> list[torch.Tensor | None]:
    """Return the tensors that a training step finds alive: weights, buffers, gradients, optimizer state, inputs."""
    tensors: list[torch.Tensor | None] = []
    for parameter in model.parameters():
        tensors.append(parameter)
        tensors.append(parameter.grad)
    tensors.extend(model.buffers())
    for state in optimizer.state.values():
        tensors.extend(value for value in state.values() if isinstance(value, torch.Tensor))
    for batch in micro_batches:
        tensors.extend(batch.values())
    return tensors


def is_full_length(
    micro_batches: Sequence[Mapping[str, torch.Tensor]], micro_batch_size: int, sequence_length: int
) -> bool:
    """Return True when every micro-batch has ``micro_batch_size`` rows of ``sequence_length`` tokens, unpadded.

    The simulator traces such inputs. A padded batch is shorter, and transformers builds a 4-D attention mask for it.
    """
    for batch in micro_batches:
        if tuple(batch["input_ids"].shape) != (micro_batch_size, sequence_length):
            return False
        mask = batch.get("attention_mask")
        if mask is not None and not bool(mask.all()):
            return False
    return True


def measure_train_step(
    run_step: Callable[[], torch.Tensor],
    existing: Iterable[torch.Tensor | None],
    *,
    step: int,
    active_layers: Sequence[int],
) -> tuple[torch.Tensor, StepMemory | None]:
    """Run ``run_step`` once and return its result with the measured peak of live CPU tensors.

    ``existing`` are the tensors alive before the step. When another PyTorch profiler is recording, the step runs
    unmeasured and the measurement is None, because profiler sessions cannot be nested.

    NOTE: a tensor in ``existing`` that the step frees still counts until the step ends. A training step frees none
    before its peak: gradients are None when it starts, and the layer switch at its end frees optimizer state last.
    """
    existing_bytes = cpu_storage_bytes(existing)
    started = False
    results: list[torch.Tensor] = []

    def run() -> None:
        nonlocal started
        started = True
        results.append(run_step())

    try:
        measurement = measure_peak_live_bytes(run)
    except RuntimeError:
        # measure_peak_live_bytes raises before calling ``run`` when a profiler is recording. An error raised by
        # the step itself is passed on, and the step is not run again.
        if started:
            raise
        return run_step(), None
    return results[0], StepMemory(step, tuple(active_layers), existing_bytes, measurement.peak_bytes)
