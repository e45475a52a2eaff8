"""An estimate of LISA training throughput on a GPU, from the work of one step and the GPU's peak figures.

Work per token, in the style of Kaplan et al. 2020 (2 FLOPs per parameter per token for a forward matrix product):

- forward: 2 (L P_layer + V h) for the matrix products, plus 2 L S w for causal attention scores and values
  (S sequence length, w = heads x head dimension);
- backward, input gradients: the same again for the products and twice the attention work, through every layer,
  because the trainable embedding needs gradients from the top;
- backward, weight gradients: 2 (gamma P_layer + V h), only for the trainable layers and the LM head;
- checkpointing recomputes every layer's forward once more.

The optimizer step is memory-bound: foreach AdamW reads the parameter, gradient and both moments, writes the
parameter and both moments, and writes and reads the square-root temporary: 9 accesses per trainable element.

Time is work divided by ``UTILIZATION`` x peak. Every figure is an estimate: the utilization is an assumption, not
a measurement, and data loading, kernel launch gaps and communication are left out.
"""

from __future__ import annotations

from dataclasses import dataclass

from lisa_tune.planner.memory_fit import MemoryFit
from lisa_tune.profiles import GpuProfile

UTILIZATION = 0.45
"""Assumed fraction of the dense tensor-core peak a training step sustains (an estimate, not measured)."""
FP32_SLOWDOWN = 8.0
"""Assumed ratio of dense bf16 tensor-core to fp32 matrix throughput when TF32 is off, PyTorch's default."""
BANDWIDTH_UTILIZATION = 0.8
ADAMW_ACCESSES = 9


@dataclass(frozen=True)
class SpeedEstimate:
    """Predicted time of one optimizer step and the resulting throughput."""

    step_seconds: float
    tokens_per_second: float
    compute_seconds: float
    optimizer_seconds: float


def flops_per_token(fit: MemoryFit, gamma: int, sequence: int, gradient_checkpointing: bool) -> float:
    """Return the FLOPs one token costs in a LISA step."""
    layers = fit.num_layers
    products = 2.0 * (layers * fit.layer_parameter_count + fit.vocab_size * fit.hidden_size)
    attention = 2.0 * layers * sequence * fit.attention_width
    forward = products + attention
    input_gradients = products + 2 * attention
    weight_gradients = 2.0 * (gamma * fit.layer_parameter_count + fit.vocab_size * fit.hidden_size)
    recompute = (2.0 * layers * fit.layer_parameter_count + attention) if gradient_checkpointing else 0.0
    return forward + input_gradients + weight_gradients + recompute


def estimate_speed(
    fit: MemoryFit,
    gpu: GpuProfile,
    *,
    gamma: int,
    micro_batch_size: int,
    accumulation_steps: int,
    sequence: int,
) -> SpeedEstimate:
    """Estimate the step time and tokens per second of one configuration on ``gpu``."""
    tokens = micro_batch_size * sequence * accumulation_steps
    peak = gpu.bf16_dense_tflops * 1e12
    if fit.precision == "fp32" or not gpu.bf16:
        peak /= FP32_SLOWDOWN if fit.precision == "fp32" else 1.0
    compute = tokens * flops_per_token(fit, gamma, sequence, fit.gradient_checkpointing) / (UTILIZATION * peak)
    trainable = fit.trainable_parameters(gamma)
    optimizer = (
        trainable * ADAMW_ACCESSES * fit.state_element_bytes / (BANDWIDTH_UTILIZATION * gpu.memory_bandwidth_gb_s * 1e9)
    )
    step = compute + optimizer
    return SpeedEstimate(step, tokens / step, compute, optimizer)
