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

FitProvider = Callable[[str, bool, bool], MemoryFit]
"""Return the memory fit for a precision, a checkpointing choice, and whether steps accumulate gradients."""


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
    """Predict memory and speed of one configuration; ``fit`` must be the one ``step_fit`` returns for it."""
    accumulation = accumulation_steps(micro_batch, effective_batch)
    if fit.accumulating != (accumulation > 1):
        raise ValueError(f"a fit with accumulating={fit.accumulating} cannot predict {accumulation} micro-batches")
    tensor = fit.tensor_peak_bytes(gamma, micro_batch, sequence)
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


def accumulation_steps(micro_batch: int, effective_batch: int | None) -> int:
    """Return the micro-batches per optimizer step."""
    return effective_batch // micro_batch if effective_batch else 1


def step_fit(
    fits: FitProvider, precision: str, checkpointing: bool, micro_batch: int, effective_batch: int | None
) -> MemoryFit:
    """Return the fit that predicts a step of ``micro_batch`` sequences: with accumulation, the accumulating one.

    From the second micro-batch of a step on, forward and backward run with the gradients of the earlier ones
    alive, so a step with accumulation peaks higher than one micro-batch alone.
    """
    return fits(precision, checkpointing, accumulation_steps(micro_batch, effective_batch) > 1)


def _device_bytes(fit: MemoryFit, budget: Budget, gamma: int, batch: int, sequence: int) -> int:
    return fit.tensor_peak_bytes(gamma, batch, sequence) + budget.cublas_bytes + budget.context_bytes


def _largest_micro_batch(
    fits: FitProvider,
    budget: Budget,
    usable: int,
    combo: tuple[str, bool],
    gamma: int,
    sequence: int,
    space: SearchSpace,
) -> int | None:
    def fitting(batch: int) -> bool:
        fit = step_fit(fits, *combo, batch, space.effective_batch)
        return _device_bytes(fit, budget, gamma, batch, sequence) <= usable

    if space.effective_batch:
        # Memory is not monotonic in the micro-batch here: the largest one needs no accumulation, so the few
        # divisors of the effective batch are all checked.
        return max((batch for batch in space.micro_batches if fitting(batch)), default=None)
    return largest_fitting(space.micro_batches, fitting)


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
                batch = _largest_micro_batch(fits, budget, usable, (precision, checkpointing), gamma, sequence, space)
                if batch is None:
                    continue
                fit = step_fit(fits, precision, checkpointing, batch, space.effective_batch)
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
    combo = (chosen.precision, chosen.gradient_checkpointing)
    fit = step_fit(fits, *combo, chosen.micro_batch_size, space.effective_batch)
    larger = [b for b in space.micro_batches if b > chosen.micro_batch_size]
    if larger:
        larger_fit = step_fit(fits, *combo, larger[0], space.effective_batch)
        candidate = predict(larger_fit, budget, chosen.gamma, larger[0], chosen.sequence_length, space.effective_batch)
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
        other = step_fit(fits, precision, checkpointing, space.micro_batches[0], space.effective_batch)
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
    needs = {
        combo: _device_bytes(step_fit(fits, *combo, batch, space.effective_batch), budget, gamma, batch, sequence)
        for combo in combos
    }
    cheapest = min(needs, key=lambda combo: needs[combo])
    advice.append(
        f"the smallest configuration searched (gamma {gamma}, micro-batch {batch}, sequence {sequence}, "
        f"{cheapest[0]}, checkpointing {'on' if cheapest[1] else 'off'}) needs {needs[cheapest] / 1e9:.2f} GB "
        f"of device memory; {usable / 1e9:.2f} GB is usable"
    )

    fit = step_fit(fits, *cheapest, batch, space.effective_batch)
    longest = longest_fitting_sequence(fit, budget, usable, gamma, batch, fit.max_positions)
    if longest is not None:
        advice.append(f"a sequence length of {longest} tokens fits at gamma {gamma}, micro-batch {batch}")

    savings = [("bf16", True), ("bf16", False), ("amp-bf16", True)]
    for precision, checkpointing in savings:
        if (precision, checkpointing) in combos:
            continue
        other = step_fit(fits, precision, checkpointing, batch, space.effective_batch)
        need = _device_bytes(other, budget, gamma, batch, sequence)
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
