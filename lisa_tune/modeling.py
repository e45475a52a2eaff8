"""Build a ``transformers`` causal language model from a config dict, with no weights read."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lisa_tune.errors import InputError
from lisa_tune.model_config import hidden_size, is_mixture_of_experts, layer_count, max_positions

logger = logging.getLogger(__name__)

ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")
__all__ = [
    "ATTENTION_IMPLEMENTATIONS",
    "build_model",
    "hidden_size",
    "is_mixture_of_experts",
    "layer_count",
    "load_config",
    "max_positions",
]


def load_config(config: dict[str, Any]) -> Any:
    """Turn a parsed ``config.json`` into a ``transformers`` config object."""
    import transformers

    model_type = config.get("model_type")
    if model_type is None:
        raise InputError("model config has no 'model_type'; pass a Hugging Face config.json.")
    try:
        config_class = transformers.AutoConfig.for_model(model_type).__class__
    except ValueError as error:
        raise InputError(
            f"model_type {model_type!r} is not known to transformers {transformers.__version__}. "
            "Upgrade transformers or pass a config of a supported architecture."
        ) from error
    fields = {key: value for key, value in config.items() if key != "model_type"}
    return config_class.from_dict(fields)


def build_model(
    config: dict[str, Any],
    *,
    device: str | torch.device,
    dtype: torch.dtype,
    attn_implementation: str = "sdpa",
    gradient_checkpointing: bool = False,
    checkpoint_context_fn: Callable[[], tuple[Any, Any]] | None = None,
) -> nn.Module:
    """Build a causal LM from ``config`` on ``device`` (``meta`` for the simulator) with random weights.

    ``checkpoint_context_fn`` is passed to ``torch.utils.checkpoint.checkpoint`` as ``context_fn``: it returns the
    context managers of the forward pass and of its recomputation during backward.
    """
    import transformers

    if attn_implementation not in ATTENTION_IMPLEMENTATIONS:
        raise InputError(
            f"invalid attention implementation {attn_implementation!r}: "
            f"use one of {', '.join(ATTENTION_IMPLEMENTATIONS)}."
        )
    hf_config = load_config(config)
    hf_config.use_cache = False
    model_class: Any = transformers.AutoModelForCausalLM._model_mapping.get(type(hf_config), None)
    if attn_implementation == "sdpa" and not getattr(model_class, "_supports_sdpa", True):
        raise InputError(
            f"{getattr(model_class, '__name__', 'this model')} does not support sdpa attention in transformers "
            f"{transformers.__version__}; pass --attention eager."
        )
    options: dict[str, Any] = {"dtype": dtype, "attn_implementation": attn_implementation}
    with torch.device(device), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = transformers.AutoModelForCausalLM.from_config(hf_config, **options)
        except ValueError as error:
            raise InputError(f"cannot build a causal LM from this config: {error}") from error
    if gradient_checkpointing:
        kwargs: dict[str, Any] = {"use_reentrant": False}
        if checkpoint_context_fn is not None:
            kwargs["context_fn"] = checkpoint_context_fn
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.train()
    assert isinstance(model, nn.Module)
    return model
