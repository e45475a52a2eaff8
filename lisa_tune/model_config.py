"""Facts read from a Hugging Face ``config.json`` dict, without importing torch or transformers."""

from __future__ import annotations

from typing import Any


def is_mixture_of_experts(config: dict[str, Any]) -> bool:
    """Return True when the config describes a mixture-of-experts model."""
    return any(key in config for key in ("num_local_experts", "num_experts", "n_routed_experts"))


def max_positions(config: dict[str, Any]) -> int | None:
    """Return the longest sequence the config's position embeddings cover, or None when it states none."""
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = config.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return None


def layer_count(config: dict[str, Any]) -> int | None:
    """Return the number of decoder layers a config states, or None."""
    for key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
        value = config.get(key)
        if isinstance(value, int):
            return value
    text_config = config.get("text_config")
    if isinstance(text_config, dict):
        return layer_count(text_config)
    return None


def hidden_size(config: dict[str, Any]) -> int | None:
    """Return the hidden size a config states, or None."""
    for key in ("hidden_size", "n_embd", "d_model", "dim"):
        value = config.get(key)
        if isinstance(value, int):
            return value
    text_config = config.get("text_config")
    if isinstance(text_config, dict):
        return hidden_size(text_config)
    return None
