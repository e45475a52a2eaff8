"""The planner's closed-form memory fit against full traces, its search and its speed model."""

from __future__ import annotations

from pathlib import Path

import pytest

from lisa_tune.lisa.precision import Precision
from lisa_tune.memory.simulator import SimulationConfig, simulate
from lisa_tune.planner.cache import fit_key, load_fit, store_fit
from lisa_tune.planner.command import PlanOptions, make_plan, parse_budget
from lisa_tune.planner.fit import fit_memory
from lisa_tune.planner.memory_fit import MemoryFit
from lisa_tune.planner.search import largest_fitting
from lisa_tune.planner.speed import flops_per_token
from lisa_tune.profiles import find_gpu_profile, resolve_model

TOLERANCE = 0.005

# (model, attention, precision, checkpointing, gamma, batch, sequence); gamma None is full fine-tuning.
FIT_SAMPLE = [
    ("tiny-llama", "sdpa", "bf16", False, 1, 1, 512),
    ("tiny-llama", "sdpa", "bf16", True, 3, 5, 384),
    ("tiny-llama", "sdpa", "fp32", False, None, 2, 1024),
    ("tiny-qwen2", "sdpa", "bf16", False, 2, 8, 256),
    ("tiny-qwen2", "sdpa", "amp-bf16", True, 1, 3, 640),
    ("tiny-gpt2", "sdpa", "fp32", True, 2, 1, 1024),
    ("tiny-gpt2", "eager", "bf16", False, 3, 2, 512),
    ("tiny-gpt-neox", "sdpa", "bf16", False, 4, 4, 256),
]


@pytest.fixture(scope="module")
def fits() -> dict[tuple[str, str, str, bool], MemoryFit]:
    return {}


def get_fit(
    cache: dict[tuple[str, str, str, bool], MemoryFit], model: str, attention: str, precision: str, checkpointing: bool
) -> MemoryFit:
    key = (model, attention, precision, checkpointing)
    if key not in cache:
        cache[key] = fit_memory(
            resolve_model(model).config,
            model,
            precision=precision,
            gradient_checkpointing=checkpointing,
            attention=attention,
        )
    return cache[key]


@pytest.mark.parametrize(("model", "attention", "precision", "checkpointing", "gamma", "batch", "sequence"), FIT_SAMPLE)
def test_fit_matches_full_trace(
    fits: dict[tuple[str, str, str, bool], MemoryFit],
    model: str,
    attention: str,
    precision: str,
    checkpointing: bool,
    gamma: int | None,
    batch: int,
    sequence: int,
) -> None:
    fit = get_fit(fits, model, attention, precision, checkpointing)
    predicted = fit.tensor_peak_bytes(fit.num_layers if gamma is None else gamma, batch, sequence)
    traced = simulate(
        SimulationConfig(
            model_config=resolve_model(model).config,
            gamma=gamma,
            micro_batch_size=batch,
            sequence_length=sequence,
            precision=Precision(precision),
            gradient_checkpointing=checkpointing,
            attention=attention,
        )
    ).tensor_peak_bytes
    assert abs(predicted - traced) / traced <= TOLERANCE


# (model, precision, checkpointing, gamma, micro-batch, sequence) of steps with gradient accumulation.
ACCUMULATION_SAMPLE = [
    ("tiny-llama", "fp32", False, 1, 4, 48),
    ("tiny-llama", "bf16", True, 2, 3, 384),
    ("tiny-qwen2", "amp-bf16", False, 1, 2, 256),
]


@pytest.mark.parametrize(("model", "precision", "checkpointing", "gamma", "batch", "sequence"), ACCUMULATION_SAMPLE)
def test_accumulating_fit_matches_trace(
    model: str, precision: str, checkpointing: bool, gamma: int, batch: int, sequence: int
) -> None:
    config = resolve_model(model).config
    fit = fit_memory(config, model, precision=precision, gradient_checkpointing=checkpointing, accumulating=True)
    single = fit_memory(config, model, precision=precision, gradient_checkpointing=checkpointing)
    predicted = fit.tensor_peak_bytes(gamma, batch, sequence)
    for steps in (2, 4):
        traced = simulate(
            SimulationConfig(
                model_config=config,
                gamma=gamma,
                micro_batch_size=batch,
                sequence_length=sequence,
                precision=Precision(precision),
                gradient_checkpointing=checkpointing,
                gradient_accumulation_steps=steps,
            )
        ).tensor_peak_bytes
        assert abs(predicted - traced) / traced <= TOLERANCE, steps
    # The earlier micro-batches' gradients stay alive, so the step peaks higher than one micro-batch alone.
    assert predicted > single.tensor_peak_bytes(gamma, batch, sequence)


def test_plan_with_accumulation_uses_accumulating_fit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LISA_TUNE_CACHE_DIR", str(tmp_path))
    plan, fits = make_plan(
        PlanOptions(gpu="24GB", model="tiny-llama", sequences="256", gamma=2, effective_batch=8, precisions=("fp32",))
    )
    assert plan.recommended is not None
    for row in plan.rows:
        traced = simulate(
            SimulationConfig(
                model_config=resolve_model("tiny-llama").config,
                gamma=row.gamma,
                micro_batch_size=row.micro_batch_size,
                sequence_length=row.sequence_length,
                precision=Precision(row.precision),
                gradient_checkpointing=row.gradient_checkpointing,
                gradient_accumulation_steps=row.accumulation_steps,
            )
        ).tensor_peak_bytes
        assert abs(row.tensor_peak_bytes - traced) / traced <= TOLERANCE, row
    single = fits("fp32", False, False)
    accumulating = fits("fp32", False, True)
    assert accumulating.accumulating and not single.accumulating
    assert accumulating.tensor_peak_bytes(2, 1, 256) > single.tensor_peak_bytes(2, 1, 256)


def test_plan_rows_match_simulator(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Every configuration a real plan reports, sampled, against the simulator's own full estimate.
    monkeypatch.setenv("LISA_TUNE_CACHE_DIR", str(tmp_path))
    plan, _ = make_plan(PlanOptions(gpu="rtx4090", model="llama-2-7b", precisions=("bf16",)))
    assert plan.recommended is not None
    sample = [plan.rows[0], plan.recommended, plan.rows[-1]]
    gpu = find_gpu_profile("rtx4090")
    for row in sample:
        estimate = simulate(
            SimulationConfig(
                model_config=resolve_model("llama-2-7b").config,
                gamma=row.gamma,
                micro_batch_size=row.micro_batch_size,
                sequence_length=row.sequence_length,
                precision=Precision(row.precision),
                gradient_checkpointing=row.gradient_checkpointing,
                gpu=gpu,
            )
        )
        assert estimate.device is not None
        simulated = estimate.device.allocated_bytes + estimate.device.cuda_context_bytes
        assert abs(row.peak_bytes - simulated) / simulated <= TOLERANCE, row
        assert row.peak_bytes <= plan.usable_bytes


def test_fit_cache_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LISA_TUNE_CACHE_DIR", str(tmp_path))
    config = resolve_model("tiny-llama").config
    fit = fit_memory(config, "tiny-llama", precision="bf16", gradient_checkpointing=False)
    store_fit(fit)
    loaded = load_fit(fit.key)
    assert loaded is not None
    assert loaded.tensor_peak_bytes(2, 3, 700) == fit.tensor_peak_bytes(2, 3, 700)


def test_fit_key_tracks_inputs() -> None:
    config = dict(resolve_model("tiny-llama").config)
    base = fit_key(config, "bf16", False, "sdpa", "foreach")
    assert fit_key(config, "fp32", False, "sdpa", "foreach") != base
    assert fit_key(config, "bf16", True, "sdpa", "foreach") != base
    config["hidden_size"] = 512
    assert fit_key(config, "bf16", False, "sdpa", "foreach") != base


def test_largest_fitting_boundary() -> None:
    values = list(range(1, 65))
    assert largest_fitting(values, lambda value: value <= 37) == 37
    assert largest_fitting(values, lambda value: False) is None
    assert largest_fitting(values, lambda value: True) == 64


def test_full_fine_tuning_flops_are_six_per_parameter(fits: dict[tuple[str, str, str, bool], MemoryFit]) -> None:
    # Without attention (sequence 0) a full fine-tuning step costs 6 FLOPs per matrix parameter per token.
    fit = get_fit(fits, "tiny-llama", "sdpa", "bf16", False)
    matrix_parameters = fit.num_layers * fit.layer_parameter_count + fit.vocab_size * fit.hidden_size
    assert flops_per_token(fit, fit.num_layers, 0, False) == 6 * matrix_parameters


def test_checkpointing_adds_recompute(fits: dict[tuple[str, str, str, bool], MemoryFit]) -> None:
    fit = get_fit(fits, "tiny-llama", "sdpa", "bf16", False)
    assert flops_per_token(fit, 2, 512, True) > flops_per_token(fit, 2, 512, False)


def test_size_budget_units() -> None:
    assert parse_budget("24GB").total_bytes == 24 * 10**9
    assert parse_budget("24GiB").total_bytes == 24 * 2**30
    assert parse_budget("a100-80gb").total_bytes == find_gpu_profile("a100-80gb").memory_bytes
