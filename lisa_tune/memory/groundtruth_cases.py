"""The configurations on which the simulator is compared with a real CPU run.

The models are ``tiny-qwen2`` (grouped-query attention, tied embeddings), ``tiny-gpt2`` (tied embeddings, learned
positions) and ``tiny-llama``. The settings cover gamma 1, 2 and all layers, checkpointing on and off, bf16 and
fp32, two micro-batch and sequence sizes, and both attention implementations.
"""

from __future__ import annotations

import itertools

from lisa_tune.lisa.precision import Precision
from lisa_tune.memory.simulator import SimulationConfig
from lisa_tune.profiles import resolve_model

GROUND_TRUTH_MODELS = ("tiny-qwen2", "tiny-gpt2", "tiny-llama")
SHAPES = ((2, 128), (1, 256))
"""(micro-batch size, sequence length) pairs."""


def ground_truth_cases(
    models: tuple[str, ...] = GROUND_TRUTH_MODELS, attention: str = "sdpa"
) -> list[SimulationConfig]:
    """Return one configuration per combination of gamma, checkpointing and precision for each model.

    The two shapes alternate so that each shape meets every other setting.
    """
    cases: list[SimulationConfig] = []
    for name in models:
        source = resolve_model(name)
        combinations = itertools.product((1, 2, None), (False, True), (Precision.BF16, Precision.FP32))
        for index, (gamma, checkpointing, precision) in enumerate(combinations):
            batch, sequence = SHAPES[index % len(SHAPES)]
            cases.append(
                SimulationConfig(
                    model_config=source.config,
                    model_name=name,
                    gamma=gamma,
                    micro_batch_size=batch,
                    sequence_length=sequence,
                    precision=precision,
                    gradient_checkpointing=checkpointing,
                    attention=attention,
                    target_device="cpu",
                )
            )
    return cases
