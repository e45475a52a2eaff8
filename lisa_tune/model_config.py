"""Facts read from a Hugging Face ``config.json`` dict, without importing torch or transformers."""

from __future__ import annotations

from typing import Any

from lisa_tune.errors import InputError

FULL_FINE_TUNING = None
"""The gamma that ``parse_gamma`` returns for ``full``: every decoder layer trains, with no sampling."""


def parse_gamma(text: str) -> int | None:
    """Parse a ``--gamma`` value: a number of layers, or ``full`` (also ``all``) for full fine-tuning (None)."""
    if text.strip().lower() in ("all", "full"):
        return FULL_FINE_TUNING
    try:
        return int(text)
    except ValueError:
        raise InputError(
            f"invalid --gamma {text!r}: pass a number of layers (for example 2) or 'full' for full fine-tuning."
        ) from None


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
