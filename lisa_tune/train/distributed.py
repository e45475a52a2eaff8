"""Data-parallel LISA training across the processes that ``accelerate launch`` or ``torchrun`` starts.

The trainer does not wrap the model in ``torch.nn.parallel.DistributedDataParallel`` (DDP). DDP registers its
gradient hooks only for the parameters that have ``requires_grad=True`` when it is constructed, and LISA changes that
set every K optimizer steps. In a model wrapped once, a layer unfrozen after wrapping is never averaged, so the
replicas drift apart without an error. A layer frozen after wrapping never produces its gradient, so the next forward
pass raises "Expected to have finished reduction in the prior iteration" (torch 2.13, gloo). Wrapping the model again
after every switch would work, but each construction broadcasts every parameter and buffer from rank 0 and rebuilds
the gradient buckets.

Instead the trainer keeps the plain model and calls ``average_gradients`` after the backward pass of a step's last
micro-batch. It sums the gradients of the trainable parameters over all processes in coalesced buckets and divides
them by the process count. Frozen layers have ``grad=None``, so nothing is allocated or sent for them, and the
micro-batches of one step accumulate locally with no communication. Compared with DDP, the all-reduce starts after
the backward pass ends, where DDP overlaps it with the backward pass of the earlier layers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lisa_tune.errors import InputError
from lisa_tune.log import ROOT_LOGGER_NAME

logger = logging.getLogger(__name__)

BUCKET_BYTES = 25 * 2**20
"""Largest coalesced all-reduce buffer, DDP's default ``bucket_cap_mb`` of 25 MiB. A larger gradient goes alone."""
RANK_RECORD_ENV = "LISA_TUNE_RANK_RECORD_DIR"
"""Environment variable naming a folder where every process writes ``rank<N>.jsonl``, a record for tests."""


@dataclass(frozen=True)
class DataParallel:
    """This process's rank in a data-parallel run, and the process count. A single-process run is rank 0 of 1."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_process_group: bool = False
    """Whether ``from_env`` initialised the process group, so ``close`` destroys it."""

    @property
    def enabled(self) -> bool:
        """Whether there is more than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Whether this process is rank 0, the one that writes files and logs."""
        return self.rank == 0

    @classmethod
    def from_env(cls) -> DataParallel:
        """Join the process group that the launcher describes in ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``.

        Without ``WORLD_SIZE`` or with a world size of 1 this is a single-process run and nothing is initialised. The
        backend is NCCL when CUDA is available and gloo otherwise. The rendezvous reads ``MASTER_ADDR`` and
        ``MASTER_PORT``.
        """
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            _warn_single_process_cpu_launch()
            return cls()
        rank = int(os.environ["RANK"])
        local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
        if dist.is_initialized():
            if dist.get_world_size() != world_size or dist.get_rank() != rank:
                raise RuntimeError(
                    f"the process group has rank {dist.get_rank()} of {dist.get_world_size()}, but the environment "
                    f"sets RANK={rank} and WORLD_SIZE={world_size}"
                )
            return cls(rank, world_size, local_rank, owns_process_group=False)
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            dist.init_process_group("nccl")
        else:
            dist.init_process_group("gloo")
        return cls(rank, world_size, local_rank, owns_process_group=True)

    def device(self) -> torch.device:
        """Return this process's device: its local GPU when CUDA is available, the CPU otherwise."""
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", self.local_rank) if self.enabled else torch.device("cuda")

    def quiet_other_processes(self) -> None:
        """Keep only errors in the ``lisa_tune`` log of every process but rank 0, so each line appears once."""
        if not self.is_main:
            root = logging.getLogger(ROOT_LOGGER_NAME)
            root.setLevel(max(root.getEffectiveLevel(), logging.ERROR))

    def barrier(self) -> None:
        """Wait until every process gets here."""
        if self.enabled:
            dist.barrier()

    @contextmanager
    def main_process_first(self) -> Iterator[None]:
        """Run the block on rank 0 first and on the other processes after it, for work that writes shared files."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def broadcast_module(self, module: nn.Module) -> None:
        """Copy rank 0's parameters and buffers to every process, as DDP does once when it wraps a model."""
        if not self.enabled:
            return
        for tensor in _unique_tensors([*module.parameters(), *module.buffers()]):
            dist.broadcast(tensor.data, src=0)

    def average_gradients(self, parameters: Sequence[nn.Parameter], bucket_bytes: int = BUCKET_BYTES) -> None:
        """Replace each parameter's gradient by its mean over all processes, as the module docstring describes.

        A parameter whose gradient is None on some processes but not on others (an MoE expert that no token of this
        process's micro-batches reached) counts zeros there. A parameter with no gradient anywhere keeps None, as in a
        single-process run. Every process must pass the same parameters in the same order.
        """
        if not self.enabled or not parameters:
            return
        device = parameters[0].device
        present = torch.tensor([float(p.grad is not None) for p in parameters], device=device)
        dist.all_reduce(present, op=dist.ReduceOp.MAX)
        gradients: list[torch.Tensor] = []
        for parameter, anywhere in zip(parameters, present.tolist(), strict=True):
            if anywhere and parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
            if parameter.grad is not None:
                gradients.append(parameter.grad)
        for bucket in _buckets(gradients, bucket_bytes):
            if len(bucket) == 1:
                dist.all_reduce(bucket[0])
                bucket[0].div_(self.world_size)
                continue
            flat = torch.cat([gradient.reshape(-1) for gradient in bucket])
            dist.all_reduce(flat)
            flat.div_(self.world_size)
            offset = 0
            for gradient in bucket:
                gradient.copy_(flat[offset : offset + gradient.numel()].view_as(gradient))
                offset += gradient.numel()

    def sum_over_processes(self, values: Sequence[float]) -> list[float]:
        """Return the element-wise sums of ``values`` over all processes, in float64."""
        if not self.enabled:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device())
        dist.all_reduce(tensor)
        return [float(value) for value in tensor.tolist()]

    def check_same_on_all_processes(self, values: Sequence[int], name: str) -> None:
        """Raise ``RuntimeError`` on every process unless all processes pass the same ``values``.

        One all-reduce of (values, -values) with MAX yields the maximum and minus the minimum of each element, which
        are equal exactly when every process has the same value.
        """
        if not self.enabled:
            return
        local = torch.tensor(list(values), dtype=torch.int64, device=self.device())
        bounds = torch.cat([local, -local])
        dist.all_reduce(bounds, op=dist.ReduceOp.MAX)
        maximum, negated_minimum = bounds.split(len(values))
        if not torch.equal(maximum, -negated_minimum):
            raise RuntimeError(
                f"the processes disagree on the {name}: rank {self.rank} has {list(values)}, the element-wise maximum "
                f"over all ranks is {maximum.tolist()}. Launch every process with the same settings."
            )

    def check_resume(self, saved_world_size: int, run_dir: Path) -> None:
        """Raise ``InputError`` unless a checkpoint was written by a run with this run's process count."""
        if saved_world_size != self.world_size:
            raise InputError(
                f"--resume: the checkpoint in {run_dir} is from a run with {saved_world_size} processes, but this run "
                f"has {self.world_size}. Resume with the same --num_processes, because the process count is part of "
                "the batch of every optimizer step."
            )

    def close(self) -> None:
        """Destroy the process group if ``from_env`` created it."""
        if self.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()


def _warn_single_process_cpu_launch() -> None:
    # accelerate 1.16 starts several CPU processes only through mpirun (--mpirun_hostfile). Without it,
    # `accelerate launch --cpu --num_processes N` starts one process and sets MASTER_ADDR but no WORLD_SIZE.
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true" and "MASTER_ADDR" in os.environ:
        logger.warning(
            "accelerate launch --cpu started a single process. To train with several CPU processes, launch with "
            "`accelerate launch --multi_gpu --num_processes N` on a machine without CUDA, or with `torchrun`."
        )


def _unique_tensors(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    seen: set[int] = set()
    unique: list[torch.Tensor] = []
    for tensor in tensors:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            unique.append(tensor)
    return unique


def _buckets(tensors: Sequence[torch.Tensor], max_bytes: int) -> Iterator[list[torch.Tensor]]:
    """Group tensors in order into lists of one dtype and device, of at most ``max_bytes`` unless a tensor is larger."""
    bucket: list[torch.Tensor] = []
    size = 0
    for tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        compatible = not bucket or (bucket[0].dtype == tensor.dtype and bucket[0].device == tensor.device)
        if bucket and (not compatible or size + nbytes > max_bytes):
            yield bucket
            bucket, size = [], 0
        bucket.append(tensor)
        size += nbytes
    if bucket:
        yield bucket


def tensor_digest(tensors: Iterable[torch.Tensor]) -> str:
    """Return the SHA-256 of the tensors' bytes, in order."""
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class RankRecord:
    """A per-process JSON-lines record of every optimizer step, written when ``LISA_TUNE_RANK_RECORD_DIR`` is set.

    Tests of data-parallel runs read it to compare the processes: the micro-batches each one trained on, the
    active layers, the averaged gradients, the final parameters, and that frozen layers had no gradient.
    """

    def __init__(self, rank: int) -> None:
        folder = os.environ.get(RANK_RECORD_ENV)
        self.path = Path(folder) / f"rank{rank}.jsonl" if folder else None
        self.step: dict[str, Any] = {}

    @property
    def enabled(self) -> bool:
        """Whether the environment variable is set."""
        return self.path is not None

    def before_step(self, micro_batches: Sequence[dict[str, torch.Tensor]]) -> None:
        """Note the digests of this process's micro-batches of the coming step."""
        self.step = {"micro_batches": [tensor_digest([batch["input_ids"]]) for batch in micro_batches]}

    def after_reduce(self, model: nn.Module) -> None:
        """Note which parameters have a gradient, and a digest of the gradients, right before the optimizer step."""
        parameters = _unique_tensors(model.parameters())
        with_grad = [p for p in parameters if p.grad is not None]
        self.step["trainable_parameters"] = sum(1 for p in parameters if p.requires_grad)
        self.step["parameters_with_grad"] = len(with_grad)
        self.step["frozen_parameters_with_grad"] = sum(1 for p in with_grad if not p.requires_grad)
        self.step["grad_digest"] = tensor_digest(p.grad for p in with_grad if p.grad is not None)

    def after_step(
        self, step: int, active_layers: Sequence[int], switches: int, loss: float, local_loss: float
    ) -> None:
        """Append the step's line with the layers active in it, the loss averaged over processes and this process's."""
        self.step.update(
            step=step, active_layers=list(active_layers), switches=switches, loss=loss, local_loss=local_loss
        )
        self._append(self.step)
        self.step = {}

    def finish(self, model: nn.Module) -> None:
        """Append a line with the digest of the final parameters."""
        self._append({"parameter_digest": tensor_digest(_unique_tensors(model.parameters()))})

    def _append(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as stream:
            stream.write(json.dumps(record) + "\n")
