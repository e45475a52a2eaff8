"""The LISA trainer: one class with short phases (set-up, train, checkpoint, final save).

It runs ``lisa_tune.lisa.step.train_step``, the same step the memory simulator traces, on real tensors.

Launched with ``accelerate launch --multi_gpu --num_processes N`` or ``torchrun --nproc-per-node N``, the trainer
runs data-parallel. Every process trains a replica of the model on its own share of each optimizer step's
micro-batches, and ``lisa_tune.train.distributed`` averages the trainable parameters' gradients before the optimizer
step. The layer samplers of all processes share the seed, so they draw the same layers. Rank 0 alone evaluates and
writes the metrics, log lines, checkpoints, the loss plot and the final model.

Known limitations: checkpoints hold the whole training state in one file, and a run keeps one checkpoint besides the
one being written.
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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
from lisa_tune.train.distributed import DataParallel, RankRecord
from lisa_tune.train.step_memory import StepMemory, existing_step_tensors, is_full_length, measure_train_step

if TYPE_CHECKING:
    from lisa_tune.memory.simulator import SimulationConfig
    from lisa_tune.memory.validation import CpuComparison

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
    """Training loss of every optimizer step, in order; in a data-parallel run the mean over the processes."""
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


def bundled_model_config(profile_config: dict[str, Any], tokenizer: Any) -> dict[str, Any]:
    """Return a bundled profile's config with the vocabulary and special tokens of ``tokenizer``."""
    model_config = dict(profile_config, vocab_size=len(tokenizer))
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        model_config[key] = getattr(tokenizer, key)
    return model_config


def run_training(config: TrainConfig, resume: bool = False) -> TrainResult:
    """Set up and run a whole training run, and log its held-out loss at the start and the end."""
    trainer = LisaTrainer(config, resume=resume)
    trainer.setup()
    result = trainer.train()
    logger.info(
        "trained %d steps: held-out loss %.4f at the start, %.4f at the end; model in %s",
        result.steps,
        result.eval_losses.get(0, float("nan")),
        result.eval_losses.get(result.steps, float("nan")),
        result.final_dir,
    )
    return result


class LisaTrainer:
    """Fine-tune a causal language model with LISA."""

    def __init__(self, config: TrainConfig, resume: bool = False) -> None:
        config.validate()
        self.config = config
        self.resume = resume
        self.parallel = DataParallel.from_env()
        """This process's rank and the process count. A run that no launcher started is rank 0 of 1."""
        self.parallel.quiet_other_processes()
        self.device = self.parallel.device()
        self.rank_record = RankRecord(self.parallel.rank)
        self.model: Any = None
        """The causal language model, a ``transformers.PreTrainedModel``."""
        self.precision = Precision(config.precision)
        self.step = 0
        self.micro_batches_done = 0
        self.losses: list[float] = []
        self.eval_losses: dict[int, float] = {}
        self.measured_step: StepMemory | None = None
        """The tensor peak of the first step of this process that the simulator's CPU prediction describes."""
        self.memory_comparison: CpuComparison | None = None
        """That peak beside the simulator's prediction for the same step, set at the end of the run."""
        self.tokens_seen = 0
        """Training tokens (attention-mask ones) of the optimizer steps done so far, on all processes."""
        self.eval_seconds = 0.0
        """Wall time spent on held-out evaluation in this process."""

    # Set-up --------------------------------------------------------------------------------------------------

    def setup(self) -> None:
        """Load data, tokenizer and model, build the optimizer and restore a checkpoint when resuming."""
        self.config.run_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(self.config.seed)
        random.seed(self.config.seed)
        records = load_records(self.config.data, strict=self.config.strict)
        # Rank 0 goes first, because it trains and saves a bundled profile's tokenizer, which the others then load.
        with self.parallel.main_process_first():
            self._setup_model(records)
        self._setup_data(records)
        self._setup_optimization()
        if self.resume:
            self._load_checkpoint()
        # The processes build or load the same weights. Copying rank 0's guards against a difference, at the cost of
        # one broadcast of the model.
        self.parallel.broadcast_module(self.model)
        self.parallel.check_same_on_all_processes(self.controller.active_layers, "active LISA layers")

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
            from lisa_tune.train.tokenizer import bundled_tokenizer

            source = resolve_model(self.config.model)
            tokenizer_dir = Path(self.config.tokenizer) if self.config.tokenizer else self.config.run_dir / "tokenizer"
            if self.config.tokenizer and not (tokenizer_dir / "tokenizer.json").is_file():
                raise InputError(
                    f"tokenizer directory {tokenizer_dir} has no tokenizer.json; pass a directory written by "
                    "save_pretrained, or leave the tokenizer unset to train one on the data."
                )
            self.tokenizer = bundled_tokenizer(
                tokenizer_dir, record_texts(records), self.config.tokenizer_vocab_size, source
            )
            model_config = bundled_model_config(source.config, self.tokenizer)
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
        """Yield this process's micro-batches forever, epoch by epoch, after the ones a resumed run already used.

        All processes share one sequence of micro-batches, which continues across epochs. Of N processes, rank r takes
        the micro-batches at positions r, r + N, r + 2N, ... of it, so one optimizer step of N processes trains on
        the micro-batches that N accumulation steps of a single process would, and ``micro_batches_done`` counts the
        micro-batches of all processes.
        """
        per_epoch = self._batches_per_epoch()
        rank, world_size = self.parallel.rank, self.parallel.world_size
        epoch, skip = divmod(self.micro_batches_done, per_epoch)
        while True:
            position = epoch * per_epoch + skip
            loader = make_dataloader(
                self.train_set,
                batch_size=self.config.micro_batch_size,
                seed=self.config.seed + epoch,
                drop_last=True,
                first_batch=skip + (rank - position) % world_size,
                batch_stride=world_size,
            )
            for batch in loader:
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
        # NOTE: in a data-parallel run rank 0 evaluates alone while the other processes wait in the next step's
        # all-reduce. An evaluation longer than the process group's timeout (torch's default: 10 min for NCCL, 30 min
        # for gloo) fails the run.
        # A tuner trial skips the held-out loss of the initial weights, which is the same in every trial.
        if self.step == 0 and self.parallel.is_main and not config.trial:
            self._evaluate()
        window_start, window_tokens = time.perf_counter(), 0
        progress = tqdm(
            total=config.max_steps,
            initial=self.step,
            desc="LISA",
            unit="step",
            disable=not sys.stderr.isatty() or not self.parallel.is_main,
        )
        # Log lines go through the progress bar so the bar stays on the last line of the terminal.
        with logging_redirect_tqdm(loggers=[logging.getLogger("lisa_tune")]), progress:
            result = self._train_loop(batches, forward_context, window_start, window_tokens, progress, stop_after)
        self.rank_record.finish(self.model)
        # Every process returns once rank 0 has written its files.
        self.parallel.barrier()
        self.parallel.close()
        return result

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
            step_tokens = self._run_step(micro, forward_context)
            progress.update(1)
            progress.set_postfix(loss=f"{self.losses[-1]:.3f}", layers=self.controller.active_layers)
            window_tokens += step_tokens
            self.tokens_seen += step_tokens
            is_main = self.parallel.is_main
            if (self.step % config.eval_every == 0 or self.step == config.max_steps) and is_main:
                spent = self.eval_seconds
                self._evaluate()
                # Evaluation time is left out of the tokens/s window.
                window_start += self.eval_seconds - spent
            if (self.step % config.log_every == 0 or self.step == config.max_steps) and is_main:
                elapsed = time.perf_counter() - window_start
                self._log_metrics(window_tokens / elapsed if elapsed > 0 else 0.0)
                window_start, window_tokens = time.perf_counter(), 0
            if self.step % config.save_every == 0 and self.step < config.max_steps and not config.trial:
                self.save_checkpoint()
            if stop_after is not None and self.step >= stop_after:
                self.save_checkpoint()
                return TrainResult(
                    self.step, list(self.losses), dict(self.eval_losses), None, peak_memory_bytes(self.device)
                )
        if config.trial:
            return TrainResult(
                self.step, list(self.losses), dict(self.eval_losses), None, peak_memory_bytes(self.device)
            )
        self.save_checkpoint()
        final_dir = self.save_final()
        if self.parallel.is_main:
            self._plot_losses()
            self._compare_with_prediction()
        return TrainResult(
            self.step, list(self.losses), dict(self.eval_losses), final_dir, peak_memory_bytes(self.device)
        )

    def _run_step(self, micro: list[dict[str, torch.Tensor]], forward_context: Any) -> int:
        """Run one optimizer step, append its loss averaged over the processes, and return its tokens on all of them."""
        kwargs: dict[str, Any] = {"scheduler": self.scheduler}
        if forward_context is not None:
            kwargs["forward_context"] = forward_context
        if self.parallel.enabled or self.rank_record.enabled:
            kwargs["reduce_gradients"] = self._reduce_gradients
        self.rank_record.before_step(micro)
        layers, switches = list(self.controller.active_layers), self.controller.switches
        loss = self._train_step(micro, kwargs)
        self.micro_batches_done += len(micro) * self.parallel.world_size
        self.step += 1
        local_tokens = sum(int(batch["attention_mask"].sum()) for batch in micro)
        loss_sum, tokens = self.parallel.sum_over_processes([float(loss), local_tokens])
        self.losses.append(loss_sum / self.parallel.world_size)
        if self.controller.switches != switches:
            self.parallel.check_same_on_all_processes(self.controller.active_layers, "active LISA layers")
        self.rank_record.after_step(self.step, layers, self.controller.switches, self.losses[-1], float(loss))
        return int(tokens)

    def _reduce_gradients(self) -> None:
        self.parallel.average_gradients(self.controller.trainable_parameters())
        self.rank_record.after_reduce(self.model)

    @torch.no_grad()
    def _evaluate(self) -> float:
        started = time.perf_counter()
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
        self.eval_seconds += time.perf_counter() - started
        self._append_metrics({"event": "eval", "step": self.step, "tokens": self.tokens_seen, "eval_loss": loss})
        logger.info("step %d: held-out loss %.4f", self.step, loss)
        return loss

    def _append_metrics(self, record: dict[str, Any]) -> None:
        # One line per record, flushed on close, so a process polling the file (the tuner) reads whole lines.
        with (self.config.run_dir / METRICS).open("a", encoding="utf-8") as stream:
            stream.write(json.dumps(record) + "\n")

    def _log_metrics(self, tokens_per_second: float) -> None:
        learning_rate = float(self.scheduler.get_last_lr()[0])
        peak = peak_memory_bytes(self.device)
        record = {
            "event": "log",
            "step": self.step,
            "tokens": self.tokens_seen,
            "loss": self.losses[-1],
            "learning_rate": learning_rate,
            "active_layers": self.controller.active_layers,
            "tokens_per_second": round(tokens_per_second, 1),
            "peak_memory_bytes": peak,
            "eval_loss": self.eval_losses.get(self.step),
        }
        self._append_metrics(record)
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

    def _train_step(self, micro: list[dict[str, torch.Tensor]], kwargs: dict[str, Any]) -> torch.Tensor:
        """Run ``train_step``, and measure its tensor peak if it is the first step like the simulator's trace."""

        def run() -> torch.Tensor:
            return train_step(self.model, self.optimizer, self.controller, micro, **kwargs)

        if self.measured_step is not None or not self._step_matches_simulation(micro):
            return run()
        # The measured step is a step of the run: it reads the same batches and random state as an unmeasured one.
        loss, self.measured_step = measure_train_step(
            run,
            existing_step_tensors(self.model, self.optimizer, micro),
            step=self.step + 1,
            active_layers=self.controller.active_layers,
        )
        return loss

    def _step_matches_simulation(self, micro: list[dict[str, torch.Tensor]]) -> bool:
        """Return True when the next step contains the tensors of the step that the simulator traces for the CPU.

        The simulator traces one process, micro-batches of full-length unpadded sequences, and a step in which the
        AdamW state of exactly the active layers exists. That excludes the first step of a LISA period, when the
        incoming layers have no state yet, unless every layer stays active.
        """
        config, controller = self.config, self.controller
        # A tuner trial makes no comparison, and the profiler would slow the step whose speed the trial measures.
        if self.device.type != "cpu" or self.parallel.enabled or self.rank_record.enabled or config.trial:
            return False
        period_start = controller.optimizer_steps % controller.interval == 0
        every_layer_active = controller.gamma == controller.num_layers
        if controller.optimizer_steps == 0 or (period_start and not every_layer_active):
            return False
        # The persistent policy also keeps the state of the layers that earlier periods trained.
        persistent = controller.policy is OptimizerStatePolicy.PERSISTENT
        if persistent and controller.visited_layers != set(controller.active_layers):
            return False
        return is_full_length(micro, config.micro_batch_size, config.sequence_length)

    def _simulation_config(self) -> SimulationConfig:
        """Return this run's configuration for the memory simulator, with the layers placed for the highest peak."""
        from lisa_tune.memory.simulator import SimulationConfig

        return SimulationConfig(
            model_config=self.model.config.to_dict(),
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
            seed=self.config.seed,
            gradient_accumulation_steps=self.config.gradient_accumulation_steps,
        )

    def _compare_with_prediction(self) -> None:
        """Log the measured memory of the run beside the simulator's prediction, and keep the CPU comparison."""
        try:
            if self.device.type == "cuda":
                self._log_cuda_prediction()
            else:
                self._compare_cpu_step()
        except InputError as error:
            logger.warning("the memory prediction for this run failed: %s", error)
        if self.device.type != "cuda":
            logger.info(
                "peak resident memory of the process %.3f GB (ru_maxrss): it includes the interpreter, the libraries "
                "and the data, so it is larger than the tensor peak",
                peak_memory_bytes(self.device) / 1e9,
            )

    def _log_cuda_prediction(self) -> None:
        from lisa_tune.memory.simulator import simulate

        prediction = simulate(self._simulation_config())
        logger.info(
            "peak max_memory_allocated %.3f GB; the simulator predicted %.3f GB",
            peak_memory_bytes(self.device) / 1e9,
            (prediction.device.allocated_bytes if prediction.device else 0) / 1e9,
        )

    def _compare_cpu_step(self) -> None:
        from lisa_tune.memory.simulator import simulate, worst_case_layers
        from lisa_tune.memory.validation import CpuComparison

        config = self._simulation_config()
        top_layers = tuple(worst_case_layers(self.controller, self.config.freeze_embedding))
        measured = self.measured_step
        if measured is None:
            logger.info(
                "the tensor peak of a step was not measured: it is measured on the CPU in one process, in a step "
                "after the first of a LISA period (the first period only, with the persistent policy), with %d "
                "sequences of %d tokens and no padding per micro-batch, which --pack gives. The simulator predicts "
                "%.3f GB of tensors with layers %s active, the placement with the highest peak",
                self.config.micro_batch_size,
                self.config.sequence_length,
                simulate(config).tensor_peak_bytes / 1e9,
                list(top_layers),
            )
            return
        same_step = replace(config, active_layers=measured.active_layers)
        comparison = CpuComparison(same_step, simulate(same_step).tensor_peak_bytes, measured.peak_bytes)
        self.memory_comparison = comparison
        logger.info(
            "step %d: measured peak of live tensors %.3f GB, predicted %.3f GB for the same layers %s "
            "(%s and %s bytes, difference %+.3f%% of the measured peak)",
            measured.step,
            comparison.measured_bytes / 1e9,
            comparison.predicted_bytes / 1e9,
            list(measured.active_layers),
            f"{comparison.measured_bytes:,}",
            f"{comparison.predicted_bytes:,}",
            100 * comparison.relative_error,
        )
        if measured.active_layers != top_layers:
            logger.info(
                "with layers %s active, the placement with the highest peak, the simulator predicts %.3f GB",
                list(top_layers),
                simulate(config).tensor_peak_bytes / 1e9,
            )

    # Checkpoints ---------------------------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """Write the whole training state, replacing the previous checkpoint only once the new one is complete.

        In a data-parallel run only rank 0 writes. The replicas hold the same weights, optimizer state and random
        state, so rank 0's state resumes every process.
        """
        run_dir = self.config.run_dir
        target = run_dir / CHECKPOINT
        if not self.parallel.is_main:
            return target
        partial = run_dir / f"{CHECKPOINT}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        state = {
            "config": self.config.to_dict(),
            "step": self.step,
            "micro_batches_done": self.micro_batches_done,
            "tokens_seen": self.tokens_seen,
            "losses": self.losses,
            "eval_losses": self.eval_losses,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "lisa": self.controller.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(),
            "world_size": self.parallel.world_size,
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
        self.parallel.check_resume(int(state.get("world_size", 1)), run_dir)
        self.model.load_state_dict(state["model"])
        self.controller.load_state_dict(state["lisa"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        self.step = int(state["step"])
        self.micro_batches_done = int(state["micro_batches_done"])
        self.tokens_seen = int(state.get("tokens_seen", 0))
        self.losses = list(state["losses"])
        self.eval_losses = {int(k): float(v) for k, v in state["eval_losses"].items()}
        logger.info("resumed from step %d (%s)", self.step, path)

    def save_final(self) -> Path:
        """Save the model and tokenizer as a Hugging Face directory that ``from_pretrained`` loads.

        In a data-parallel run only rank 0 writes it.
        """
        final = self.config.run_dir / FINAL
        if not self.parallel.is_main:
            return final
        partial = self.config.run_dir / f"{FINAL}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        self.model.save_pretrained(partial, safe_serialization=True)  # type: ignore[operator]
        self.tokenizer.save_pretrained(partial)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        logger.info("final model saved in %s", final)
        return final
