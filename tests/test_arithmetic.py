"""Hand-computed parameter counts of every bundled model, checked against transformers, the LISA controller and
the simulator.

``hand_counts`` reads only config.json fields and has one formula per architecture. Where a field is absent it uses
the default of the transformers 5.25 config class. For example, Falcon and GPT-2 tie their embeddings unless the
config sets tie_word_embeddings to false. The gradient and AdamW-state checks follow from LISA. The trainable set of
a period is everything outside the decoder layer list plus gamma layers, each trainable parameter has one gradient
of its own dtype, and AdamW keeps two moments of that dtype per parameter.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

from lisa_tune.errors import InputError
from lisa_tune.lisa.controller import LisaController
from lisa_tune.lisa.optim import AdamWImplementation, build_adamw
from lisa_tune.lisa.precision import Precision
from lisa_tune.memory.categories import MemoryCategory
from lisa_tune.memory.simulator import SimulationConfig, simulate
from lisa_tune.modeling import build_model
from lisa_tune.profiles import bundled_model_names, resolve_model

MODEL_NAMES = bundled_model_names()
TINY_MODELS = [name for name in MODEL_NAMES if name.startswith("tiny-")]
REAL_MODELS = [name for name in MODEL_NAMES if not name.startswith("tiny-")]
GAMMAS = [1, 2, None]
PRECISIONS = list(Precision)


# Hand formulas


@dataclass(frozen=True)
class HandCounts:
    """Parameter counts of one model, computed from its config.json."""

    embedding: int
    """The input token embedding."""
    layer: int
    """One decoder layer."""
    outside_layers: int
    """Everything outside the decoder layer list: embeddings, final norm and an untied LM head."""
    num_layers: int

    @property
    def total(self) -> int:
        """Parameters of the whole model, with tied embeddings counted once."""
        return self.outside_layers + self.num_layers * self.layer

    def trainable(self, gamma: int | None) -> int:
        """Parameters trainable in one LISA period. A gamma of None trains every layer."""
        active = self.num_layers if gamma is None else gamma
        return self.outside_layers + active * self.layer


def _attention_shape(config: dict[str, Any], hidden: int) -> tuple[int, int, int]:
    """Return query heads, key/value heads and head dimension. A config may omit head_dim or set it to null."""
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    return heads, kv_heads, head_dim


def _separate_projections(hidden: int, heads: int, kv_heads: int, head_dim: int, bias: bool) -> int:
    """Count q_proj, k_proj, v_proj and o_proj as separate linear layers."""
    weights = hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim + heads * head_dim * hidden
    biases = heads * head_dim + 2 * kv_heads * head_dim + hidden if bias else 0
    return weights + biases


def _rms_decoder_layer(config: dict[str, Any]) -> int:
    """Count one layer of the llama-style architectures: separate projections, gated MLP, RMS norms."""
    model_type = config["model_type"]
    hidden = config["hidden_size"]
    intermediate = config["intermediate_size"]
    heads, kv_heads, head_dim = _attention_shape(config, hidden)
    attention_bias = bool(config.get("attention_bias", False))
    gated_mlp = 3 * hidden * intermediate

    if model_type == "llama":
        mlp_bias = 2 * intermediate + hidden if config.get("mlp_bias", False) else 0
        attention = _separate_projections(hidden, heads, kv_heads, head_dim, attention_bias)
        return attention + gated_mlp + mlp_bias + 2 * hidden
    if model_type == "mistral":
        return _separate_projections(hidden, heads, kv_heads, head_dim, False) + gated_mlp + 2 * hidden
    if model_type == "qwen2":
        # Qwen2Attention in transformers 5.25 gives q, k and v a bias and o_proj none, whatever the config sets.
        attention = _separate_projections(hidden, heads, kv_heads, head_dim, False)
        qkv_bias = heads * head_dim + 2 * kv_heads * head_dim
        return attention + qkv_bias + gated_mlp + 2 * hidden
    if model_type == "qwen3":
        # q_norm and k_norm normalise each head, so each has head_dim weights.
        attention = _separate_projections(hidden, heads, kv_heads, head_dim, attention_bias)
        return attention + 2 * head_dim + gated_mlp + 2 * hidden
    if model_type == "olmo2":
        # q_norm and k_norm normalise the whole projection. OLMo 2 has no input norm, only the norms after
        # attention and after the MLP.
        attention = _separate_projections(hidden, heads, kv_heads, head_dim, attention_bias)
        qk_norms = heads * head_dim + kv_heads * head_dim
        return attention + qk_norms + gated_mlp + 2 * hidden
    if model_type == "mixtral":
        experts = config["num_local_experts"]
        attention = _separate_projections(hidden, heads, kv_heads, head_dim, False)
        router = experts * hidden
        return attention + router + experts * gated_mlp + 2 * hidden
    if model_type == "gemma2":
        # Gemma 2 normalises before and after both attention and the MLP: four norms.
        attention = _separate_projections(hidden, heads, kv_heads, head_dim, attention_bias)
        return attention + gated_mlp + 4 * hidden
    if model_type == "phi3":
        fused_qkv = hidden * (heads + 2 * kv_heads) * head_dim
        output = heads * head_dim * hidden
        fused_gate_up = hidden * 2 * intermediate
        down = intermediate * hidden
        return fused_qkv + output + fused_gate_up + down + 2 * hidden
    raise NotImplementedError(f"no hand formula for model_type {model_type!r}")


def _gpt2_counts(config: dict[str, Any]) -> HandCounts:
    hidden = config["n_embd"]
    vocab = config["vocab_size"]
    inner = config.get("n_inner") or 4 * hidden
    layer_norms = 2 * (2 * hidden)
    attention = (hidden * 3 * hidden + 3 * hidden) + (hidden * hidden + hidden)
    mlp = (hidden * inner + inner) + (inner * hidden + hidden)
    layer = layer_norms + attention + mlp

    embedding = vocab * hidden
    positions = config["n_positions"] * hidden
    head = 0 if config.get("tie_word_embeddings", True) else vocab * hidden
    outside = embedding + positions + 2 * hidden + head
    return HandCounts(embedding, layer, outside, config["n_layer"])


def _gpt_neox_counts(config: dict[str, Any]) -> HandCounts:
    hidden = config["hidden_size"]
    vocab = config["vocab_size"]
    intermediate = config["intermediate_size"]
    attention = 3 * hidden * hidden + hidden * hidden
    if config.get("attention_bias", True):
        attention += 3 * hidden + hidden
    mlp = (hidden * intermediate + intermediate) + (intermediate * hidden + hidden)
    layer = 2 * (2 * hidden) + attention + mlp

    embedding = vocab * hidden
    head = 0 if config.get("tie_word_embeddings", False) else vocab * hidden
    outside = embedding + 2 * hidden + head
    return HandCounts(embedding, layer, outside, config["num_hidden_layers"])


def _falcon_counts(config: dict[str, Any]) -> HandCounts:
    if config.get("new_decoder_architecture", False):
        raise NotImplementedError("no hand formula for Falcon's new decoder architecture")
    hidden = config["hidden_size"]
    vocab = config["vocab_size"]
    heads = config["num_attention_heads"]
    head_dim = hidden // heads
    # Multi-query attention shares one key head and one value head across all query heads.
    kv_heads = 1 if config.get("multi_query", True) else heads
    qkv_out = (heads + 2 * kv_heads) * head_dim
    ffn = config.get("ffn_hidden_size") or 4 * hidden
    weights = hidden * qkv_out + hidden * hidden + 2 * hidden * ffn
    biases = qkv_out + hidden + ffn + hidden if config.get("bias", False) else 0
    # Parallel attention feeds attention and MLP from one input norm, and sequential layers add a second norm.
    norms = 1 if config.get("parallel_attn", True) else 2
    layer = weights + biases + norms * 2 * hidden

    embedding = vocab * hidden
    head = 0 if config.get("tie_word_embeddings", True) else vocab * hidden
    outside = embedding + 2 * hidden + head
    return HandCounts(embedding, layer, outside, config["num_hidden_layers"])


def hand_counts(config: dict[str, Any]) -> HandCounts:
    """Compute the parameter counts of a bundled architecture from its config.json fields."""
    model_type = config["model_type"]
    if model_type == "gpt2":
        return _gpt2_counts(config)
    if model_type == "gpt_neox":
        return _gpt_neox_counts(config)
    if model_type == "falcon":
        return _falcon_counts(config)

    hidden = config["hidden_size"]
    vocab = config["vocab_size"]
    tied_default = model_type == "gemma2"
    embedding = vocab * hidden
    head = 0 if config.get("tie_word_embeddings", tied_default) else vocab * hidden
    outside = embedding + hidden + head
    return HandCounts(embedding, _rms_decoder_layer(config), outside, config["num_hidden_layers"])


# Models


def _config(name: str) -> dict[str, Any]:
    return resolve_model(name).config


def _attention(config: dict[str, Any]) -> str:
    # NOTE: transformers 5.25 rejects sdpa for Gemma 2, so Gemma 2 is built and traced with eager attention.
    return "eager" if config["model_type"] == "gemma2" else "sdpa"


@functools.cache
def _meta_model(name: str, dtype: torch.dtype) -> nn.Module:
    config = _config(name)
    return build_model(config, device="meta", dtype=dtype, attn_implementation=_attention(config))


def _buffer_bytes(model: nn.Module) -> int:
    return sum(buffer.numel() * buffer.element_size() for buffer in model.buffers())


def _dtype_bytes(precision: Precision) -> int:
    return precision.parameter_dtype.itemsize


def _precision_id(precision: Precision) -> str:
    return precision.value


def _gamma_id(gamma: int | None) -> str:
    return "all" if gamma is None else f"gamma{gamma}"


# Whole-model counts


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_total_matches_model(name: str) -> None:
    model = _meta_model(name, torch.bfloat16)
    assert hand_counts(_config(name)).total == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_embedding_matches_model(name: str) -> None:
    model = _meta_model(name, torch.bfloat16)
    embedding = model.get_input_embeddings()
    assert hand_counts(_config(name)).embedding == sum(p.numel() for p in embedding.parameters())


def test_falcon_7b_head_tied() -> None:
    # falcon-7b's config.json omits tie_word_embeddings, so FalconConfig's default (tied) applies.
    config = _config("falcon-7b")
    model = _meta_model("falcon-7b", torch.bfloat16)
    counts = hand_counts(config)
    final_norm = 2 * config["hidden_size"]

    assert "tie_word_embeddings" not in config
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert counts.outside_layers == counts.embedding + final_norm


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_layer_matches_model(name: str) -> None:
    model = _meta_model(name, torch.bfloat16)
    layers = LisaController(model, gamma=1).decoder.layers
    counts = hand_counts(_config(name))
    assert len(layers) == counts.num_layers
    for index, layer in enumerate(layers):
        assert sum(p.numel() for p in layer.parameters()) == counts.layer, f"layer {index}"


# LISA trainable set, gradients and AdamW state through the controller (real models, no trace)


@dataclass(frozen=True)
class ControllerBytes:
    """What the controller makes trainable in one period, and the bytes one AdamW step gives it."""

    trainable_count: int
    """Parameters in ``LisaController.trainable_parameters()``."""
    requires_grad_count: int
    """Parameters of the model with ``requires_grad`` set."""
    gradient_bytes: int
    state_bytes: int
    """AdamW's meta-device state: the two moments."""


@functools.cache
def _controller_bytes(name: str, gamma: int | None, dtype: torch.dtype) -> ControllerBytes:
    """Run one AdamW step on zero gradients of the trainable set of a fresh controller and measure it.

    This is the step the simulator runs for a period it does not trace. AdamW keeps its step counters on the CPU
    unless it is fused or capturable, so the meta tensors of its state are the moments alone. The result depends
    on the precision only through the parameter dtype, so amp-bf16 and fp32 share one run.
    """
    model = _meta_model(name, dtype)
    controller = LisaController(model, gamma=gamma)
    trainable = controller.trainable_parameters()
    requires_grad_count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    for parameter in trainable:
        parameter.grad = torch.zeros_like(parameter)
    optimizer = build_adamw(model, implementation=AdamWImplementation.FOREACH)
    optimizer.step()

    gradient_bytes = sum(p.grad.untyped_storage().nbytes() for p in trainable if p.grad is not None)
    state_bytes = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.device.type == "meta":
                state_bytes += value.untyped_storage().nbytes()

    for parameter in model.parameters():
        parameter.grad = None
    return ControllerBytes(sum(p.numel() for p in trainable), requires_grad_count, gradient_bytes, state_bytes)


@pytest.mark.parametrize("precision", PRECISIONS, ids=_precision_id)
@pytest.mark.parametrize("gamma", GAMMAS, ids=_gamma_id)
@pytest.mark.parametrize("name", REAL_MODELS)
def test_controller_trainable_bytes(name: str, gamma: int | None, precision: Precision) -> None:
    expected = hand_counts(_config(name)).trainable(gamma)
    measured = _controller_bytes(name, gamma, precision.parameter_dtype)

    assert measured.trainable_count == expected
    assert measured.requires_grad_count == expected
    assert measured.gradient_bytes == expected * _dtype_bytes(precision)
    assert measured.state_bytes == 2 * expected * _dtype_bytes(precision)


# The simulator's categories at the optimizer step (tiny models, traced)


def _simulator_cases() -> list[Any]:
    cases = []
    for name in TINY_MODELS:
        for gamma in GAMMAS:
            for precision in PRECISIONS:
                if name == "tiny-mixtral" and precision is not Precision.BF16:
                    # The simulator rejects fp32 experts (test_mixtral_fp32_rejected); the controller-level checks
                    # above still cover Mixtral's arithmetic in every precision.
                    continue
                case_id = f"{name}-{_gamma_id(gamma)}-{precision.value}"
                cases.append(pytest.param(name, gamma, precision, id=case_id))
    return cases


@pytest.mark.parametrize(("name", "gamma", "precision"), _simulator_cases())
def test_simulator_categories(name: str, gamma: int | None, precision: Precision) -> None:
    config = _config(name)
    counts = hand_counts(config)
    buffer_bytes = _buffer_bytes(_meta_model(name, precision.parameter_dtype))
    estimate = simulate(
        SimulationConfig(
            model_config=config,
            model_name=name,
            gamma=gamma,
            micro_batch_size=1,
            sequence_length=16,
            precision=precision,
            attention=_attention(config),
        )
    )
    at_step = estimate.at_optimizer_step
    trainable_bytes = counts.trainable(gamma) * _dtype_bytes(precision)

    assert estimate.parameter_count == counts.total
    assert estimate.trainable_parameter_count == counts.trainable(gamma)
    assert at_step[MemoryCategory.GRADIENTS] == trainable_bytes
    assert at_step[MemoryCategory.OPTIMIZER_STATES] == 2 * trainable_bytes
    assert at_step[MemoryCategory.PARAMETERS] == counts.total * _dtype_bytes(precision) + buffer_bytes


# The hand formulas on hand-made configs: options no bundled model sets


def test_llama_biases_counted() -> None:
    base = dict(_config("tiny-llama"))
    with_bias = {**base, "attention_bias": True, "mlp_bias": True}
    hidden, intermediate = base["hidden_size"], base["intermediate_size"]
    heads, kv_heads, head_dim = _attention_shape(base, hidden)
    bias = heads * head_dim + 2 * kv_heads * head_dim + hidden + 2 * intermediate + hidden

    model = build_model(with_bias, device="meta", dtype=torch.float32)
    assert hand_counts(with_bias).layer == hand_counts(base).layer + bias
    assert hand_counts(with_bias).total == sum(p.numel() for p in model.parameters())


def test_untied_gpt2_adds_head() -> None:
    config = {**_config("tiny-gpt2"), "tie_word_embeddings": False}
    model = build_model(config, device="meta", dtype=torch.float32)
    assert hand_counts(config).total == sum(p.numel() for p in model.parameters())


def test_mixtral_fp32_rejected() -> None:
    config = SimulationConfig(model_config=resolve_model("tiny-mixtral").config, precision=Precision.FP32)
    with pytest.raises(InputError, match="--precision bf16"):
        simulate(config)
