"""LISA for people who train with the Hugging Face ``Trainer`` (or a TRL trainer built on it), as a callback."""

from __future__ import annotations

import logging
from typing import Any

import torch
import transformers
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from lisa_tune.errors import InputError
from lisa_tune.lisa.controller import LisaController, OptimizerStatePolicy
from lisa_tune.lisa.layers import find_decoder_layers

logger = logging.getLogger(__name__)

ParamGroup = dict[str, Any]


class LisaCallback(TrainerCallback):
    """Train the embedding, the LM head and ``gamma`` random decoder layers, redrawn every ``interval`` steps.

    A ``LisaController`` draws the layers, as in ``lisa-tune train``, so both draw the same layers for the same
    ``seed``. ``interval`` (K) counts optimizer steps, which the Trainer calls ``global_step``: with gradient
    accumulation, one step spans several micro-batches. At each switch the outgoing layers' gradients are freed.
    With ``policy="reset"`` their AdamW state is freed too, so the optimizer keeps state for at most ``gamma``
    decoder layers. ``policy="persistent"`` keeps the state of every layer visited, as the LMFlow and axolotl
    callbacks do.

    Pass the callback in ``Trainer(callbacks=[...])``. Then ``on_init_end`` makes every decoder layer trainable
    before the Trainer builds its optimizer, so the optimizer contains every layer in the Trainer's own
    weight-decay groups. A callback added later, or an optimizer built by hand, may lack the layers that were
    frozen when it was built, and ``on_train_begin`` appends those to its param groups. A checkpoint of such an
    optimizer only loads into an optimizer built the same way.

    NOTE: tested in one process only. Under DDP, a frozen layer produces no gradient, so the Trainer likely needs
    ``ddp_find_unused_parameters=True``. DeepSpeed and FSDP are untested.
    """

    def __init__(
        self,
        gamma: int,
        interval: int,
        policy: OptimizerStatePolicy | str = OptimizerStatePolicy.RESET,
        seed: int = 0,
        freeze_embedding: bool = False,
        layers_path: str | None = None,
    ) -> None:
        if gamma < 1:
            raise InputError(f"invalid gamma {gamma}: LISA trains at least one decoder layer at a time.")
        if interval < 1:
            raise InputError(f"invalid switch interval K={interval}: it counts optimizer steps and must be >= 1.")
        try:
            self.policy = OptimizerStatePolicy(policy)
        except ValueError as error:
            choices = ", ".join(member.value for member in OptimizerStatePolicy)
            raise InputError(f"invalid optimizer-state policy {policy!r}: use one of {choices}.") from error
        self.gamma = gamma
        self.interval = interval
        self.seed = seed
        self.freeze_embedding = freeze_embedding
        self.layers_path = layers_path
        self.controller: LisaController | None = None
        self._optimizer: torch.optim.Optimizer | None = None

    @property
    def active_layers(self) -> list[int]:
        """Indices of the decoder layers trained in the current period, or an empty list before training begins."""
        return [] if self.controller is None else list(self.controller.active_layers)

    def on_init_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        """Make every decoder layer trainable, so the optimizer the Trainer builds next contains all of them."""
        if model is None:
            return
        decoder = find_decoder_layers(_unwrap_model(model), self.layers_path)
        for parameter in decoder.layers.parameters():
            parameter.requires_grad_(True)

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        **kwargs: Any,
    ) -> None:
        """Draw the first active layers, freeze the rest and add missing layer parameters to the optimizer."""
        if model is None or optimizer is None:
            raise InputError(
                "LisaCallback.on_train_begin needs the model and optimizer keyword arguments, which "
                "transformers.Trainer.train passes. Register the callback with a Trainer instead of calling it."
            )
        model = _unwrap_model(model)
        self._optimizer = _unwrap_optimizer(optimizer)
        controller = LisaController(
            model,
            gamma=self.gamma,
            interval=self.interval,
            policy=self.policy,
            seed=self.seed,
            freeze_embedding=self.freeze_embedding,
            layers_path=self.layers_path,
        )

        # A run resumed from a checkpoint repeats the draws of the steps already taken, so it trains the same
        # layers as an uninterrupted run. The checkpoint's optimizer state belongs to those layers.
        for _ in range(state.global_step // self.interval):
            controller.switch(None)
        controller.optimizer_steps = state.global_step
        self.controller = controller

        added = _add_missing_parameters(self._optimizer, model, controller, args.weight_decay)
        if added:
            logger.info("LISA added %d parameters that were frozen when the optimizer was built", added)
        logger.info(
            "LISA trains %d of %d decoder layers, redrawn every %d optimizer steps (policy %s). First layers: %s",
            controller.gamma,
            controller.num_layers,
            self.interval,
            self.policy.value,
            controller.active_layers,
        )

    def on_step_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        optimizer: torch.optim.Optimizer | None = None,
        **kwargs: Any,
    ) -> None:
        """Redraw the active layers after every ``interval``-th optimizer step."""
        if self.controller is None:
            return
        if optimizer is not None:
            self._optimizer = _unwrap_optimizer(optimizer)
        self.controller.optimizer_steps = state.global_step
        if state.global_step % self.interval == 0:
            self.controller.switch(self._optimizer)


def _unwrap_model(model: nn.Module) -> nn.Module:
    # DistributedDataParallel and DataParallel keep the model in ``module``.
    inner = getattr(model, "module", None)
    while isinstance(inner, nn.Module):
        model = inner
        inner = getattr(model, "module", None)
    return model


def _unwrap_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Return the torch optimizer inside wrappers such as accelerate's ``AcceleratedOptimizer``.

    The wrapper's ``state`` forwards to the inner optimizer's in accelerate 1.16, but popping from the inner
    optimizer does not depend on that.
    """
    inner = optimizer
    wrapped = getattr(inner, "optimizer", None)
    while isinstance(wrapped, torch.optim.Optimizer):
        inner = wrapped
        wrapped = getattr(inner, "optimizer", None)
    return inner


def _add_missing_parameters(
    optimizer: torch.optim.Optimizer, model: nn.Module, controller: LisaController, weight_decay: float
) -> int:
    """Append the parameters LISA may train but ``optimizer`` lacks to its param groups and return their count.

    A missing layer parameter joins the group of the same parameter in another layer, which keeps any grouping
    the optimizer was built with. Without such a sibling, the Trainer's weight-decay rule picks the group.
    """
    group_of: dict[int, ParamGroup] = {}
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            group_of[id(parameter)] = group
    candidates = controller.always_trainable + [p for params in controller.layer_parameters for p in params]
    missing = [parameter for parameter in candidates if id(parameter) not in group_of]
    if not missing:
        return 0

    name_in_layer: dict[int, str] = {}
    sibling_group: dict[str, ParamGroup] = {}
    for layer in controller.decoder.layers:
        for name, parameter in layer.named_parameters():
            name_in_layer[id(parameter)] = name
            if id(parameter) in group_of:
                sibling_group.setdefault(name, group_of[id(parameter)])

    full_names = {id(parameter): name for name, parameter in model.named_parameters()}
    decay_names: set[str] | None = None
    for parameter in missing:
        sibling = sibling_group.get(name_in_layer.get(id(parameter), ""))
        if sibling is not None:
            sibling["params"].append(parameter)
            continue
        if decay_names is None:
            decay_names = _decay_parameter_names(model)
        name = full_names[id(parameter)]
        group = _group_with_weight_decay(optimizer, weight_decay if name in decay_names else 0.0, name)
        group["params"].append(parameter)
    return len(missing)


def _decay_parameter_names(model: nn.Module) -> set[str]:
    # NOTE: ``Trainer.get_decay_parameter_names`` does not use ``self`` in transformers 5.25, so it is called
    # unbound. Other versions are unchecked, and a Trainer subclass that overrides it is not seen here.
    trainer_class: Any = transformers.Trainer
    names = trainer_class.get_decay_parameter_names(None, model)
    return set(names)


def _group_with_weight_decay(optimizer: torch.optim.Optimizer, weight_decay: float, name: str) -> ParamGroup:
    groups = optimizer.param_groups
    if len(groups) == 1:
        return groups[0]
    for group in groups:
        if group.get("weight_decay") == weight_decay:
            return group
    decays = ", ".join(str(group.get("weight_decay")) for group in groups)
    raise InputError(
        f"parameter {name} is missing from the optimizer, and none of its param groups has weight_decay "
        f"{weight_decay} (the groups have {decays}). Pass LisaCallback in Trainer(callbacks=[...]) so the "
        "Trainer builds its optimizer over every decoder layer, or build the optimizer with every layer trainable."
    )
