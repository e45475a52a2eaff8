"""One tuner trial, run in its own process: ``python -m lisa_tune.tune.worker TRIAL_DIR``.

The tuner writes ``TRIAL_DIR/spec.json`` (the training settings and limits) and starts this module. It trains with
the bundled trainer, which appends held-out losses to ``TRIAL_DIR/metrics.jsonl`` as they are computed, and writes
``TRIAL_DIR/result.json`` once at the end: ``ok``, ``out_of_memory`` or ``error``. A process that dies without a
result (killed, or crashed in native code) is reported by the tuner from its exit status and log.
"""

from __future__ import annotations

import json
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Any

SPEC = "spec.json"
RESULT = "result.json"
LOG = "log.txt"

_CPU_REQUEST = re.compile(r"you tried to allocate (\d+) bytes")
_CUDA_REQUEST = re.compile(r"Tried to allocate ([\d.]+) (B|KiB|MiB|GiB|TiB)")
_UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}


def requested_bytes(message: str) -> int | None:
    """Return the size of the allocation that failed, read from PyTorch's out-of-memory message."""
    match = _CPU_REQUEST.search(message)
    if match:
        return int(match.group(1))
    match = _CUDA_REQUEST.search(message)
    if match:
        return int(float(match.group(1)) * _UNITS[match.group(2)])
    return None


def is_out_of_memory(error: BaseException) -> bool:
    """Tell an out-of-memory failure (CUDA, or the CPU allocator under a memory cap) from other errors."""
    import torch

    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(error, RuntimeError) and (
        "can't allocate memory" in str(error) or "out of memory" in str(error).lower()
    )


def virtual_memory_peak() -> int | None:
    """Return this process's peak address-space size (VmPeak, Linux), the figure a memory cap limits."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmPeak:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def write_result(trial_dir: Path, result: dict[str, Any]) -> None:
    """Write ``result.json`` through a temporary file, so the tuner never reads half of it."""
    from lisa_tune.files import write_text_atomically

    write_text_atomically(trial_dir / RESULT, json.dumps(result))


def run(trial_dir: Path) -> int:
    """Run the trial described by ``trial_dir/spec.json``; return the exit status."""
    started = time.time()
    spec = json.loads((trial_dir / SPEC).read_text(encoding="utf-8"))
    import torch

    from lisa_tune.log import configure_logging
    from lisa_tune.train.config import TrainConfig
    from lisa_tune.train.trainer import LisaTrainer, peak_memory_bytes

    configure_logging(0)
    torch.set_num_threads(int(spec.get("threads") or torch.get_num_threads()))
    fraction = spec.get("cuda_memory_fraction")
    if fraction and torch.cuda.is_available():
        # Hold the trial to the budget even on a larger GPU, so an out-of-memory error means "does not fit".
        torch.cuda.set_per_process_memory_fraction(float(fraction))
    timings = {"process_start": started - float(spec["launched_at"])}
    settings = dict(spec["train"], data=Path(spec["train"]["data"]), run_dir=trial_dir)
    trainer = LisaTrainer(TrainConfig(**settings))
    try:
        mark = time.time()
        timings["imports"] = mark - started
        trainer.setup()
        timings["setup"] = time.time() - mark
        mark = time.time()
        trainer.train()
        timings["train"] = time.time() - mark
    except Exception as error:
        if is_out_of_memory(error):
            message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            write_result(
                trial_dir,
                {
                    "status": "out_of_memory",
                    "step": trainer.step,
                    "requested_bytes": requested_bytes(str(error)),
                    "peak_memory_bytes": peak_memory_bytes(trainer.device),
                    "message": message,
                    "timings": timings,
                },
            )
            print(f"out of memory at step {trainer.step}: {message}", file=sys.stderr)
            return 3
        traceback.print_exc()
        write_result(
            trial_dir,
            {"status": "error", "step": trainer.step, "message": f"{type(error).__name__}: {error}"},
        )
        return 1
    train_seconds = timings["train"] - trainer.eval_seconds
    write_result(
        trial_dir,
        {
            "status": "ok",
            "steps": trainer.step,
            "tokens": trainer.tokens_seen,
            "eval_losses": {str(step): loss for step, loss in trainer.eval_losses.items()},
            "final_eval_loss": trainer.eval_losses[trainer.step],
            "tokens_per_second": trainer.tokens_seen / train_seconds if train_seconds > 0 else 0.0,
            "peak_memory_bytes": peak_memory_bytes(trainer.device),
            "peak_memory_kind": "cuda_max_allocated" if trainer.device.type == "cuda" else "process_max_rss",
            "virtual_memory_peak_bytes": virtual_memory_peak(),
            "timings": dict(timings, evaluation=trainer.eval_seconds),
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(run(Path(sys.argv[1])))
