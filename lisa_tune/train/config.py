"""Settings of a ``lisa-tune train`` run, readable from the planner's ``plan.yaml``."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from lisa_tune.errors import InputError

PRECISIONS = ("bf16", "amp-bf16", "fp32")


@dataclass
class TrainConfig:
    """One training run. Derived values (sequences per step) are computed, never stored."""

    data: Path
    """Training data: JSON or JSONL records in the Alpaca, chat or plain-text layout."""
    run_dir: Path
    """Folder for checkpoints, metrics, the tokenizer of a bundled profile and the final model."""
    model: str = "tiny-llama"
    """A local model directory with weights and tokenizer, or a bundled profile built with random weights."""
    gamma: int = 2
    """Decoder layers trained per period."""
    interval: int = 20
    """K: optimizer steps per sampling period."""
    policy: str = "reset"
    """Optimizer state of layers leaving the active set: reset frees it, persistent keeps it."""
    precision: str = "fp32"
    gradient_checkpointing: bool = False
    micro_batch_size: int = 4
    """Sequences per forward pass."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step."""
    sequence_length: int = 256
    """Tokens per sequence; longer records are truncated and counted."""
    learning_rate: float = 3e-4
    weight_decay: float = 0.0
    warmup_steps: int = 10
    """Optimizer steps of linear warm-up before the cosine decay to 10% of the learning rate."""
    max_steps: int = 100
    """Optimizer steps of the run."""
    eval_fraction: float = 0.05
    """Share of the records held out for evaluation."""
    eval_every: int = 50
    """Optimizer steps between held-out evaluations."""
    log_every: int = 10
    """Optimizer steps between log lines and metrics records."""
    save_every: int = 50
    """Optimizer steps between checkpoints."""
    seed: int = 0
    """Seed of the data order, the held-out split, the layer sampler and the weights of a bundled profile."""
    pack: bool = False
    """Concatenate examples into full sequences instead of padding each one."""
    strict: bool = False
    """Fail on the first malformed data line instead of skipping it."""
    freeze_embedding: bool = False
    attention: str = "sdpa"
    tokenizer_vocab_size: int = 4096
    """Vocabulary of the BPE tokenizer trained for a bundled profile, which ships no tokenizer."""
    tokenizer: str | None = None
    """A tokenizer directory for a bundled profile, used instead of training one (the tuner shares one)."""
    trial: bool = False
    """A short tuner trial: no checkpoints, final model, loss plot or end-of-run memory comparison."""

    @property
    def sequences_per_step(self) -> int:
        """Sequences per optimizer step."""
        return self.micro_batch_size * self.gradient_accumulation_steps

    def validate(self) -> None:
        """Collect every invalid setting and raise one ``InputError`` listing them."""
        problems: list[str] = []
        positive = (
            "gamma",
            "interval",
            "micro_batch_size",
            "gradient_accumulation_steps",
            "sequence_length",
            "max_steps",
            "eval_every",
            "log_every",
            "save_every",
            "tokenizer_vocab_size",
        )
        for name in positive:
            value = getattr(self, name)
            if value < 1:
                option = "K (--interval)" if name == "interval" else f"--{name.replace('_', '-')}"
                problems.append(f"{option} is {value}; it must be at least 1")
        if self.precision not in PRECISIONS:
            problems.append(f"--precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.policy not in ("reset", "persistent"):
            problems.append(f"--policy {self.policy!r} is not reset or persistent")
        if not 0 < self.eval_fraction < 1:
            problems.append(f"--eval-fraction {self.eval_fraction} must be between 0 and 1")
        if self.learning_rate <= 0:
            problems.append(f"--learning-rate {self.learning_rate} must be positive")
        if self.warmup_steps < 0:
            problems.append(f"--warmup-steps {self.warmup_steps} must not be negative")
        if problems:
            raise InputError("invalid training settings: " + "; ".join(problems) + ".")

    def to_dict(self) -> dict[str, Any]:
        """Return the settings as plain values, for checkpoints and logs."""
        return {
            field.name: str(getattr(self, field.name))
            if isinstance(getattr(self, field.name), Path)
            else getattr(self, field.name)
            for field in fields(self)
        }


PLAN_KEYS = {
    "model": "model",
    "gamma": "gamma",
    "micro_batch_size": "micro_batch_size",
    "gradient_accumulation_steps": "gradient_accumulation_steps",
    "sequence_length": "sequence_length",
    "precision": "precision",
    "gradient_checkpointing": "gradient_checkpointing",
    "attention": "attention",
    "optimizer_state_policy": "policy",
    "interval": "interval",
    "learning_rate": "learning_rate",
    "tokenizer": "tokenizer",
    "pack": "pack",
    "seed": "seed",
}


def read_plan(path: Path) -> dict[str, Any]:
    """Read the settings a ``plan.yaml`` (from ``lisa-tune plan --output``) fixes, keyed by ``TrainConfig`` field."""
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise InputError(f"cannot read --config {path}: {error.strerror}. Check the path.") from error
    except yaml.YAMLError as error:
        raise InputError(
            f"--config {path} is not valid YAML: {error}. Pass a file written by lisa-tune plan."
        ) from error
    if not isinstance(document, dict):
        raise InputError(f"--config {path} must hold a mapping of settings; pass a file written by lisa-tune plan.")
    settings = {PLAN_KEYS[key]: value for key, value in document.items() if key in PLAN_KEYS}
    rate = settings.get("learning_rate")
    if isinstance(rate, str):
        # YAML 1.1 reads 1e-3 (no decimal point) as a string.
        with contextlib.suppress(ValueError):
            settings["learning_rate"] = float(rate)
    problems = [problem for name, value in settings.items() if (problem := _plan_value_problem(name, value))]
    if problems:
        raise InputError(
            f"--config {path}: " + "; ".join(problems) + ". Pass a file written by lisa-tune plan or tune."
        )
    return settings


_PLAN_INTEGERS = ("gamma", "interval", "micro_batch_size", "gradient_accumulation_steps", "sequence_length", "seed")
_PLAN_CHOICES = {"precision": PRECISIONS, "policy": ("reset", "persistent"), "attention": ("sdpa", "eager")}


def _plan_value_problem(name: str, value: Any) -> str | None:
    """Describe what is wrong with one value of a plan file, or return None when it is valid."""
    if name in _PLAN_INTEGERS and (isinstance(value, bool) or not isinstance(value, int)):
        return f"{name} {value!r} is not a whole number"
    if name == "learning_rate" and (isinstance(value, bool) or not isinstance(value, (int, float))):
        return f"learning_rate {value!r} is not a number"
    if name in ("gradient_checkpointing", "pack") and not isinstance(value, bool):
        return f"{name} {value!r} is not true or false"
    if name in _PLAN_CHOICES and value not in _PLAN_CHOICES[name]:
        return f"{name} {value!r} is not one of {', '.join(_PLAN_CHOICES[name])}"
    if name in ("model", "tokenizer") and not isinstance(value, str):
        return f"{name} {value!r} is not a name or path"
    return None
