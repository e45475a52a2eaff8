"""The trainable set of a LISA run and what happens to optimizer state when the active layers switch."""

from __future__ import annotations

import enum
import logging
from collections.abc import Iterator

import torch
from torch import nn

from lisa_tune.errors import InputError
from lisa_tune.lisa.layers import DecoderLayers, find_decoder_layers
from lisa_tune.lisa.sampler import LayerSampler

logger = logging.getLogger(__name__)


class OptimizerStatePolicy(str, enum.Enum):
    """The policy for the AdamW state of layers that leave the active set."""

    RESET = "reset"
    """Free the outgoing layers' state and gradients; memory stays bounded by gamma layers."""
    PERSISTENT = "persistent"
    """Keep every visited layer's state, as the LMFlow and axolotl LISA callbacks do; memory grows per layer."""


def _unique(parameters: Iterator[nn.Parameter]) -> list[nn.Parameter]:
    seen: set[int] = set()
    unique: list[nn.Parameter] = []
    for parameter in parameters:
        if id(parameter) not in seen:
            seen.add(id(parameter))
            unique.append(parameter)
    return unique


class LisaController:
    """Owns ``requires_grad`` of every parameter of a model during LISA training.

    The embedding, the LM head and every parameter outside the decoder layer list are always trainable (the
    embedding can be frozen with ``freeze_embedding``). Exactly ``gamma`` decoder layers are trainable at a time,
    drawn uniformly without replacement by a ``LayerSampler`` and redrawn every ``interval`` optimizer steps.
    ``gamma=None`` trains every layer: full fine-tuning, the baseline LISA is compared with.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        gamma: int | None,
        interval: int = 1,
        policy: OptimizerStatePolicy = OptimizerStatePolicy.RESET,
        seed: int = 0,
        freeze_embedding: bool = False,
        layers_path: str | None = None,
    ) -> None:
        if interval < 1:
            raise InputError(f"invalid switch interval K={interval}: it counts optimizer steps and must be >= 1.")
        self.model = model
        self.decoder: DecoderLayers = find_decoder_layers(model, layers_path)
        self.interval = interval
        self.policy = OptimizerStatePolicy(policy)
        self.num_layers = len(self.decoder)
        self.gamma = self.num_layers if gamma is None else gamma
        self.full_fine_tuning = gamma is None
        self.sampler = LayerSampler(self.num_layers, self.gamma, seed)
        self.layer_parameters = [_unique(layer.parameters()) for layer in self.decoder.layers]
        in_layers = {id(p) for params in self.layer_parameters for p in params}

        embedding_ids: set[int] = set()
        if freeze_embedding:
            embedding = getattr(model, "get_input_embeddings", lambda: None)()
            if not isinstance(embedding, nn.Module):
                raise InputError("--freeze-embedding was given, but the model exposes no input embedding.")
            embedding_ids = {id(p) for p in embedding.parameters()}
            output = getattr(model, "get_output_embeddings", lambda: None)()
            if isinstance(output, nn.Module) and embedding_ids & {id(p) for p in output.parameters()}:
                logger.warning("the model ties its embedding and LM head, so freezing the embedding freezes the head")
        self.frozen_parameters = [p for p in _unique(model.parameters()) if id(p) in embedding_ids]
        self.always_trainable = [
            p for p in _unique(model.parameters()) if id(p) not in in_layers and id(p) not in embedding_ids
        ]
        self.active_layers: list[int] = []
        self.optimizer_steps = 0
        self.switches = 0
        self.visited_layers: set[int] = set()
        self._visited_before_period: set[int] = set()
        self._start()

    def _start(self) -> None:
        for parameter in self.frozen_parameters:
            parameter.requires_grad_(False)
        for parameter in self.always_trainable:
            parameter.requires_grad_(True)
        first = list(range(self.num_layers)) if self.full_fine_tuning else self.sampler.draw()
        self._activate(first)

    def _activate(self, layers: list[int]) -> None:
        self._visited_before_period = set(self.visited_layers)
        chosen = set(layers)
        for index, parameters in enumerate(self.layer_parameters):
            for parameter in parameters:
                parameter.requires_grad_(index in chosen)
        self.active_layers = sorted(chosen)
        self.visited_layers.update(chosen)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Return the parameters trainable in the current period."""
        active = [p for index in self.active_layers for p in self.layer_parameters[index]]
        return self.always_trainable + active

    def after_optimizer_step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Count one optimizer step and redraw the active layers when a period of ``interval`` steps ends.

        Returns True when the layers switched.
        """
        self.optimizer_steps += 1
        if self.full_fine_tuning or self.optimizer_steps % self.interval != 0:
            return False
        self.switch(optimizer)
        return True

    def place(self, layers: list[int], optimizer: torch.optim.Optimizer | None = None) -> None:
        """Replace the current period's layers before any of its steps has run.

        The memory simulator uses this to trace a chosen placement. The replaced draw counts as never visited, and
        layers leaving the active set get the optimizer-state policy as in ``switch``.
        """
        for index in set(self.active_layers) - set(layers):
            for parameter in self.layer_parameters[index]:
                parameter.grad = None
                if self.policy is OptimizerStatePolicy.RESET and optimizer is not None:
                    optimizer.state.pop(parameter, None)
        visited_before = self._visited_before_period
        self._activate(sorted(layers))
        self.visited_layers = visited_before | set(layers)
        self._visited_before_period = visited_before

    def switch(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Draw the next period's layers and apply the optimizer-state policy to the outgoing ones."""
        incoming = self.sampler.draw()
        outgoing = set(self.active_layers) - set(incoming)
        for index in outgoing:
            for parameter in self.layer_parameters[index]:
                # A frozen layer never needs its gradient again before it is redrawn, under either policy.
                parameter.grad = None
                if self.policy is OptimizerStatePolicy.RESET and optimizer is not None:
                    optimizer.state.pop(parameter, None)
        self._activate(incoming)
        self.switches += 1
        logger.debug("LISA switch %d: active layers %s", self.switches, self.active_layers)

    def state_dict(self) -> dict[str, object]:
        """Return what a checkpoint needs to continue the same sequence of draws."""
        return {
            "sampler": self.sampler.state_dict(),
            "active_layers": list(self.active_layers),
            "optimizer_steps": self.optimizer_steps,
            "switches": self.switches,
            "visited_layers": sorted(self.visited_layers),
            "interval": self.interval,
            "policy": self.policy.value,
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore the sampler and the active layers saved by ``state_dict``; K and the policy must match."""
        if state.get("interval") != self.interval or state.get("policy") != self.policy.value:
            raise InputError(
                f"the saved LISA state has K={state.get('interval')} and policy {state.get('policy')}, but this run "
                f"has K={self.interval} and policy {self.policy.value}; resume with the same settings."
            )
        sampler_state = state["sampler"]
        assert isinstance(sampler_state, dict)
        self.sampler.load_state_dict(sampler_state)
        active = state["active_layers"]
        visited = state["visited_layers"]
        steps = state["optimizer_steps"]
        switches = state["switches"]
        assert isinstance(active, list) and isinstance(visited, list)
        assert isinstance(steps, int) and isinstance(switches, int)
        self._activate([int(index) for index in active])
        self.visited_layers = {int(index) for index in visited}
        self.optimizer_steps = steps
        self.switches = switches
