"""The memory simulator against a real CPU run, and the CUDA-specific behaviour it models."""

from __future__ import annotations

import statistics
from dataclasses import replace

import pytest
import torch

from lisa_tune.lisa.controller import OptimizerStatePolicy
from lisa_tune.lisa.optim import AdamWImplementation
from lisa_tune.lisa.precision import Precision
from lisa_tune.memory.categories import MemoryCategory
from lisa_tune.memory.groundtruth_cases import ground_truth_cases
from lisa_tune.memory.simulator import SimulationConfig, simulate
from lisa_tune.memory.validation import compare_with_cpu
from lisa_tune.modeling import build_model
from lisa_tune.profiles import find_gpu_profile, resolve_model


def tiny(name: str = "tiny-llama", **changes: object) -> dict[str, object]:
    config = dict(resolve_model(name).config)
    config.update(changes)
    return config


def test_cpu_ground_truth_within_tolerance() -> None:
    # 24 configurations: GQA with tied embeddings (tiny-qwen2) and GPT-2 (tied), gamma 1/2/all, checkpointing on
    # and off, bf16 and fp32, two batch and sequence sizes. The full table is in benchmarks/cpu_ground_truth.py.
    torch.set_num_threads(2)
    comparisons = [compare_with_cpu(case) for case in ground_truth_cases(models=("tiny-qwen2", "tiny-gpt2"))]
    errors = [abs(comparison.relative_error) for comparison in comparisons]
    assert len(errors) == 24
    assert statistics.median(errors) <= 0.01
    assert max(errors) <= 0.03


def test_cpu_prediction_counts_step_tensors() -> None:
    # On the CPU, AdamW's per-parameter step counters are CPU tensors; the CPU target counts them.
    config = SimulationConfig(model_config=tiny(), gamma=1, sequence_length=16, target_device="cpu")
    cuda = simulate(replace(config, target_device="cuda"))
    cpu = simulate(config)
    assert (
        cpu.at_optimizer_step[MemoryCategory.OPTIMIZER_STATES] > cuda.at_optimizer_step[MemoryCategory.OPTIMIZER_STATES]
    )


def activation_bytes(attention: str, sequence: int) -> int:
    config = SimulationConfig(
        model_config=tiny(max_position_embeddings=8192),
        gamma=None,
        micro_batch_size=1,
        sequence_length=sequence,
        precision=Precision.BF16,
        attention=attention,
    )
    return simulate(config).at_backward_start[MemoryCategory.ACTIVATIONS]


def test_cuda_sdpa_activations_linear_in_sequence() -> None:
    # Flash attention keeps the output and an fp32 log-sum-exp per head: O(sequence) memory.
    ratio = activation_bytes("sdpa", 2048) / activation_bytes("sdpa", 512)
    assert ratio == pytest.approx(4.0, rel=0.01)


def test_eager_activations_quadratic_in_sequence() -> None:
    # Eager attention saves the batch x heads x sequence x sequence scores, so 4x the tokens is far more than 4x.
    ratio = activation_bytes("eager", 2048) / activation_bytes("eager", 512)
    assert ratio > 6.0


def test_flash_backward_workspace_counted() -> None:
    # The flash backward's softmax_d and dq_accum are not outputs of the meta kernel. The workspace rule adds them
    # to the backward phase, which must then hold at least the parameters and that workspace.
    config = SimulationConfig(model_config=tiny(), gamma=None, micro_batch_size=4, sequence_length=512)
    estimate = simulate(config)
    heads, head_dim = 4, 64
    softmax_d = 4 * heads * 512 * 4
    dq_accum = 4 * 512 * heads * head_dim * 4
    assert estimate.peak.phase_peaks["backward"] >= estimate.at_optimizer_step[MemoryCategory.PARAMETERS] + (
        softmax_d + dq_accum
    )


def test_foreach_adamw_temporaries() -> None:
    # foreach AdamW materialises sqrt(exp_avg_sq) for a whole parameter group at once; fused AdamW does not.
    base = SimulationConfig(model_config=tiny(), gamma=None, sequence_length=16, precision=Precision.FP32)
    foreach = simulate(replace(base, adamw=AdamWImplementation.FOREACH))
    fused = simulate(replace(base, adamw=AdamWImplementation.FUSED))
    model = build_model(tiny(), device="meta", dtype=torch.float32)
    decayed_bytes = 4 * sum(parameter.numel() for parameter in model.parameters() if parameter.ndim >= 2)
    difference = foreach.peak.phase_peaks["optimizer step"] - fused.peak.phase_peaks["optimizer step"]
    assert difference >= decayed_bytes * 0.99


def test_reset_policy_bounds_optimizer_state() -> None:
    # 21 periods = 20 switches of gamma 2 on a 32-layer model.
    config = SimulationConfig(
        model_config=tiny(
            num_hidden_layers=32,
            hidden_size=64,
            intermediate_size=128,
            num_attention_heads=2,
            num_key_value_heads=1,
            vocab_size=512,
        ),
        gamma=2,
        sequence_length=8,
        periods=21,
        policy=OptimizerStatePolicy.RESET,
        precision=Precision.FP32,
    )
    reset = simulate(config)
    persistent = simulate(replace(config, policy=OptimizerStatePolicy.PERSISTENT))

    layer_parameters = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64
    always_trainable = 512 * 64 * 2 + 64
    assert reset.layers_with_optimizer_state == reset.active_layers
    assert reset.optimizer_state_bytes_at_end == 2 * 4 * (always_trainable + 2 * layer_parameters)
    assert persistent.layers_with_optimizer_state == persistent.visited_layers
    visited = len(persistent.visited_layers)
    assert persistent.optimizer_state_bytes_at_end == 2 * 4 * (always_trainable + visited * layer_parameters)
    # Expected layers visited after 21 draws of 2 of 32: 32 * (1 - (30/32)^21), about 23.7.
    assert 18 <= visited <= 29
    assert persistent.tensor_peak_bytes > reset.tensor_peak_bytes


def test_amp_bf16_keeps_fp32_state() -> None:
    config = SimulationConfig(model_config=tiny(), gamma=None, sequence_length=64, precision=Precision.AMP_BF16)
    estimate = simulate(config)
    parameters = estimate.parameter_count
    assert estimate.at_optimizer_step[MemoryCategory.GRADIENTS] == 4 * parameters
    assert estimate.at_optimizer_step[MemoryCategory.OPTIMIZER_STATES] == 8 * parameters


def test_amp_bf16_activations_below_fp32() -> None:
    base = SimulationConfig(model_config=tiny(), gamma=None, sequence_length=256)
    amp = simulate(replace(base, precision=Precision.AMP_BF16))
    fp32 = simulate(replace(base, precision=Precision.FP32))
    amp_activations = amp.at_backward_start[MemoryCategory.ACTIVATIONS]
    fp32_activations = fp32.at_backward_start[MemoryCategory.ACTIVATIONS]
    assert amp_activations < fp32_activations
    assert amp_activations > fp32_activations / 2


def test_breakdown_sums_to_device_total() -> None:
    config = SimulationConfig(model_config=tiny(), gamma=2, sequence_length=128, gpu=find_gpu_profile("rtx4090"))
    estimate = simulate(config)
    assert estimate.device is not None
    assert sum(estimate.breakdown().values()) == estimate.device.total_bytes


def test_allocator_figures_ordered() -> None:
    estimate = simulate(SimulationConfig(model_config=tiny(), gamma=2, sequence_length=128))
    assert estimate.device is not None
    assert estimate.device.allocated_bytes >= estimate.tensor_peak_bytes
    assert estimate.device.reserved_bytes >= estimate.device.allocated_bytes


def test_peak_location_reported() -> None:
    estimate = simulate(SimulationConfig(model_config=tiny(), gamma=None, sequence_length=256))
    assert estimate.peak.context.phase in {"forward", "backward", "optimizer step"}
    assert estimate.peak.context.step == 2


def test_worst_case_placement_bounds_draws() -> None:
    # The top gamma layers give the highest backward peak: their gradients appear while most activations live.
    base = SimulationConfig(model_config=tiny(num_hidden_layers=8), gamma=2, sequence_length=256)
    worst = simulate(base)
    assert worst.active_layers == [6, 7]
    for seed in range(4):
        sampled = simulate(replace(base, worst_case_layers=False, seed=seed))
        assert sampled.tensor_peak_bytes <= worst.tensor_peak_bytes
