"""A closed-form memory model of one model's LISA step, fitted from a few small traces.

Every allocation in a traced step has a size that is affine in the tokens per micro-batch T = batch x sequence
(and, with eager attention, in Q = batch x sequence^2 for the score matrices), and the order of allocations does
not depend on them. So two traces (three with eager attention) give, for each allocation event, the live bytes
as c + d*T (+ e*Q), and the peak of any batch and sequence is the maximum of those lines, exactly.

Layers and gamma are handled by traces of reduced models with the active layers at the top, the placement the
simulator traces. At fixed T the peak of each part of the step is affine in the layer count and in gamma. So three
reduced models (4 layers with gamma 1 and 2, 5 layers with gamma 1) extrapolate to the full model. Tests compare the
result with full traces (``tests/test_planner.py``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

FIT_VARIANTS = ((4, 1), (4, 2), (5, 1))
"""(layers, gamma) of the reduced models that are traced."""
LINEAR_POINTS = ((2, 128), (3, 128))
"""(micro-batch, sequence) of the traces when memory is affine in tokens (sdpa attention).

A batch of 1 is avoided: some operators skip a copy when a dimension has size 1, so its trace allocates
differently. The fit therefore slightly over-predicts micro-batch 1, by those copies."""
QUADRATIC_POINTS = ((2, 128), (3, 128), (2, 256))
ACTIVE = "active"
FROZEN_TOP = "frozen-top"
FROZEN_REST = "frozen-rest"
"""The traces with eager attention, whose score matrices grow with batch x sequence^2."""


@dataclass
class PhaseLines:
    """Live bytes at each allocation of one phase, per reduced model, as c + d*T + e*Q."""

    c: list[list[float]]
    d: list[list[float]]
    e: list[list[float]]


@dataclass
class MemoryFit:
    """The fitted memory model of one model, precision, checkpointing and attention setting."""

    key: str
    model_name: str
    num_layers: int
    precision: str
    gradient_checkpointing: bool
    attention: str
    adamw: str
    parameter_count: int
    layer_parameter_count: int
    """Parameters of one decoder layer."""
    always_trainable_count: int
    """Parameters outside the decoder layers: embedding, LM head, final norm."""
    parameter_bytes: int
    """Parameters and buffers, in bytes."""
    state_element_bytes: int
    """Bytes per element of weights, gradients and AdamW state."""
    hidden_size: int
    attention_width: int
    """Query heads x head dimension: the width of the attention score products."""
    vocab_size: int
    max_positions: int | None
    phases: dict[str, PhaseLines] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    accumulating: bool = False
    """Fitted from steps of two micro-batches: it predicts any step with gradient accumulation, where the second
    and later micro-batches run forward and backward with the earlier ones' gradients alive."""
    _arrays: dict[str, list[list[tuple[float, float, float]]]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def _lines(self, phase: str) -> list[list[tuple[float, float, float]]]:
        # Pareto pruning leaves a handful of lines per segment, so plain Python beats numpy's call overhead.
        arrays = self._arrays.get(phase)
        if arrays is None:
            lines = self.phases[phase]
            arrays = [list(zip(c, d, e, strict=True)) for c, d, e in zip(lines.c, lines.d, lines.e, strict=True)]
            self._arrays[phase] = arrays
        return arrays

    def phase_peaks(self, gamma: int, batch: int, sequence: int) -> dict[str, float]:
        """Return the predicted peak live tensor bytes of each segment (``phase|part``) of the step."""
        tokens = float(batch * sequence)
        squares = float(batch) * float(sequence) * float(sequence)
        base_layers, base_gamma = FIT_VARIANTS[0]
        peaks: dict[str, float] = {}
        frozen = self.num_layers - gamma
        for phase in self.phases:
            role = phase.rsplit("|", 1)[-1]
            if (role == FROZEN_TOP and frozen < 1) or (role == FROZEN_REST and frozen < 2):
                continue
            values = [max(c + tokens * d + squares * e for c, d, e in lines) for lines in self._lines(phase)]
            base, more_gamma, more_layers = values
            peaks[phase] = (
                base
                + (gamma - base_gamma) * (more_gamma - base)
                + (self.num_layers - base_layers) * (more_layers - base)
            )
        return peaks

    def tensor_peak_bytes(self, gamma: int, batch: int, sequence: int) -> int:
        """Return the predicted peak live tensor bytes of the step."""
        return round(max(self.phase_peaks(gamma, batch, sequence).values()))

    def trainable_parameters(self, gamma: int) -> int:
        """Return the parameters trained in one period."""
        return self.always_trainable_count + gamma * self.layer_parameter_count

    def to_json(self) -> str:
        """Serialise for the on-disk cache."""
        data = asdict(self)
        data.pop("_arrays")
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> MemoryFit:
        """Load a fit written by ``to_json``."""
        data: dict[str, Any] = json.loads(text)
        phases = {name: PhaseLines(**lines) for name, lines in data.pop("phases").items()}
        return cls(phases=phases, **data)
