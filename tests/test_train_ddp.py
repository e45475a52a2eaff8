"""Data-parallel training: two gloo processes on the CPU, started by ``accelerate launch``, against one process.

The two-process run trains 3 steps, stops, and resumes from rank 0's checkpoint to step 6. With gamma 1 and K 2 the
layers switch after steps 2, 4 and 6. Each process writes a record of every step (``LISA_TUNE_RANK_RECORD_DIR``).
The reference is one in-process run whose step accumulates 2 micro-batches of 2, the same global batch as 2
processes with one micro-batch of 2 each.

``accelerate launch --cpu --num_processes 2`` starts a single process in accelerate 1.16, which starts several CPU
processes only through mpirun. The test therefore launches with ``--multi_gpu`` and hides CUDA, so accelerate starts
its torchrun launcher and the trainer picks gloo on the CPU.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing
import transformers
from records import write_records
from safetensors.torch import load_file

import lisa_tune
from lisa_tune.errors import InputError
from lisa_tune.train.config import TrainConfig
from lisa_tune.train.data import Example, TokenizationStats, TokenizedDataset, make_dataloader
from lisa_tune.train.distributed import RANK_RECORD_ENV, DataParallel
from lisa_tune.train.trainer import LisaTrainer

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_torch_thread")]

REPOSITORY_ROOT = Path(lisa_tune.__file__).resolve().parent.parent
FIRST_STEPS = 3
MAX_STEPS = 6
# Seed 1 draws layer 1, then 0, then 3 for gamma 1 of tiny-llama's 4 layers, so every switch changes the layer.
SEED = 1
SETTINGS: dict[str, Any] = {
    "model": "tiny-llama",
    "gamma": 1,
    "interval": 2,
    "micro_batch_size": 2,
    "sequence_length": 48,
    "precision": "fp32",
    "learning_rate": 1e-3,
    # Every step is in the warm-up, so the learning rate of a step does not depend on max_steps and a run stopped at
    # step 3 continues with the rates of an uninterrupted run.
    "warmup_steps": 10,
    "log_every": 1,
    "seed": SEED,
    "tokenizer_vocab_size": 512,
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def launch(data: Path, run_dir: Path, records: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """Run ``lisa-tune train`` in 2 processes through ``accelerate launch`` and return the finished launcher."""
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        CUDA_VISIBLE_DEVICES="",
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPOSITORY_ROOT), env.get("PYTHONPATH")])),
        **{RANK_RECORD_ENV: str(records)},
    )
    if Path("/sys/class/net/lo").exists():
        # Without GLOO_SOCKET_IFNAME, gloo uses the interface of the address that the host name resolves to.
        env["GLOO_SOCKET_IFNAME"] = "lo"
    options = {key: value for key, value in SETTINGS.items() if key != "sequence_length"}
    train_options = [f"--{key.replace('_', '-')}={value}" for key, value in options.items()]
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes=2",
        "--num_machines=1",
        "--mixed_precision=no",
        "--dynamo_backend=no",
        "--main_process_ip=127.0.0.1",
        f"--main_process_port={free_port()}",
        "-m",
        "lisa_tune",
        "train",
        f"--data={data}",
        f"--run-dir={run_dir}",
        f"--seq={SETTINGS['sequence_length']}",
        *train_options,
        *extra,
    ]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@dataclass
class Runs:
    data: Path
    parallel_dir: Path
    launches: list[subprocess.CompletedProcess[str]]
    ranks: list[list[dict[str, Any]]]
    """Each rank's record lines, from both launches."""
    single_dir: Path
    single: list[dict[str, Any]]
    single_losses: list[float]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    root = tmp_path_factory.mktemp("ddp")
    data = write_records(root / "data.jsonl")
    parallel_dir = root / "parallel"
    records = root / "records"
    first = launch(data, parallel_dir, records, f"--max-steps={FIRST_STEPS}")
    launches = [first]
    if first.returncode == 0:
        launches.append(launch(data, parallel_dir, records, f"--max-steps={MAX_STEPS}", "--resume"))
    ranks = [
        read_jsonl(records / f"rank{rank}.jsonl") if (records / f"rank{rank}.jsonl").exists() else [] for rank in (0, 1)
    ]

    # The single-process reference reuses the tokenizer that rank 0 trained, so both runs tokenize alike.
    single_dir = root / "single"
    if (parallel_dir / "tokenizer").is_dir():
        shutil.copytree(parallel_dir / "tokenizer", single_dir / "tokenizer")
    single_records = root / "single-records"
    config = TrainConfig(data=data, run_dir=single_dir, max_steps=MAX_STEPS, gradient_accumulation_steps=2, **SETTINGS)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(RANK_RECORD_ENV, str(single_records))
        patch.setenv("HF_HUB_OFFLINE", "1")
        trainer = LisaTrainer(config)
        trainer.setup()
        result = trainer.train()
    return Runs(
        data, parallel_dir, launches, ranks, single_dir, read_jsonl(single_records / "rank0.jsonl"), result.losses
    )


def step_lines(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [line for line in lines if "step" in line]


def test_launches_exit_zero(runs: Runs) -> None:
    assert len(runs.launches) == 2, runs.launches[0].stderr[-3000:]
    for finished in runs.launches:
        assert finished.returncode == 0, finished.stderr[-3000:]
        output = finished.stdout + finished.stderr
        assert "Expected to have finished reduction" not in output
        assert "unused parameters" not in output


def test_every_step_recorded_once(runs: Runs) -> None:
    for lines in runs.ranks:
        assert [line["step"] for line in step_lines(lines)] == list(range(1, MAX_STEPS + 1))


def test_ranks_draw_same_layers(runs: Runs) -> None:
    rank0, rank1 = (step_lines(lines) for lines in runs.ranks)
    assert [line["active_layers"] for line in rank0] == [line["active_layers"] for line in rank1]
    assert [line["active_layers"] for line in rank0] == [[1], [1], [0], [0], [3], [3]]
    assert rank0[-1]["switches"] == rank1[-1]["switches"] == 3


def test_frozen_layers_have_no_grad(runs: Runs) -> None:
    for lines in runs.ranks:
        for line in step_lines(lines):
            assert line["frozen_parameters_with_grad"] == 0, line
            # Embedding, final norm, LM head and the 9 tensors of one decoder layer.
            assert line["parameters_with_grad"] == line["trainable_parameters"] == 12, line


def test_ranks_average_same_gradients(runs: Runs) -> None:
    rank0, rank1 = (step_lines(lines) for lines in runs.ranks)
    assert [line["grad_digest"] for line in rank0] == [line["grad_digest"] for line in rank1]


def test_ranks_end_with_same_parameters(runs: Runs) -> None:
    digests = [[line["parameter_digest"] for line in lines if "parameter_digest" in line] for lines in runs.ranks]
    assert len(digests[0]) == 2
    assert digests[0] == digests[1]


def test_ranks_split_global_batch(runs: Runs) -> None:
    rank0, rank1 = (step_lines(lines) for lines in runs.ranks)
    single = step_lines(runs.single)
    for line0, line1, reference in zip(rank0, rank1, single, strict=True):
        assert len(line0["micro_batches"]) == len(line1["micro_batches"]) == 1
        assert line0["micro_batches"] != line1["micro_batches"]
        # Rank r takes micro-batch r of the pair that one process accumulates in the same step.
        assert line0["micro_batches"] + line1["micro_batches"] == reference["micro_batches"]


def test_logged_loss_is_rank_mean(runs: Runs) -> None:
    rank0, rank1 = (step_lines(lines) for lines in runs.ranks)
    for line0, line1 in zip(rank0, rank1, strict=True):
        assert line0["loss"] == line1["loss"]
        assert line0["loss"] == pytest.approx((line0["local_loss"] + line1["local_loss"]) / 2, rel=1e-6)


def test_loss_matches_single_process(runs: Runs) -> None:
    parallel_losses = [line["loss"] for line in step_lines(runs.ranks[0])]
    assert parallel_losses == pytest.approx(runs.single_losses, rel=1e-5)


def test_weights_match_single_process(runs: Runs) -> None:
    parallel = load_file(runs.parallel_dir / "final" / "model.safetensors")
    single = load_file(runs.single_dir / "final" / "model.safetensors")
    assert parallel.keys() == single.keys()
    for name, tensor in parallel.items():
        torch.testing.assert_close(tensor, single[name], rtol=1e-5, atol=1e-6, msg=name)


def test_rank0_alone_writes_metrics(runs: Runs) -> None:
    metrics = read_jsonl(runs.parallel_dir / "metrics.jsonl")
    logged_steps = [record["step"] for record in metrics if "loss" in record]
    assert logged_steps == list(range(1, MAX_STEPS + 1))
    # The first launch evaluates at steps 0 and 3 and the resumed one at step 6. Each saves one checkpoint at its end.
    for finished, evaluations in zip(runs.launches, (2, 1), strict=True):
        assert len(re.findall(r"step \d+: held-out loss", finished.stderr)) == evaluations, finished.stderr[-3000:]
        assert finished.stderr.count("checkpoint saved") == 1, finished.stderr[-3000:]


def test_final_model_loads(runs: Runs) -> None:
    final = runs.parallel_dir / "final"
    model = transformers.AutoModelForCausalLM.from_pretrained(final)
    assert model.config.num_hidden_layers == 4
    assert (runs.parallel_dir / "loss.png").is_file()


def test_resume_other_process_count_rejected(runs: Runs) -> None:
    config = TrainConfig(data=runs.data, run_dir=runs.parallel_dir, max_steps=MAX_STEPS + 1, **SETTINGS)
    trainer = LisaTrainer(config, resume=True)
    with pytest.raises(InputError, match="2 processes"):
        trainer.setup()


def average_on_rank(rank: int, store: str, output: str) -> None:
    """Average five gradients over 2 processes with a 64-byte bucket and save what rank ``rank`` ends up with."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        # 0 has a gradient on both ranks and shares a bucket with 1, which has a gradient on rank 1 only, like an MoE
        # expert that no token of rank 0 reached. 2 has no gradient anywhere. 3 is larger than the bucket and goes
        # alone, and 4 has another dtype, so it gets a bucket of its own.
        parameters = [
            torch.nn.Parameter(torch.zeros(4)),
            torch.nn.Parameter(torch.zeros(2)),
            torch.nn.Parameter(torch.zeros(3)),
            torch.nn.Parameter(torch.zeros(32)),
            torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16)),
        ]
        parameters[0].grad = torch.full((4,), float(rank + 1))
        if rank == 1:
            parameters[1].grad = torch.tensor([2.0, 4.0])
        parameters[3].grad = torch.arange(32, dtype=torch.float32) * (rank + 1)
        parameters[4].grad = torch.full((2,), 2.0 * (rank + 1), dtype=torch.bfloat16)
        DataParallel(rank=rank, world_size=2, local_rank=rank).average_gradients(parameters, bucket_bytes=64)
        torch.save([parameter.grad for parameter in parameters], output.format(rank=rank))
    finally:
        dist.destroy_process_group()


def test_average_gradients_two_processes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if Path("/sys/class/net/lo").exists():
        monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    output = str(tmp_path / "grads{rank}.pt")
    torch.multiprocessing.spawn(average_on_rank, args=(str(tmp_path / "store"), output), nprocs=2)
    for rank in (0, 1):
        grads = torch.load(output.format(rank=rank))
        torch.testing.assert_close(grads[0], torch.full((4,), 1.5))
        torch.testing.assert_close(grads[1], torch.tensor([1.0, 2.0]))
        assert grads[2] is None
        torch.testing.assert_close(grads[3], torch.arange(32, dtype=torch.float32) * 1.5)
        torch.testing.assert_close(grads[4], torch.full((2,), 3.0, dtype=torch.bfloat16))


def test_dataloader_strided_batches() -> None:
    stats = TokenizationStats(0, 0, 0, [], 0, [], 0, 0)
    examples = [Example(input_ids=[index + 1], labels=[index + 1]) for index in range(11)]
    dataset = TokenizedDataset(examples, pad_token_id=0, max_length=4, packed=False, stats=stats)
    every = [batch["input_ids"].tolist() for batch in make_dataloader(dataset, batch_size=2, seed=3, drop_last=True)]
    selected = make_dataloader(dataset, batch_size=2, seed=3, drop_last=True, first_batch=1, batch_stride=2)
    assert len(every) == 5
    assert len(selected) == 2
    assert [batch["input_ids"].tolist() for batch in selected] == every[1::2]
