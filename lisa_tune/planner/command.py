"""The ``plan`` command's work, kept apart from click so tests and programs can call it."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lisa_tune.errors import InputError, LisaTuneError
from lisa_tune.model_config import FULL_FINE_TUNING, hidden_size, layer_count, max_positions, parse_gamma
from lisa_tune.planner.cache import fit_key, load_fit, store_fit
from lisa_tune.planner.memory_fit import MemoryFit
from lisa_tune.planner.search import (
    DEFAULT_GAMMA,
    Budget,
    Plan,
    SearchSpace,
    longest_fitting_sequence,
    search,
    step_fit,
    usable_bytes,
)
from lisa_tune.profiles import GpuProfile, find_gpu_profile, load_gpu_profiles, resolve_model
from lisa_tune.units import parse_size

logger = logging.getLogger(__name__)

REFERENCE_GPU = "rtx4090"
"""The profile used when the local CUDA device matches no profile."""
CUBLAS_HANDLES = 2
_SIZE_LIKE = re.compile(r"^\s*[+-]?\d")


class NothingFits(LisaTuneError):
    """No configuration fits the budget, and the plan's advice suggests what would. Exit status 1."""

    exit_code = 1


@dataclass(frozen=True)
class PlanOptions:
    """The settings of one ``plan`` run, as the command line gives them."""

    gpu: str
    model: str = "llama-2-7b"
    sequences: str = "1024"
    """Comma-separated lengths in tokens, or ``auto``."""
    gamma: int | str | None = None
    """A layer count, ``full`` for every layer, or None to search every gamma."""
    batch: int | None = None
    max_batch: int = 64
    precisions: tuple[str, ...] = ()
    """Empty: bf16 and amp-bf16 on a GPU with bf16, else fp32."""
    gradient_checkpointing: bool | None = None
    """None searches both."""
    effective_batch: int | None = None
    margin: float = 0.05
    attention: str = "sdpa"
    adamw: str = "foreach"


def parse_budget(text: str) -> Budget:
    """Turn ``--gpu`` into a budget: a size (24GB = 24 x 10^9 bytes, 24GiB = 24 x 2^30), a profile, or ``auto``."""
    key = text.strip().lower()
    if key == "auto":
        return _local_gpu_budget()
    # Profile names and aliases come first: some aliases, such as 4090, also read as a byte count.
    for profile in load_gpu_profiles().values():
        if key == profile.name or key in profile.aliases:
            return _profile_budget(profile, profile.memory_bytes, profile.name, False)
    if _SIZE_LIKE.match(text):
        if text.strip().isdigit() and int(text) > 0:
            raise InputError(
                f"invalid --gpu {text!r}: a size needs a unit, for example {text.strip()}GB or {text.strip()}GiB."
            )
        try:
            total = parse_size(text)
        except ValueError as error:
            raise InputError(f"invalid --gpu {text!r}: {error}. Pass a size such as 24GB or a GPU name.") from None
        reference = reference_profile(total)
        return Budget(
            total,
            text.strip(),
            reference,
            True,
            reference.cuda_context_bytes,
            CUBLAS_HANDLES * reference.cublas_workspace_bytes,
        )
    profile = find_gpu_profile(text)
    return _profile_budget(profile, profile.memory_bytes, profile.name, False)


def reference_profile(total_bytes: int) -> GpuProfile:
    """Return the profile that supplies context and speed figures for a size budget.

    That is the fastest card (dense bf16 TFLOP/s) whose memory is within 10% of the budget, or, when none is,
    the card with the closest memory.
    """
    profiles = list(load_gpu_profiles().values())
    similar = [p for p in profiles if abs(p.memory_bytes - total_bytes) <= 0.1 * total_bytes]
    if similar:
        return max(similar, key=lambda profile: (profile.bf16_dense_tflops, profile.name))
    return min(profiles, key=lambda profile: (abs(profile.memory_bytes - total_bytes), profile.name))


def _profile_budget(profile: GpuProfile, total: int, label: str, context_included: bool) -> Budget:
    context = 0 if context_included else profile.cuda_context_bytes
    return Budget(total, label, profile, False, context, CUBLAS_HANDLES * profile.cublas_workspace_bytes)


def _local_gpu_budget() -> Budget:
    import torch

    if not torch.cuda.is_available():
        raise InputError(
            "--gpu auto reads the free memory of the local CUDA device, but torch finds none "
            f"(torch {torch.__version__}, CUDA available: False). Pass a size such as 24GB or a GPU name."
        )
    free, _total = torch.cuda.mem_get_info()
    name = torch.cuda.get_device_name().lower()
    profiles = load_gpu_profiles()
    match = next(
        (p for p in profiles.values() if p.name in name.replace(" ", "") or any(a in name for a in p.aliases)), None
    )
    profile = match or profiles[REFERENCE_GPU]
    # The context of this process already exists, so the free memory is what a training process can use.
    budget = _profile_budget(profile, int(free), f"free memory of {torch.cuda.get_device_name()}", True)
    return budget


class FitCache:
    """Memory fits for one model: from memory, the disk cache, or new traces (which import torch)."""

    def __init__(self, model_config: dict[str, Any], model_name: str, attention: str, adamw: str) -> None:
        self.model_config = model_config
        self.model_name = model_name
        self.attention = attention
        self.adamw = adamw
        self._fits: dict[tuple[str, bool, bool], MemoryFit] = {}
        self.traced = 0

    def __call__(self, precision: str, checkpointing: bool, accumulating: bool = False) -> MemoryFit:
        fit = self._fits.get((precision, checkpointing, accumulating))
        if fit is not None:
            return fit
        key = fit_key(self.model_config, precision, checkpointing, self.attention, self.adamw, accumulating)
        fit = load_fit(key)
        if fit is None:
            from lisa_tune.planner.fit import fit_memory

            logger.info(
                "tracing %s (%s, checkpointing %s%s) on the meta device; the result is cached",
                self.model_name,
                precision,
                "on" if checkpointing else "off",
                ", gradient accumulation" if accumulating else "",
            )
            fit = fit_memory(
                self.model_config,
                self.model_name,
                precision=precision,
                gradient_checkpointing=checkpointing,
                attention=self.attention,
                adamw=self.adamw,
                accumulating=accumulating,
            )
            store_fit(fit)
            self.traced += 1
        self._fits[(precision, checkpointing, accumulating)] = fit
        return fit


def _parse_sequences(text: str) -> list[int] | None:
    if text.strip().lower() == "auto":
        return None
    values: list[int] = []
    for part in text.split(","):
        try:
            value = int(part)
        except ValueError:
            raise InputError(
                f"invalid --seq {text!r}: pass token counts such as 1024 or 512,1024,2048, or auto."
            ) from None
        if value < 1:
            raise InputError(f"invalid --seq {value}: a sequence length must be at least 1 token.")
        values.append(value)
    return sorted(set(values))


def make_plan(options: PlanOptions) -> tuple[Plan, FitCache]:
    """Validate ``options``, search, and return the plan and the fits it used."""
    budget = parse_budget(options.gpu)
    if not 0 <= options.margin < 1:
        raise InputError(f"invalid --margin {options.margin}: pass a fraction of the budget from 0 to below 1.")
    source = resolve_model(options.model)
    layers = layer_count(source.config)
    if layers is None or hidden_size(source.config) is None:
        raise InputError(f"the config of model {source.name} states no layer count or hidden size.")
    problems: list[str] = []
    # None searches every gamma; "full" narrows the search to all layers.
    gamma = options.gamma if options.gamma is None or isinstance(options.gamma, int) else parse_gamma(options.gamma)
    if isinstance(options.gamma, str) and gamma is FULL_FINE_TUNING:
        gamma = layers
    if gamma is not None and not 1 <= gamma <= layers:
        problems.append(f"--gamma {options.gamma} is outside 1 to the model's {layers} layers")
    if options.batch is not None and options.batch < 1:
        problems.append(f"--batch {options.batch} is below 1")
    if options.max_batch < 1:
        problems.append(f"--max-batch {options.max_batch} is below 1")
    if options.effective_batch is not None:
        if options.effective_batch < 1:
            problems.append(f"--effective-batch {options.effective_batch} is below 1")
        elif options.batch is not None and options.effective_batch % options.batch:
            problems.append(
                f"--effective-batch {options.effective_batch} is not a multiple of --batch {options.batch}; "
                "pass a multiple so gradient accumulation is a whole number of micro-batches"
            )
    precisions = list(options.precisions) or (["bf16", "amp-bf16"] if budget.gpu.bf16 else ["fp32"])
    if not budget.gpu.bf16 and any(p != "fp32" for p in precisions):
        problems.append(f"{budget.gpu.display_name} has no bf16 support; pass --precision fp32")
    if problems:
        raise InputError("; ".join(problems) + ".")

    if options.batch is not None:
        batches = [options.batch]
    elif options.effective_batch is not None:
        batches = [
            b for b in range(1, min(options.effective_batch, options.max_batch) + 1) if options.effective_batch % b == 0
        ]
    else:
        batches = list(range(1, options.max_batch + 1))
    checkpointing = [False, True] if options.gradient_checkpointing is None else [options.gradient_checkpointing]
    gammas = [gamma] if gamma is not None else list(range(1, layers + 1))
    fits = FitCache(source.config, source.name, options.attention, options.adamw)
    sequences = _parse_sequences(options.sequences)
    limit = max_positions(source.config)
    if sequences is not None and limit is not None and max(sequences) > limit:
        logger.warning(
            "sequence length %d is %d tokens longer than the model's %d position embeddings",
            max(sequences),
            max(sequences) - limit,
            limit,
        )
    if sequences is None:
        sequences = [
            _longest_sequence(fits, budget, options, gamma or DEFAULT_GAMMA, precisions, checkpointing, batches, limit)
        ]
        gammas = [gamma or DEFAULT_GAMMA]

    space = SearchSpace(
        gammas=gammas,
        sequences=sequences,
        precisions=precisions,
        checkpointing=checkpointing,
        micro_batches=batches,
        effective_batch=options.effective_batch,
        recommend_gamma=gamma or DEFAULT_GAMMA,
    )
    return search(fits, budget, options.margin, space, source.name, layers), fits


def _longest_sequence(
    fits: FitCache,
    budget: Budget,
    options: PlanOptions,
    gamma: int,
    precisions: list[str],
    checkpointing: list[bool],
    batches: list[int],
    limit: int | None,
) -> int:
    usable = usable_bytes(budget, options.margin)
    best = 0
    for precision in precisions:
        for checkpoint in checkpointing:
            fit = step_fit(fits, precision, checkpoint, batches[0], options.effective_batch)
            longest = longest_fitting_sequence(fit, budget, usable, gamma, batches[0], limit)
            best = max(best, longest or 0)
    # With nothing fitting, plan a one-token sequence so the search reports what the smallest run needs.
    return max(best, 1)


def write_outputs(plan: Plan, fits: FitCache, options: PlanOptions, output: Path | None, plot: Path | None) -> None:
    """Write the plan file and the plot, each atomically."""
    from lisa_tune.files import write_text_atomically
    from lisa_tune.planner.output import plan_to_yaml_dict, write_plot

    if output is not None:
        document = plan_to_yaml_dict(plan, options.attention, options.adamw)
        text = "# Written by lisa-tune plan; lisa-tune train --config and lisa-tune tune read it.\n" + yaml.safe_dump(
            document, sort_keys=False
        )
        write_text_atomically(output, text)
        logger.info("wrote the recommended configuration to %s", output)
    if plot is not None:
        chosen = plan.recommended
        assert chosen is not None
        write_plot(plan, fits(chosen.precision, chosen.gradient_checkpointing, chosen.accumulation_steps > 1), plot)
        logger.info("wrote the memory plot to %s", plot)


def dumps(document: dict[str, Any]) -> str:
    """Return indented JSON."""
    return json.dumps(document, indent=2)
