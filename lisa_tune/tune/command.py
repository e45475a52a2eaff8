"""``lisa-tune tune``: validate the options, prepare the shared data, run the study, write its results."""

from __future__ import annotations

import logging
import math
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import FrozenTrial
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from lisa_tune.errors import InputError
from lisa_tune.files import write_text_atomically
from lisa_tune.model_config import layer_count
from lisa_tune.planner.command import parse_budget
from lisa_tune.planner.search import DEFAULT_GAMMA
from lisa_tune.profiles import resolve_model
from lisa_tune.train.config import TrainConfig, read_plan
from lisa_tune.tune import storage as storage_module
from lisa_tune.tune.report import print_table, write_plots
from lisa_tune.tune.space import TuneSpace, build_space, default_trial_steps
from lisa_tune.tune.tuner import StudySettings, Tuner, best_trial, describe, file_digest, make_pruner, make_sampler
from lisa_tune.units import parse_size

logger = logging.getLogger(__name__)

BEST = "best.yaml"
LAUNCH_DIR = "train"


@dataclass(frozen=True)
class TuneOptions:
    """The settings of one ``tune`` run, as the command line gives them (None: from plan.yaml or the default)."""

    data: Path
    run_dir: Path
    trials: int
    gpu: str | None = None
    model: str | None = None
    plan_file: Path | None = None
    gammas: str | None = None
    intervals: str | None = None
    micro_batches: str | None = None
    batch: int | None = None
    learning_rate: str = "3e-4"
    sequence_length: int | None = None
    precision: str | None = None
    gradient_checkpointing: bool | None = None
    attention: str | None = None
    policy: str | None = None
    trial_steps: int | None = None
    reports: int = 4
    seed: int = 0
    sampler_seed: int | None = None
    """Seed of the sampler alone; None uses ``seed``."""
    margin: float = 0.05
    eval_fraction: float = 0.05
    storage: str | None = None
    study_name: str | None = None
    trial_memory_limit: str | None = None
    pruner: str = "median"
    threads: int | None = None
    launch: bool = False
    launch_steps: int | None = None


def _default_precision() -> str:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def _prepare_tokenizer(model: str, records: Any, run_dir: Path) -> tuple[Path | None, Any]:
    """Return the tokenizer directory every trial shares (trained once for a bundled profile) and the tokenizer."""
    import transformers

    from lisa_tune.train.data import record_texts
    from lisa_tune.train.tokenizer import bundled_tokenizer

    path = Path(model).expanduser()
    if path.is_dir():
        return None, transformers.AutoTokenizer.from_pretrained(path)
    tokenizer_dir = run_dir / "tokenizer"
    vocab_size = TrainConfig.tokenizer_vocab_size
    return tokenizer_dir, bundled_tokenizer(tokenizer_dir, record_texts(records), vocab_size, resolve_model(model))


def build_settings(options: TuneOptions) -> StudySettings:
    """Check every option before any trial starts, and return the study's fixed settings."""
    if options.trials < 1:
        raise InputError(f"invalid --trials {options.trials}: pass at least 1 trial to run.")
    if options.reports < 1:
        raise InputError(f"invalid --reports {options.reports}: pass at least 1 held-out evaluation per trial.")
    if not 0 <= options.margin < 1:
        raise InputError(f"invalid --margin {options.margin}: pass a fraction of the budget from 0 to below 1.")
    if not 0 < options.eval_fraction < 1:
        raise InputError(f"invalid --eval-fraction {options.eval_fraction}: pass a fraction between 0 and 1.")
    if options.threads is not None and options.threads < 1:
        raise InputError(f"invalid --threads {options.threads}: pass at least 1, or leave it out for PyTorch's choice.")
    if options.launch_steps is not None and options.launch_steps < 1:
        raise InputError(f"invalid --launch-steps {options.launch_steps}: pass at least 1 optimizer step.")
    if not options.data.is_file():
        raise InputError(
            f"--data {options.data} not found or not a file. Pass a JSON or JSONL file of training records."
        )
    plan = read_plan(options.plan_file) if options.plan_file is not None else {}
    model = options.model or plan.get("model")
    if model is None:
        raise InputError("missing model: pass --model, or --config with a plan.yaml that names one.")
    source = resolve_model(model)
    layers = layer_count(source.config)
    if layers is None:
        raise InputError(f"the config of model {source.name} states no layer count.")
    gpu = options.gpu
    if gpu is None:
        raise InputError("missing memory budget: pass --gpu with a size such as 24GB, a GPU name, or auto.")
    budget = parse_budget(gpu)
    micro_text = options.micro_batches
    if micro_text is None and "micro_batch_size" in plan:
        micro_text = str(plan["micro_batch_size"])
        if options.batch is not None and options.batch % int(plan["micro_batch_size"]):
            # The plan's micro-batch does not divide the --batch given here, so the trials take --batch whole.
            micro_text = None
    batch = options.batch
    if batch is None and "micro_batch_size" in plan:
        batch = int(plan["micro_batch_size"]) * int(plan.get("gradient_accumulation_steps", 1))
    space = build_space(layers, options.gammas, options.intervals, micro_text, batch, options.learning_rate)
    steps = options.trial_steps if options.trial_steps is not None else default_trial_steps(space)
    from lisa_tune.tune.tuner import steps_check

    steps_check(steps, space)
    memory_limit = None
    if options.trial_memory_limit is not None:
        try:
            memory_limit = parse_size(options.trial_memory_limit)
        except ValueError as error:
            raise InputError(
                f"invalid --trial-memory-limit {options.trial_memory_limit!r}: {error}. Pass a size such as 4GB."
            ) from None
    sequence = options.sequence_length if options.sequence_length is not None else int(plan.get("sequence_length", 256))
    if sequence < 1:
        raise InputError(f"invalid --seq {sequence}: a sequence length must be at least 1 token.")
    return StudySettings(
        model=model,
        data=options.data.resolve(),
        run_dir=options.run_dir,
        model_config=source.config,
        layers=layers,
        space=space,
        sequence_length=sequence,
        precision=options.precision or plan.get("precision") or _default_precision(),
        gradient_checkpointing=bool(
            options.gradient_checkpointing
            if options.gradient_checkpointing is not None
            else plan.get("gradient_checkpointing", False)
        ),
        attention=options.attention or plan.get("attention") or "sdpa",
        policy=options.policy or plan.get("policy") or "reset",
        steps=steps,
        reports=options.reports,
        seed=options.seed,
        eval_fraction=options.eval_fraction,
        tokenizer_dir=None,
        budget=budget,
        margin=options.margin,
        trial_memory_limit=memory_limit,
        threads=options.threads,
        plan=plan,
    )


def recommendation(space: TuneSpace, plan: dict[str, Any], fitting: list[tuple[int, int]]) -> dict[str, Any]:
    """Return the first trial, chosen as the planner chooses among the (gamma, micro-batch) pairs that fit.

    Gamma is the plan's (2 without a plan) or the largest smaller one that fits, else the smallest that fits. The
    micro-batch is the plan's when it fits, else the largest that fits. K is the plan's, else the middle of the space.
    """
    target = int(plan.get("gamma", DEFAULT_GAMMA))
    gammas = sorted({gamma for gamma, _ in fitting})
    below = [gamma for gamma in gammas if gamma <= target]
    gamma = max(below) if below else gammas[0]
    micro = max(m for g, m in fitting if g == gamma)
    if (gamma, int(plan.get("micro_batch_size", 0))) in fitting:
        micro = int(plan["micro_batch_size"])
    interval_target = int(plan.get("interval", space.intervals[len(space.intervals) // 2]))
    interval = min(space.intervals, key=lambda k: (abs(k - interval_target), k))
    return {"gamma": gamma, "interval": interval, "micro_batch_size": micro}


def open_study(settings: StudySettings, options: TuneOptions) -> tuple[optuna.Study, optuna.storages.RDBStorage]:
    """Create or load the study, and reject one made for another model, data set or trial length."""
    url = options.storage or storage_module.default_url(settings.run_dir)
    storage = storage_module.open_storage(url)
    name = options.study_name or settings.run_dir.resolve().name
    study = optuna.create_study(
        storage=storage,
        study_name=name,
        direction="minimize",
        sampler=make_sampler(settings.seed if options.sampler_seed is None else options.sampler_seed, options.trials),
        pruner=make_pruner(options.pruner, settings.tokens_per_trial),
        load_if_exists=True,
    )
    identity = settings.identity(file_digest(settings.data))
    saved = {key: study.user_attrs.get(key) for key in identity}
    # Studies made before a key was recorded hold None for it; only the recorded keys are compared.
    known = {key for key, value in saved.items() if value is not None}
    if all(value is None for value in saved.values()):
        for key, value in identity.items():
            study.set_user_attr(key, value)
    else:
        different = [key for key in identity if key in known and saved[key] != identity[key]]
        if different:
            details = "; ".join(
                "the data file changed (its SHA-256 differs)"
                if key == "data_sha256"
                else f"{key} {saved[key]!r} there, {identity[key]!r} now"
                for key in different
            )
            raise InputError(
                f"study {name!r} in {storage_module.masked(url)} was made for other settings ({details}). Pass a "
                "new --run-dir (or --study-name), or the settings the study was made with."
            )
    return study, storage


def run_tune(options: TuneOptions) -> int:
    """Run or resume the study, write the table, best.yaml and plots, and launch the winner when asked."""
    settings = build_settings(options)
    from lisa_tune.tune.tuner import MemoryFilter

    created = not options.run_dir.exists()
    had_tokenizer = (options.run_dir / "tokenizer" / "tokenizer.json").is_file()
    try:
        # The memory check needs the model as the trials build it: a bundled profile gets the data's tokenizer.
        options.run_dir.mkdir(parents=True, exist_ok=True)
        from lisa_tune.train.data import load_records

        records = load_records(settings.data)
        tokenizer_dir, tokenizer = _prepare_tokenizer(settings.model, records, settings.run_dir)
        if tokenizer_dir is not None:
            from lisa_tune.train.trainer import bundled_model_config

            settings.model_config = bundled_model_config(settings.model_config, tokenizer)
            settings.tokenizer_dir = tokenizer_dir.resolve()
        memory = MemoryFilter(settings)
        fitting = memory.check_space()
        settings.recommended = recommendation(settings.space, settings.plan, fitting)
        blocks = training_blocks(settings, records, tokenizer)
        optuna.logging.set_verbosity(optuna.logging.ERROR)
        study, storage = open_study(settings, options)
    except BaseException:
        # A start that fails before any trial leaves nothing behind that a later start would pick up.
        if created:
            shutil.rmtree(options.run_dir, ignore_errors=True)
        elif not had_tokenizer:
            shutil.rmtree(options.run_dir / "tokenizer", ignore_errors=True)
        raise
    tuner = Tuner(settings, study, options.trials, memory)
    for orphan in storage_module.fail_orphaned_trials(study, storage):
        if orphan.params:
            study.enqueue_trial(orphan.params, user_attrs={"retry_of": orphan.number})
    tuner.enqueue_first()
    done = len(tuner.counted())
    logger.info(
        "study %s: %d of %d trials done; %d of %d (gamma, micro-batch) pairs fit %s; each trial trains %d steps "
        "(%s tokens)",
        study.study_name,
        done,
        options.trials,
        len(fitting),
        len(settings.space.memory_grid()),
        settings.budget.label,
        settings.steps,
        f"{settings.tokens_per_trial:,}",
    )
    progress = tqdm(
        total=options.trials,
        initial=min(done, options.trials),
        desc="trials",
        unit="trial",
        disable=not sys.stderr.isatty(),
    )

    def on_trial(study: optuna.Study, trial: FrozenTrial) -> None:
        if trial.user_attrs.get("counted"):
            progress.update(1)
        best = best_trial(study)
        suffix = f"; best {best.value:.4f} (trial {best.number})" if best is not None and best.value else ""
        logger.info("%s%s", describe(trial), suffix)

    try:
        with logging_redirect_tqdm(loggers=[logging.getLogger("lisa_tune")]), progress:
            tuner.run(on_trial)
    except KeyboardInterrupt:
        logger.warning("interrupted; run the same command again to resume the study from its finished trials")
        raise
    return finish(settings, options, study, max(1, blocks // settings.space.batch))


def finish(settings: StudySettings, options: TuneOptions, study: optuna.Study, epoch_steps: int) -> int:
    """Print the trial table, write best.yaml and the plots, and launch the winner when asked."""
    print_table(study, settings)
    best = best_trial(study)
    if best is None:
        logger.warning("no trial completed, so %s and the plots were not written", BEST)
        return 1
    document = best_document(settings, best)
    path = settings.run_dir / BEST
    text = "# Written by lisa-tune tune; lisa-tune train --config reads it.\n" + yaml.safe_dump(
        document, sort_keys=False
    )
    write_text_atomically(path, text)
    write_plots(study, settings.run_dir)
    logger.info(
        "best: trial %d, gamma %d, K %d, held-out loss %.4f; written to %s",
        best.number,
        best.params["gamma"],
        best.params["interval"],
        best.value,
        path,
    )
    if options.launch:
        launch(settings, options.launch_steps or epoch_steps, path)
    return 0


def best_document(settings: StudySettings, best: FrozenTrial) -> dict[str, Any]:
    """Return the winner in the layout of plan.yaml, which ``train --config`` reads."""
    micro = int(best.params.get("micro_batch_size", settings.space.micro_batches[0]))
    learning_rate = float(best.params.get("learning_rate", settings.space.learning_rate.low))
    document: dict[str, Any] = {
        "model": settings.model,
        "gamma": int(best.params["gamma"]),
        "interval": int(best.params["interval"]),
        "micro_batch_size": micro,
        "gradient_accumulation_steps": settings.space.batch // micro,
        "sequence_length": settings.sequence_length,
        "precision": settings.precision,
        "gradient_checkpointing": settings.gradient_checkpointing,
        "attention": settings.attention,
        "optimizer_state_policy": settings.policy,
        "learning_rate": learning_rate,
        "pack": True,
        "seed": settings.seed,
    }
    if settings.tokenizer_dir is not None:
        document["tokenizer"] = str(settings.tokenizer_dir)
    document["tuning"] = {
        "trial": best.number,
        "held_out_loss": round(float(best.value or math.nan), 6),
        "training_tokens": settings.tokens_per_trial,
        "tokens_per_second": best.user_attrs.get("tokens_per_second"),
        "predicted_peak_bytes": best.user_attrs.get("predicted_peak_bytes"),
        "measured_peak_bytes": best.user_attrs.get("measured_peak_bytes"),
        "budget": settings.budget.label,
    }
    return document


def training_blocks(settings: StudySettings, records: Any, tokenizer: Any) -> int:
    """Tokenize and pack the data as every trial will, and return the training sequences; fail before any trial."""
    from lisa_tune.train.data import split_holdout, tokenize_records

    dataset = tokenize_records(records, tokenizer, max_length=settings.sequence_length, pack=True)
    train_set, _ = split_holdout(dataset, settings.eval_fraction, settings.seed)
    if len(train_set) < settings.space.batch:
        raise InputError(
            f"{settings.data} packs into {len(train_set)} training sequences of {settings.sequence_length} tokens, "
            f"fewer than one optimizer step of --batch {settings.space.batch}; add data or lower --batch or --seq."
        )
    return len(train_set)


def launch(settings: StudySettings, steps: int, best: Path) -> None:
    """Train the winner in ``best`` (best.yaml) for the full run in RUN_DIR/train, resuming an interrupted launch."""
    from lisa_tune.train.trainer import CHECKPOINT, run_training

    run_dir = settings.run_dir / LAUNCH_DIR
    # The same reading as lisa-tune train --config best.yaml, so both train the same configuration.
    config = TrainConfig(
        data=settings.data,
        run_dir=run_dir,
        eval_fraction=settings.eval_fraction,
        max_steps=steps,
        **read_plan(best),
    )
    resume = (run_dir / CHECKPOINT / "state.pt").is_file()
    logger.info(
        "launching the full run of the winner in %s (%d steps)%s",
        run_dir,
        config.max_steps,
        ", resuming its checkpoint" if resume else "",
    )
    run_training(config, resume=resume)
