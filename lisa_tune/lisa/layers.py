"""Find the decoder layer list of a causal language model built by ``transformers``."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lisa_tune.errors import ModelStructureError

# Attribute paths of the decoder layer list in the architectures transformers ships, tried in order:
# Llama, Mistral, Mixtral, Qwen2/3, Gemma/Gemma2, Phi3, OLMo use ``model.layers``; GPT-2 and Falcon use
# ``transformer.h``; GPT-NeoX uses ``gpt_neox.layers``; OPT uses ``model.decoder.layers``.
KNOWN_LAYER_PATHS = (
    "model.layers",
    "model.language_model.layers",
    "transformer.h",
    "gpt_neox.layers",
    "model.decoder.layers",
    "transformer.blocks",
    "transformer.layers",
)


@dataclass(frozen=True)
class DecoderLayers:
    """The decoder layer list of a model and the dotted path where it was found."""

    path: str
    layers: nn.ModuleList

    def __len__(self) -> int:
        return len(self.layers)


def _get_attribute(model: nn.Module, path: str) -> object | None:
    current: object = model
    for part in path.split("."):
        current = getattr(current, part, None)
        if current is None:
            return None
    return current


def _module_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    return [(name, module) for name, module in model.named_modules() if isinstance(module, nn.ModuleList)]


def find_decoder_layers(model: nn.Module, override: str | None = None) -> DecoderLayers:
    """Return the decoder layer list of ``model``.

    ``override`` is a dotted attribute path (for example ``model.layers``) for architectures the search does not
    know. Without it, the known paths are tried first, then the only ``nn.ModuleList`` whose length equals the
    config's ``num_hidden_layers`` and whose entries share one class. Raises ``ModelStructureError`` naming the
    module lists it saw when no layer list is found.
    """
    if override is not None:
        found = _get_attribute(model, override)
        if not isinstance(found, nn.ModuleList) or len(found) == 0:
            seen = ", ".join(f"{name} ({len(ml)})" for name, ml in _module_lists(model)) or "none"
            raise ModelStructureError(
                f"--layers-path {override!r} is not a non-empty nn.ModuleList in {type(model).__name__}. "
                f"Module lists in this model (with their lengths): {seen}."
            )
        return DecoderLayers(override, found)

    for path in KNOWN_LAYER_PATHS:
        found = _get_attribute(model, path)
        if isinstance(found, nn.ModuleList) and len(found) > 0:
            return DecoderLayers(path, found)

    config = getattr(model, "config", None)
    expected = getattr(config, "num_hidden_layers", None)
    candidates = _module_lists(model)
    matching = [
        (name, module_list)
        for name, module_list in candidates
        if len(module_list) > 0
        and (expected is None or len(module_list) == expected)
        and len({type(child) for child in module_list}) == 1
    ]
    if len(matching) == 1:
        return DecoderLayers(*matching[0])

    seen = ", ".join(f"{name} ({len(ml)})" for name, ml in candidates) or "none"
    raise ModelStructureError(
        f"cannot find the decoder layer list of {type(model).__name__} "
        f"(expected an nn.ModuleList of {expected} identical layers). Module lists seen: {seen}. "
        "Pass the dotted path of the layer list with --layers-path."
    )
