"""The ``lisa-tune`` command line: a thin layer over the library API.

Errors the user can fix are ``LisaTuneError`` subclasses. Each prints one line and exits with its status
(2 for invalid input); a traceback is shown only with ``--debug``.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from pathlib import Path
from typing import Any

import click

from lisa_tune.errors import InputError, LisaTuneError
from lisa_tune.log import configure_logging
from lisa_tune.model_config import parse_gamma

logger = logging.getLogger(__name__)

_state = {"debug": False}

PRECISIONS = ("bf16", "amp-bf16", "fp32")
POLICIES = ("reset", "persistent")
ADAMW_IMPLEMENTATIONS = ("foreach", "fused", "for-loop")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("-v", "--verbose", count=True, help="Log more: -v adds debug messages.")
@click.option("-q", "--quiet", count=True, help="Log less: -q keeps warnings, -qq only errors.")
@click.option("--debug", is_flag=True, help="Show the full traceback of an error.")
@click.version_option(package_name="lisa-tune")
def cli(verbose: int, quiet: int, debug: bool) -> None:
    """Plan, tune and run LISA fine-tuning of large language models on the GPU you have.

    LISA (Layerwise Importance Sampled AdamW, Pan et al. 2024, arXiv 2403.17919) always trains the embedding and
    LM head plus gamma decoder layers drawn at random, redrawn every K optimizer steps.
    """
    _state["debug"] = debug
    configure_logging(verbose - quiet)


@cli.command()
@click.option(
    "--model",
    "model_spec",
    default="llama-2-7b",
    show_default=True,
    help="Bundled model name, a model directory, a config.json, or a Hub id already in the local cache.",
)
@click.option(
    "--gamma",
    default="2",
    show_default=True,
    help="Decoder layers trained per period (1 to the layer count), or 'full' for full fine-tuning.",
)
@click.option(
    "--batch",
    "micro_batch",
    type=int,
    default=1,
    show_default=True,
    help="Micro-batch size: sequences per forward pass.",
)
@click.option("--seq", "sequence_length", type=int, default=1024, show_default=True, help="Sequence length in tokens.")
@click.option(
    "--precision",
    type=click.Choice(PRECISIONS),
    default="bf16",
    show_default=True,
    help="bf16: weights, gradients and AdamW state in bf16. amp-bf16: fp32 weights with bf16 autocast. "
    "fp32: everything in fp32.",
)
@click.option(
    "--grad-ckpt/--no-grad-ckpt",
    default=False,
    show_default=True,
    help="Gradient (activation) checkpointing of every decoder layer.",
)
@click.option(
    "--attention",
    type=click.Choice(("sdpa", "eager")),
    default="sdpa",
    show_default=True,
    help="Attention implementation. sdpa runs flash or memory-efficient kernels on CUDA; eager "
    "materialises the score matrix.",
)
@click.option(
    "--policy",
    type=click.Choice(POLICIES),
    default="reset",
    show_default=True,
    help="Optimizer state of layers leaving the active set: reset frees it, persistent keeps it.",
)
@click.option(
    "--periods",
    type=int,
    default=1,
    show_default=True,
    help="Sampling periods to simulate; with --policy persistent the state grows over them.",
)
@click.option(
    "--device",
    "target_device",
    type=click.Choice(("cuda", "cpu")),
    default="cuda",
    show_default=True,
    help="Device the prediction is for.",
)
@click.option(
    "--gpu",
    "gpu_name",
    default=None,
    help="GPU profile (for example rtx4090) that supplies the CUDA context and cuBLAS workspace sizes.",
)
@click.option(
    "--adamw",
    type=click.Choice(ADAMW_IMPLEMENTATIONS),
    default=None,
    help="AdamW implementation. Default: PyTorch's default for the device (foreach on CUDA, for-loop on CPU).",
)
@click.option("--freeze-embedding", is_flag=True, help="Keep the input embedding frozen.")
@click.option(
    "--layers-path",
    default=None,
    help="Dotted path of the decoder layer list, for architectures lisa-tune does not know.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the layer sampler.")
@click.option("--json", "as_json", is_flag=True, help="Print the estimate as JSON (see docs/estimate-json.md).")
def estimate(
    model_spec: str,
    gamma: str,
    micro_batch: int,
    sequence_length: int,
    precision: str,
    grad_ckpt: bool,
    attention: str,
    policy: str,
    periods: int,
    target_device: str,
    gpu_name: str | None,
    adamw: str | None,
    freeze_embedding: bool,
    layers_path: str | None,
    seed: int,
    as_json: bool,
) -> None:
    """Predict the peak memory of one LISA training step, with a breakdown by category."""
    from lisa_tune.profiles import find_gpu_profile, resolve_model

    source = resolve_model(model_spec)
    gpu = find_gpu_profile(gpu_name) if gpu_name else None
    if gpu is not None and target_device == "cpu":
        raise InputError(
            f"--gpu {gpu_name} sets the CUDA context of a CUDA prediction and has no effect with --device cpu; "
            "drop --gpu or use --device cuda."
        )

    from lisa_tune.lisa.controller import OptimizerStatePolicy
    from lisa_tune.lisa.optim import AdamWImplementation
    from lisa_tune.lisa.precision import Precision
    from lisa_tune.memory.simulator import SimulationConfig, simulate, validate
    from lisa_tune.modeling import hidden_size, max_positions

    if hidden_size(source.config) is None:
        raise InputError(
            f"model config {source.config_path} states no hidden size (hidden_size or n_embd); "
            "pass a complete Hugging Face config.json."
        )
    config = SimulationConfig(
        model_config=source.config,
        model_name=source.name,
        gamma=parse_gamma(gamma),
        micro_batch_size=micro_batch,
        sequence_length=sequence_length,
        precision=Precision(precision),
        gradient_checkpointing=grad_ckpt,
        attention=attention,
        policy=OptimizerStatePolicy(policy),
        periods=periods,
        target_device=target_device,
        adamw=AdamWImplementation(adamw) if adamw else None,
        freeze_embedding=freeze_embedding,
        layers_path=layers_path,
        seed=seed,
        gpu=gpu,
    )
    validate(config)
    limit = max_positions(source.config)
    if limit is not None and sequence_length > limit:
        logger.warning(
            "sequence length %d is %d tokens longer than the model's %d position embeddings; "
            "the estimate assumes the model is extended to it",
            sequence_length,
            sequence_length - limit,
            limit,
        )
    result = simulate(config)
    from lisa_tune.memory.report import estimate_to_dict, print_estimate

    if as_json:
        click.echo(json.dumps(estimate_to_dict(result), indent=2))
    else:
        print_estimate(result)


@cli.command()
@click.option(
    "--gpu",
    "gpu",
    required=True,
    help="Memory budget: a size (24GB = 24 x 10^9 bytes, 24GiB = 24 x 2^30 bytes), a GPU profile name "
    "(rtx4090, a100-80gb, ...), or auto for the free memory of the local CUDA device.",
)
@click.option(
    "--model",
    "model_spec",
    default="llama-2-7b",
    show_default=True,
    help="Bundled model name, a model directory, a config.json, or a Hub id already in the local cache.",
)
@click.option(
    "--seq",
    "sequences",
    default="1024",
    show_default=True,
    help="Sequence length in tokens; several as 512,1024,2048; or auto for the longest that fits "
    "the --gamma (default 2) and micro-batch.",
)
@click.option(
    "--gamma",
    "gamma_text",
    default=None,
    help="Search only this many active layers, or 'full' for all of them (default: every gamma from 1 to the "
    "layer count; the recommendation uses 2).",
)
@click.option(
    "--batch",
    "micro_batch",
    type=int,
    default=None,
    help="Fix the micro-batch size (sequences per forward pass) instead of searching it.",
)
@click.option("--max-batch", type=int, default=64, show_default=True, help="Largest micro-batch size searched.")
@click.option(
    "--precision",
    "precisions",
    multiple=True,
    type=click.Choice(PRECISIONS),
    help="Precision to consider; repeat for several. Default: bf16 and amp-bf16 (fp32 on a GPU without bf16).",
)
@click.option(
    "--grad-ckpt/--no-grad-ckpt",
    default=None,
    help="Consider only runs with (or without) gradient checkpointing. Default: both.",
)
@click.option(
    "--effective-batch",
    type=int,
    default=None,
    help="Sequences per optimizer step; the micro-batch must divide it and the rest is gradient accumulation.",
)
@click.option(
    "--margin",
    type=float,
    default=0.05,
    show_default=True,
    help="Safety margin as a fraction of the budget, kept free for allocator fragmentation.",
)
@click.option(
    "--attention",
    type=click.Choice(("sdpa", "eager")),
    default="sdpa",
    show_default=True,
    help="Attention implementation.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@click.option(
    "--output",
    type=click.Path(path_type=Path),
    default=None,
    help="Write the recommended configuration as YAML for lisa-tune train --config and lisa-tune tune.",
)
@click.option(
    "--plot",
    type=click.Path(path_type=Path),
    default=None,
    help="Write a PNG of the memory breakdown per gamma against the budget.",
)
@click.pass_context
def plan(
    ctx: click.Context,
    gpu: str,
    model_spec: str,
    sequences: str,
    gamma_text: str | None,
    micro_batch: int | None,
    max_batch: int,
    precisions: tuple[str, ...],
    grad_ckpt: bool | None,
    effective_batch: int | None,
    margin: float,
    attention: str,
    as_json: bool,
    output: Path | None,
    plot: Path | None,
) -> None:
    """Find the LISA configurations that fit a GPU, and recommend the fastest at gamma 2.

    Exit status 0 when a configuration fits, 1 when none does (the output suggests what would), 2 for invalid
    input.
    """
    from lisa_tune.planner.command import NothingFits, PlanOptions, dumps, make_plan, write_outputs
    from lisa_tune.planner.output import check_plot_path, check_writable, plan_to_dict, print_plan

    for path, option in ((output, "--output"), (plot, "--plot")):
        if path is not None:
            check_writable(path, option)
    if plot is not None:
        check_plot_path(plot)
    defaults_used = [
        f"--{name.replace('_', '-')} {value}"
        for name, value, parameter in (("model", model_spec, "model_spec"), ("seq", sequences, "sequences"))
        if ctx.get_parameter_source(parameter) is click.core.ParameterSource.DEFAULT
    ]
    options = PlanOptions(
        gpu=gpu,
        model=model_spec,
        sequences=sequences,
        gamma=gamma_text,
        batch=micro_batch,
        max_batch=max_batch,
        precisions=precisions,
        gradient_checkpointing=grad_ckpt,
        effective_batch=effective_batch,
        margin=margin,
        attention=attention,
    )
    result, fits = make_plan(options)
    if as_json:
        click.echo(dumps(plan_to_dict(result, defaults_used)))
    else:
        print_plan(result, defaults_used)
    if result.recommended is None:
        skipped = [str(path) for path in (output, plot) if path is not None]
        if skipped:
            logger.warning(
                "nothing fits, so %s %s not written", " and ".join(skipped), "was" if len(skipped) == 1 else "were"
            )
        raise NothingFits("nothing fits the budget; see the advice above")
    write_outputs(result, fits, options, output, plot)


@cli.command()
@click.option(
    "--data",
    type=click.Path(path_type=Path),
    required=True,
    help="Training data: JSON or JSONL records in the Alpaca, chat or plain-text layout.",
)
@click.option(
    "--run-dir",
    type=click.Path(path_type=Path),
    required=True,
    help="Folder for checkpoints, metrics.jsonl, the tokenizer of a bundled profile and the final model.",
)
@click.option(
    "--config",
    "plan_file",
    type=click.Path(path_type=Path),
    default=None,
    help="A plan.yaml from lisa-tune plan --output; flags given here override it.",
)
@click.option(
    "--model",
    default=None,
    help="Model directory with weights and tokenizer, or a bundled profile trained from random weights.",
)
@click.option("--gamma", type=int, default=None, help="Decoder layers trained per period.  [default: 2]")
@click.option("--interval", type=int, default=None, help="K: optimizer steps per sampling period.  [default: 20]")
@click.option(
    "--policy",
    type=click.Choice(POLICIES),
    default=None,
    help="Optimizer state of outgoing layers: reset frees it, persistent keeps it.  [default: reset]",
)
@click.option("--precision", type=click.Choice(PRECISIONS), default=None, help="Precision.  [default: fp32]")
@click.option("--grad-ckpt/--no-grad-ckpt", default=None, help="Gradient checkpointing.  [default: off]")
@click.option("--micro-batch-size", type=int, default=None, help="Sequences per forward pass.  [default: 4]")
@click.option(
    "--gradient-accumulation-steps", type=int, default=None, help="Micro-batches per optimizer step.  [default: 1]"
)
@click.option(
    "--seq",
    "sequence_length",
    type=int,
    default=None,
    help="Sequence length in tokens; longer records are truncated.  [default: 256]",
)
@click.option("--learning-rate", type=float, default=None, help="Peak learning rate.  [default: 3e-4]")
@click.option("--warmup-steps", type=int, default=None, help="Optimizer steps of linear warm-up.  [default: 10]")
@click.option("--max-steps", type=int, default=None, help="Optimizer steps of the run.  [default: 100]")
@click.option("--eval-fraction", type=float, default=None, help="Share of records held out.  [default: 0.05]")
@click.option("--eval-every", type=int, default=None, help="Optimizer steps between evaluations.  [default: 50]")
@click.option("--log-every", type=int, default=None, help="Optimizer steps between log lines.  [default: 10]")
@click.option("--save-every", type=int, default=None, help="Optimizer steps between checkpoints.  [default: 50]")
@click.option("--seed", type=int, default=None, help="Seed of data order, split, sampler and weights.  [default: 0]")
@click.option("--pack/--no-pack", default=None, help="Pack examples into full sequences.  [default: no-pack]")
@click.option("--strict", is_flag=True, default=None, help="Fail on the first malformed data line.")
@click.option("--freeze-embedding", is_flag=True, default=None, help="Keep the input embedding frozen.")
@click.option(
    "--attention", type=click.Choice(("sdpa", "eager")), default=None, help="Attention implementation.  [default: sdpa]"
)
@click.option(
    "--tokenizer-vocab-size",
    type=int,
    default=None,
    help="Vocabulary of the BPE tokenizer trained for a bundled profile.  [default: 4096]",
)
@click.option("--resume", is_flag=True, help="Continue the run in --run-dir from its checkpoint.")
def train(plan_file: Path | None, resume: bool, **options: Any) -> None:
    """Fine-tune a model with LISA and save it as a Hugging Face directory in RUN_DIR/final."""
    from lisa_tune.train.config import TrainConfig, read_plan
    from lisa_tune.train.trainer import run_training

    names = {
        "grad_ckpt": "gradient_checkpointing",
    }
    settings: dict[str, Any] = read_plan(plan_file) if plan_file is not None else {}
    for key, value in options.items():
        if value is not None:
            settings[names.get(key, key)] = value
    run_training(TrainConfig(**settings), resume=resume)


@cli.command()
@click.option(
    "--data",
    type=click.Path(path_type=Path),
    required=True,
    help="Training data: JSON or JSONL records; every trial trains and is scored on the same split of it.",
)
@click.option(
    "--run-dir",
    type=click.Path(path_type=Path),
    required=True,
    help="Folder of the study: study.db, one folder per trial, best.yaml and the plots. Rerun to resume.",
)
@click.option(
    "--trials", type=int, required=True, help="Trials to run; configurations that do not fit are not counted."
)
@click.option("--gpu", required=True, help="Memory budget: a size (24GB, 24GiB), a GPU name, or auto.")
@click.option("--model", default=None, help="Model directory with weights and tokenizer, or a bundled profile.")
@click.option(
    "--config",
    "plan_file",
    type=click.Path(path_type=Path),
    default=None,
    help="A plan.yaml from lisa-tune plan --output: fixed settings and the first trial. Flags override it.",
)
@click.option("--gamma", "gammas", default=None, help="Gammas to search: 1,2,4 or a range 1-8.  [default: 1,2,4,8]")
@click.option("--interval", "intervals", default=None, help="K values to search (optimizer steps).  [default: 5,10,20]")
@click.option(
    "--micro-batch",
    "micro_batches",
    default=None,
    help="Micro-batch sizes to search; each must divide --batch.  [default: the plan's, else --batch, else 4]",
)
@click.option(
    "--batch",
    type=int,
    default=None,
    help="Sequences per optimizer step, the same in every trial.  [default: the plan's, else the largest micro-batch]",
)
@click.option(
    "--learning-rate",
    default="3e-4",
    show_default=True,
    help="A learning rate, or a range low:high searched on a log scale.",
)
@click.option("--seq", "sequence_length", type=int, default=None, help="Sequence length in tokens.  [default: 256]")
@click.option("--precision", type=click.Choice(PRECISIONS), default=None, help="Precision of every trial.")
@click.option(
    "--grad-ckpt/--no-grad-ckpt", "gradient_checkpointing", default=None, help="Gradient checkpointing in every trial."
)
@click.option("--attention", type=click.Choice(("sdpa", "eager")), default=None, help="Attention implementation.")
@click.option("--policy", type=click.Choice(POLICIES), default=None, help="Optimizer state of outgoing layers.")
@click.option(
    "--trial-steps",
    type=int,
    default=None,
    help="Optimizer steps per trial; at least 3 periods of the largest K.  [default: 3 x largest K]",
)
@click.option("--reports", type=int, default=4, show_default=True, help="Held-out evaluations per trial, for pruning.")
@click.option(
    "--pruner",
    type=click.Choice(("median", "none")),
    default="median",
    show_default=True,
    help="median stops a trial whose held-out loss is above the median of the others in its second half.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the data, weights and the sampler.")
@click.option("--sampler-seed", type=int, default=None, help="Seed of the sampler alone, to repeat a search.")
@click.option("--margin", type=float, default=0.05, show_default=True, help="Share of the budget kept free.")
@click.option("--eval-fraction", type=float, default=0.05, show_default=True, help="Share of the data held out.")
@click.option(
    "--storage",
    default=None,
    help="Optuna storage URL shared by several workers, e.g. postgresql://user:password@host/db.  "
    "[default: sqlite in --run-dir]",
)
@click.option("--study-name", default=None, help="Study name in the storage.  [default: the run folder's name]")
@click.option(
    "--trial-memory-limit",
    default=None,
    help="Cap each trial process's address space (e.g. 6GB); a CPU stand-in for a smaller device.",
)
@click.option("--threads", type=int, default=None, help="CPU threads per trial.  [default: PyTorch's choice]")
@click.option("--launch", is_flag=True, help="Train the winner afterwards in RUN_DIR/train.")
@click.option(
    "--launch-steps", type=int, default=None, help="Optimizer steps of the launched run.  [default: one epoch]"
)
def tune(**options: Any) -> None:
    """Search gamma and K with Optuna by short real LISA trials that fit the budget, then pick the winner.

    Exit status 0 with a winner, 1 when nothing fits the budget or no trial completed, 2 for invalid input.
    """
    from lisa_tune.tune.command import TuneOptions, run_tune

    if run_tune(TuneOptions(**options)):
        raise LisaTuneError(f"no trial completed; see the table above and the logs in {options['run_dir'] / 'trials'}")


def main(argv: list[str] | None = None) -> int:
    """Run the command line and return its exit status."""
    try:
        cli.main(args=argv, prog_name="lisa-tune", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        return 130
    except click.ClickException as error:
        error.show()
        return error.exit_code
    except click.exceptions.Exit as exit_request:
        return int(exit_request.exit_code)
    except LisaTuneError as error:
        if _state["debug"]:
            traceback.print_exc()
        click.echo(f"Error: {error}", err=True)
        return error.exit_code
    except Exception as error:
        if _state["debug"]:
            traceback.print_exc()
        else:
            click.echo(
                f"Error: unexpected {type(error).__name__}: {error}. Rerun as lisa-tune --debug ... for the traceback.",
                err=True,
            )
        return 1
    return 0


def entry_point(*args: Any) -> None:
    """Console-script entry point."""
    del args
    sys.exit(main())
