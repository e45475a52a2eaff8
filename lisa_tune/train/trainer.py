"""The LISA trainer: one class with short phases (set-up, train, checkpoint, final save).

It runs ``lisa_tune.lisa.step.train_step``, the same step the memory simulator traces, on real tensors.

Known limitations: the trainer runs one process on one device, because data-parallel launch is not built yet.
Checkpoints hold the whole training state in one file, and a run keeps one checkpoint besides the one being written.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from lisa_tune.errors import InputError
from lisa_tune.lisa.controller import LisaController, OptimizerStatePolicy
from lisa_tune.lisa.optim import AdamWImplementation, build_adamw
from lisa_tune.lisa.precision import Precision
from lisa_tune.lisa.step import train_step
from lisa_tune.train.config import TrainConfig
from lisa_tune.train.data import (
    load_records,
    make_dataloader,
    record_texts,
    split_holdout,
    tokenize_records,
)

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint"
FINAL = "final"
METRICS = "metrics.jsonl"
MIN_LR_FRACTION = 0.1
# Settings a resumed run must share with the checkpoint; the others (max_steps, logging) may change.
RESUME_KEYS = (
    "model",
    "data",
    "gamma",
    "interval",
    "policy",
    "precision",
    "micro_batch_size",
    "gradient_accumulation_steps",
    "sequence_length",
    "seed",
    "pack",
    "freeze_embedding",
)


@dataclass
class TrainResult:
    """The summary of a finished or stopped run."""

    steps: int
    losses: list[float]
    """Training loss of every optimizer step of this process, in order."""
    eval_losses: dict[int, float]
    """Held-out loss by optimizer step."""
    final_dir: Path | None
    peak_memory_bytes: int


def warmup_cosine(warmup_steps: int, max_steps: int) -> Any:
    """Return the learning-rate multiplier: linear warm-up, then cosine decay to ``MIN_LR_FRACTION``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def peak_memory_bytes(device: torch.device) -> int:
    """Return the peak memory of this process so far: CUDA allocated on a GPU, resident set size on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class LisaTrainer:
    """Fine-tune a causal language model with LISA."""

    def __init__(self, config: TrainConfig, resume: bool = False) -> None:
        config.validate()
        self.config = config
        self.resume = resume
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model: Any = None
        """The causal language model, a ``transformers.PreTrainedModel``."""
        self.precision = Precision(config.precision)
        self.step = 0
        self.micro_batches_done = 0
        self.losses: list[float] = []
        self.eval_losses: dict[int, float] = {}

    # Set-up --------------------------------------------------------------------------------------------------

    def setup(self) -> None:
        """Load data, tokenizer and model, build the optimizer and restore a checkpoint when resuming."""
        self.config.run_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(self.config.seed)
        random.seed(self.config.seed)
        records = load_records(self.config.data, strict=self.config.strict)
        self._setup_model(records)
        self._setup_data(records)
        self._setup_optimization()
        if self.resume:
            self._load_checkpoint()

    def _setup_model(self, records: Any) -> None:
        import transformers

        from lisa_tune.modeling import build_model
        from lisa_tune.profiles import resolve_model

        path = Path(self.config.model).expanduser()
        dtype = self.precision.parameter_dtype
        if path.is_dir():
            weights = [*path.glob("*.safetensors"), *path.glob("pytorch_model*.bin")]
            if not weights:
                raise InputError(
                    f"model directory {path} has no weights (*.safetensors or pytorch_model.bin); pass a "
                    "directory saved with save_pretrained, or a bundled profile name to start from random weights."
                )
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(path)
            self.model = transformers.AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype, attn_implementation=self.config.attention
            )
            if self.config.gradient_checkpointing:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            from lisa_tune.train.tokenizer import train_bpe_tokenizer

            source = resolve_model(self.config.model)
            tokenizer_dir = self.config.run_dir / "tokenizer"
            if (tokenizer_dir / "tokenizer.json").is_file():
                self.tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
            else:
                vocab_size = min(self.config.tokenizer_vocab_size, int(source.config.get("vocab_size", 4096)))
                self.tokenizer = train_bpe_tokenizer(record_texts(records), vocab_size, tokenizer_dir)
                logger.info(
                    "bundled profile %s has no tokenizer: trained a %d-token BPE tokenizer on the training data, "
                    "saved in %s",
                    source.name,
                    len(self.tokenizer),
                    tokenizer_dir,
                )
            model_config = dict(source.config, vocab_size=len(self.tokenizer))
            for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
                model_config[key] = getattr(self.tokenizer, key)
            torch.manual_seed(self.config.seed)
            self.model = build_model(
                model_config,
                device="cpu",
                dtype=dtype,
                attn_implementation=self.config.attention,
                gradient_checkpointing=self.config.gradient_checkpointing,
            )
            logger.info(
                "built %s with random weights (%s parameters)",
                source.name,
                f"{sum(p.numel() for p in self.model.parameters()):,}",
            )
        model: nn.Module = self.model
        model.to(self.device)
        model.train()

    def _setup_data(self, records: Any) -> None:
        dataset = tokenize_records(
            records, self.tokenizer, max_length=self.config.sequence_length, pack=self.config.pack
        )
        stats = dataset.stats
        if stats.truncated_count:
            logger.info(
                "%d of %d records were truncated to %d tokens",
                stats.truncated_count,
                stats.record_count,
                self.config.sequence_length,
            )
        self.train_set, self.eval_set = split_holdout(dataset, self.config.eval_fraction, self.config.seed)
        if len(self.train_set) < self.config.micro_batch_size:
            raise InputError(
                f"only {len(self.train_set)} training examples for a micro-batch of {self.config.micro_batch_size}; "
                "add data or lower --micro-batch-size."
            )
        logger.info("%d training and %d held-out examples", len(self.train_set), len(self.eval_set))

    def _setup_optimization(self) -> None:
        self.controller = LisaController(
            self.model,
            gamma=self.config.gamma,
            interval=self.config.interval,
            policy=OptimizerStatePolicy(self.config.policy),
            seed=self.config.seed,
            freeze_embedding=self.config.freeze_embedding,
        )
        self.optimizer = build_adamw(
            self.model,
            lr=self.config.learning_rate,
            weight_decay=self.config.weight_decay,
            implementation=AdamWImplementation.default_for(self.device.type),
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(self.config.warmup_steps, self.config.max_steps)
        )

    # Data order ----------------------------------------------------------------------------------------------

    def _batches_per_epoch(self) -> int:
        return len(self.train_set) // self.config.micro_batch_size

    def _micro_batches(self) -> Any:
        """Yield micro-batches forever, epoch by epoch, starting after the ones a resumed run already used."""
        per_epoch = self._batches_per_epoch()
        epoch, skip = divmod(self.micro_batches_done, per_epoch)
        while True:
            loader = make_dataloader(
                self.train_set,
                batch_size=self.config.micro_batch_size,
                seed=self.config.seed + epoch,
                drop_last=True,
            )
            for index, batch in enumerate(loader):
                if index < skip:
                    continue
                yield {key: value.to(self.device) for key, value in batch.items()}
            epoch, skip = epoch + 1, 0

    # Training ------------------------------------------------------------------------------------------------

    def train(self, stop_after: int | None = None) -> TrainResult:
        """Run optimizer steps up to ``max_steps``, with logging, evaluation and checkpoints.

        ``stop_after`` ends the run early after that step with a checkpoint and no final model, as an interruption
        would; ``--resume`` continues it.
        """
        config = self.config
        batches = self._micro_batches()
        forward_context = (
            (lambda: torch.autocast(self.device.type, dtype=self.precision.autocast_dtype))
            if self.precision.autocast_dtype is not None
            else None
        )
        if self.step == 0:
            self._evaluate()
        window_start, window_tokens = time.perf_counter(), 0
        progress = tqdm(
            total=config.max_steps, initial=self.step, desc="LISA", unit="step", disable=not sys.stderr.isatty()
        )
        # Log lines go through the progress bar so the bar stays on the last line of the terminal.
        with logging_redirect_tqdm(loggers=[logging.getLogger("lisa_tune")]), progress:
            return self._train_loop(batches, forward_context, window_start, window_tokens, progress, stop_after)

    def _train_loop(
        self,
        batches: Any,
        forward_context: Any,
        window_start: float,
        window_tokens: int,
        progress: Any,
        stop_after: int | None,
    ) -> TrainResult:
        config = self.config
        while self.step < config.max_steps:
            micro = [next(batches) for _ in range(config.gradient_accumulation_steps)]
            kwargs: dict[str, Any] = {"scheduler": self.scheduler}
            if forward_context is not None:
                kwargs["forward_context"] = forward_context
            loss = train_step(self.model, self.optimizer, self.controller, micro, **kwargs)
            self.micro_batches_done += len(micro)
            self.step += 1
            self.losses.append(float(loss))
            progress.update(1)
            progress.set_postfix(loss=f"{self.losses[-1]:.3f}", layers=self.controller.active_layers)
            window_tokens += sum(int(batch["attention_mask"].sum()) for batch in micro)
            if self.step % config.eval_every == 0 or self.step == config.max_steps:
                self._evaluate()
            if self.step % config.log_every == 0 or self.step == config.max_steps:
                elapsed = time.perf_counter() - window_start
                self._log_metrics(window_tokens / elapsed if elapsed > 0 else 0.0)
                window_start, window_tokens = time.perf_counter(), 0
            if self.step % config.save_every == 0 and self.step < config.max_steps:
                self.save_checkpoint()
            if stop_after is not None and self.step >= stop_after:
                self.save_checkpoint()
                return TrainResult(
                    self.step, list(self.losses), dict(self.eval_losses), None, peak_memory_bytes(self.device)
                )
        self.save_checkpoint()
        final_dir = self.save_final()
        self._plot_losses()
        self._compare_with_prediction()
        return TrainResult(
            self.step, list(self.losses), dict(self.eval_losses), final_dir, peak_memory_bytes(self.device)
        )

    @torch.no_grad()
    def _evaluate(self) -> float:
        self.model.eval()
        total, count = 0.0, 0
        loader = make_dataloader(self.eval_set, batch_size=self.config.micro_batch_size, seed=0, shuffle=False)
        for batch in loader:
            batch = {key: value.to(self.device) for key, value in batch.items()}
            outputs = self.model(**batch)
            tokens = int((batch["labels"][:, 1:] != -100).sum())
            total += float(outputs.loss) * tokens
            count += tokens
        self.model.train()
        loss = total / max(count, 1)
        self.eval_losses[self.step] = loss
        logger.info("step %d: held-out loss %.4f", self.step, loss)
        return loss

    def _log_metrics(self, tokens_per_second: float) -> None:
        learning_rate = float(self.scheduler.get_last_lr()[0])
        peak = peak_memory_bytes(self.device)
        record = {
            "step": self.step,
            "loss": self.losses[-1],
            "learning_rate": learning_rate,
            "active_layers": self.controller.active_layers,
            "tokens_per_second": round(tokens_per_second, 1),
            "peak_memory_bytes": peak,
            "eval_loss": self.eval_losses.get(self.step),
        }
        with (self.config.run_dir / METRICS).open("a", encoding="utf-8") as stream:
            stream.write(json.dumps(record) + "\n")
        logger.info(
            "step %d: loss %.4f, lr %.2e, layers %s, %.0f tokens/s, peak memory %.2f GB",
            self.step,
            self.losses[-1],
            learning_rate,
            self.controller.active_layers,
            tokens_per_second,
            peak / 1e9,
        )

    def _plot_losses(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axes = plt.subplots(figsize=(7, 4))
        axes.plot(range(1, len(self.losses) + 1), self.losses, label="training loss", linewidth=0.8)
        steps = sorted(self.eval_losses)
        axes.plot(steps, [self.eval_losses[s] for s in steps], marker="o", label="held-out loss")
        axes.set_xlabel("optimizer step")
        axes.set_ylabel("cross-entropy (nats per token)")
        axes.set_title(f"LISA gamma {self.config.gamma}, K {self.config.interval}, {self.config.model}")
        axes.legend()
        figure.tight_layout()
        figure.savefig(self.config.run_dir / "loss.png", dpi=110)
        plt.close(figure)

    def _compare_with_prediction(self) -> None:
        from lisa_tune.memory.simulator import SimulationConfig, simulate

        model_config = self.model.config.to_dict()
        prediction = simulate(
            SimulationConfig(
                model_config=model_config,
                model_name=self.config.model,
                gamma=self.config.gamma,
                micro_batch_size=self.config.micro_batch_size,
                sequence_length=self.config.sequence_length,
                precision=self.precision,
                gradient_checkpointing=self.config.gradient_checkpointing,
                attention=self.config.attention,
                policy=OptimizerStatePolicy(self.config.policy),
                target_device=self.device.type,
                freeze_embedding=self.config.freeze_embedding,
            )
        )
        measured = peak_memory_bytes(self.device)
        if self.device.type == "cuda":
            logger.info(
                "peak max_memory_allocated %.3f GB; the simulator predicted %.3f GB",
                measured / 1e9,
                (prediction.device.allocated_bytes if prediction.device else 0) / 1e9,
            )
        else:
            logger.info(
                "peak resident memory %.3f GB (includes the interpreter, libraries and data); the simulator "
                "predicted %.3f GB of tensors for a step at the full sequence length",
                measured / 1e9,
                prediction.tensor_peak_bytes / 1e9,
            )

    # Checkpoints ---------------------------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """Write the whole training state, replacing the previous checkpoint only once the new one is complete."""
        run_dir = self.config.run_dir
        target = run_dir / CHECKPOINT
        partial = run_dir / f"{CHECKPOINT}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        state = {
            "config": self.config.to_dict(),
            "step": self.step,
            "micro_batches_done": self.micro_batches_done,
            "losses": self.losses,
            "eval_losses": self.eval_losses,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "lisa": self.controller.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(),
        }
        torch.save(state, partial / "state.pt")
        previous = run_dir / f"{CHECKPOINT}.previous"
        shutil.rmtree(previous, ignore_errors=True)
        if target.exists():
            os.replace(target, previous)
        os.replace(partial, target)
        shutil.rmtree(previous, ignore_errors=True)
        logger.info("step %d: checkpoint saved in %s", self.step, target)
        return target

    def _load_checkpoint(self) -> None:
        run_dir = self.config.run_dir
        path = run_dir / CHECKPOINT / "state.pt"
        if not path.is_file():
            previous = run_dir / f"{CHECKPOINT}.previous" / "state.pt"
            if not previous.is_file():
                raise InputError(f"--resume: no checkpoint in {run_dir}; start without --resume.")
            path = previous
        state = torch.load(path, map_location=self.device, weights_only=False)
        saved = state["config"]
        current = self.config.to_dict()
        mismatched = [key for key in RESUME_KEYS if saved.get(key) != current.get(key)]
        if mismatched:
            details = ", ".join(
                f"{key} {saved.get(key)!r} in the checkpoint, {current.get(key)!r} now" for key in mismatched
            )
            raise InputError(f"--resume: the checkpoint in {run_dir} is from a different run ({details}).")
        self.model.load_state_dict(state["model"])
        self.controller.load_state_dict(state["lisa"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        self.step = int(state["step"])
        self.micro_batches_done = int(state["micro_batches_done"])
        self.losses = list(state["losses"])
        self.eval_losses = {int(k): float(v) for k, v in state["eval_losses"].items()}
        logger.info("resumed from step %d (%s)", self.step, path)

    def save_final(self) -> Path:
        """Save the model and tokenizer as a Hugging Face directory that ``from_pretrained`` loads."""
        final = self.config.run_dir / FINAL
        partial = self.config.run_dir / f"{FINAL}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        self.model.save_pretrained(partial, safe_serialization=True)  # type: ignore[operator]
        self.tokenizer.save_pretrained(partial)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        logger.info("final model saved in %s", final)
        return final
