"""The tuner on tiny models on the CPU: real Optuna studies in SQLite (and PostgreSQL when installed), trials in
child processes, the memory filter, out-of-memory isolation, resume after SIGKILL, and bad input.

Every trial is a real training process of the bundled trainer. Nothing is mocked: the GPU is not needed because the
memory filter works from the planner's prediction for the budget, and an out-of-memory failure is produced on the CPU
by capping the trial process's address space (--trial-memory-limit).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import torch
import transformers
from optuna.trial import TrialState
from records import write_records

from lisa_tune.cli import main
from lisa_tune.errors import InputError
from lisa_tune.train.config import read_plan
from lisa_tune.tune.command import TuneOptions, build_settings
from lisa_tune.tune.space import LearningRate, build_space, parse_int_list
from lisa_tune.tune.tuner import CONSTRAINT, DistinctMedianPruner, MetricsReader, Tuner, make_sampler
from lisa_tune.tune.worker import requested_bytes

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca-libre"
requires_data = pytest.mark.skipif(
    not DATA_DIR.is_dir(), reason=f"the alpaca-libre data set is not at {DATA_DIR}, so the real-data tests skip"
)
CLI = [sys.executable, "-m", "lisa_tune"]


def tune_args(data: Path, run_dir: Path, *extra: str, trials: int = 2) -> list[str]:
    return [
        "tune",
        "--model",
        "tiny-llama",
        "--data",
        str(data),
        "--run-dir",
        str(run_dir),
        "--trials",
        str(trials),
        "--seq",
        "64",
        "--batch",
        "2",
        "--threads",
        "1",
        *extra,
    ]


def one_config_args(data: Path, run_dir: Path, *extra: str, trials: int = 2) -> list[str]:
    """Return ``tune`` arguments whose space is gamma 1 and K 1 at a 24 GB budget, plus ``extra``."""
    return tune_args(data, run_dir, "--gpu", "24GB", "--gamma", "1", "--interval", "1", *extra, trials=trials)


def load_study(run_dir: Path) -> optuna.Study:
    return optuna.load_study(study_name=run_dir.name, storage=f"sqlite:///{run_dir / 'study.db'}")


def counted(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.get_trials() if t.user_attrs.get("counted")]


# Parsing --------------------------------------------------------------------------------------------------------


def test_integer_lists_and_ranges() -> None:
    assert parse_int_list("1,2,4", "--gamma", 1, 8) == [1, 2, 4]
    assert parse_int_list("2-4,8", "--gamma", 1, 8) == [2, 3, 4, 8]
    with pytest.raises(InputError, match="9 outside 1 to 8"):
        parse_int_list("1,9", "--gamma", 1, 8)
    with pytest.raises(InputError, match="empty"):
        parse_int_list("4-2", "--gamma", 1, 8)
    with pytest.raises(InputError, match="integers"):
        parse_int_list("two", "--gamma", 1, 8)


def test_learning_rate_fixed_or_range() -> None:
    assert not LearningRate.parse("3e-4").searched
    assert LearningRate.parse("1e-5:1e-3") == LearningRate(1e-5, 1e-3)
    for bad in ("0", "1e-3:1e-5", "fast", "1:2:3"):
        with pytest.raises(InputError):
            LearningRate.parse(bad)


def test_micro_batches_must_divide_the_batch() -> None:
    space = build_space(4, None, None, "1,2,4", 8, "3e-4")
    assert space.gammas == [1, 2, 4]
    assert space.intervals == [5, 10, 20]
    assert space.grid_size() == 27
    with pytest.raises(InputError, match="does not divide --batch 6"):
        build_space(4, None, None, "4", 6, "3e-4")


def test_out_of_memory_request_sizes() -> None:
    cpu = "DefaultCPUAllocator: can't allocate memory: you tried to allocate 11272192 bytes. Error code 12"
    cuda = "CUDA out of memory. Tried to allocate 2.50 GiB. GPU 0 has a total capacity of 23.55 GiB"
    assert requested_bytes(cpu) == 11272192
    assert requested_bytes(cuda) == int(2.5 * 2**30)
    assert requested_bytes("something else") is None


def test_metrics_reader_waits_for_whole_lines(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    reader = MetricsReader(path)
    assert reader.new_evaluations() == []
    path.write_text('{"event": "eval", "step": 0, "tokens": 0, "eval_loss": 9.0}\n{"event": "ev', encoding="utf-8")
    assert [r["step"] for r in reader.new_evaluations()] == [0]
    with path.open("a", encoding="utf-8") as stream:
        stream.write('al", "step": 2, "tokens": 64, "eval_loss": 8.0}\n{"event": "log", "step": 2}\n')
    assert [r["step"] for r in reader.new_evaluations()] == [2]


def test_pruner_judges_second_half_against_distinct_trials() -> None:
    study = optuna.create_study()
    for value in (1.0, 2.0, 3.0):
        study.add_trial(optuna.trial.create_trial(value=value, intermediate_values={40: value, 100: value}))
    pruner = DistinctMedianPruner(warmup_tokens=50)

    def running(loss_at_40: float, loss_at_100: float | None = None) -> optuna.trial.FrozenTrial:
        values = {40: loss_at_40} if loss_at_100 is None else {40: loss_at_40, 100: loss_at_100}
        return optuna.trial.create_trial(state=TrialState.PRUNED, intermediate_values=values)

    # The median of 1, 2 and 3 is 2: above it is pruned in the second half, never in the first.
    assert pruner.prune(study, running(9.0, 2.5))
    assert not pruner.prune(study, running(9.0, 1.5))
    assert not pruner.prune(study, running(9.0))
    # A repeat of the best configuration does not move the median.
    repeat = optuna.trial.create_trial(value=1.0, intermediate_values={100: 1.0}, user_attrs={"repeat_of": 0})
    study.add_trial(repeat)
    study.add_trial(repeat)
    assert not pruner.prune(study, running(9.0, 1.9))
    # Fewer than three other configurations at that point: no judgement.
    few = optuna.create_study()
    few.add_trial(optuna.trial.create_trial(value=1.0, intermediate_values={100: 1.0}))
    assert not DistinctMedianPruner(warmup_tokens=50).prune(few, running(9.0, 5.0))


# Studies ----------------------------------------------------------------------------------------------------------


def test_predicted_misfit_never_runs(tmp_path: Path) -> None:
    # At 0.6 GB, micro-batch 1 is predicted to fit and micro-batch 64 is not. The study's first trial is micro-batch
    # 64, queued as a sampler might suggest it.
    run_dir = tmp_path / "study"
    run_dir.mkdir()
    options = TuneOptions(
        data=write_records(tmp_path / "data.jsonl"),
        run_dir=run_dir,
        trials=1,
        gpu="0.6GB",
        model="tiny-llama",
        gammas="1",
        intervals="1",
        micro_batches="1,64",
        batch=64,
        margin=0.0,
        sequence_length=64,
        pruner="none",
        threads=1,
    )
    settings = build_settings(options)
    study = optuna.create_study(
        storage=f"sqlite:///{run_dir / 'study.db'}", study_name="study", sampler=make_sampler(0, 1)
    )
    study.enqueue_trial({"gamma": 1, "interval": 1, "micro_batch_size": 64})
    Tuner(settings, study, trials=1).run(lambda study, trial: None)

    first = study.trials[0]
    assert first.params["micro_batch_size"] == 64
    assert first.state == TrialState.PRUNED
    assert first.constraints[CONSTRAINT] > 0
    assert first.user_attrs["outcome"] == "predicted not to fit"
    assert not (run_dir / "trials" / "0000").exists()

    ran = counted(study)
    assert len(ran) == 1
    assert ran[0].params["micro_batch_size"] == 1
    assert ran[0].state == TrialState.COMPLETE
    assert ran[0].constraints[CONSTRAINT] == 0


def test_first_trial_is_the_largest_fitting_micro_batch(tmp_path: Path) -> None:
    data = write_records(tmp_path / "data.jsonl")
    run_dir = tmp_path / "first"
    args = tune_args(
        data,
        run_dir,
        "--gpu",
        "0.6GB",
        "--margin",
        "0",
        "--gamma",
        "1",
        "--interval",
        "1",
        "--micro-batch",
        "1,2,64",
        "--batch",
        "64",
        "--pruner",
        "none",
        trials=1,
    )
    assert main(args) == 0
    first = load_study(run_dir).trials[0]
    assert first.user_attrs["source"] == "planner recommendation"
    assert first.params == {"gamma": 1, "interval": 1, "micro_batch_size": 2}
    assert first.state == TrialState.COMPLETE
    assert read_plan(run_dir / "best.yaml")["micro_batch_size"] == 2


def test_out_of_memory_trial_infeasible(tmp_path: Path) -> None:
    data = write_records(tmp_path / "data.jsonl")
    # The cap is measured, not guessed: a first study runs micro-batch 1 and records the trial's address-space peak.
    probe = tmp_path / "probe"
    assert main(one_config_args(data, probe, "--batch", "1", "--seq", "64", trials=1)) == 0
    peak = counted(load_study(probe))[0].user_attrs["virtual_memory_peak_bytes"]
    cap = peak + 150 * 2**20

    # Micro-batch 64 at 64 tokens needs several hundred MB more than micro-batch 1: its logits alone are 64 MiB.
    run_dir = tmp_path / "capped"
    args = one_config_args(
        data,
        run_dir,
        "--micro-batch",
        "1,64",
        "--batch",
        "64",
        "--seq",
        "64",
        "--trial-memory-limit",
        f"{cap}B",
        "--pruner",
        "none",
        trials=2,
    )
    assert main(args) == 0

    trials = load_study(run_dir).trials
    oom = trials[0]
    assert oom.params["micro_batch_size"] == 64
    assert oom.user_attrs["outcome"] == "out of memory"
    assert oom.state == TrialState.PRUNED
    assert oom.constraints[CONSTRAINT] > 0
    result = json.loads((run_dir / "trials" / "0000" / "result.json").read_text(encoding="utf-8"))
    assert result["status"] == "out_of_memory"
    assert result["requested_bytes"] > 0

    # The study went on: micro-batch 1 completed under the same cap, and no later trial ran micro-batch 64 again.
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert complete
    assert all(t.params["micro_batch_size"] == 1 for t in complete)
    for later in trials[1:]:
        if later.params["micro_batch_size"] == 64:
            assert "ran out of memory" in later.user_attrs["outcome"]
            assert not (run_dir / "trials" / f"{later.number:04d}" / "result.json").exists()


def _worker_processes(marker: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if "lisa_tune.tune.worker" in command and marker in command:
                pids.append(int(entry.name))
    return pids


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="the process checks read Linux's /proc")
def test_sigkill_resume_leaves_no_running(tmp_path: Path) -> None:
    data = write_records(tmp_path / "data.jsonl")
    run_dir = tmp_path / "killed"
    args = [
        *CLI,
        *tune_args(
            data, run_dir, "--gpu", "24GB", "--gamma", "1,2,4", "--interval", "1,2", "--pruner", "none", trials=4
        ),
    ]
    log = (tmp_path / "first.log").open("wb")
    first = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    # Wait until one trial has finished and the next one is running, then kill the tuner with SIGKILL.
    while time.monotonic() < deadline:
        results = list(run_dir.glob("trials/*/result.json"))
        specs = list(run_dir.glob("trials/*/spec.json"))
        if results and len(specs) > len(results):
            break
        assert first.poll() is None, (tmp_path / "first.log").read_text()
        time.sleep(0.1)
    else:
        pytest.fail("no trial finished in time")
    first.send_signal(signal.SIGKILL)
    first.wait()
    log.close()
    before = {t.number: t.value for t in load_study(run_dir).trials if t.state == TrialState.COMPLETE}
    running = [t.number for t in load_study(run_dir).trials if t.state == TrialState.RUNNING]
    assert before and len(running) == 1
    # The trial process dies with its tuner.
    for _ in range(50):
        if not _worker_processes(str(run_dir)):
            break
        time.sleep(0.1)
    assert _worker_processes(str(run_dir)) == []

    second = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert "left running by process" in second.stderr
    study = load_study(run_dir)
    assert not [t for t in study.trials if t.state == TrialState.RUNNING]
    killed = study.trials[running[0]]
    assert killed.state == TrialState.FAIL
    for number, value in before.items():
        assert study.trials[number].value == value
    assert len(counted(study)) == 4
    retried = [t for t in study.trials if t.user_attrs.get("retry_of") == killed.number]
    assert len(retried) == 1
    assert retried[0].params == killed.params
    # Finished configurations were not run again: each trial folder with a result belongs to one counted trial.
    assert len(list(run_dir.glob("trials/*/result.json"))) == len(
        [t for t in counted(study) if "repeat_of" not in t.user_attrs]
    )


@pytest.mark.slow
@requires_data
def test_alpaca_study_launches_winner(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Eight trials over gamma, K and the micro-batch on the real data; the pruner may stop some early.
    run_dir = tmp_path / "alpaca"
    args = tune_args(
        DATA_DIR / "tasks_v1.jsonl",
        run_dir,
        "--gpu",
        "24GB",
        "--gamma",
        "1,2,4",
        "--interval",
        "1,2",
        "--micro-batch",
        "1,2",
        "--launch",
        "--launch-steps",
        "4",
        trials=8,
    )
    assert main(args) == 0
    study = load_study(run_dir)
    ran = counted(study)
    assert len(ran) == 8
    complete = [t for t in ran if t.state == TrialState.COMPLETE]
    best = min(complete, key=lambda t: t.value or 0.0)
    for pruned in (t for t in ran if t.user_attrs.get("outcome") == "pruned"):
        # The pruner judges only the second half of the 768 training tokens.
        assert pruned.user_attrs["pruned_at_tokens"] >= 384
    plan = read_plan(run_dir / "best.yaml")
    assert (plan["gamma"], plan["interval"]) == (best.params["gamma"], best.params["interval"])
    for trial in complete:
        # Same data, same number of tokens: every trial saw the same 6 steps x 2 sequences x 64 tokens.
        assert trial.user_attrs["tokens"] == 6 * 2 * 64
        assert trial.user_attrs["tokens_per_second"] > 0
        assert trial.user_attrs["predicted_peak_bytes"] > 0
        assert trial.user_attrs["measured_peak_bytes"] > 0
    for name in ("history.png", "gamma_k.png"):
        assert (run_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    output = capsys.readouterr()
    assert "Trials of study alpaca" in output.out
    assert "held-out loss" in output.err
    assert "best" in output.err
    # The launched run trains the winner and saves a model that transformers loads.
    model = transformers.AutoModelForCausalLM.from_pretrained(run_dir / "train" / "final")
    assert model.config.num_hidden_layers == 4
    metrics = (run_dir / "train" / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    assert json.loads(metrics[-1])["step"] == 4


def test_rerun_with_the_same_settings_adds_no_trials(tmp_path: Path) -> None:
    data = write_records(tmp_path / "data.jsonl")
    run_dir = tmp_path / "again"
    args = one_config_args(data, run_dir, trials=1)
    assert main(args) == 0
    trials = load_study(run_dir).trials
    assert main(args) == 0
    assert [t.number for t in load_study(run_dir).trials] == [t.number for t in trials]


def test_learning_rate_range_is_searched(tmp_path: Path) -> None:
    data = write_records(tmp_path / "data.jsonl")
    run_dir = tmp_path / "rates"
    args = one_config_args(
        data,
        run_dir,
        "--learning-rate",
        "1e-4:1e-2",
        "--pruner",
        "none",
        trials=2,
    )
    assert main(args) == 0
    trials = counted(load_study(run_dir))
    rates = [t.params["learning_rate"] for t in trials]
    assert len(rates) == 2
    assert rates[0] != rates[1]
    assert all(1e-4 <= rate <= 1e-2 for rate in rates)
    best = min(trials, key=lambda t: t.value or 0.0)
    assert read_plan(run_dir / "best.yaml")["learning_rate"] == pytest.approx(best.params["learning_rate"])
    for trial in trials:
        spec = json.loads((run_dir / "trials" / f"{trial.number:04d}" / "spec.json").read_text(encoding="utf-8"))
        assert spec["train"]["learning_rate"] == trial.params["learning_rate"]


def test_plan_file_fixes_settings_and_first_trial(tmp_path: Path) -> None:
    plan = tmp_path / "plan.yaml"
    plan_args = ["plan", "--gpu", "24GB", "--model", "tiny-llama", "--seq", "64", "--max-batch", "4"]
    assert main([*plan_args, "--gamma", "3", "--precision", "bf16", "--output", str(plan)]) == 0
    planned = read_plan(plan)
    data = write_records(tmp_path / "data.jsonl")
    run_dir = tmp_path / "from-plan"
    args = [
        "tune",
        "--config",
        str(plan),
        "--data",
        str(data),
        "--run-dir",
        str(run_dir),
        "--gpu",
        "24GB",
        "--trials",
        "1",
        "--gamma",
        "1,3",
        "--interval",
        "1",
        "--threads",
        "1",
    ]
    assert main(args) == 0
    first = load_study(run_dir).trials[0]
    assert first.params["gamma"] == 3
    spec = json.loads((run_dir / "trials" / "0000" / "spec.json").read_text(encoding="utf-8"))["train"]
    assert spec["precision"] == "bf16"
    assert spec["sequence_length"] == 64
    assert spec["micro_batch_size"] == planned["micro_batch_size"]


def test_trials_on_a_gpu_are_capped_to_the_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # No GPU here: torch.cuda is mocked to report an 80 GB card, to check the fraction a trial process is given.
    data = write_records(tmp_path / "data.jsonl")
    options = TuneOptions(
        data=data,
        run_dir=tmp_path / "gpu",
        trials=1,
        gpu="24GB",
        model="tiny-llama",
        intervals="1",
        sequence_length=64,
        threads=1,
    )
    tuner = Tuner(build_settings(options), optuna.create_study(), trials=1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (79 * 10**9, 80 * 10**9))
    # 24 GB less the 5% margin, of 80 GB.
    assert tuner._cuda_memory_fraction() == pytest.approx(22.8 / 80)


# Bad input ----------------------------------------------------------------------------------------------------------


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    return write_records(tmp_path / "data.jsonl", count=40)


@pytest.mark.parametrize(
    ("extra", "status", "message"),
    [
        (["--trials", "0"], 2, "invalid --trials 0"),
        (["--gpu", "0.3GB"], 1, "nothing fits 0.3GB"),
        (["--gpu", "0.52GB", "--margin", "0", "--seq", "256", "--batch", "4"], 1, "fits at gamma 1 and micro-batch 1"),
        (["--gpu", "0.6GB", "--margin", "0", "--micro-batch", "64", "--batch", "64"], 2, "empty after the memory"),
        (["--interval", "4", "--trial-steps", "6"], 2, "fewer than 3 periods of the largest K"),
        (["--gamma", "0"], 2, "0 outside 1 to 4"),
        (["--learning-rate", "1e-3:1e-5"], 2, "range is empty"),
        (["--trial-memory-limit", "lots"], 2, "--trial-memory-limit"),
        (["--micro-batch", "1", "--batch", "64"], 2, "fewer than one optimizer step of --batch 64"),
        (["--seq", "0"], 2, "invalid --seq 0"),
        (["--threads", "0"], 2, "invalid --threads 0"),
        (["--launch", "--launch-steps", "0"], 2, "invalid --launch-steps 0"),
        (["--eval-fraction", "1"], 2, "invalid --eval-fraction 1.0"),
    ],
)
def test_bad_input_stops_before_any_trial(
    tmp_path: Path, data_file: Path, capsys: pytest.CaptureFixture[str], extra: list[str], status: int, message: str
) -> None:
    run_dir = tmp_path / "bad"
    args = tune_args(data_file, run_dir, "--gpu", "24GB", "--interval", "1")
    # A later option wins in click, so each case's own values replace the defaults above.
    assert main([*args, *extra]) == status
    captured = capsys.readouterr()
    assert message in captured.err
    assert "Traceback" not in captured.err
    assert not (run_dir / "trials").exists()


def test_run_dir_of_another_data_set_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "shared-dir"
    first = write_records(tmp_path / "first.jsonl", count=60)
    assert main(one_config_args(first, run_dir, trials=1)) == 0
    capsys.readouterr()
    other = write_records(tmp_path / "other.jsonl", count=70)
    assert main(one_config_args(other, run_dir, trials=1)) == 2
    error = capsys.readouterr().err
    assert "was made for other settings" in error
    assert "the data file changed" in error
    assert len(load_study(run_dir).trials) == 1


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (["--learning-rate", "1e-3"], "learning_rate"),
        (["--policy", "persistent"], "policy"),
        (["--seed", "1"], "seed"),
        (["--eval-fraction", "0.2"], "eval_fraction"),
    ],
)
def test_resume_with_changed_setting_rejected(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], change: list[str], named: str
) -> None:
    # Each of these changes the trials' results, so the finished trials would be mislabelled.
    data = write_records(tmp_path / "data.jsonl")
    run_dir = tmp_path / "study"
    args = one_config_args(data, run_dir, trials=1)
    assert main(args) == 0
    best = (run_dir / "best.yaml").read_bytes()
    capsys.readouterr()
    assert main([*args, *change]) == 2
    error = capsys.readouterr().err
    assert "was made for other settings" in error
    assert named in error
    assert (run_dir / "best.yaml").read_bytes() == best


def test_failed_start_leaves_no_run_dir(tmp_path: Path, data_file: Path) -> None:
    run_dir = tmp_path / "never"
    assert main(tune_args(data_file, run_dir, "--gpu", "0.3GB", "--interval", "1")) == 1
    assert not run_dir.exists()


def test_best_yaml_trains_like_the_trials(tmp_path: Path) -> None:
    data = write_records(tmp_path / "data.jsonl")
    run_dir = tmp_path / "study"
    assert main(one_config_args(data, run_dir, trials=1)) == 0
    plan = read_plan(run_dir / "best.yaml")
    assert plan["pack"] is True
    assert plan["seed"] == 0
    assert plan["tokenizer"] == str((run_dir / "tokenizer").resolve())
    trial = load_study(run_dir).trials[0]
    # Training the winner with the trial's length reproduces the trial's held-out loss.
    final = tmp_path / "final"
    args = ["train", "--config", str(run_dir / "best.yaml"), "--data", str(data), "--run-dir", str(final)]
    assert main([*args, "--max-steps", "3", "--warmup-steps", "1", "--eval-every", "1"]) == 0
    metrics = [json.loads(line) for line in (final / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    last = [record for record in metrics if record["event"] == "eval"][-1]
    assert last["eval_loss"] == pytest.approx(trial.value, rel=1e-6)


def test_plan_file_with_invalid_values(tmp_path: Path, data_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plan = tmp_path / "plan.yaml"
    plan.write_text("model: tiny-llama\ngamma: two\nprecision: fp64\n", encoding="utf-8")
    args = tune_args(data_file, tmp_path / "study", "--gpu", "24GB", "--config", str(plan), "--interval", "1")
    assert main(args) == 2
    error = capsys.readouterr().err
    assert "gamma 'two' is not a whole number" in error
    assert "precision 'fp64' is not one of bf16, amp-bf16, fp32" in error


def test_unreachable_storage_hides_the_password(
    tmp_path: Path, data_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Nothing listens on the port just released, so the connection is refused at once.
    url = f"postgresql://tuner:hunter2secret@127.0.0.1:{port}/optuna"
    args = tune_args(data_file, tmp_path / "remote", "--gpu", "24GB", "--interval", "1", "--storage", url)
    assert main(args) == 2
    error = capsys.readouterr().err
    assert "cannot open the study storage postgresql://tuner:***@127.0.0.1" in error
    assert "hunter2secret" not in error
    assert "Traceback" not in error


# PostgreSQL ------------------------------------------------------------------------------------------------------


def _postgres_binaries() -> Path | None:
    for candidate in [shutil.which("initdb"), *sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))]:
        if candidate:
            return Path(candidate).parent
    return None


@pytest.fixture
def postgres() -> Iterator[str]:
    """Start a throwaway PostgreSQL server on 127.0.0.1 and yield its URL; skip when that cannot be done here."""
    pytest.importorskip("psycopg", reason="psycopg (the PostgreSQL driver SQLAlchemy uses) is not installed")
    binaries = _postgres_binaries()
    if binaries is None:
        pytest.skip("PostgreSQL is not installed (no initdb on PATH or in /usr/lib/postgresql)")
    prefix: list[str] = []
    if os.geteuid() == 0:
        # The server refuses to run as root; run it as the postgres account when there is one.
        if shutil.which("runuser") is None or subprocess.run(["id", "postgres"], capture_output=True).returncode:
            pytest.skip("running as root without a postgres account to start the server with")
        prefix = ["runuser", "-u", "postgres", "--"]
    # pytest's temporary folders are private to their owner, and the server runs as another user.
    base = Path(tempfile.mkdtemp(prefix="lisa-tune-postgres-"))
    base.chmod(0o777)
    data_dir = base / "data"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    options = f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={base}"
    steps = [
        [str(binaries / "initdb"), "-D", str(data_dir), "-U", "tuner", "--auth=trust"],
        [str(binaries / "pg_ctl"), "-D", str(data_dir), "-o", options, "-w", "-l", str(base / "server.log"), "start"],
    ]
    try:
        for step in steps:
            done = subprocess.run([*prefix, *step], capture_output=True, text=True)
            if done.returncode:
                pytest.skip(f"could not start a PostgreSQL server: {Path(step[0]).name} said {done.stderr.strip()!r}")
        # initdb creates the database "postgres"; the study's tables go there.
        yield f"postgresql://tuner@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            [*prefix, str(binaries / "pg_ctl"), "-D", str(data_dir), "-m", "immediate", "stop"], capture_output=True
        )
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.slow
def test_two_workers_share_a_study_in_postgresql(tmp_path: Path, postgres: str) -> None:
    data = write_records(tmp_path / "data.jsonl")
    common = [
        "--gpu",
        "24GB",
        "--gamma",
        "1,2,4",
        "--interval",
        "1,2",
        "--storage",
        postgres,
        "--study-name",
        "shared",
        "--pruner",
        "none",
    ]
    workers = [
        subprocess.Popen(
            [*CLI, *tune_args(data, tmp_path / f"machine{i}", *common, trials=4)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    for worker in workers:
        _out, err = worker.communicate(timeout=300)
        assert worker.returncode == 0, err
    study = optuna.load_study(study_name="shared", storage=postgres)
    assert not [t for t in study.trials if t.state == TrialState.RUNNING]
    ran = counted(study)
    # Each worker stops once the study has 4 counted trials; one started just before that may finish too.
    assert 4 <= len(ran) <= 5
    assert len({t.user_attrs["worker"]["pid"] for t in ran}) == 2
