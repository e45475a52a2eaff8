"""The peak of live tensors that the trainer measures in a real CPU step, against the simulator's prediction."""

from __future__ import annotations

import logging
import os
import statistics
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from records import write_records

from lisa_tune.errors import InputError
from lisa_tune.lisa.precision import Precision
from lisa_tune.memory.simulator import SimulationConfig, simulate, validate
from lisa_tune.profiles import resolve_model
from lisa_tune.train.config import TrainConfig
from lisa_tune.train.trainer import LisaTrainer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytestmark = pytest.mark.usefixtures("single_torch_thread")

# The bounds of the CPU ground truth in docs/memory-validation.md and tests/test_simulator.py: a median error of
# at most 1% over the configurations and no configuration above 3%.
MEDIAN_ERROR_BOUND = 0.01
MAX_ERROR_BOUND = 0.03

CASES: dict[str, dict[str, object]] = {
    "tiny-llama, gamma 1, fp32": {"model": "tiny-llama", "gamma": 1, "precision": "fp32"},
    "tiny-qwen2 (tied embeddings), all 4 layers, bf16": {"model": "tiny-qwen2", "gamma": 4, "precision": "bf16"},
    "tiny-llama, gamma 2, checkpointing, 2 micro-batches per step": {
        "model": "tiny-llama",
        "gamma": 2,
        "gradient_checkpointing": True,
        "gradient_accumulation_steps": 2,
    },
    "tiny-gpt2, gamma 1, amp-bf16": {"model": "tiny-gpt2", "gamma": 1, "precision": "amp-bf16"},
}


@pytest.fixture
def propagate_logs(monkeypatch: pytest.MonkeyPatch) -> None:
    # The command line stops lisa_tune records at its own handler; caplog listens on the root logger.
    monkeypatch.setattr(logging.getLogger("lisa_tune"), "propagate", True)


def packed_config(tmp_path: Path, run: str, **changes: object) -> TrainConfig:
    """Two optimizer steps on packed data: the second is the first with the active layers' AdamW state."""
    settings: dict[str, object] = {
        "data": write_records(tmp_path / "data.jsonl"),
        "run_dir": tmp_path / run,
        "interval": 3,
        "max_steps": 2,
        "sequence_length": 48,
        "micro_batch_size": 4,
        "pack": True,
        "eval_every": 100,
        "log_every": 100,
        "save_every": 100,
        "warmup_steps": 1,
        "tokenizer_vocab_size": 512,
    }
    settings.update(changes)
    return TrainConfig(**settings)  # type: ignore[arg-type]


def trained(config: TrainConfig) -> LisaTrainer:
    trainer = LisaTrainer(config)
    trainer.setup()
    trainer.train()
    return trainer


def predict_measured_step(trainer: LisaTrainer) -> int:
    """Predict the measured step from the run's settings, built here rather than taken from the trainer."""
    measured = trainer.measured_step
    assert measured is not None
    config = trainer.config
    estimate = simulate(
        SimulationConfig(
            model_config=trainer.model.config.to_dict(),
            gamma=config.gamma,
            micro_batch_size=config.micro_batch_size,
            sequence_length=config.sequence_length,
            precision=Precision(config.precision),
            gradient_checkpointing=config.gradient_checkpointing,
            attention=config.attention,
            target_device="cpu",
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            active_layers=measured.active_layers,
        )
    )
    return estimate.tensor_peak_bytes


def test_measured_step_matches_prediction(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, propagate_logs: None
) -> None:
    errors: dict[str, float] = {}
    for index, (name, changes) in enumerate(CASES.items()):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="lisa_tune.train.trainer"):
            trainer = trained(packed_config(tmp_path, f"run{index}", **changes))
        measured = trainer.measured_step
        comparison = trainer.memory_comparison

        assert measured is not None, name
        assert measured.step == 2, name
        assert comparison is not None, name
        predicted = predict_measured_step(trainer)
        assert comparison.predicted_bytes == predicted, name
        assert comparison.measured_bytes == measured.peak_bytes, name
        assert "step 2: measured peak of live tensors" in caplog.text, name
        assert f"{measured.peak_bytes:,} and {predicted:,} bytes" in caplog.text, name
        assert "peak resident memory of the process" in caplog.text, name
        errors[name] = (predicted - measured.peak_bytes) / measured.peak_bytes

    details = ", ".join(f"{name}: {error:+.3%}" for name, error in errors.items())
    assert statistics.median(abs(error) for error in errors.values()) <= MEDIAN_ERROR_BOUND, details
    assert max(abs(error) for error in errors.values()) <= MAX_ERROR_BOUND, details


def test_padded_batches_not_measured(tmp_path: Path, caplog: pytest.LogCaptureFixture, propagate_logs: None) -> None:
    # The records are about 20 tokens long, so every padded batch is shorter than the 48 tokens the simulator traces.
    with caplog.at_level(logging.INFO, logger="lisa_tune.train.trainer"):
        trainer = trained(packed_config(tmp_path, "padded", pack=False, max_steps=3))

    assert trainer.measured_step is None
    assert trainer.memory_comparison is None
    assert "the tensor peak of a step was not measured" in caplog.text


def test_measured_step_keeps_trajectory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Five steps with a layer switch after the second: the measured second step must leave the losses, the data
    # position and the global random state exactly as an unmeasured run leaves them.
    settings: dict[str, object] = {"gamma": 1, "interval": 2, "max_steps": 5}
    measured = trained(packed_config(tmp_path, "measured", **settings))
    measured_rng = torch.get_rng_state()
    monkeypatch.setattr(LisaTrainer, "_step_matches_simulation", lambda self, micro: False)
    unmeasured = trained(packed_config(tmp_path, "unmeasured", **settings))
    unmeasured_rng = torch.get_rng_state()

    assert measured.measured_step is not None
    assert unmeasured.measured_step is None
    assert measured.losses == unmeasured.losses
    assert measured.micro_batches_done == unmeasured.micro_batches_done
    assert torch.equal(measured_rng, unmeasured_rng)


def test_resume_exact_with_measured_steps(tmp_path: Path) -> None:
    # The uninterrupted run measures step 2 only. The resumed process measures its first step, step 3, which
    # the uninterrupted run does not, and the losses must still agree bit for bit.
    settings: dict[str, object] = {"gamma": 1, "interval": 3, "max_steps": 6}
    whole = trained(packed_config(tmp_path, "whole", **settings))
    first = LisaTrainer(packed_config(tmp_path, "split", **settings))
    first.setup()
    first.train(stop_after=2)
    resumed = LisaTrainer(packed_config(tmp_path, "split", **settings), resume=True)
    resumed.setup()
    resumed.train()

    assert whole.measured_step is not None
    assert whole.measured_step.step == 2
    assert resumed.measured_step is not None
    assert resumed.measured_step.step == 3
    assert resumed.losses == whole.losses


def test_simulator_rejects_invalid_active_layers() -> None:
    base = SimulationConfig(model_config=dict(resolve_model("tiny-llama").config), gamma=2, target_device="cpu")
    for layers in ((1,), (0, 0), (0, 4)):
        with pytest.raises(InputError, match="active layers"):
            validate(replace(base, active_layers=layers))
    with pytest.raises(InputError, match="gradient accumulation steps 0"):
        validate(replace(base, gradient_accumulation_steps=0))
