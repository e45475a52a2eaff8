"""Fit a ``MemoryFit`` by tracing reduced models with the memory simulator (imports torch)."""

from __future__ import annotations

import copy
import logging
import re
from typing import Any

import numpy as np

from lisa_tune.errors import LisaTuneError
from lisa_tune.lisa.layers import find_decoder_layers
from lisa_tune.lisa.optim import AdamWImplementation
from lisa_tune.lisa.precision import Precision
from lisa_tune.memory.simulator import SimulationConfig, simulate
from lisa_tune.memory.tracker import StorageTracker
from lisa_tune.model_config import hidden_size, layer_count, max_positions
from lisa_tune.modeling import build_model
from lisa_tune.planner.cache import fit_key, library_versions
from lisa_tune.planner.memory_fit import (
    ACTIVE,
    FIT_VARIANTS,
    FROZEN_REST,
    FROZEN_TOP,
    LINEAR_POINTS,
    QUADRATIC_POINTS,
    MemoryFit,
    PhaseLines,
)

logger = logging.getLogger(__name__)

_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


class FitError(LisaTuneError):
    """Traces of one model did not line up, so no closed-form fit exists."""


def reduced_config(config: dict[str, Any], layers: int) -> dict[str, Any]:
    """Return ``config`` with ``layers`` decoder layers; per-layer lists are cut to that length."""
    reduced = copy.deepcopy(config)
    for key in _LAYER_KEYS:
        if key in reduced:
            reduced[key] = layers
    for key in ("layer_types", "mlp_only_layers"):
        value = reduced.get(key)
        if isinstance(value, list) and len(value) > layers:
            reduced[key] = value[:layers]
    return reduced


_LAYER_INDEX = re.compile(r"\.(?:layers|h|blocks)\.(\d+)(?:\.|$)")


def segment_of(phase: str, module: str, layers: int, gamma: int) -> str:
    """Name the part of the step an allocation belongs to, the same way for every layer count and gamma.

    Decoder layers are named by role, not index: ``active`` (the top gamma layers), ``frozen-top`` (the frozen
    layer just below them) and ``frozen-rest``. Identical layers of one role reach their highest live bytes at
    the same end of their run, so each segment's peak is affine in the layer count and gamma.
    """
    match = _LAYER_INDEX.search(module)
    if match is None:
        return f"{phase}|{module}"
    index = int(match.group(1))
    if index >= layers - gamma:
        role = ACTIVE
    elif index == layers - gamma - 1:
        role = FROZEN_TOP
    else:
        role = FROZEN_REST
    return f"{phase}|{role}"


def _live_at_allocations(tracker: StorageTracker, layers: int, gamma: int) -> tuple[np.ndarray, list[str]]:
    """Return the live bytes right after each allocation event, and the segment of each."""
    values: list[int] = []
    segments: list[str] = []
    for _index, context, live in tracker.live_at_allocations():
        values.append(live)
        segments.append(segment_of(context.phase, context.module, layers, gamma))
    return np.asarray(values, dtype=np.float64), segments


def pareto_front(c: np.ndarray, d: np.ndarray, e: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Drop the lines c + d*T + e*Q that another line bounds from above for every T, Q >= 0."""
    order = np.lexsort((-e, -d, -c))
    front: list[int] = []
    for index in order:
        dominated = any(d[k] >= d[index] and e[k] >= e[index] for k in front)
        if not dominated:
            front.append(int(index))
    keep = np.asarray(sorted(front), dtype=np.int64)
    return c[keep], d[keep], e[keep]


def fit_memory(
    model_config: dict[str, Any],
    model_name: str,
    *,
    precision: str,
    gradient_checkpointing: bool,
    attention: str = "sdpa",
    adamw: str = "foreach",
    accumulating: bool = False,
) -> MemoryFit:
    """Trace the reduced models and return the fitted memory model of the full one.

    ``accumulating`` traces steps of two micro-batches, whose peak is that of any step with gradient accumulation:
    from the second micro-batch on, the same gradients are alive, so more micro-batches add nothing.
    """
    num_layers = layer_count(model_config)
    if num_layers is None:
        raise FitError(f"the config of model {model_name} states no layer count")
    points = QUADRATIC_POINTS if attention == "eager" else LINEAR_POINTS
    design = np.array([[1.0, b * s, b * s * s] for b, s in points])
    if attention != "eager":
        design = design[:, :2]

    per_variant: list[dict[str, tuple[np.ndarray, ...]]] = []
    for layers, gamma in FIT_VARIANTS:
        lives: list[np.ndarray] = []
        phases: list[str] = []
        for batch, sequence in points:
            estimate = simulate(
                SimulationConfig(
                    model_config=reduced_config(model_config, layers),
                    model_name=model_name,
                    gamma=gamma,
                    micro_batch_size=batch,
                    sequence_length=sequence,
                    precision=Precision(precision),
                    gradient_checkpointing=gradient_checkpointing,
                    attention=attention,
                    adamw=AdamWImplementation(adamw),
                    gradient_accumulation_steps=2 if accumulating else 1,
                ),
                keep_trace=True,
                steady_state_only=True,
            )
            assert estimate.trace is not None
            live, phase_names = _live_at_allocations(estimate.trace, layers, gamma)
            if lives and (len(live) != len(lives[0]) or phase_names != phases):
                raise FitError(
                    f"traces of {model_name} at different batch and sequence sizes allocate differently; "
                    "estimate its configurations one by one with lisa-tune estimate"
                )
            lives.append(live)
            phases = phase_names
        solution = np.linalg.solve(design, np.vstack(lives))
        coefficients = list(solution) + ([np.zeros_like(solution[0])] if attention != "eager" else [])
        grouped: dict[str, tuple[np.ndarray, ...]] = {}
        phase_array = np.asarray(phases)
        for phase in dict.fromkeys(phases):
            mask = phase_array == phase
            grouped[phase] = tuple(coefficient[mask] for coefficient in coefficients)
        per_variant.append(grouped)

    shared = set(per_variant[0])
    for grouped in per_variant[1:]:
        shared &= set(grouped)
    phases_out: dict[str, PhaseLines] = {}
    for phase in sorted(shared):
        pruned = [pareto_front(*grouped[phase]) for grouped in per_variant]
        phases_out[phase] = PhaseLines(
            c=[lines[0].tolist() for lines in pruned],
            d=[lines[1].tolist() for lines in pruned],
            e=[lines[2].tolist() for lines in pruned],
        )
    sizes = _model_sizes(model_config, precision, attention)
    return MemoryFit(
        key=fit_key(model_config, precision, gradient_checkpointing, attention, adamw, accumulating),
        model_name=model_name,
        num_layers=num_layers,
        precision=precision,
        gradient_checkpointing=gradient_checkpointing,
        attention=attention,
        adamw=adamw,
        phases=phases_out,
        versions=library_versions(),
        accumulating=accumulating,
        **sizes,
    )


def _model_sizes(model_config: dict[str, Any], precision: str, attention: str) -> dict[str, Any]:
    model = build_model(
        model_config, device="meta", dtype=Precision(precision).parameter_dtype, attn_implementation=attention
    )
    decoder = find_decoder_layers(model)
    parameters = {id(p): p for p in model.parameters()}
    layer_parameters = sum(p.numel() for p in {id(p): p for p in decoder.layers[0].parameters()}.values())
    total = sum(p.numel() for p in parameters.values())
    storages = {
        t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in [*parameters.values(), *model.buffers()]
    }
    heads = int(model_config.get("num_attention_heads") or model_config.get("n_head") or 1)
    hidden = hidden_size(model_config) or 0
    head_dim = int(model_config.get("head_dim") or hidden // heads)
    return {
        "hidden_size": hidden,
        "attention_width": heads * head_dim,
        "vocab_size": int(model_config.get("vocab_size") or 0),
        "max_positions": max_positions(model_config),
        "parameter_count": total,
        "layer_parameter_count": layer_parameters,
        "always_trainable_count": total - len(decoder) * layer_parameters,
        "parameter_bytes": sum(storages.values()),
        "state_element_bytes": Precision(precision).parameter_dtype.itemsize,
    }
