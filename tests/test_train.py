"""The LISA trainer on tiny models on the CPU: training, exact resume, checkpoints, the final model, bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import transformers
from records import write_records

from lisa_tune.cli import main
from lisa_tune.errors import InputError
from lisa_tune.train.config import TrainConfig
from lisa_tune.train.trainer import LisaTrainer

os.environ.setdefault("HF_HUB_OFFLINE", "1")


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def config(tmp_path: Path, run: str = "run", **changes: object) -> TrainConfig:
    settings: dict[str, object] = {
        "data": write_records(tmp_path / "data.jsonl"),
        "run_dir": tmp_path / run,
        "model": "tiny-llama",
        "gamma": 2,
        "interval": 3,
        "max_steps": 12,
        "sequence_length": 48,
        "micro_batch_size": 4,
        "eval_every": 6,
        "log_every": 3,
        "save_every": 4,
        "warmup_steps": 2,
        "tokenizer_vocab_size": 512,
    }
    settings.update(changes)
    return TrainConfig(**settings)  # type: ignore[arg-type]


def run(config: TrainConfig, resume: bool = False, stop_after: int | None = None) -> list[float]:
    trainer = LisaTrainer(config, resume=resume)
    trainer.setup()
    return trainer.train(stop_after=stop_after).losses


def test_training_lowers_heldout_loss(tmp_path: Path) -> None:
    trainer = LisaTrainer(config(tmp_path, max_steps=30, learning_rate=3e-3, eval_every=30))
    trainer.setup()
    result = trainer.train()
    assert result.eval_losses[30] < result.eval_losses[0]


def test_resume_is_bitwise_exact(tmp_path: Path) -> None:
    uninterrupted = run(config(tmp_path, "whole"))
    run(config(tmp_path, "split"), stop_after=5)
    resumed = run(config(tmp_path, "split"), resume=True)
    assert resumed == uninterrupted


def test_final_model_loads(tmp_path: Path) -> None:
    run(config(tmp_path, max_steps=3))
    final = tmp_path / "run" / "final"
    model = transformers.AutoModelForCausalLM.from_pretrained(final)
    tokenizer = transformers.AutoTokenizer.from_pretrained(final)
    assert model.config.vocab_size == len(tokenizer)
    assert (final / "model.safetensors").is_file()


def test_metrics_file_fields(tmp_path: Path) -> None:
    run(config(tmp_path, max_steps=6))
    lines = (tmp_path / "run" / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    logs = [record for record in records if record["event"] == "log"]
    evals = [record for record in records if record["event"] == "eval"]
    assert [record["step"] for record in logs] == [3, 6]
    for key in ("loss", "learning_rate", "active_layers", "tokens_per_second", "peak_memory_bytes", "tokens"):
        assert key in logs[0], key
    assert len(logs[0]["active_layers"]) == 2
    assert logs[1]["eval_loss"] is not None
    # The default eval_every is above 6 steps, so the held-out set is scored at the start and at the end.
    assert [record["step"] for record in evals] == [0, 6]
    assert evals[0]["tokens"] == 0
    assert evals[1]["tokens"] == logs[1]["tokens"] > logs[0]["tokens"] > 0


def test_layers_switch_every_interval(tmp_path: Path) -> None:
    trainer = LisaTrainer(config(tmp_path, max_steps=9, interval=3))
    trainer.setup()
    trainer.train()
    assert trainer.controller.switches == 3


def test_partial_checkpoint_ignored(tmp_path: Path) -> None:
    # A run killed while writing leaves checkpoint.partial behind; resume uses the last complete checkpoint.
    cfg = config(tmp_path)
    run(cfg, stop_after=4)
    partial = cfg.run_dir / "checkpoint.partial"
    partial.mkdir()
    (partial / "state.pt").write_bytes(b"truncated")
    trainer = LisaTrainer(cfg, resume=True)
    trainer.setup()
    assert trainer.step == 4


def test_resume_other_gamma_rejected(tmp_path: Path) -> None:
    run(config(tmp_path), stop_after=2)
    trainer = LisaTrainer(config(tmp_path, gamma=1), resume=True)
    with pytest.raises(InputError, match="gamma"):
        trainer.setup()


def test_resume_without_checkpoint_rejected(tmp_path: Path) -> None:
    trainer = LisaTrainer(config(tmp_path), resume=True)
    with pytest.raises(InputError, match="no checkpoint"):
        trainer.setup()


def test_model_dir_without_weights_rejected(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}", encoding="utf-8")
    trainer = LisaTrainer(config(tmp_path, model=str(folder)))
    with pytest.raises(InputError, match="no weights"):
        trainer.setup()


def test_invalid_settings_listed() -> None:
    with pytest.raises(InputError, match="interval") as error:
        TrainConfig(data=Path("d"), run_dir=Path("r"), interval=0, max_steps=0).validate()
    assert "--max-steps" in str(error.value)


def test_empty_data_rejected(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    trainer = LisaTrainer(config(tmp_path, data=empty))
    with pytest.raises(InputError):
        trainer.setup()


def test_cli_reads_plan_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plan = tmp_path / "plan.yaml"
    plan.write_text(
        "model: tiny-llama\ngamma: 1\nmicro_batch_size: 2\nsequence_length: 64\nprecision: fp32\n", encoding="utf-8"
    )
    data = write_records(tmp_path / "data.jsonl")
    arguments = [
        "train",
        "--config",
        str(plan),
        "--data",
        str(data),
        "--run-dir",
        str(tmp_path / "run"),
        "--max-steps",
        "2",
    ]
    status = main(arguments)
    assert status == 0
    state = torch.load(tmp_path / "run" / "checkpoint" / "state.pt", weights_only=False)
    assert state["config"]["gamma"] == 1
    assert state["config"]["micro_batch_size"] == 2


def test_cli_bad_gamma_exit_status(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_records(tmp_path / "data.jsonl")
    status = main(["train", "--data", str(data), "--run-dir", str(tmp_path / "run"), "--gamma", "9"])
    assert status == 2
    assert "gamma 9" in capsys.readouterr().err
