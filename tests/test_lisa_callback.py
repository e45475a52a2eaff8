"""Tests of LisaCallback: LISA inside ``transformers.Trainer`` on the tiny Llama with random weights, on the CPU.

Every run is a real ``Trainer.train`` over synthetic token ids. A recording callback, registered after
``LisaCallback``, reads the weights, the active layers and the AdamW state around each optimizer step.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate.optimizer import AcceleratedOptimizer
from torch import nn
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

import lisa_tune
from lisa_tune.errors import InputError
from lisa_tune.lisa.callback import LisaCallback
from lisa_tune.lisa.sampler import LayerSampler
from lisa_tune.modeling import build_model

CONFIG_PATH = Path(__file__).resolve().parents[1] / "profiles" / "models" / "tiny-llama" / "config.json"
NUM_LAYERS = 4
LAYER_PREFIX = "model.layers."
EMBEDDING = "model.embed_tokens.weight"
HEAD = "lm_head.weight"
FINAL_NORM = "model.norm.weight"
NON_LAYER = {EMBEDDING, HEAD, FINAL_NORM}
SEQUENCE_LENGTH = 16
DATASET_SIZE = 64


pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


class TokenDataset(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """Random token ids that serve as their own labels."""

    def __init__(self, size: int, vocab_size: int) -> None:
        generator = torch.Generator().manual_seed(1)
        self.input_ids = torch.randint(0, vocab_size, (size, SEQUENCE_LENGTH), generator=generator)

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[index], "labels": self.input_ids[index]}


def _config() -> dict[str, Any]:
    config: dict[str, Any] = json.loads(CONFIG_PATH.read_text())
    return config


def _model() -> nn.Module:
    torch.manual_seed(0)
    return build_model(_config(), device="cpu", dtype=torch.float32)


def _trainer(
    model: nn.Module,
    output_dir: Path,
    callbacks: list[TrainerCallback] | None,
    *,
    max_steps: int,
    gradient_accumulation_steps: int = 1,
    weight_decay: float = 0.0,
    optimizers: tuple[torch.optim.Optimizer | None, None] = (None, None),
    **extra: Any,
) -> Trainer:
    options: dict[str, Any] = {"save_strategy": "no", **extra}
    args = TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=2,
        max_steps=max_steps,
        gradient_accumulation_steps=gradient_accumulation_steps,
        weight_decay=weight_decay,
        report_to=[],
        use_cpu=True,
        logging_strategy="no",
        learning_rate=1e-3,
        disable_tqdm=True,
        **options,
    )
    dataset = TokenDataset(DATASET_SIZE, _config()["vocab_size"])
    return Trainer(model=model, args=args, train_dataset=dataset, callbacks=callbacks, optimizers=optimizers)


def _layer_of(name: str) -> int | None:
    if not name.startswith(LAYER_PREFIX):
        return None
    return int(name[len(LAYER_PREFIX) :].split(".")[0])


def _layer_names(model: nn.Module, layers: Iterable[int]) -> set[str]:
    selected = set(layers)
    return {name for name, _ in model.named_parameters() if _layer_of(name) in selected}


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: parameter.detach().clone() for name, parameter in model.named_parameters()}


def _changed(model: nn.Module, before: dict[str, torch.Tensor]) -> set[str]:
    return {name for name, parameter in model.named_parameters() if not torch.equal(parameter, before[name])}


def _names_with_state(optimizer: torch.optim.Optimizer, model: nn.Module) -> set[str]:
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    inner = getattr(optimizer, "optimizer", optimizer)
    return {names[id(parameter)] for parameter, state in inner.state.items() if state}


def _group_index_by_name(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, int]:
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    return {
        names[id(parameter)]: index
        for index, group in enumerate(optimizer.param_groups)
        for parameter in group["params"]
    }


def _group_names(optimizer: torch.optim.Optimizer, model: nn.Module) -> list[list[str]]:
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    return [[names[id(parameter)] for parameter in group["params"]] for group in optimizer.param_groups]


@dataclass
class Period:
    """The layers active during one period and the parameters whose values changed during it."""

    layers: list[int]
    changed: set[str]


class Recorder(TrainerCallback):
    """Reads the model and the optimizer around each optimizer step of a run with ``lisa``.

    Register it after ``lisa``, so each of its hooks reads the state that ``lisa`` left.
    """

    def __init__(self, lisa: LisaCallback) -> None:
        self.lisa = lisa
        self.optimizer_names_at_start: set[str] = set()
        self.trainable_at_start: set[str] = set()
        self.active_by_step: dict[int, list[int]] = {}
        self.state_by_step: dict[int, set[str]] = {}
        self.switch_steps: list[int] = []
        self.micro_batches = 0
        self.periods: list[Period] = []
        self._switches = 0
        self._period_start: dict[str, torch.Tensor] = {}
        self._period_layers: list[int] = []

    def _begin_period(self, model: nn.Module) -> None:
        self._period_start = _snapshot(model)
        self._period_layers = self.lisa.active_layers

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        **kwargs: Any,
    ) -> None:
        assert model is not None and optimizer is not None
        self.optimizer_names_at_start = set(_group_index_by_name(optimizer, model))
        self.trainable_at_start = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
        assert self.lisa.controller is not None
        self._switches = self.lisa.controller.switches
        self._begin_period(model)

    def on_optimizer_step(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        **kwargs: Any,
    ) -> None:
        assert model is not None and optimizer is not None
        # global_step counts the steps already finished, so this step is number global_step + 1.
        step = state.global_step + 1
        self.active_by_step[step] = self.lisa.active_layers
        self.state_by_step[step] = _names_with_state(optimizer, model)

    def on_substep_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.micro_batches += 1

    def on_step_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        assert model is not None and self.lisa.controller is not None
        self.micro_batches += 1
        if self.lisa.controller.switches == self._switches:
            return
        self._switches = self.lisa.controller.switches
        self.switch_steps.append(state.global_step)
        self.periods.append(Period(self._period_layers, _changed(model, self._period_start)))
        self._begin_period(model)


def _run(
    tmp_path: Path, lisa: LisaCallback, *, max_steps: int, **trainer_options: Any
) -> tuple[nn.Module, Trainer, Recorder]:
    model = _model()
    recorder = Recorder(lisa)
    trainer = _trainer(model, tmp_path, [lisa, recorder], max_steps=max_steps, **trainer_options)
    trainer.train()
    return model, trainer, recorder


# Training ---------------------------------------------------------------------------------------------------------


def test_fine_tune_changes_gamma_layers_per_period(tmp_path: Path) -> None:
    lisa = LisaCallback(gamma=2, interval=3, seed=0)
    model = _model()
    recorder = Recorder(lisa)
    trainer = _trainer(model, tmp_path, [lisa, recorder], max_steps=12)

    output = trainer.train()

    assert output.global_step == 12
    assert math.isfinite(output.training_loss)
    assert len(recorder.periods) == 4
    for period in recorder.periods:
        changed_in_layers = {name for name in period.changed if _layer_of(name) is not None}
        assert len(period.layers) == 2
        assert changed_in_layers == _layer_names(model, period.layers)
        assert EMBEDDING in period.changed
        assert HEAD in period.changed
        assert FINAL_NORM in period.changed


def test_interval_counts_optimizer_steps(tmp_path: Path) -> None:
    lisa = LisaCallback(gamma=2, interval=2, seed=3)

    _, _, recorder = _run(tmp_path, lisa, max_steps=6, gradient_accumulation_steps=2)

    sampler = LayerSampler(NUM_LAYERS, 2, seed=3)
    draws = [sampler.draw() for _ in range(3)]
    assert recorder.micro_batches == 12
    assert recorder.switch_steps == [2, 4, 6]
    assert recorder.active_by_step == {
        1: draws[0],
        2: draws[0],
        3: draws[1],
        4: draws[1],
        5: draws[2],
        6: draws[2],
    }


def test_every_layer_trained_over_long_run(tmp_path: Path) -> None:
    lisa = LisaCallback(gamma=1, interval=2, seed=0)
    model = _model()
    before = _snapshot(model)
    trainer = _trainer(model, tmp_path, [lisa], max_steps=24)

    trainer.train()

    changed = _changed(model, before)
    assert {_layer_of(name) for name in changed} - {None} == set(range(NUM_LAYERS))
    assert _layer_names(model, range(NUM_LAYERS)) <= changed


# Optimizer state --------------------------------------------------------------------------------------------------


def test_reset_keeps_state_of_active_layers_only(tmp_path: Path) -> None:
    lisa = LisaCallback(gamma=1, interval=1, policy="reset", seed=0)

    model, trainer, recorder = _run(tmp_path, lisa, max_steps=10)

    assert isinstance(trainer.optimizer, AcceleratedOptimizer)
    visited = {layer for layers in recorder.active_by_step.values() for layer in layers}
    assert len(visited) > 1
    for step, names_with_state in recorder.state_by_step.items():
        assert names_with_state == NON_LAYER | _layer_names(model, recorder.active_by_step[step]), f"after step {step}"
    # The switch after the last step frees the state of the layer that left.
    still_active = set(recorder.active_by_step[10]) & set(lisa.active_layers)
    assert _names_with_state(trainer.optimizer, model) == NON_LAYER | _layer_names(model, still_active)


def test_persistent_keeps_state_of_visited_layers(tmp_path: Path) -> None:
    lisa = LisaCallback(gamma=1, interval=1, policy="persistent", seed=0)

    model, trainer, recorder = _run(tmp_path, lisa, max_steps=10)

    visited: set[int] = set()
    for step in sorted(recorder.state_by_step):
        visited.update(recorder.active_by_step[step])
        assert recorder.state_by_step[step] == NON_LAYER | _layer_names(model, visited), f"after step {step}"
    assert len(visited) > 1
    assert _names_with_state(trainer.optimizer, model) == NON_LAYER | _layer_names(model, visited)


# Parameters in the optimizer ---------------------------------------------------------------------------------


def test_optimizer_holds_every_parameter(tmp_path: Path) -> None:
    lisa = LisaCallback(gamma=1, interval=1, seed=0)

    model, _, recorder = _run(tmp_path, lisa, max_steps=1)

    all_names = {name for name, _ in model.named_parameters()}
    first = LayerSampler(NUM_LAYERS, 1, seed=0).draw()
    assert recorder.optimizer_names_at_start == all_names
    assert recorder.trainable_at_start == NON_LAYER | _layer_names(model, first)


def test_layers_frozen_before_init_join_trainer_optimizer(tmp_path: Path) -> None:
    reference = _trainer(_model(), tmp_path / "reference", None, max_steps=1, weight_decay=0.1)
    reference_optimizer = reference.create_optimizer()
    model = _model()
    for name, parameter in model.named_parameters():
        if name.startswith(LAYER_PREFIX):
            parameter.requires_grad_(False)
    lisa = LisaCallback(gamma=1, interval=1, seed=0)

    trainer = _trainer(model, tmp_path, [lisa], max_steps=1, weight_decay=0.1)
    trainer.train()

    # Equal lists mean that the Trainer built the groups itself, in the order it uses for a fully trainable model.
    assert _group_names(trainer.optimizer, model) == _group_names(reference_optimizer, reference.model)


@pytest.mark.parametrize(
    ("frozen_prefixes", "registration"),
    [
        ((LAYER_PREFIX, FINAL_NORM, HEAD), "init"),
        ((LAYER_PREFIX, FINAL_NORM, HEAD), "add_callback"),
        ((f"{LAYER_PREFIX}2.", f"{LAYER_PREFIX}3."), "add_callback"),
    ],
    ids=["head-frozen-before-init", "all-frozen-added-late", "some-frozen-added-late"],
)
def test_frozen_parameters_join_trainer_groups(
    tmp_path: Path, frozen_prefixes: tuple[str, ...], registration: str
) -> None:
    reference = _trainer(_model(), tmp_path / "reference", None, max_steps=1, weight_decay=0.1)
    reference_groups = _group_index_by_name(reference.create_optimizer(), reference.model)

    model = _model()
    for name, parameter in model.named_parameters():
        if name.startswith(frozen_prefixes):
            parameter.requires_grad_(False)
    lisa = LisaCallback(gamma=2, interval=1, seed=0)
    recorder = Recorder(lisa)
    callbacks: list[TrainerCallback] = [lisa, recorder]
    trainer = _trainer(model, tmp_path, callbacks if registration == "init" else None, max_steps=4, weight_decay=0.1)
    if registration == "add_callback":
        for callback in callbacks:
            trainer.add_callback(callback)

    trainer.train()

    optimizer_parameters = [parameter for group in trainer.optimizer.param_groups for parameter in group["params"]]
    assert reference.optimizer.param_groups[0]["weight_decay"] == 0.1
    assert reference.optimizer.param_groups[1]["weight_decay"] == 0.0
    assert _group_index_by_name(trainer.optimizer, model) == reference_groups
    assert len(optimizer_parameters) == len({id(parameter) for parameter in optimizer_parameters})
    assert len(recorder.periods) == 4
    for period in recorder.periods:
        changed_in_layers = {name for name in period.changed if _layer_of(name) is not None}
        assert changed_in_layers == _layer_names(model, period.layers)
        assert {HEAD, FINAL_NORM} <= period.changed


def test_hand_built_optimizer_gets_layers_in_sibling_group(tmp_path: Path) -> None:
    model = _model()
    for name, parameter in model.named_parameters():
        if name.startswith((f"{LAYER_PREFIX}2.", f"{LAYER_PREFIX}3.")):
            parameter.requires_grad_(False)
    in_layers = [p for name, p in model.named_parameters() if _layer_of(name) in {0, 1}]
    outside = [p for name, p in model.named_parameters() if _layer_of(name) is None]
    optimizer = torch.optim.AdamW(
        [{"params": in_layers, "weight_decay": 0.01, "lr": 5e-4}, {"params": outside, "weight_decay": 0.0}], lr=1e-3
    )
    lisa = LisaCallback(gamma=2, interval=1, seed=0)
    trainer = _trainer(model, tmp_path, None, max_steps=2, optimizers=(optimizer, None))
    trainer.add_callback(lisa)

    trainer.train()

    groups = _group_index_by_name(optimizer, model)
    assert {groups[name] for name in _layer_names(model, range(NUM_LAYERS))} == {0}
    assert {groups[name] for name in NON_LAYER} == {1}


# Resuming ---------------------------------------------------------------------------------------------------------


def test_resume_trains_same_layers(tmp_path: Path) -> None:
    first = LisaCallback(gamma=1, interval=2, seed=5)
    _, _, uninterrupted = _run(tmp_path, first, max_steps=6, save_strategy="steps", save_steps=4)

    second = LisaCallback(gamma=1, interval=2, seed=5)
    model = _model()
    resumed = Recorder(second)
    trainer = _trainer(model, tmp_path / "resumed", [second, resumed], max_steps=6)
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))

    assert resumed.active_by_step == {5: uninterrupted.active_by_step[5], 6: uninterrupted.active_by_step[6]}
    assert resumed.state_by_step[5] == uninterrupted.state_by_step[5]


# Arguments and the package root -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [{"gamma": 0, "interval": 1}, {"gamma": 1, "interval": 0}, {"gamma": 1, "interval": 1, "policy": "keep"}],
    ids=["gamma-zero", "interval-zero", "unknown-policy"],
)
def test_invalid_arguments_raise(options: dict[str, Any]) -> None:
    with pytest.raises(InputError):
        LisaCallback(**options)


def test_gamma_above_layer_count_raises(tmp_path: Path) -> None:
    trainer = _trainer(_model(), tmp_path, [LisaCallback(gamma=NUM_LAYERS + 1, interval=1)], max_steps=1)

    with pytest.raises(InputError, match="invalid gamma 5"):
        trainer.train()


def test_package_root_imports_callback_lazily() -> None:
    script = "import sys, lisa_tune; print(sorted(name for name in ('torch', 'transformers') if name in sys.modules))"

    completed = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "[]"
    assert lisa_tune.LisaCallback is LisaCallback
    with pytest.raises(AttributeError, match="NoSuchName"):
        _ = lisa_tune.NoSuchName
