"""Search gamma and K (and optionally learning rate and micro-batch) with Optuna, by short real LISA trials.

Each trial runs the bundled trainer in its own process (``lisa_tune.tune.worker``). Every trial trains on the same
packed data in the same order, from the same initial weights, for the same number of tokens. All are scored on the
same held-out set, so differences between trials come from the settings searched (common random numbers).

Memory: the planner's prediction decides before a trial starts whether it fits the budget. A configuration predicted
not to fit, or predicted to need at least as much as one that ran out of memory, is recorded as an infeasible trial
(``Trial.set_constraint`` with the overshoot in GB, state PRUNED) and never run. A trial that runs out of memory is
recorded the same way with its measured overshoot.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import logging
import math
import os
import resource
import signal
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from lisa_tune.errors import InputError, LisaTuneError
from lisa_tune.planner.command import FitCache, NothingFits
from lisa_tune.planner.search import Budget, longest_fitting_sequence, predict, step_fit, usable_bytes
from lisa_tune.tune import storage as storage_module
from lisa_tune.tune.space import PERIODS_PER_TRIAL, TuneSpace, default_trial_steps
from lisa_tune.tune.worker import LOG, RESULT, SPEC

logger = logging.getLogger(__name__)

CONSTRAINT = "memory_overshoot_gb"
"""The constraint Optuna's samplers read: GB over the usable budget, positive when a configuration does not fit."""
POLL_SECONDS = 0.2
MAX_SKIPPED_PER_TRIAL = 50
"""Infeasible or repeated suggestions tolerated per trial run before the search is considered exhausted."""


class TrialCrashed(LisaTuneError):
    """A trial process ended without a result; the study records it as failed and goes on."""


@dataclass
class StudySettings:
    """Everything a study is fixed to; every trial shares these."""

    model: str
    data: Path
    run_dir: Path
    model_config: dict[str, Any]
    layers: int
    space: TuneSpace
    sequence_length: int
    precision: str
    gradient_checkpointing: bool
    attention: str
    policy: str
    steps: int
    """Optimizer steps of every trial."""
    reports: int
    """Held-out evaluations per trial, which feed the pruner."""
    seed: int
    eval_fraction: float
    tokenizer_dir: Path | None
    budget: Budget
    margin: float
    trial_memory_limit: int | None = None
    """Address-space cap (bytes) of each trial process on the CPU, a stand-in for a smaller device."""
    threads: int | None = None
    plan: dict[str, Any] = field(default_factory=dict)
    """The settings of ``--config plan.yaml``, keyed by ``TrainConfig`` field."""
    recommended: dict[str, Any] = field(default_factory=dict)
    """The first trial's parameters: the planner's recommendation within the space."""

    @property
    def tokens_per_trial(self) -> int:
        return self.steps * self.space.batch * self.sequence_length

    def identity(self, data_digest: str) -> dict[str, Any]:
        """Return the study attributes a resumed run must match: everything that changes a trial's result."""
        rate = self.space.learning_rate
        tokenizer = self.tokenizer_dir / "tokenizer.json" if self.tokenizer_dir else None
        return {
            "model": self.model,
            "data_sha256": data_digest,
            "tokenizer_sha256": file_digest(tokenizer) if tokenizer is not None else "the model's",
            "sequence_length": self.sequence_length,
            "precision": self.precision,
            "gradient_checkpointing": self.gradient_checkpointing,
            "attention": self.attention,
            "policy": self.policy,
            "batch": self.space.batch,
            "steps": self.steps,
            "seed": self.seed,
            "eval_fraction": self.eval_fraction,
            "gammas": ",".join(map(str, self.space.gammas)),
            "intervals": ",".join(map(str, self.space.intervals)),
            "micro_batches": ",".join(map(str, self.space.micro_batches)),
            "learning_rate": f"{rate.low:g}:{rate.high:g}" if rate.searched else f"{rate.low:g}",
        }

    def train_settings(self, gamma: int, interval: int, micro_batch: int, learning_rate: float) -> dict[str, Any]:
        """Return the ``TrainConfig`` fields of one trial, without the run directory."""
        return {
            "model": self.model,
            "data": str(self.data),
            "gamma": gamma,
            "interval": interval,
            "policy": self.policy,
            "precision": self.precision,
            "gradient_checkpointing": self.gradient_checkpointing,
            "micro_batch_size": micro_batch,
            "gradient_accumulation_steps": self.space.batch // micro_batch,
            "sequence_length": self.sequence_length,
            "learning_rate": learning_rate,
            "warmup_steps": max(1, self.steps // 10),
            "max_steps": self.steps,
            "eval_fraction": self.eval_fraction,
            "eval_every": math.ceil(self.steps / self.reports),
            "log_every": math.ceil(self.steps / self.reports),
            "save_every": self.steps,
            "seed": self.seed,
            "pack": True,
            "attention": self.attention,
            "tokenizer": str(self.tokenizer_dir) if self.tokenizer_dir else None,
            "trial": True,
        }


def file_digest(path: Path) -> str:
    """Return the SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Prediction:
    peak_bytes: int
    tensor_peak_bytes: int
    usable_bytes: int

    @property
    def overshoot_bytes(self) -> int:
        return self.peak_bytes - self.usable_bytes


class MemoryFilter:
    """The planner's memory prediction for the study's fixed settings, by gamma and micro-batch."""

    def __init__(self, settings: StudySettings) -> None:
        self.settings = settings
        self.fits = FitCache(settings.model_config, settings.model, settings.attention, "foreach")
        self.usable = usable_bytes(settings.budget, settings.margin)
        self._fitting: list[tuple[int, int]] | None = None

    def predict(self, gamma: int, micro_batch: int) -> Prediction:
        s = self.settings
        fit = step_fit(self.fits, s.precision, s.gradient_checkpointing, micro_batch, s.space.batch)
        candidate = predict(fit, s.budget, gamma, micro_batch, s.sequence_length, s.space.batch)
        return Prediction(candidate.peak_bytes, candidate.tensor_peak_bytes, self.usable)

    def _what_would_fit(self) -> str:
        s = self.settings
        fit = step_fit(self.fits, s.precision, s.gradient_checkpointing, 1, s.space.batch)
        longest = longest_fitting_sequence(fit, s.budget, self.usable, 1, 1, s.sequence_length - 1 or None)
        hints = []
        if longest:
            hints.append(f"--seq {longest} fits at gamma 1 and micro-batch 1")
        if not s.gradient_checkpointing:
            other = step_fit(self.fits, s.precision, True, 1, s.space.batch)
            need = predict(other, s.budget, 1, 1, s.sequence_length, s.space.batch).peak_bytes
            hints.append(f"--grad-ckpt needs {need / 1e9:.2f} GB{'' if need <= self.usable else ', still too much'}")
        advice = "; ".join(hints) + ". " if hints else ""
        return (
            f"{advice}lisa-tune plan --gpu {s.budget.label} --model {s.model} lists more options, such as a lower "
            "precision or a frozen embedding."
        )

    def check_space(self) -> list[tuple[int, int]]:
        """Return the (gamma, micro-batch) pairs that fit; raise when none does, saying what would."""
        if self._fitting is None:
            self._fitting = self._find_fitting()
        return self._fitting

    def _find_fitting(self) -> list[tuple[int, int]]:
        s = self.settings
        fitting = [pair for pair in s.space.memory_grid() if self.predict(*pair).overshoot_bytes <= 0]
        if fitting:
            return fitting
        smallest = self.predict(1, 1)
        budget = f"{s.budget.label} ({self.usable / 1e9:.2f} GB usable after the {s.margin:.0%} margin)"
        if smallest.overshoot_bytes > 0:
            raise NothingFits(
                f"nothing fits {budget}: even gamma 1 at micro-batch 1 needs {smallest.peak_bytes / 1e9:.2f} GB at "
                f"sequence length {s.sequence_length} ({s.precision}, checkpointing "
                f"{'on' if s.gradient_checkpointing else 'off'}). {self._what_would_fit()}"
            )
        options = [
            (gamma, micro)
            for gamma in range(1, s.layers + 1)
            for micro in sorted({1, *s.space.micro_batches})
            if self.predict(gamma, micro).overshoot_bytes <= 0
        ]
        largest = max(options)
        raise InputError(
            f"the search space is empty after the memory filter: none of gamma {s.space.gammas} x micro-batch "
            f"{s.space.micro_batches} fits {budget}. What fits: gamma up to {largest[0]} at micro-batch "
            f"{max(m for g, m in options if g == largest[0])}; pass --gamma and --micro-batch within that."
        )


def _set_child_limits(memory_limit: int | None) -> None:
    # Runs in the trial process before exec: die with the tuner, and cap memory when asked.
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if memory_limit is not None:
        resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))


class MetricsReader:
    """Read the held-out losses a trial appends to its metrics file, whole lines only."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0

    def new_evaluations(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        with self.path.open("rb") as stream:
            stream.seek(self.offset)
            chunk = stream.read()
        end = chunk.rfind(b"\n") + 1
        self.offset += end
        records = [json.loads(line) for line in chunk[:end].splitlines() if line.strip()]
        return [record for record in records if record.get("event") == "eval"]


class Tuner:
    """Run one study: sample, filter by memory, run trials in child processes, record results."""

    def __init__(
        self, settings: StudySettings, study: optuna.Study, trials: int, memory: MemoryFilter | None = None
    ) -> None:
        self.settings = settings
        self.study = study
        self.trials = trials
        self.memory = memory or MemoryFilter(settings)
        self.skipped_in_a_row = 0

    # Bookkeeping --------------------------------------------------------------------------------------------

    def counted(self) -> list[FrozenTrial]:
        """Return the finished trials that ran, which count towards ``--trials``; repeats of them do not."""
        return [
            trial
            for trial in self.study.get_trials(deepcopy=False)
            if trial.state != TrialState.RUNNING and trial.user_attrs.get("counted")
        ]

    def exhausted(self) -> bool:
        """Return True when every feasible configuration of a discrete space has run."""
        if self.settings.space.grid_size() is None:
            return False
        ran = self.counted()
        feasible = {
            (g, k, m)
            for g, m in self.memory.check_space()
            for k in self.settings.space.intervals
            if not self._known_out_of_memory(self.memory.predict(g, m), ran)
        }
        done = {(t.params["gamma"], t.params["interval"], self._micro(t.params)) for t in ran}
        return feasible <= done

    def _micro(self, params: dict[str, Any]) -> int:
        return int(params.get("micro_batch_size", self.settings.space.micro_batches[0]))

    @staticmethod
    def _known_out_of_memory(prediction: Prediction, ran: list[FrozenTrial]) -> FrozenTrial | None:
        for trial in ran:
            oom = trial.user_attrs.get("outcome") == "out of memory"
            if oom and prediction.peak_bytes >= trial.user_attrs["predicted_peak_bytes"]:
                return trial
        return None

    # The objective --------------------------------------------------------------------------------------------

    def suggest(self, trial: optuna.Trial) -> tuple[int, int, int, float]:
        space = self.settings.space
        gamma = int(trial.suggest_categorical("gamma", space.gammas))
        interval = int(trial.suggest_categorical("interval", space.intervals))
        micro = (
            int(trial.suggest_categorical("micro_batch_size", space.micro_batches))
            if len(space.micro_batches) > 1
            else space.micro_batches[0]
        )
        if space.learning_rate.searched:
            learning_rate = trial.suggest_float(
                "learning_rate", space.learning_rate.low, space.learning_rate.high, log=True
            )
        else:
            learning_rate = space.learning_rate.low
        return gamma, interval, micro, learning_rate

    def objective(self, trial: optuna.Trial) -> float:
        trial.set_user_attr(storage_module.WORKER_ATTR, storage_module.worker_identity())
        gamma, interval, micro, learning_rate = self.suggest(trial)
        prediction = self.memory.predict(gamma, micro)
        trial.set_user_attr("predicted_peak_bytes", prediction.peak_bytes)
        trial.set_user_attr("predicted_tensor_peak_bytes", prediction.tensor_peak_bytes)
        if prediction.overshoot_bytes > 0:
            self._infeasible(trial, prediction.overshoot_bytes, "predicted not to fit")
        ran = self.counted()
        oom = self._known_out_of_memory(prediction, ran)
        if oom is not None:
            self._infeasible(
                trial,
                max(1, prediction.peak_bytes - oom.user_attrs["predicted_peak_bytes"] + 1),
                f"predicted to need at least as much as trial {oom.number}, which ran out of memory",
            )
        if not self.settings.space.learning_rate.searched:
            for earlier in ran:
                same = (earlier.params["gamma"], earlier.params["interval"], self._micro(earlier.params))
                if same == (gamma, interval, micro):
                    return self._repeat(trial, earlier)
        self.skipped_in_a_row = 0
        return self.run_trial(trial, self.settings.train_settings(gamma, interval, micro, learning_rate), prediction)

    def _infeasible(self, trial: optuna.Trial, overshoot_bytes: int, reason: str) -> None:
        trial.set_constraint(CONSTRAINT, overshoot_bytes / 1e9)
        trial.set_user_attr("outcome", reason)
        self.skipped_in_a_row += 1
        raise optuna.TrialPruned(reason)

    def _repeat(self, trial: optuna.Trial, earlier: FrozenTrial) -> float:
        # A sampler may suggest a finished configuration again; its result is reused, not run twice.
        self.skipped_in_a_row += 1
        trial.set_user_attr("repeat_of", earlier.number)
        for key in ("tokens_per_second", "measured_peak_bytes", "outcome"):
            if key in earlier.user_attrs:
                trial.set_user_attr(key, earlier.user_attrs[key])
        if earlier.state == TrialState.COMPLETE and earlier.value is not None:
            # The pruner compares trials at each point they reported, so a repeat carries the earlier reports too.
            for tokens, loss in sorted(earlier.intermediate_values.items()):
                trial.report(loss, tokens)
            trial.set_constraint(CONSTRAINT, 0.0)
            return earlier.value
        if CONSTRAINT in earlier.constraints:
            trial.set_constraint(CONSTRAINT, earlier.constraints[CONSTRAINT])
        raise optuna.TrialPruned(f"repeat of trial {earlier.number}")

    def run_trial(self, trial: optuna.Trial, train: dict[str, Any], prediction: Prediction) -> float:
        """Run one trial process, feed its held-out losses to the pruner, and return its final held-out loss."""
        settings = self.settings
        trial_dir = settings.run_dir / "trials" / f"{trial.number:04d}"
        trial_dir.mkdir(parents=True, exist_ok=True)
        for stale in (RESULT, "metrics.jsonl"):
            (trial_dir / stale).unlink(missing_ok=True)
        spec = {
            "launched_at": time.time(),
            "train": train,
            "threads": settings.threads,
            "cuda_memory_fraction": self._cuda_memory_fraction(),
        }
        (trial_dir / SPEC).write_text(json.dumps(spec, indent=1), encoding="utf-8")
        trial.set_user_attr("trial_dir", str(trial_dir))

        reader = MetricsReader(trial_dir / "metrics.jsonl")
        limit = settings.trial_memory_limit
        with (trial_dir / LOG).open("wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "lisa_tune.tune.worker", str(trial_dir)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=lambda: _set_child_limits(limit),
                env=dict(os.environ, PYTHONUNBUFFERED="1"),
            )
            try:
                self._follow(trial, process, reader)
            finally:
                if process.poll() is None:
                    process.kill()
                    process.wait()
        return self._finish(trial, trial_dir, process.returncode, prediction)

    def _follow(self, trial: optuna.Trial, process: subprocess.Popen[bytes], reader: MetricsReader) -> None:
        while True:
            code = process.poll()
            for record in reader.new_evaluations():
                step = int(record["step"])
                if step == 0:
                    continue
                trial.report(float(record["eval_loss"]), int(record["tokens"]))
                if step < self.settings.steps and trial.should_prune():
                    process.kill()
                    process.wait()
                    trial.set_user_attr("counted", True)
                    trial.set_user_attr("outcome", "pruned")
                    trial.set_user_attr("pruned_at_tokens", int(record["tokens"]))
                    raise optuna.TrialPruned(f"pruned at {record['tokens']} tokens")
            if code is not None:
                return
            time.sleep(POLL_SECONDS)

    def _finish(self, trial: optuna.Trial, trial_dir: Path, code: int | None, prediction: Prediction) -> float:
        result_path = trial_dir / RESULT
        result = json.loads(result_path.read_text(encoding="utf-8")) if result_path.is_file() else None
        trial.set_user_attr("counted", True)
        if result is not None and "timings" in result:
            trial.set_user_attr("timings", result["timings"])

        if result is not None and result["status"] == "ok":
            trial.set_user_attr("outcome", "complete")
            trial.set_user_attr("tokens_per_second", round(float(result["tokens_per_second"]), 1))
            trial.set_user_attr("measured_peak_bytes", int(result["peak_memory_bytes"]))
            trial.set_user_attr("measured_peak_kind", result["peak_memory_kind"])
            trial.set_user_attr("tokens", int(result["tokens"]))
            if result.get("virtual_memory_peak_bytes"):
                trial.set_user_attr("virtual_memory_peak_bytes", int(result["virtual_memory_peak_bytes"]))
            trial.set_constraint(CONSTRAINT, 0.0)
            return float(result["final_eval_loss"])
        if result is not None and result["status"] == "out_of_memory":
            requested = result.get("requested_bytes") or 1
            trial.set_user_attr("outcome", "out of memory")
            trial.set_user_attr("measured_peak_bytes", int(result["peak_memory_bytes"]))
            trial.set_user_attr("overshoot_bytes", int(requested))
            trial.set_user_attr("message", result["message"])
            # The failed request is how far the step went over, at least: the limit was reached before it.
            trial.set_constraint(CONSTRAINT, max(requested, 1) / 1e9)
            raise optuna.TrialPruned(f"out of memory: {result['message']}")

        tail = (trial_dir / LOG).read_text(encoding="utf-8", errors="replace").strip().splitlines()[-3:]
        if result is not None:
            reason = str(result["message"])
        elif code is not None and code < 0:
            reason = f"killed by {signal.Signals(-code).name}"
            if -code == signal.SIGKILL:
                reason += ", which the kernel's out-of-memory killer also sends"
        else:
            reason = f"exit status {code}"
        if result is None and self.settings.trial_memory_limit is not None:
            reason += (
                f"; the process ran under --trial-memory-limit {self.settings.trial_memory_limit:,} bytes, and the "
                "interpreter and libraries alone take about 1.3 GB of address space"
            )
        trial.set_user_attr("outcome", "crashed")
        trial.set_user_attr("message", reason)
        raise TrialCrashed(f"trial {trial.number} crashed ({reason}); log {trial_dir / LOG}: {' | '.join(tail)}")

    def _cuda_memory_fraction(self) -> float | None:
        import torch

        if not torch.cuda.is_available():
            return None
        _free, total = torch.cuda.mem_get_info()
        return min(1.0, self.memory.usable / total)

    # The loop ---------------------------------------------------------------------------------------------------

    def enqueue_first(self) -> None:
        """Queue the planner's recommendation as the first trial of a new study."""
        if self.study.get_trials(deepcopy=False):
            return
        params = dict(self.settings.recommended)
        if len(self.settings.space.micro_batches) == 1:
            params.pop("micro_batch_size", None)
        self.study.enqueue_trial(params, user_attrs={"source": "planner recommendation"})

    def run(self, on_trial: Any) -> None:
        """Run trials until ``trials`` have counted, the space is exhausted, or suggestions keep failing the filter."""
        while len(self.counted()) < self.trials:
            if self.exhausted():
                logger.info("every configuration that fits has run; the study is complete")
                return
            if self.skipped_in_a_row >= MAX_SKIPPED_PER_TRIAL:
                logger.warning(
                    "the sampler suggested %d configurations in a row that do not fit or already ran; stopping",
                    self.skipped_in_a_row,
                )
                return
            self.study.optimize(self.objective, n_trials=1, catch=(TrialCrashed,), callbacks=[on_trial])


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    """Return the feasible complete trial with the lowest held-out loss, or None."""
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]
    feasible = [t for t in complete if all(v <= 0 for v in t.constraints.values())]
    return min(feasible, key=lambda t: (t.value, t.number)) if feasible else None


def make_sampler(seed: int, trials: int) -> optuna.samplers.BaseSampler:
    """Return TPE with a start-up phase sized to the study, which only the constraint mechanism informs."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            seed=seed,
            n_startup_trials=max(2, min(10, trials // 3)),
            multivariate=True,
            constant_liar=True,
        )


class DistinctMedianPruner(optuna.pruners.BasePruner):
    """Stop a trial whose held-out loss is above the median of other configurations' at the same number of tokens.

    It is Optuna's median rule with two changes for LISA trials. A repeated configuration counts once, since a
    repeat carries its original's reports and would otherwise pull the median towards it. A trial is judged only in
    the second half of its tokens, because early held-out losses are close and their order changes as layers switch.
    """

    def __init__(self, warmup_tokens: int, min_trials: int = 3) -> None:
        self.warmup_tokens = warmup_tokens
        self.min_trials = min_trials

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        step = trial.last_step
        if step is None or step < self.warmup_tokens:
            return False
        others = [
            other.intermediate_values[step]
            for other in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if step in other.intermediate_values and "repeat_of" not in other.user_attrs
        ]
        if len(others) < self.min_trials:
            return False
        return trial.intermediate_values[step] > statistics.median(others)


def make_pruner(name: str, tokens_per_trial: int) -> optuna.pruners.BasePruner:
    """Return the pruner ``--pruner`` names."""
    if name == "none":
        return optuna.pruners.NopPruner()
    return DistinctMedianPruner(warmup_tokens=tokens_per_trial // 2)


def steps_check(steps: int, space: TuneSpace) -> None:
    """Reject a trial length shorter than ``PERIODS_PER_TRIAL`` periods of the largest K."""
    needed = default_trial_steps(space)
    if steps < needed:
        raise InputError(
            f"--trial-steps {steps} covers fewer than {PERIODS_PER_TRIAL} periods of the largest K "
            f"({max(space.intervals)}); pass at least {needed} or smaller --interval values."
        )


def format_bytes(value: Any) -> str:
    return "-" if value is None else f"{int(value) / 1e9:.2f} GB"


def describe(trial: FrozenTrial) -> str:
    """Return one line about a finished trial."""
    params = trial.params
    parts = [f"trial {trial.number}: gamma {params.get('gamma')}, K {params.get('interval')}"]
    if "micro_batch_size" in params:
        parts.append(f"micro-batch {params['micro_batch_size']}")
    if "learning_rate" in params:
        parts.append(f"lr {params['learning_rate']:.2e}")
    outcome = trial.user_attrs.get("outcome", trial.state.name.lower())
    if trial.state == TrialState.COMPLETE and trial.value is not None:
        parts.append(f"held-out loss {trial.value:.4f}")
        if "tokens_per_second" in trial.user_attrs:
            parts.append(f"{trial.user_attrs['tokens_per_second']:.0f} tokens/s")
    else:
        parts.append(outcome)
        if "message" in trial.user_attrs:
            parts.append(str(trial.user_attrs["message"]))
    parts.append(
        f"peak predicted {format_bytes(trial.user_attrs.get('predicted_peak_bytes'))}, measured "
        f"{format_bytes(trial.user_attrs.get('measured_peak_bytes'))}"
    )
    if "repeat_of" in trial.user_attrs:
        parts.append(f"repeat of trial {trial.user_attrs['repeat_of']}, not run again")
    return ", ".join(parts)


def constraint_gb(trial: FrozenTrial) -> float | None:
    value = trial.constraints.get(CONSTRAINT)
    return None if value is None or math.isnan(value) else value
