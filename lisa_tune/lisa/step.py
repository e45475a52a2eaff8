"""One LISA training step, shared by the trainer (real tensors) and the memory simulator (meta tensors)."""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import nn

from lisa_tune.lisa.controller import LisaController


class Phase(str, enum.Enum):
    """The parts of a training step, in the order they run."""

    FORWARD = "forward"
    BACKWARD = "backward"
    OPTIMIZER = "optimizer step"
    ZERO_GRAD = "zero_grad"
    SWITCH = "layer switch"


PhaseHook = Callable[[Phase], None]


def _no_phase_hook(phase: Phase) -> None:
    del phase


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    controller: LisaController,
    micro_batches: Sequence[Mapping[str, torch.Tensor]],
    *,
    forward_context: Callable[[], AbstractContextManager[Any]] = nullcontext,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    on_phase: PhaseHook = _no_phase_hook,
    reduce_gradients: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Run one optimizer step over ``micro_batches`` (gradient accumulation) and return the mean loss, detached.

    Each micro-batch is a mapping of model inputs that includes ``labels``. ``forward_context`` wraps every
    forward pass (``torch.autocast`` for mixed precision). ``on_phase`` is called as each phase starts, so a
    memory tracker can attribute allocations to it. ``reduce_gradients`` is called once, after the backward pass
    of the last micro-batch and before the optimizer step. Data-parallel training averages the gradients across
    processes there, so the micro-batches of a step accumulate locally without communication.
    """
    count = len(micro_batches)
    if count == 0:
        raise ValueError("train_step needs at least one micro-batch")
    total: torch.Tensor | None = None
    for batch in micro_batches:
        on_phase(Phase.FORWARD)
        with forward_context():
            outputs = model(**batch)
        loss = outputs.loss / count
        # Drop the output object before backward. It references the logits, which the graph does not need, and keeping
        # them would add batch x sequence x vocabulary elements to the backward peak.
        del outputs
        on_phase(Phase.BACKWARD)
        loss.backward()
        detached = loss.detach()
        total = detached if total is None else total + detached
        del loss

    if reduce_gradients is not None:
        reduce_gradients()
    on_phase(Phase.OPTIMIZER)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    on_phase(Phase.ZERO_GRAD)
    optimizer.zero_grad(set_to_none=True)
    on_phase(Phase.SWITCH)
    controller.after_optimizer_step(optimizer)
    assert total is not None
    return total
