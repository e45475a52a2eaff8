"""Tests of ``lisa-tune plan`` as a user runs it: through ``main``, and once in a fresh Python process.

Most runs use tiny-llama, whose plans start to fit at about 0.65 GB. The tests share one memory-fit cache folder,
so each model, precision and checkpointing setting is traced once per test run.
The cache tests use folders of their own.
"""

from __future__ import annotations

import os

# Set before anything imports huggingface_hub, which reads it at import. Nothing in these tests may download.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import yaml

from lisa_tune.cli import main
from lisa_tune.planner.cache import fit_key
from lisa_tune.profiles import profiles_dir, resolve_model

SCHEMA = "lisa-tune/plan/v1"
TINY = ("--model", "tiny-llama")
TINY_LLAMA_LAYERS = 4
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Options that search one precision and checkpointing setting, so a cold cache traces the model once.
ONE_FIT = ("--precision", "bf16", "--no-grad-ckpt")


class Result(NamedTuple):
    status: int
    out: str
    err: str


@pytest.fixture(scope="module", autouse=True)
def fit_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Point LISA_TUNE_CACHE_DIR at one folder for the whole module, so later tests reuse the traced fits."""
    folder = tmp_path_factory.mktemp("fits")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LISA_TUNE_CACHE_DIR", str(folder))
        yield folder


def run(capsys: pytest.CaptureFixture[str], *args: str) -> Result:
    """Run ``lisa-tune plan`` with ``args`` in this process and return the exit status, stdout and stderr."""
    status = main(["plan", *args])
    captured = capsys.readouterr()
    return Result(status, captured.out, captured.err)


def run_json(capsys: pytest.CaptureFixture[str], *args: str, status: int = 0) -> dict[str, Any]:
    """Run ``lisa-tune plan --json`` with ``args``, check the exit status and return the parsed plan."""
    result = run(capsys, "--json", *args)
    assert result.status == status, result.err
    document = json.loads(result.out)
    assert isinstance(document, dict)
    return document


def unwrap(text: str) -> str:
    """Join the lines rich wraps at the terminal width, so a message can be searched as one line."""
    return " ".join(text.split())


def profile_memory_bytes(name: str) -> int:
    """Read a GPU's memory from the bundled profiles/gpus.yaml."""
    with (profiles_dir() / "gpus.yaml").open(encoding="utf-8") as stream:
        document = yaml.safe_load(stream)
    return next(int(entry["memory_bytes"]) for entry in document["gpus"] if entry["name"] == name)


def read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# The default command ----------------------------------------------------------------------------------------------


def test_default_command_prints_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    result = run(capsys, "--gpu", "24GB")
    defaults_line = next(line for line in result.out.splitlines() if line.startswith("Defaults used:"))

    assert result.status == 0, result.err
    assert "--model llama-2-7b" in defaults_line
    assert "--seq 1024" in defaults_line
    assert "Recommended" in result.out


def test_default_command_json(capsys: pytest.CaptureFixture[str]) -> None:
    plan = run_json(capsys, "--gpu", "24GB")
    budget = plan["budget"]
    recommended = plan["recommended"]

    assert plan["model"] == "llama-2-7b"
    assert plan["defaults_used"] == ["--model llama-2-7b", "--seq 1024"]
    assert budget["total_bytes"] == 24 * 10**9
    assert budget["usable_bytes"] == math.floor(budget["total_bytes"] * (1 - budget["margin"]))
    assert recommended["predicted_peak_bytes"] <= budget["usable_bytes"]
    assert recommended["gamma"] == 2
    assert recommended["sequence_length"] == 1024


def test_explicit_options_not_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    plan = run_json(capsys, "--gpu", "24GB", "--model", "llama-2-7b", "--seq", "1024")

    assert plan["defaults_used"] == []


# JSON output ------------------------------------------------------------------------------------------------------

CANDIDATE_TYPES: dict[str, type] = {
    "gamma": int,
    "micro_batch_size": int,
    "gradient_accumulation_steps": int,
    "effective_batch_size": int,
    "sequence_length": int,
    "precision": str,
    "gradient_checkpointing": bool,
    "predicted_peak_bytes": int,
    "predicted_tensor_peak_bytes": int,
    "estimated_tokens_per_second": float,
}
BUDGET_TYPES: dict[str, type] = {
    "label": str,
    "total_bytes": int,
    "margin": float,
    "usable_bytes": int,
    "gpu_profile": str,
    "gpu_profile_is_reference": bool,
    "cuda_context_bytes": int,
    "cublas_workspace_bytes": int,
}


def test_json_top_level_types(capsys: pytest.CaptureFixture[str]) -> None:
    plan = run_json(capsys, "--gpu", "1GB", *TINY)

    assert plan["schema"] == SCHEMA
    assert plan["model"] == "tiny-llama"
    assert plan["layers"] == TINY_LLAMA_LAYERS
    assert plan["sequences"] == [1024]
    assert plan["fits"] is True
    assert isinstance(plan["recommended"], dict)
    assert isinstance(plan["alternatives"], list)
    assert isinstance(plan["rejected"], list)
    assert plan["advice"] == []
    assert plan["speed_is_estimate"] is True
    assert isinstance(plan["speed_assumed_utilization"], float)


def test_json_budget_types(capsys: pytest.CaptureFixture[str]) -> None:
    budget = run_json(capsys, "--gpu", "1GB", *TINY)["budget"]

    assert set(budget) == set(BUDGET_TYPES)
    for key, expected in BUDGET_TYPES.items():
        assert isinstance(budget[key], expected), key


def test_json_candidate_types(capsys: pytest.CaptureFixture[str]) -> None:
    plan = run_json(capsys, "--gpu", "1GB", *TINY)
    candidates = [plan["recommended"], *plan["alternatives"], *plan["rejected"]]

    for candidate in candidates:
        assert set(candidate) - {"reason"} == set(CANDIDATE_TYPES), candidate
        for key, expected in CANDIDATE_TYPES.items():
            assert isinstance(candidate[key], expected), (key, candidate)


def test_rejected_have_reasons(capsys: pytest.CaptureFixture[str]) -> None:
    plan = run_json(capsys, "--gpu", "1GB", *TINY)
    usable = plan["budget"]["usable_bytes"]

    assert plan["rejected"], "a tight budget rejects at least the next micro-batch"
    for rejected in plan["rejected"]:
        assert isinstance(rejected["reason"], str), rejected
        assert rejected["reason"], rejected
        assert rejected["predicted_peak_bytes"] > usable, rejected


def test_alternatives_fit_budget(capsys: pytest.CaptureFixture[str]) -> None:
    plan = run_json(capsys, "--gpu", "1GB", *TINY)
    usable = plan["budget"]["usable_bytes"]

    for alternative in plan["alternatives"]:
        assert alternative["predicted_peak_bytes"] <= usable, alternative


def test_alternatives_cover_every_gamma(capsys: pytest.CaptureFixture[str]) -> None:
    plan = run_json(capsys, "--gpu", "1GB", *TINY)
    gammas = [alternative["gamma"] for alternative in plan["alternatives"]]

    assert gammas == list(range(1, TINY_LLAMA_LAYERS + 1))


def test_recommended_is_an_alternative(capsys: pytest.CaptureFixture[str]) -> None:
    plan = run_json(capsys, "--gpu", "1GB", *TINY)

    assert plan["recommended"] in plan["alternatives"]


def test_micro_batch_within_max_batch(capsys: pytest.CaptureFixture[str]) -> None:
    # 24 GB fits far more than 3 sequences of tiny-llama, so only --max-batch limits the micro-batch.
    plan = run_json(capsys, "--gpu", "24GB", *TINY, "--max-batch", "3")

    assert plan["alternatives"]
    for alternative in plan["alternatives"]:
        assert alternative["micro_batch_size"] <= 3, alternative


def test_single_gamma_searched(capsys: pytest.CaptureFixture[str]) -> None:
    plan = run_json(capsys, "--gpu", "1GB", *TINY, "--gamma", "3")
    gammas = [alternative["gamma"] for alternative in plan["alternatives"]]

    assert gammas == [3]
    assert plan["recommended"]["gamma"] == 3


def test_text_output_marks_estimate(capsys: pytest.CaptureFixture[str]) -> None:
    result = run(capsys, "--gpu", "1GB", *TINY)

    assert result.status == 0, result.err
    assert "Recommended" in result.out
    assert "estimate" in unwrap(result.out)


# Budgets ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("gpu", "total_bytes"),
    [
        ("24GB", 24 * 10**9),
        ("24GiB", 24 * 2**30),
        ("1.5GiB", 3 * 2**29),
        ("2.01GB", 2_010_000_000),
    ],
)
def test_size_budget_total(capsys: pytest.CaptureFixture[str], gpu: str, total_bytes: int) -> None:
    budget = run_json(capsys, "--gpu", gpu, *TINY)["budget"]

    assert budget["total_bytes"] == total_bytes
    assert budget["gpu_profile_is_reference"] is True


def test_size_budget_usable_floor(capsys: pytest.CaptureFixture[str]) -> None:
    # 24 GiB x 0.95 is 24481313587.2 bytes, so the floor is visible.
    budget = run_json(capsys, "--gpu", "24GiB", *TINY)["budget"]

    assert budget["usable_bytes"] == math.floor(24 * 2**30 * 0.95)


def test_margin_sets_usable(capsys: pytest.CaptureFixture[str]) -> None:
    budget = run_json(capsys, "--gpu", "24GB", *TINY, "--margin", "0.25")["budget"]

    assert budget["margin"] == 0.25
    assert budget["usable_bytes"] == 18 * 10**9


def test_profile_budget_total(capsys: pytest.CaptureFixture[str]) -> None:
    budget = run_json(capsys, "--gpu", "rtx4090", *TINY)["budget"]

    assert budget["total_bytes"] == profile_memory_bytes("rtx4090")
    assert budget["gpu_profile"] == "rtx4090"
    assert budget["gpu_profile_is_reference"] is False


@pytest.mark.parametrize(
    "alias",
    [
        "RTX4090",
        "rtx-4090",
        "geforce-rtx-4090",
        "4090",
    ],
)
def test_profile_alias(capsys: pytest.CaptureFixture[str], alias: str) -> None:
    budget = run_json(capsys, "--gpu", alias, *TINY)["budget"]

    assert budget["gpu_profile"] == "rtx4090"
    assert budget["total_bytes"] == profile_memory_bytes("rtx4090")


def test_gpu_auto_without_cuda(capsys: pytest.CaptureFixture[str]) -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device, so --gpu auto reads its free memory")

    result = run(capsys, "--gpu", "auto", *TINY)

    assert result.status == 2
    assert result.err.startswith("Error:")
    assert "24GB" in result.err
    assert "GPU name" in result.err


# Effective batch --------------------------------------------------------------------------------------------------


def test_effective_batch_divides(capsys: pytest.CaptureFixture[str]) -> None:
    plan = run_json(capsys, "--gpu", "1GB", *TINY, "--effective-batch", "8")

    assert plan["alternatives"]
    for alternative in plan["alternatives"]:
        assert 8 % alternative["micro_batch_size"] == 0, alternative
        assert alternative["micro_batch_size"] * alternative["gradient_accumulation_steps"] == 8, alternative
        assert alternative["effective_batch_size"] == 8, alternative


def test_effective_batch_in_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    plan = run_json(capsys, "--gpu", "1GB", *TINY, "--effective-batch", "8")

    assert plan["rejected"]
    for rejected in plan["rejected"]:
        assert rejected["effective_batch_size"] == 8, rejected


# Invalid input ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (("--gpu", "1GB", "--batch", "2", "--effective-batch", "7"), ("--batch 2", "--effective-batch 7")),
        (("--gpu", "1GB", "--gamma", "0"), ("--gamma 0",)),
        (("--gpu", "1GB", "--gamma", "5"), ("--gamma 5", "4 layers")),
        (("--gpu", "24XB"), ("24XB", "GiB")),
        (("--gpu", "0"), ("'0'", "greater than zero")),
        (("--gpu", "-4GB"), ("-4GB", "greater than zero")),
        (("--gpu", "rtx409"), ("rtx409", "rtx4090")),
        (("--gpu", "1GB", "--margin", "1.5"), ("--margin 1.5",)),
        (("--gpu", "1GB", "--margin", "-0.1"), ("--margin -0.1",)),
        (("--gpu", "1GB", "--batch", "0"), ("--batch 0",)),
        (("--gpu", "1GB", "--seq", "0"), ("--seq 0",)),
        (("--gpu", "1GB", "--seq", "long"), ("--seq 'long'",)),
    ],
    ids=[
        "batch-not-divisor",
        "gamma-zero",
        "gamma-above-layers",
        "unknown-unit",
        "zero-size",
        "negative-size",
        "misspelt-profile",
        "margin-above-one",
        "margin-negative",
        "batch-zero",
        "seq-zero",
        "seq-not-number",
    ],
)
def test_invalid_input(capsys: pytest.CaptureFixture[str], args: tuple[str, ...], fragments: tuple[str, ...]) -> None:
    result = run(capsys, *TINY, *args)

    assert result.status == 2
    assert result.out == ""
    assert result.err.startswith("Error:")
    assert len(result.err.splitlines()) == 1, result.err
    assert "Traceback" not in result.err
    for fragment in fragments:
        assert fragment in result.err, fragment


# Nothing fits -----------------------------------------------------------------------------------------------------


def test_tiny_budget_gives_advice(capsys: pytest.CaptureFixture[str]) -> None:
    result = run(capsys, "--gpu", "1MB", *TINY)
    text = unwrap(result.out)

    assert result.status == 1
    assert "Nothing fits" in text
    assert "the smallest configuration searched" in text
    assert "GB of device memory" in text
    assert result.err.startswith("Error: nothing fits")


def test_tiny_budget_json(capsys: pytest.CaptureFixture[str]) -> None:
    plan = run_json(capsys, "--gpu", "1MB", *TINY, status=1)

    assert plan["fits"] is False
    assert plan["recommended"] is None
    assert plan["alternatives"] == []
    assert plan["advice"]


def test_7b_on_8gb_needs_more(capsys: pytest.CaptureFixture[str]) -> None:
    result = run(capsys, "--gpu", "8GB")
    text = unwrap(result.out)

    assert result.status == 1
    assert "Nothing fits llama-2-7b" in text
    assert "the weights and CUDA context alone need" in text
    assert "use a larger GPU" in text


def test_nothing_fits_writes_nothing(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)

    result = run(capsys, "--gpu", "1MB", *TINY, "--output", "plan.yaml", "--plot", "plan.png")

    assert result.status == 1
    assert list(tmp_path.iterdir()) == []


def test_seq_auto_nothing_fits_json(capsys: pytest.CaptureFixture[str]) -> None:
    result = run(capsys, "--json", "--gpu", "0.5GB", *TINY, "--seq", "auto")

    assert result.status == 1
    assert json.loads(result.out)["fits"] is False


# Plan file and plot -----------------------------------------------------------------------------------------------

PLAN_FILE_KEYS = (
    "gamma",
    "micro_batch_size",
    "gradient_accumulation_steps",
    "sequence_length",
    "precision",
    "gradient_checkpointing",
)


def test_output_matches_json(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)

    plan = run_json(capsys, "--gpu", "1GB", *TINY, "--output", "plan.yaml")
    document = yaml.safe_load((tmp_path / "plan.yaml").read_text(encoding="utf-8"))

    assert document["model"] == plan["model"]
    for key in PLAN_FILE_KEYS:
        assert document[key] == plan["recommended"][key], key


def test_output_replaces_existing(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "plan.yaml").write_text("sentinel\n", encoding="utf-8")

    result = run(capsys, "--gpu", "1GB", *TINY, "--output", "plan.yaml")
    document = yaml.safe_load((tmp_path / "plan.yaml").read_text(encoding="utf-8"))

    assert result.status == 0, result.err
    assert document["model"] == "tiny-llama"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["plan.yaml"]


def test_output_kept_when_nothing_fits(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "plan.yaml").write_text("sentinel\n", encoding="utf-8")

    result = run(capsys, "--gpu", "1MB", *TINY, "--output", "plan.yaml")

    assert result.status == 1
    assert (tmp_path / "plan.yaml").read_text(encoding="utf-8") == "sentinel\n"


def test_output_mode_follows_umask(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)

    result = run(capsys, "--gpu", "1GB", *TINY, "--output", "plan.yaml")

    assert result.status == 0, result.err
    assert (tmp_path / "plan.yaml").stat().st_mode & 0o777 == 0o666 & ~read_umask()


def test_output_missing_folder(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    target = tmp_path / "missing" / "plan.yaml"

    result = run(capsys, "--gpu", "1GB", *TINY, "--output", str(target))

    assert result.status == 2
    assert result.err.startswith("Error:")
    assert "does not exist" in result.err
    assert list(tmp_path.iterdir()) == []


def test_output_is_directory(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    target = tmp_path / "plans"
    target.mkdir()

    result = run(capsys, "--gpu", "1GB", *TINY, "--output", str(target))

    assert result.status == 2
    assert result.err.startswith("Error:")
    assert "is a directory" in result.err
    assert list(target.iterdir()) == []


def test_plot_missing_folder(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    target = tmp_path / "missing" / "plan.png"

    result = run(capsys, "--gpu", "1GB", *TINY, "--plot", str(target))

    assert result.status == 2
    assert "--plot" in result.err
    assert list(tmp_path.iterdir()) == []


def test_plot_writes_png(capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)

    result = run(capsys, "--gpu", "1GB", *TINY, "--plot", "plan.png")

    assert result.status == 0, result.err
    assert (tmp_path / "plan.png").read_bytes().startswith(PNG_SIGNATURE)


# Sequence lengths -------------------------------------------------------------------------------------------------


def test_seq_auto_finds_longest(capsys: pytest.CaptureFixture[str]) -> None:
    # 0.7 GB leaves room for about 1600 tokens of tiny-llama, below its 2048 position embeddings.
    plan = run_json(capsys, "--gpu", "0.6GB", *TINY, "--seq", "auto", "--gamma", "2", "--batch", "1")
    chosen = plan["recommended"]
    longest = chosen["sequence_length"]
    settings = (
        "--gamma",
        "2",
        "--batch",
        "1",
        "--precision",
        chosen["precision"],
        "--grad-ckpt" if chosen["gradient_checkpointing"] else "--no-grad-ckpt",
    )

    at_longest = run_json(capsys, "--gpu", "0.6GB", *TINY, "--seq", str(longest), *settings)
    one_more = run_json(capsys, "--gpu", "0.6GB", *TINY, "--seq", str(longest + 1), *settings, status=1)
    # Without --precision and --grad-ckpt the plan searches every setting, and none fits one token more either.
    one_more_any_setting = run_json(
        capsys, "--gpu", "0.6GB", *TINY, "--seq", str(longest + 1), "--gamma", "2", "--batch", "1", status=1
    )

    assert longest < 2048
    assert chosen["predicted_peak_bytes"] <= plan["budget"]["usable_bytes"]
    assert at_longest["recommended"]["predicted_peak_bytes"] == chosen["predicted_peak_bytes"]
    assert one_more["fits"] is False
    assert one_more_any_setting["fits"] is False


def test_several_sequence_lengths(capsys: pytest.CaptureFixture[str]) -> None:
    plan = run_json(capsys, "--gpu", "1GB", "--model", "tiny-qwen2", *ONE_FIT, "--seq", "512,1024")
    pairs = {(alternative["sequence_length"], alternative["gamma"]) for alternative in plan["alternatives"]}

    assert plan["sequences"] == [512, 1024]
    assert pairs == {(sequence, gamma) for sequence in (512, 1024) for gamma in range(1, 5)}
    assert plan["recommended"]["sequence_length"] == 1024


# Memory-fit cache -------------------------------------------------------------------------------------------------


def test_cached_plan_skips_torch(capsys: pytest.CaptureFixture[str], fit_cache: Path, tmp_path: Path) -> None:
    args = ["plan", "--gpu", "24GB", "--model", "tiny-llama", "--json"]
    assert run(capsys, *args[1:]).status == 0
    script = (
        "import sys; "
        f"sys.argv = ['lisa-tune', *{args!r}]; "
        "from lisa_tune.cli import main; "
        "code = main(sys.argv[1:]); "
        "print('torch' in sys.modules); "
        "raise SystemExit(code)"
    )

    completed = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env={**os.environ, "LISA_TUNE_CACHE_DIR": str(fit_cache)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.splitlines()[-1] == "False"
    assert "tracing" not in completed.stderr


def test_cache_file_per_key(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LISA_TUNE_CACHE_DIR", str(tmp_path))
    config = resolve_model("tiny-llama").config
    sdpa_key = fit_key(config, "bf16", False, "sdpa", "foreach")
    eager_key = fit_key(config, "bf16", False, "eager", "foreach")

    first = run(capsys, "--gpu", "24GB", *TINY, *ONE_FIT)
    files_after_first = sorted(path.name for path in tmp_path.glob("*.json"))
    again = run(capsys, "--gpu", "24GB", *TINY, *ONE_FIT)
    eager = run(capsys, "--gpu", "24GB", *TINY, *ONE_FIT, "--attention", "eager")

    assert first.status == 0, first.err
    assert files_after_first == [f"{sdpa_key}.json"]
    assert again.status == 0, again.err
    assert "tracing" not in again.err
    assert eager.status == 0, eager.err
    assert sdpa_key != eager_key
    assert (tmp_path / f"{eager_key}.json").is_file()


def test_corrupt_cache_warns(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LISA_TUNE_CACHE_DIR", str(tmp_path))
    key = fit_key(resolve_model("tiny-llama").config, "bf16", False, "sdpa", "foreach")
    cache_file = tmp_path / f"{key}.json"
    assert run(capsys, "--gpu", "1GB", *TINY, *ONE_FIT).status == 0
    cache_file.write_text("not json", encoding="utf-8")

    result = run(capsys, "--gpu", "1GB", *TINY, *ONE_FIT)
    warnings = [line for line in result.err.splitlines() if line.startswith("WARNING")]

    assert result.status == 0, result.err
    assert len(warnings) == 1, result.err
    assert "unreadable cached memory fit" in warnings[0]
    assert str(cache_file) in warnings[0]
    assert isinstance(json.loads(cache_file.read_text(encoding="utf-8")), dict)


def test_unitless_size_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    result = run(capsys, "--gpu", "24", *TINY)

    assert result.status == 2
    assert "24GB" in result.err


def test_plot_needs_png_suffix(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    target = tmp_path / "plan.jpg"
    result = run(capsys, "--gpu", "1GB", *TINY, "--plot", str(target))

    assert result.status == 2
    assert not target.exists()


def test_size_budget_uses_closest_profile(capsys: pytest.CaptureFixture[str]) -> None:
    budget = run_json(capsys, "--gpu", "80GB", *TINY)["budget"]

    assert budget["gpu_profile"] == "h100-80gb"
