"""Predict the peak memory of a LISA training step by running the real step on a meta-device model.

The simulator builds the model from its config on the meta device, where tensors have shapes and dtypes but no
data, and runs ``lisa_tune.lisa.step.train_step`` (forward, loss, backward, AdamW step, zero_grad, layer switch)
under a ``StorageTracker``. ``TargetKernels`` gives the trace the attention kernels and autocast behaviour of the
target device. For a CUDA target the recorded allocations are replayed through a model of PyTorch's caching
allocator, and the CUDA context and cuBLAS workspace of the GPU profile are added.

Traced steps: every period runs two optimizer steps, because the first step of a period creates the AdamW state
of the newly active layers and the second is the steady state where that state is alive through forward and
backward. With the ``persistent`` policy and more than one period, the earlier periods run only the optimizer step,
on zero gradients of the trainable parameters: that creates the same AdamW state a full step would, and nothing
else outlives a step.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lisa_tune.errors import InputError
from lisa_tune.lisa.controller import LisaController, OptimizerStatePolicy
from lisa_tune.lisa.optim import AdamWImplementation, build_adamw
from lisa_tune.lisa.precision import Precision
from lisa_tune.lisa.step import Phase, train_step
from lisa_tune.memory.allocator import CachingAllocatorModel
from lisa_tune.memory.categories import MemoryCategory
from lisa_tune.memory.kernels import TargetKernels, cuda_workspace_rule, fused_adamw_on_meta, no_workspace_rule
from lisa_tune.memory.tracker import PeakReport, StorageTracker
from lisa_tune.modeling import build_model, is_mixture_of_experts, layer_count
from lisa_tune.profiles import GpuProfile

logger = logging.getLogger(__name__)

STEPS_PER_PERIOD = 2
# PyTorch keeps a cuBLAS workspace per (handle, stream), and a handle per thread: a training step multiplies
# matrices on the main thread (forward) and on autograd's device thread (backward). Inferred from PyTorch's
# CublasHandlePool.cpp, not measured.
CUBLAS_HANDLES_PER_STEP = 2


@dataclass(frozen=True)
class SimulationConfig:
    """One configuration of a LISA step whose peak memory is predicted."""

    model_config: dict[str, Any]
    """The model's parsed Hugging Face ``config.json``."""
    model_name: str = "model"
    gamma: int | None = 2
    """Active decoder layers per period; None for full fine-tuning."""
    micro_batch_size: int = 1
    """Sequences per forward pass."""
    sequence_length: int = 1024
    """Tokens per sequence."""
    precision: Precision = Precision.BF16
    gradient_checkpointing: bool = False
    attention: str = "sdpa"
    """``sdpa`` or ``eager``."""
    policy: OptimizerStatePolicy = OptimizerStatePolicy.RESET
    periods: int = 1
    """Sampling periods traced; with ``persistent`` the optimizer state grows over them."""
    target_device: str = "cuda"
    """``cuda`` (the prediction users want) or ``cpu`` (for comparison with a real CPU run)."""
    adamw: AdamWImplementation | None = None
    """AdamW implementation; None takes PyTorch's default for the target device."""
    freeze_embedding: bool = False
    layers_path: str | None = None
    seed: int = 0
    worst_case_layers: bool = True
    """Trace the last period with the top gamma layers active, the placement with the highest backward peak.
    False traces the layers the seeded sampler draws."""
    gpu: GpuProfile | None = None
    """Supplies the CUDA context and cuBLAS workspace; None leaves both at zero."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step. From the second one on, the gradients of the earlier ones are alive
    through the whole forward and backward pass, so the peak grows with accumulation."""
    active_layers: tuple[int, ...] | None = None
    """Decoder layers active in the last traced period, to match a real run. None leaves the placement to
    ``worst_case_layers``."""

    @property
    def adamw_implementation(self) -> AdamWImplementation:
        """The AdamW implementation the trace runs."""
        return self.adamw or AdamWImplementation.default_for(self.target_device)


@dataclass
class DeviceMemory:
    """Memory at the level of the device, for a CUDA target."""

    allocated_bytes: int
    """Predicted ``torch.cuda.max_memory_allocated``: tensors rounded to 512-byte blocks, plus cuBLAS workspaces."""
    reserved_bytes: int
    """Predicted ``torch.cuda.max_memory_reserved`` under the caching-allocator model."""
    cuda_context_bytes: int
    """Estimate from the GPU profile; outside the allocator's pool."""
    cublas_workspace_bytes: int
    """cuBLAS workspaces, allocated through the caching allocator and so part of ``reserved_bytes``."""

    @property
    def total_bytes(self) -> int:
        """Device memory the process uses at its peak: the allocator's reserved segments and the CUDA context."""
        return self.reserved_bytes + self.cuda_context_bytes


@dataclass
class MemoryEstimate:
    """The prediction for one configuration."""

    config: SimulationConfig
    peak: PeakReport
    device: DeviceMemory | None
    parameter_count: int
    trainable_parameter_count: int
    num_layers: int
    active_layers: list[int]
    layers_with_optimizer_state: list[int]
    visited_layers: list[int]
    optimizer_state_bytes_at_end: int
    trace_seconds: float
    build_seconds: float
    at_optimizer_step: dict[MemoryCategory, int]
    """Bytes by category as the last traced optimizer step starts: every gradient and, in the steady-state step,
    every optimizer state of the period are alive then."""
    at_backward_start: dict[MemoryCategory, int]
    """Bytes by category as the last traced backward starts, when the saved activations are all alive."""
    notes: list[str] = field(default_factory=list)
    trace: StorageTracker | None = None
    """The tracker of the trace, when ``simulate`` was asked to keep it."""

    @property
    def tensor_peak_bytes(self) -> int:
        """Peak of live tensor bytes, as traced, with no allocator rounding."""
        return self.peak.peak_bytes

    @property
    def total_bytes(self) -> int:
        """The number to compare with a memory budget: device total for CUDA, tensor peak for CPU."""
        return self.device.total_bytes if self.device is not None else self.peak.peak_bytes

    def breakdown(self) -> dict[MemoryCategory, int]:
        """Bytes per category at the peak, summing to ``total_bytes``."""
        parts: dict[MemoryCategory, int] = dict(self.peak.by_category)
        if self.device is not None:
            device = self.device
            parts[MemoryCategory.CUDA_CONTEXT] = device.cuda_context_bytes + device.cublas_workspace_bytes
            parts[MemoryCategory.ALLOCATOR_RESERVE] = (
                device.reserved_bytes - self.peak.peak_bytes - device.cublas_workspace_bytes
            )
        else:
            parts[MemoryCategory.CUDA_CONTEXT] = 0
            parts[MemoryCategory.ALLOCATOR_RESERVE] = 0
        return parts


def validate(config: SimulationConfig) -> int:
    """Check a configuration before anything is built; return the model's layer count."""
    layers = layer_count(config.model_config)
    problems: list[str] = []
    if layers is None:
        problems.append(
            f"the config of model {config.model_name} states no layer count (num_hidden_layers or n_layer); "
            "pass a complete Hugging Face config.json"
        )
    if config.gamma is not None and layers is not None and not 1 <= config.gamma <= layers:
        problems.append(f"gamma {config.gamma} is outside 1 to the model's {layers} layers; pass --gamma 1 to {layers}")
    if config.micro_batch_size < 1:
        problems.append(f"micro-batch size {config.micro_batch_size} is below 1; pass --batch 1 or more")
    if config.sequence_length < 1:
        problems.append(f"sequence length {config.sequence_length} is below 1; pass --seq 1 or more")
    if config.periods < 1:
        problems.append(f"periods {config.periods} is below 1; pass --periods 1 or more")
    if config.gradient_accumulation_steps < 1:
        problems.append(f"gradient accumulation steps {config.gradient_accumulation_steps} is below 1; pass 1 or more")
    if config.active_layers is not None and layers is not None:
        expected = layers if config.gamma is None else config.gamma
        chosen = set(config.active_layers)
        if len(chosen) != len(config.active_layers) or len(chosen) != expected or not chosen <= set(range(layers)):
            problems.append(
                f"active layers {list(config.active_layers)} are invalid: pass {expected} distinct layer indices "
                f"from 0 to {layers - 1}"
            )
    if is_mixture_of_experts(config.model_config) and config.precision is not Precision.BF16:
        # transformers runs experts through torch._grouped_mm, whose meta kernel in torch 2.13 takes bf16 only. Its
        # per-expert loop selects tokens with torch.nonzero, which has no meta kernel, so neither can be traced.
        problems.append(
            f"mixture-of-experts models can only be estimated with --precision bf16, not {config.precision.value}: "
            "torch's meta kernel for grouped matrix products accepts bf16 inputs only"
        )
    if config.target_device not in ("cuda", "cpu"):
        problems.append(f"target device {config.target_device!r} is invalid; use cuda or cpu")
    if problems:
        raise InputError("; ".join(problems) + ".")
    assert layers is not None
    return layers


def _optimizer_state_bytes(optimizer: torch.optim.Optimizer, device_types: frozenset[str]) -> int:
    seen: set[int] = set()
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.device.type in device_types:
                storage = value.untyped_storage()
                if storage._cdata not in seen:
                    seen.add(storage._cdata)
                    total += storage.nbytes()
    return total


def _replay_allocator(tracker: StorageTracker, resident_bytes: list[int]) -> tuple[int, int]:
    """Replay the trace through the caching-allocator model; return peak allocated and peak reserved bytes.

    ``resident_bytes`` are allocations made before the step and held for the whole process (cuBLAS workspaces).
    """
    allocator = CachingAllocatorModel()
    for nbytes in resident_bytes:
        allocator.malloc(nbytes)
    handles: dict[int, int] = {}
    for event in tracker.events:
        allocation = abs(event) - 1
        if event > 0:
            handles[allocation] = allocator.malloc(tracker.sizes[allocation])
        else:
            allocator.free(handles.pop(allocation))
    return allocator.peak_allocated_bytes, allocator.peak_reserved_bytes


def simulate(config: SimulationConfig, keep_trace: bool = False, steady_state_only: bool = False) -> MemoryEstimate:
    """Trace the LISA step of ``config`` on the meta device and return its predicted memory.

    ``keep_trace`` keeps the tracker, with every allocation and free, on the result's ``trace`` field.
    ``steady_state_only`` creates the period's AdamW state with an optimizer step on zero gradients and then traces
    one full step instead of two. The second full step has everything the first has alive plus that state, so the
    peak is the same, and the memory planner uses it to halve its tracing time.
    """
    validate(config)
    build_start = time.perf_counter()
    kernels = TargetKernels(config.target_device, config.precision.autocast_dtype)
    model = build_model(
        config.model_config,
        device="meta",
        dtype=config.precision.parameter_dtype,
        attn_implementation=config.attention,
        gradient_checkpointing=config.gradient_checkpointing,
        checkpoint_context_fn=kernels.checkpoint_contexts,
    )
    controller = LisaController(
        model,
        gamma=config.gamma,
        interval=2**62,  # the simulator switches layers itself, between periods
        policy=config.policy,
        seed=config.seed,
        freeze_embedding=config.freeze_embedding,
        layers_path=config.layers_path,
    )
    optimizer = build_adamw(model, implementation=config.adamw_implementation)
    build_seconds = time.perf_counter() - build_start

    device_types = frozenset({"meta", "cpu"} if config.target_device == "cpu" else {"meta"})
    workspace = cuda_workspace_rule if config.target_device == "cuda" else no_workspace_rule
    tracker = StorageTracker(device_types, workspace)
    tracker.track_existing(list(model.parameters()) + list(model.buffers()), MemoryCategory.PARAMETERS)
    input_embedding = getattr(model, "get_input_embeddings", lambda: None)()
    output_embedding = getattr(model, "get_output_embeddings", lambda: None)()
    edge_modules = [module for module in (input_embedding, output_embedding) if isinstance(module, nn.Module)]
    tracker.attach(
        model,
        optimizer,
        backward_modules=[*controller.decoder.layers, *edge_modules],
        no_activation_modules=[output_embedding] if isinstance(output_embedding, nn.Module) else [],
    )

    def on_phase(phase: Phase) -> None:
        tracker.set_phase(phase)
        kernels.clear_cast_cache(enabled=phase is Phase.FORWARD)

    trace_start = time.perf_counter()
    try:
        with kernels, tracker, fused_adamw_on_meta():
            for period in range(config.periods):
                last_period = period == config.periods - 1
                if not last_period:
                    _optimizer_only_period(controller, optimizer, tracker)
                    continue
                if config.active_layers is not None:
                    controller.place(list(config.active_layers), optimizer)
                elif config.worst_case_layers and not controller.full_fine_tuning:
                    # Backward runs from the top layer down, so the top layers' gradients are allocated while almost
                    # every activation is still alive. Lower layers' gradients appear after most are freed.
                    controller.place(worst_case_layers(controller, config.freeze_embedding), optimizer)
                full_steps = STEPS_PER_PERIOD
                if steady_state_only:
                    _create_optimizer_state(controller, optimizer, tracker)
                    full_steps = 1
                for _ in range(full_steps):
                    tracker.step += 1
                    tracker.set_phase("inputs")
                    input_ids = torch.zeros(
                        config.micro_batch_size, config.sequence_length, dtype=torch.long, device="meta"
                    )
                    batch = {"input_ids": input_ids, "labels": input_ids}
                    micro_batches = [batch] * config.gradient_accumulation_steps
                    train_step(model, optimizer, controller, micro_batches, on_phase=on_phase)
                    del batch, input_ids, micro_batches
    finally:
        tracker.detach_hooks()
    trace_seconds = time.perf_counter() - trace_start
    tracker.recording = False

    peak = tracker.peak()
    device = None
    notes: list[str] = []
    if config.target_device == "cuda":
        gpu = config.gpu
        cublas = CUBLAS_HANDLES_PER_STEP * gpu.cublas_workspace_bytes if gpu else 0
        workspaces = [gpu.cublas_workspace_bytes] * CUBLAS_HANDLES_PER_STEP if gpu else []
        allocated, reserved = _replay_allocator(tracker, workspaces)
        device = DeviceMemory(
            allocated_bytes=allocated,
            reserved_bytes=reserved,
            cuda_context_bytes=gpu.cuda_context_bytes if gpu else 0,
            cublas_workspace_bytes=cublas,
        )
        if gpu is None:
            notes.append("no GPU profile given: CUDA context and cuBLAS workspace are not included")

    layers_with_state = sorted(
        index
        for index, parameters in enumerate(controller.layer_parameters)
        if any(parameter in optimizer.state for parameter in parameters)
    )
    parameters = {id(p): p for p in model.parameters()}
    return MemoryEstimate(
        config=config,
        peak=peak,
        device=device,
        parameter_count=sum(p.numel() for p in parameters.values()),
        trainable_parameter_count=sum(p.numel() for p in controller.trainable_parameters()),
        num_layers=controller.num_layers,
        active_layers=list(controller.active_layers),
        layers_with_optimizer_state=layers_with_state,
        visited_layers=sorted(controller.visited_layers),
        optimizer_state_bytes_at_end=_optimizer_state_bytes(optimizer, frozenset({"meta"})),
        trace_seconds=trace_seconds,
        build_seconds=build_seconds,
        at_optimizer_step=tracker.live_by_category_at_phase_start(tracker.step, Phase.OPTIMIZER),
        at_backward_start=tracker.live_by_category_at_phase_start(tracker.step, Phase.BACKWARD),
        notes=notes,
        trace=tracker if keep_trace else None,
    )


def worst_case_layers(controller: LisaController, freeze_embedding: bool) -> list[int]:
    """Return the active layers with the highest backward peak.

    Backward runs from the top layer down, so gradients of the top layers are allocated while almost every
    activation is still alive. With a frozen embedding, autograd saves activations only from the lowest active
    layer up, so layer 0 is kept active to keep every layer's activations.
    """
    layers, gamma = controller.num_layers, controller.gamma
    top = list(range(layers - gamma, layers))
    if freeze_embedding:
        return sorted({0, *top[1:]}) if gamma > 1 else [0]
    return top


def _create_optimizer_state(
    controller: LisaController, optimizer: torch.optim.Optimizer, tracker: StorageTracker, phase: str = "state"
) -> None:
    """Run one optimizer step on zero gradients of the trainable parameters, which creates their AdamW state."""
    tracker.step += 1
    tracker.set_phase(phase)
    for parameter in controller.trainable_parameters():
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _optimizer_only_period(
    controller: LisaController, optimizer: torch.optim.Optimizer, tracker: StorageTracker
) -> None:
    _create_optimizer_state(controller, optimizer, tracker, Phase.OPTIMIZER.value)
    tracker.set_phase(Phase.SWITCH)
    controller.switch(optimizer)
