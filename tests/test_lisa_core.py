"""Tests of the LISA core: decoder layer discovery, the layer sampler and the controller with real training steps.

The controller tests train the tiny bundled models on the CPU in fp32, so every claim about which weights change
and which parameters have AdamW state is checked on real tensors.
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

from lisa_tune.errors import InputError, ModelStructureError
from lisa_tune.lisa.controller import LisaController, OptimizerStatePolicy
from lisa_tune.lisa.layers import find_decoder_layers
from lisa_tune.lisa.optim import build_adamw
from lisa_tune.lisa.sampler import LayerSampler
from lisa_tune.lisa.step import train_step
from lisa_tune.modeling import build_model
from lisa_tune.profiles import bundled_model_names, resolve_model

TINY_MODELS = [name for name in bundled_model_names() if name.startswith("tiny-")]

EXPECTED_LAYER_PATHS = {
    "tiny-falcon": "transformer.h",
    "tiny-gemma2": "model.layers",
    "tiny-gpt-neox": "gpt_neox.layers",
    "tiny-gpt2": "transformer.h",
    "tiny-llama": "model.layers",
    "tiny-mistral": "model.layers",
    "tiny-mixtral": "model.layers",
    "tiny-olmo2": "model.layers",
    "tiny-phi3": "model.layers",
    "tiny-qwen2": "model.layers",
    "tiny-qwen3": "model.layers",
}
TINY_LAYERS = 4
SEQUENCE_LENGTH = 16


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def _config(name: str) -> dict[str, Any]:
    return resolve_model(name).config


def _attention(config: dict[str, Any]) -> str:
    # transformers 5.25 rejects sdpa for Gemma 2.
    return "eager" if config["model_type"] == "gemma2" else "sdpa"


def _meta_model(name: str) -> nn.Module:
    config = _config(name)
    return build_model(config, device="meta", dtype=torch.float32, attn_implementation=_attention(config))


def _cpu_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return build_model(_config(name), device="cpu", dtype=torch.float32)


def _batch(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, _config(name)["vocab_size"], (1, SEQUENCE_LENGTH), generator=generator)
    return {"input_ids": input_ids, "labels": input_ids}


def _expected_trainable_names(model: nn.Module, controller: LisaController) -> set[str]:
    """Name every parameter outside the decoder layer list and every parameter of an active layer."""
    prefix = controller.decoder.path + "."
    names = set()
    for name, _ in model.named_parameters():
        outside_layers = not name.startswith(prefix)
        if outside_layers or int(name[len(prefix) :].split(".")[0]) in controller.active_layers:
            names.add(name)
    return names


def _requires_grad_names(model: nn.Module) -> set[str]:
    return {name for name, parameter in model.named_parameters() if parameter.requires_grad}


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: parameter.detach().clone() for name, parameter in model.named_parameters()}


def _changed_names(model: nn.Module, before: dict[str, torch.Tensor]) -> set[str]:
    return {name for name, parameter in model.named_parameters() if not torch.equal(parameter, before[name])}


def _layers_with_state(controller: LisaController, optimizer: torch.optim.Optimizer) -> list[int]:
    return [
        index
        for index, parameters in enumerate(controller.layer_parameters)
        if any(parameter in optimizer.state for parameter in parameters)
    ]


def _step_on_zero_gradients(controller: LisaController, optimizer: torch.optim.Optimizer) -> None:
    """Run one AdamW step that creates state for the trainable set without a forward and backward pass."""
    for parameter in controller.trainable_parameters():
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


# Layer discovery


def test_expected_paths_cover_tiny_models() -> None:
    assert sorted(EXPECTED_LAYER_PATHS) == TINY_MODELS


@pytest.mark.parametrize("name", TINY_MODELS)
def test_find_layers_tiny_model(name: str) -> None:
    model = _meta_model(name)
    decoder = find_decoder_layers(model)
    assert decoder.path == EXPECTED_LAYER_PATHS[name]
    assert len(decoder) == TINY_LAYERS
    assert decoder.layers is model.get_submodule(EXPECTED_LAYER_PATHS[name])


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)


class NoLayerList(nn.Module):
    """An embedding and a head, with no module list at all."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed


class TwoStacks(NoLayerList):
    """Two module lists of three identical blocks at paths the search does not know, and no config."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder_blocks = nn.ModuleList(Block() for _ in range(3))
        self.decoder_blocks = nn.ModuleList(Block() for _ in range(3))


class UnknownPath(NoLayerList):
    """One list of identical blocks whose length matches the config, next to a shorter list of heads."""

    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(num_hidden_layers=3)
        self.backbone = nn.Module()
        self.backbone.blocks = nn.ModuleList(Block() for _ in range(3))
        self.heads = nn.ModuleList([nn.Linear(4, 10), nn.Linear(4, 10)])


class MixedList(NoLayerList):
    """A list whose length matches the config but whose entries differ in class."""

    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(num_hidden_layers=2)
        self.mixed = nn.ModuleList([Block(), nn.ReLU()])


def test_find_layers_unknown_path() -> None:
    model = UnknownPath()
    decoder = find_decoder_layers(model)
    assert decoder.path == "backbone.blocks"
    assert decoder.layers is model.backbone.blocks


def test_find_layers_no_list_raises() -> None:
    with pytest.raises(ModelStructureError, match="Module lists seen: none"):
        find_decoder_layers(NoLayerList())


def test_find_layers_mixed_list_raises() -> None:
    with pytest.raises(ModelStructureError, match=r"mixed \(2\)"):
        find_decoder_layers(MixedList())


def test_find_layers_ambiguous_names_both() -> None:
    with pytest.raises(ModelStructureError) as raised:
        find_decoder_layers(TwoStacks())
    assert "encoder_blocks (3)" in str(raised.value)
    assert "decoder_blocks (3)" in str(raised.value)


def test_layers_path_override() -> None:
    model = TwoStacks()
    decoder = find_decoder_layers(model, "decoder_blocks")
    assert decoder.path == "decoder_blocks"
    assert decoder.layers is model.decoder_blocks


def test_controller_layers_path_override() -> None:
    model = TwoStacks()
    controller = LisaController(model, gamma=1, layers_path="encoder_blocks")
    assert controller.decoder.layers is model.encoder_blocks
    assert controller.num_layers == 3


@pytest.mark.parametrize("override", ["model.blocks", "model.norm", "model.layers.0", "lm_head.weight"])
def test_wrong_layers_path_raises(override: str) -> None:
    with pytest.raises(ModelStructureError) as raised:
        find_decoder_layers(_meta_model("tiny-llama"), override)
    assert repr(override) in str(raised.value)
    assert "model.layers (4)" in str(raised.value)


def test_empty_layers_path_raises() -> None:
    model = NoLayerList()
    model.empty = nn.ModuleList()
    with pytest.raises(ModelStructureError, match=r"empty \(0\)"):
        find_decoder_layers(model, "empty")


# LayerSampler


def _draws(sampler: LayerSampler, count: int) -> list[list[int]]:
    return [sampler.draw() for _ in range(count)]


@pytest.mark.parametrize(("num_layers", "gamma"), [(4, 1), (8, 2), (32, 7), (5, 5)])
def test_sampler_draw_shape(num_layers: int, gamma: int) -> None:
    for draw in _draws(LayerSampler(num_layers, gamma, seed=3), 200):
        assert len(draw) == gamma
        assert len(set(draw)) == gamma
        assert draw == sorted(draw)
        assert all(0 <= index < num_layers for index in draw)


def test_sampler_same_seed_same_draws() -> None:
    assert _draws(LayerSampler(8, 2, seed=7), 50) == _draws(LayerSampler(8, 2, seed=7), 50)


def test_sampler_different_seed_differs() -> None:
    assert _draws(LayerSampler(8, 2, seed=7), 50) != _draws(LayerSampler(8, 2, seed=8), 50)


def test_sampler_uniform_layers() -> None:
    draws = _draws(LayerSampler(8, 2, seed=0), 4000)
    counts = Counter(index for draw in draws for index in draw)
    # Each draw picks a layer with probability 2/8, so a layer's count is binomial(4000, 0.25): mean 1000,
    # standard deviation 27.4. The bound is five standard deviations.
    for layer in range(8):
        assert abs(counts[layer] - 1000) < 137, f"layer {layer} drawn {counts[layer]} times"
    # The counts are not independent because each draw adds 2 to their sum, so the statistic is only
    # chi-square-like. Its expected value is 8 * 750 / 1000 = 6, and 24.3 is the 0.1 percent tail of
    # chi-square with 7 degrees of freedom.
    chi_square = sum((counts[layer] - 1000) ** 2 / 1000 for layer in range(8))
    assert chi_square < 24.3


def test_sampler_uniform_pairs() -> None:
    # Uniform sampling without replacement makes each of the 28 pairs of 8 layers equally likely: mean
    # 4000 / 28 = 142.9, standard deviation 11.8, and the bound is five standard deviations. A sampler that
    # favoured neighbouring layers would pass the per-layer check above and fail this one.
    draws = _draws(LayerSampler(8, 2, seed=0), 4000)
    counts = Counter(tuple(draw) for draw in draws)
    for pair in itertools.combinations(range(8), 2):
        assert abs(counts[pair] - 4000 / 28) < 59, f"pair {pair} drawn {counts[pair]} times"


def test_sampler_keeps_global_rng() -> None:
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    _draws(LayerSampler(8, 2, seed=0), 5)
    assert torch.equal(torch.rand(3), expected)


def test_sampler_state_round_trip() -> None:
    original = LayerSampler(8, 2, seed=5)
    _draws(original, 5)
    state = original.state_dict()
    expected = _draws(original, 10)

    restored = LayerSampler(8, 2, seed=99)
    restored.load_state_dict(state)
    assert _draws(restored, 10) == expected


def test_sampler_state_mismatch_raises() -> None:
    state = LayerSampler(8, 2).state_dict()
    with pytest.raises(InputError, match="gamma 2"):
        LayerSampler(8, 3).load_state_dict(state)


@pytest.mark.parametrize(("num_layers", "gamma"), [(4, 0), (4, -1), (4, 5), (0, 1)])
def test_sampler_invalid_gamma_raises(num_layers: int, gamma: int) -> None:
    with pytest.raises(InputError):
        LayerSampler(num_layers, gamma)


# LisaController with real training steps


def test_controller_zero_interval_raises() -> None:
    with pytest.raises(InputError, match="K=0"):
        LisaController(_meta_model("tiny-llama"), gamma=1, interval=0)


def test_controller_gamma_above_layers_raises() -> None:
    with pytest.raises(InputError, match="invalid gamma 5"):
        LisaController(_meta_model("tiny-llama"), gamma=5)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-falcon"])
def test_controller_requires_grad_set(name: str) -> None:
    model = _meta_model(name)
    controller = LisaController(model, gamma=2)
    assert len(controller.active_layers) == 2
    assert _requires_grad_names(model) == _expected_trainable_names(model, controller)
    assert model.get_input_embeddings().weight.requires_grad
    assert model.get_output_embeddings().weight.requires_grad


def test_controller_full_fine_tuning() -> None:
    model = _cpu_model("tiny-llama")
    controller = LisaController(model, gamma=None, interval=1)
    optimizer = build_adamw(model, lr=1e-3)
    for step in range(3):
        train_step(model, optimizer, controller, [_batch("tiny-llama", step)])
    assert controller.switches == 0
    assert controller.active_layers == list(range(TINY_LAYERS))
    assert all(parameter.requires_grad for parameter in model.parameters())


@pytest.mark.parametrize("policy", list(OptimizerStatePolicy), ids=lambda policy: policy.value)
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_train_step_changes_trainable_only(name: str, policy: OptimizerStatePolicy) -> None:
    model = _cpu_model(name)
    controller = LisaController(model, gamma=2, interval=1, policy=policy)
    optimizer = build_adamw(model, lr=1e-3)
    expected: list[set[str]] = []
    changed: list[set[str]] = []
    # interval 1 switches after every step, so later steps also check that a switch neither moves weights nor
    # lets AdamW update the layers that left the active set.
    for step in range(3):
        expected.append(_expected_trainable_names(model, controller))
        before = _snapshot(model)
        train_step(model, optimizer, controller, [_batch(name, step)])
        changed.append(_changed_names(model, before))
    assert changed == expected


def test_controller_switches_every_interval() -> None:
    interval = 3
    model = _cpu_model("tiny-llama")
    controller = LisaController(model, gamma=2, interval=interval, seed=4)
    optimizer = build_adamw(model, lr=1e-3)
    reference = _draws(LayerSampler(TINY_LAYERS, 2, seed=4), 4)

    active: list[list[int]] = []
    switches: list[int] = []
    for step in range(1, 10):
        train_step(model, optimizer, controller, [_batch("tiny-llama", step)])
        active.append(controller.active_layers)
        switches.append(controller.switches)

    assert controller.optimizer_steps == 9
    assert switches == [0, 0, 1, 1, 1, 2, 2, 2, 3]
    assert active == [reference[step // interval] for step in range(1, 10)]
    assert _requires_grad_names(model) == _expected_trainable_names(model, controller)


def test_controller_visits_every_layer() -> None:
    model = _cpu_model("tiny-llama")
    controller = LisaController(model, gamma=1, interval=1)
    optimizer = build_adamw(model, lr=1e-3)
    active: set[int] = set(controller.active_layers)
    for step in range(16):
        train_step(model, optimizer, controller, [_batch("tiny-llama", step)])
        active.update(controller.active_layers)
    assert active == set(range(TINY_LAYERS))
    assert controller.visited_layers == set(range(TINY_LAYERS))


def _run_switches(policy: OptimizerStatePolicy, switches: int) -> tuple[nn.Module, LisaController, Any, list[Any]]:
    """Step and switch ``switches`` times, then step once more, and return what the state checks need.

    The last list holds, for every step, the layers with AdamW state, the active layers and the visited layers.
    """
    model = _cpu_model("tiny-llama")
    controller = LisaController(model, gamma=2, interval=1, policy=policy)
    optimizer = build_adamw(model, lr=1e-3)
    history = []
    for _ in range(switches):
        _step_on_zero_gradients(controller, optimizer)
        state_layers = _layers_with_state(controller, optimizer)
        history.append((state_layers, controller.active_layers, sorted(controller.visited_layers)))
        controller.switch(optimizer)
    _step_on_zero_gradients(controller, optimizer)
    return model, controller, optimizer, history


def test_reset_state_only_active() -> None:
    model, controller, optimizer, history = _run_switches(OptimizerStatePolicy.RESET, 50)
    expected = {id(parameter) for parameter in controller.trainable_parameters()}
    frozen_with_grad = [name for name, p in model.named_parameters() if not p.requires_grad and p.grad is not None]

    assert controller.switches == 50
    assert {id(parameter) for parameter in optimizer.state} == expected
    assert _layers_with_state(controller, optimizer) == controller.active_layers
    assert [state for state, _, _ in history] == [active for _, active, _ in history]
    assert frozen_with_grad == []


def test_persistent_state_every_visited() -> None:
    _, controller, optimizer, history = _run_switches(OptimizerStatePolicy.PERSISTENT, 50)
    visited = sorted(controller.visited_layers)
    expected = {id(parameter) for parameter in controller.always_trainable}
    for index in visited:
        expected.update(id(parameter) for parameter in controller.layer_parameters[index])

    assert controller.switches == 50
    assert visited == list(range(TINY_LAYERS))
    assert {id(parameter) for parameter in optimizer.state} == expected
    assert [state for state, _, _ in history] == [visited_then for _, _, visited_then in history]


def test_freeze_embedding_untied() -> None:
    model = _cpu_model("tiny-llama")
    controller = LisaController(model, gamma=2, interval=1, freeze_embedding=True)
    optimizer = build_adamw(model, lr=1e-3)
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    embedding_before = embedding.detach().clone()
    head_before = head.detach().clone()

    for step in range(3):
        train_step(model, optimizer, controller, [_batch("tiny-llama", step)])

    assert not embedding.requires_grad
    assert torch.equal(embedding, embedding_before)
    assert embedding not in optimizer.state
    assert head.requires_grad
    assert not torch.equal(head, head_before)
    assert all(parameter is not embedding for parameter in controller.trainable_parameters())


def test_freeze_embedding_tied_warns(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    # The command line stops lisa_tune records at its own handler; caplog listens on the root logger.
    monkeypatch.setattr(logging.getLogger("lisa_tune"), "propagate", True)
    model = _cpu_model("tiny-gpt2")
    with caplog.at_level(logging.WARNING, logger="lisa_tune.lisa.controller"):
        controller = LisaController(model, gamma=2, interval=1, freeze_embedding=True)
    optimizer = build_adamw(model, lr=1e-3)
    embedding = model.get_input_embeddings().weight
    before = embedding.detach().clone()
    train_step(model, optimizer, controller, [_batch("tiny-gpt2")])

    assert "ties its embedding and LM head" in caplog.text
    assert not embedding.requires_grad
    assert torch.equal(embedding, before)


def test_controller_state_round_trip() -> None:
    original = LisaController(_meta_model("tiny-llama"), gamma=2, seed=1)
    for _ in range(3):
        original.switch(None)
    state = original.state_dict()
    expected = []
    for _ in range(5):
        original.switch(None)
        expected.append(original.active_layers)

    model = _meta_model("tiny-llama")
    restored = LisaController(model, gamma=2, seed=2)
    restored.load_state_dict(state)
    assert restored.active_layers == state["active_layers"]
    assert _requires_grad_names(model) == _expected_trainable_names(model, restored)
    continued = []
    for _ in range(5):
        restored.switch(None)
        continued.append(restored.active_layers)
    assert continued == expected
