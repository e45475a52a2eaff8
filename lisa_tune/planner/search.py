"""Search the LISA configurations that fit a memory budget and rank them by estimated speed."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from lisa_tune.planner.memory_fit import MemoryFit
from lisa_tune.planner.speed import estimate_speed
from lisa_tune.profiles import GpuProfile

DEFAULT_GAMMA = 2
"""The gamma the LISA paper uses for its main results; the plan recommends it unless --gamma sets another."""
MAX_SEQUENCE = 131072

FitProvider = Callable[[str, bool], MemoryFit]
"""Return the memory fit for a precision and a checkpointing choice."""


@dataclass(frozen=True)
class Budget:
    """The memory a plan must fit in, and the GPU figures used for context size and speed."""

    total_bytes: int
    label: str
    gpu: GpuProfile
    gpu_is_reference: bool
    """True when the budget was a size, so ``gpu`` only supplies context, workspace and speed figures."""
    context_bytes: int
    cublas_bytes: int
    """cuBLAS workspaces, two handles (forward and backward thread), allocated through the caching allocator."""


@dataclass(frozen=True)
class Candidate:
    """One configuration and its predictions."""

    gamma: int
    micro_batch_size: int
    accumulation_steps: int
    sequence_length: int
    precision: str
    gradient_checkpointing: bool
    tensor_peak_bytes: int
    peak_bytes: int
    """Tensor peak plus cuBLAS workspaces and CUDA context: the predicted device memory at the peak."""
    tokens_per_second: float

    @property
    def effective_batch(self) -> int:
        """Sequences per optimizer step."""
        return self.micro_batch_size * self.accumulation_steps


@dataclass(frozen=True)
class Rejection:
    """A configuration near the recommendation that does not fit, and why."""

    candidate: Candidate
    reason: str


@dataclass
class Plan:
    """The result of a search."""

    model_name: str
    num_layers: int
    budget: Budget
    margin: float
    usable_bytes: int
    sequences: list[int]
    rows: list[Candidate] = field(default_factory=list)
    """The fastest fitting configuration for each sequence length and gamma."""
    recommended: Candidate | None = None
    rejections: list[Rejection] = field(default_factory=list)
    advice: list[str] = field(default_factory=list)
    """Suggestions of what would fit, when nothing does."""


@dataclass(frozen=True)
class SearchSpace:
    """The settings a plan may choose from."""

    gammas: list[int]
    sequences: list[int]
    precisions: list[str]
    checkpointing: list[bool]
    micro_batches: list[int]
    effective_batch: int | None
    recommend_gamma: int


def predict(
    fit: MemoryFit, budget: Budget, gamma: int, micro_batch: int, sequence: int, effective_batch: int | None
) -> Candidate:
    """Predict memory and speed of one configuration."""
    # NOTE: the fit traces one micro-batch per optimizer step. With accumulation, the gradients of the first
    # micro-batch stay alive through the next ones' forward and backward, so the real peak is higher: 10% to 21%
    # on tiny-llama on the CPU with 2 micro-batches of 4 x 48 tokens. SimulationConfig.gradient_accumulation_steps
    # traces this.
    tensor = fit.tensor_peak_bytes(gamma, micro_batch, sequence)
    accumulation = effective_batch // micro_batch if effective_batch else 1
    speed = estimate_speed(
        fit, budget.gpu, gamma=gamma, micro_batch_size=micro_batch, accumulation_steps=accumulation, sequence=sequence
    )
    return Candidate(
        gamma=gamma,
        micro_batch_size=micro_batch,
        accumulation_steps=accumulation,
        sequence_length=sequence,
        precision=fit.precision,
        gradient_checkpointing=fit.gradient_checkpointing,
        tensor_peak_bytes=tensor,
        peak_bytes=tensor + budget.cublas_bytes + budget.context_bytes,
        tokens_per_second=speed.tokens_per_second,
    )


def _device_bytes(fit: MemoryFit, budget: Budget, gamma: int, batch: int, sequence: int) -> int:
    return fit.tensor_peak_bytes(gamma, batch, sequence) + budget.cublas_bytes + budget.context_bytes


def _fits_with(fit: MemoryFit, budget: Budget, usable: int, gamma: int, sequence: int) -> Callable[[int], bool]:
    def fits(batch: int) -> bool:
        return _device_bytes(fit, budget, gamma, batch, sequence) <= usable

    return fits


def usable_bytes(budget: Budget, margin: float) -> int:
    """Return the bytes a configuration may use: the budget less the safety margin, rounded down."""
    return math.floor(budget.total_bytes * (1.0 - margin))


def longest_fitting_sequence(
    fit: MemoryFit, budget: Budget, usable: int, gamma: int, batch: int, limit: int | None
) -> int | None:
    """Return the longest sequence, up to ``limit`` or ``MAX_SEQUENCE`` tokens, that fits ``usable`` bytes."""

    def fits(sequence: int) -> bool:
        return _device_bytes(fit, budget, gamma, batch, sequence) <= usable

    return largest_fitting(range(1, (limit or MAX_SEQUENCE) + 1), fits)


def largest_fitting(values: Sequence[int], fits: Callable[[int], bool]) -> int | None:
    """Return the largest of the sorted ``values`` for which ``fits`` holds; memory grows with each of them."""
    low, high = 0, len(values) - 1
    best: int | None = None
    while low <= high:
        middle = (low + high) // 2
        if fits(values[middle]):
            best = values[middle]
            low = middle + 1
        else:
            high = middle - 1
    return best


def _preference(candidate: Candidate) -> tuple[float, int, int]:
    # Fastest first; among equals, no recomputation and the lower precision's smaller memory.
    return (candidate.tokens_per_second, -int(candidate.gradient_checkpointing), -candidate.peak_bytes)


def search(
    fits: FitProvider, budget: Budget, margin: float, space: SearchSpace, model_name: str, num_layers: int
) -> Plan:
    """Find, for every sequence length and gamma, the fastest configuration that fits the budget after ``margin``."""
    usable = usable_bytes(budget, margin)
    plan = Plan(model_name, num_layers, budget, margin, usable, list(space.sequences))
    combos = [(precision, checkpointing) for precision in space.precisions for checkpointing in space.checkpointing]

    for sequence in space.sequences:
        for gamma in space.gammas:
            best: Candidate | None = None
            for precision, checkpointing in combos:
                fit = fits(precision, checkpointing)
                batch = largest_fitting(space.micro_batches, _fits_with(fit, budget, usable, gamma, sequence))
                if batch is None:
                    continue
                candidate = predict(fit, budget, gamma, batch, sequence, space.effective_batch)
                if best is None or _preference(candidate) > _preference(best):
                    best = candidate
            if best is not None:
                plan.rows.append(best)

    if not plan.rows:
        plan.advice = _what_would_fit(fits, budget, usable, space, combos)
        return plan

    longest = max(row.sequence_length for row in plan.rows)
    at_longest = [row for row in plan.rows if row.sequence_length == longest]
    gammas = [row.gamma for row in at_longest if row.gamma <= space.recommend_gamma]
    gamma = max(gammas) if gammas else min(row.gamma for row in at_longest)
    plan.recommended = next(row for row in at_longest if row.gamma == gamma)
    plan.rejections = _nearest_rejections(fits, budget, usable, space, combos, plan.recommended)
    return plan


def _nearest_rejections(
    fits: FitProvider,
    budget: Budget,
    usable: int,
    space: SearchSpace,
    combos: list[tuple[str, bool]],
    chosen: Candidate,
) -> list[Rejection]:
    rejections: list[Rejection] = []
    fit = fits(chosen.precision, chosen.gradient_checkpointing)
    larger = [b for b in space.micro_batches if b > chosen.micro_batch_size]
    if larger:
        candidate = predict(fit, budget, chosen.gamma, larger[0], chosen.sequence_length, space.effective_batch)
        rejections.append(Rejection(candidate, f"micro-batch {larger[0]} exceeds the usable memory"))
    higher = [g for g in space.gammas if g > chosen.gamma]
    if higher:
        candidate = predict(
            fit, budget, higher[0], chosen.micro_batch_size, chosen.sequence_length, space.effective_batch
        )
        if candidate.peak_bytes > usable:
            rejections.append(Rejection(candidate, f"gamma {higher[0]} at the same micro-batch exceeds it"))
    for precision, checkpointing in combos:
        if (precision, checkpointing) == (chosen.precision, chosen.gradient_checkpointing):
            continue
        other = fits(precision, checkpointing)
        smallest = predict(
            other, budget, chosen.gamma, space.micro_batches[0], chosen.sequence_length, space.effective_batch
        )
        if smallest.peak_bytes > usable:
            setting = f"{precision}, checkpointing {'on' if checkpointing else 'off'}"
            rejections.append(
                Rejection(smallest, f"{setting} does not fit even at micro-batch {smallest.micro_batch_size}")
            )
    return rejections


def _what_would_fit(
    fits: FitProvider, budget: Budget, usable: int, space: SearchSpace, combos: list[tuple[str, bool]]
) -> list[str]:
    advice: list[str] = []
    gamma = min(space.gammas)
    batch = space.micro_batches[0]
    sequence = min(space.sequences)
    needs = {combo: _device_bytes(fits(*combo), budget, gamma, batch, sequence) for combo in combos}
    cheapest = min(needs, key=lambda combo: needs[combo])
    advice.append(
        f"the smallest configuration searched (gamma {gamma}, micro-batch {batch}, sequence {sequence}, "
        f"{cheapest[0]}, checkpointing {'on' if cheapest[1] else 'off'}) needs {needs[cheapest] / 1e9:.2f} GB "
        f"of device memory; {usable / 1e9:.2f} GB is usable"
    )

    fit = fits(*cheapest)
    longest = longest_fitting_sequence(fit, budget, usable, gamma, batch, fit.max_positions)
    if longest is not None:
        advice.append(f"a sequence length of {longest} tokens fits at gamma {gamma}, micro-batch {batch}")

    savings = [("bf16", True), ("bf16", False), ("amp-bf16", True)]
    for precision, checkpointing in savings:
        if (precision, checkpointing) in combos:
            continue
        need = _device_bytes(fits(precision, checkpointing), budget, gamma, batch, sequence)
        if need <= usable:
            advice.append(
                f"--precision {precision} {'--grad-ckpt' if checkpointing else '--no-grad-ckpt'} fits "
                f"({need / 1e9:.2f} GB)"
            )
            break

    always_trained = 3 * fit.always_trainable_count * fit.state_element_bytes
    advice.append(
        f"the embedding and LM head are always trained: their gradients and AdamW state take "
        f"{always_trained / 1e9:.2f} GB; lisa-tune estimate --freeze-embedding predicts a run with a frozen "
        "embedding, which the planner does not search"
    )

    if longest is None:
        parameters_only = fit.parameter_bytes + budget.cublas_bytes + budget.context_bytes
        if parameters_only > usable:
            advice.append(f"the weights and CUDA context alone need {parameters_only / 1e9:.2f} GB: use a larger GPU")
    return advice
