"""The tuner's search space: parsing the ``tune`` options and listing the configurations the budget admits."""

from __future__ import annotations

import math
from dataclasses import dataclass

from lisa_tune.errors import InputError

DEFAULT_INTERVALS = (5, 10, 20)
DEFAULT_GAMMAS = (1, 2, 4, 8)
PERIODS_PER_TRIAL = 3
"""A trial covers at least this many sampling periods of the largest K, so a large K is not judged on one draw."""


def parse_int_list(text: str, option: str, low: int = 1, high: int | None = None, high_name: str = "") -> list[int]:
    """Parse ``1,2,4`` or a range ``1-8`` (both ends included) into sorted distinct integers within limits."""
    values: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        bounds = part.split("-", 1) if "-" in part[1:] else [part, part]
        try:
            start, end = int(bounds[0]), int(bounds[1])
        except ValueError:
            raise InputError(
                f"invalid {option} {text!r}: pass integers such as 1,2,4 or a range such as 1-8."
            ) from None
        if start > end:
            raise InputError(f"invalid {option} {text!r}: the range {part} is empty; write it low-high.")
        values.update(range(start, end + 1))
    outside = sorted(v for v in values if v < low or (high is not None and v > high))
    if outside:
        listed = ", ".join(map(str, outside))
        if high is None:
            raise InputError(f"invalid {option} {text!r}: {listed} below {low}; pass values of at least {low}.")
        raise InputError(f"invalid {option} {text!r}: {listed} outside {low} to {high}{high_name}.")
    return sorted(values)


@dataclass(frozen=True)
class LearningRate:
    """A fixed learning rate, or a log-uniform range the tuner searches."""

    low: float
    high: float

    @property
    def searched(self) -> bool:
        return self.high > self.low

    @classmethod
    def parse(cls, text: str) -> LearningRate:
        """Parse ``3e-4`` (fixed) or ``1e-5:1e-3`` (searched on a log scale)."""
        parts = text.split(":")
        try:
            values = [float(part) for part in parts]
        except ValueError:
            raise InputError(
                f"invalid --learning-rate {text!r}: pass a number such as 3e-4 or a range such as 1e-5:1e-3."
            ) from None
        if len(values) > 2 or any(not math.isfinite(v) or v <= 0 for v in values):
            raise InputError(
                f"invalid --learning-rate {text!r}: pass one positive number, or two separated by a colon."
            )
        low, high = values[0], values[-1]
        if low > high:
            raise InputError(f"invalid --learning-rate {text!r}: the range is empty; write it low:high.")
        return cls(low, high)


@dataclass(frozen=True)
class TuneSpace:
    """The values the tuner chooses among. Memory depends on gamma and micro-batch only."""

    gammas: list[int]
    intervals: list[int]
    micro_batches: list[int]
    batch: int
    """Sequences per optimizer step, the same in every trial so each trains on the same data."""
    learning_rate: LearningRate

    def memory_grid(self) -> list[tuple[int, int]]:
        """Return every (gamma, micro-batch) pair, the settings the memory prediction depends on."""
        return [(gamma, micro) for gamma in self.gammas for micro in self.micro_batches]

    def grid_size(self) -> int | None:
        """Return the number of distinct configurations, or None when the learning rate is searched."""
        if self.learning_rate.searched:
            return None
        return len(self.gammas) * len(self.intervals) * len(self.micro_batches)


def build_space(
    layers: int,
    gammas: str | None,
    intervals: str | None,
    micro_batches: str | None,
    batch: int | None,
    learning_rate: str,
) -> TuneSpace:
    """Validate the search options against the model's layer count and return the space."""
    if gammas is None:
        gamma_values = [g for g in DEFAULT_GAMMAS if g <= layers]
    else:
        gamma_values = parse_int_list(gammas, "--gamma", 1, layers, f" (the model's {layers} layers)")
    interval_values = list(DEFAULT_INTERVALS) if intervals is None else parse_int_list(intervals, "--interval (K)", 1)
    micro_values = [batch or 4] if micro_batches is None else parse_int_list(micro_batches, "--micro-batch", 1)
    sequences_per_step = batch if batch is not None else max(micro_values)
    if sequences_per_step < 1:
        raise InputError(f"invalid --batch {sequences_per_step}: pass at least 1 sequence per optimizer step.")
    uneven = [m for m in micro_values if sequences_per_step % m]
    if uneven:
        raise InputError(
            f"--micro-batch {', '.join(map(str, uneven))} does not divide --batch {sequences_per_step}; every trial "
            "takes the same number of sequences per optimizer step, so pass micro-batches that divide it."
        )
    return TuneSpace(
        gammas=gamma_values,
        intervals=interval_values,
        micro_batches=micro_values,
        batch=sequences_per_step,
        learning_rate=LearningRate.parse(learning_rate),
    )


def default_trial_steps(space: TuneSpace) -> int:
    """Return the shortest trial that covers ``PERIODS_PER_TRIAL`` periods of the largest K."""
    return PERIODS_PER_TRIAL * max(space.intervals)
