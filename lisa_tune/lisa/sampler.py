"""Uniform sampling of the gamma active layers, from a generator of the sampler's own."""

from __future__ import annotations

import torch

from lisa_tune.errors import InputError


class LayerSampler:
    """Draw ``gamma`` of ``num_layers`` layer indices uniformly without replacement, once per period.

    The sampler owns a seeded ``torch.Generator`` on the CPU, so draws do not depend on, or disturb, the global
    random state that dropout and data shuffling use. Processes that share the seed draw the same layers, which is
    what data-parallel training needs.
    """

    def __init__(self, num_layers: int, gamma: int, seed: int = 0) -> None:
        if num_layers < 1:
            raise InputError(f"the model has {num_layers} decoder layers; LISA needs at least one.")
        if not 1 <= gamma <= num_layers:
            raise InputError(
                f"invalid gamma {gamma}: it must be between 1 and the model's {num_layers} decoder layers."
            )
        self.num_layers = num_layers
        self.gamma = gamma
        self.seed = seed
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(seed)

    def draw(self) -> list[int]:
        """Return the next period's active layer indices, sorted."""
        order = torch.randperm(self.num_layers, generator=self.generator)
        return sorted(int(index) for index in order[: self.gamma])

    def state_dict(self) -> dict[str, object]:
        """Return the generator state, for checkpoints."""
        return {
            "num_layers": self.num_layers,
            "gamma": self.gamma,
            "seed": self.seed,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore a state from ``state_dict``; the layer count and gamma must match."""
        if state["num_layers"] != self.num_layers or state["gamma"] != self.gamma:
            raise InputError(
                f"sampler state is for {state['num_layers']} layers and gamma {state['gamma']}, "
                f"but this run has {self.num_layers} layers and gamma {self.gamma}."
            )
        generator_state = state["generator"]
        assert isinstance(generator_state, torch.Tensor)
        self.generator.set_state(generator_state)
