"""Tests of ``lisa-tune estimate`` as a user runs it: through ``main`` and once through the installed console script.

Most runs use the tiny bundled models with a 16-token sequence, so that a trace takes well under a second.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# Set before anything imports huggingface_hub, which reads it at import. Nothing in these tests may download.
os.environ["HF_HUB_OFFLINE"] = "1"

import click
import pytest

from lisa_tune.cli import cli, estimate, main
from lisa_tune.profiles import profiles_dir

TINY = ("--model", "tiny-llama", "--seq", "16")
TINY_LLAMA_LAYERS = 4
TINY_LLAMA_POSITIONS = 2048
SCHEMA = "lisa-tune/estimate/v1"
CATEGORIES = (
    "parameters",
    "gradients",
    "optimizer_states",
    "activations",
    "temporaries",
    "cuda_context",
    "allocator_reserve",
)
TABLE_LABELS = (
    "parameters",
    "gradients",
    "optimizer states",
    "activations",
    "temporaries",
    "CUDA context + cuBLAS",
    "allocator reserve",
)


@pytest.fixture(autouse=True)
def fresh_log_handler() -> Iterator[None]:
    """Let each test's ``main`` attach a new handler to the ``lisa_tune`` logger.

    ``configure_logging`` binds its handler to the ``sys.stderr`` of its first call and reuses it afterwards, but
    capsys replaces ``sys.stderr`` in every test.
    """
    logger = logging.getLogger("lisa_tune")
    saved = logger.handlers[:]
    logger.handlers.clear()
    yield
    logger.handlers[:] = saved


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run the command line in this process and return the exit status, stdout and stderr."""
    status = main(list(args))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def run_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    """Run ``estimate --json`` with ``args`` and return the parsed object."""
    status, out, err = run(capsys, "estimate", "--json", *args)
    assert status == 0, err
    payload = json.loads(out)
    assert isinstance(payload, dict)
    return payload


def lookup(payload: dict[str, Any], dotted_key: str) -> Any:
    """Return the value at a dotted key such as ``model.name``. Raises KeyError when a part is missing."""
    value: Any = payload
    for part in dotted_key.split("."):
        value = value[part]
    return value


def has_key(payload: dict[str, Any], dotted_key: str) -> bool:
    try:
        lookup(payload, dotted_key)
    except KeyError:
        return False
    return True


def option_help(command: click.Command, flag: str) -> str:
    """Return the help text of the option of ``command`` spelled ``flag``."""
    for param in command.params:
        if isinstance(param, click.Option) and flag in param.opts + param.secondary_opts:
            return param.help or ""
    raise KeyError(flag)


def tiny_llama_config() -> dict[str, Any]:
    """Return a fresh copy of the bundled tiny-llama config.json."""
    path = profiles_dir() / "models" / "tiny-llama" / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    assert isinstance(config, dict)
    return config


def write_json(path: Path, document: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document), encoding="utf-8")
    return path


# Help ----------------------------------------------------------------------------------------------------------


def test_group_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "--help")

    assert status == 0
    assert "estimate" in out
    for flag in ("--verbose", "--quiet", "--debug", "--version"):
        assert flag in out, flag


def test_estimate_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "estimate", "--help")

    assert status == 0
    for param in estimate.params:
        if isinstance(param, click.Option):
            assert param.opts[-1] in out, param.opts


@pytest.mark.parametrize("command", [cli, estimate], ids=["group", "estimate"])
def test_every_option_has_help(command: click.Command) -> None:
    for param in command.params:
        if isinstance(param, click.Option):
            assert param.help, f"{param.opts} has no help text"


@pytest.mark.parametrize(
    ("flag", "words"),
    [
        ("--seq", "tokens"),
        ("--batch", "sequences"),
        ("--gamma", "layers"),
        ("--periods", "periods"),
        ("--gpu", "CUDA context"),
        ("--seed", "seed"),
        ("--json", "JSON"),
        ("--quiet", "warnings"),
        ("--verbose", "debug"),
    ],
)
def test_option_help_names_unit(flag: str, words: str) -> None:
    command = cli if flag in ("--quiet", "--verbose") else estimate

    assert words.lower() in option_help(command, flag).lower()


# JSON output ---------------------------------------------------------------------------------------------------

# The leaf keys of the JSON object with their JSON types, for a CUDA target without --gpu. ``type(None)`` marks a null.
JSON_KEY_TYPES: dict[str, type | tuple[type, ...]] = {
    "schema": str,
    "model.name": str,
    "model.model_type": str,
    "model.parameters": int,
    "model.layers": int,
    "config.gamma": int,
    "config.full_fine_tuning": bool,
    "config.micro_batch_size": int,
    "config.sequence_length": int,
    "config.precision": str,
    "config.gradient_checkpointing": bool,
    "config.attention": str,
    "config.optimizer_state_policy": str,
    "config.periods": int,
    "config.target_device": str,
    "config.adamw_implementation": str,
    "config.freeze_embedding": bool,
    "config.gpu": type(None),
    "trainable_parameters": int,
    "total_bytes": int,
    "breakdown_bytes": dict,
    "breakdown_basis": dict,
    "peak.tensor_bytes": int,
    "peak.step": int,
    "peak.phase": str,
    "peak.module": str,
    "peak.operator": str,
    "peak.phase_peaks_bytes": dict,
    "device.allocated_bytes": int,
    "device.reserved_bytes": int,
    "device.cuda_context_bytes": int,
    "device.cublas_workspace_bytes": int,
    "device.total_bytes": int,
    "optimizer_state.bytes_at_end": int,
    "optimizer_state.layers_with_state": list,
    "optimizer_state.visited_layers": list,
    "timing_seconds.build": float,
    "timing_seconds.trace": float,
    "notes": list,
}


def test_json_keys_and_types(capsys: pytest.CaptureFixture[str]) -> None:
    payload = run_json(capsys, *TINY)

    for dotted_key, expected in JSON_KEY_TYPES.items():
        value = lookup(payload, dotted_key)
        # Exact type, so that a bool does not pass for an int nor an int for a float.
        assert type(value) is expected, f"{dotted_key}: {value!r} is not {expected}"


DOCS_PAGE = Path(__file__).resolve().parents[1] / "docs" / "estimate-json.md"
# Objects whose keys are data (categories, phase names), so the page documents the object and not each key.
FREE_FORM_OBJECTS = ("breakdown_bytes", "breakdown_basis", "peak.phase_peaks_bytes")


def documented_keys() -> list[str]:
    """Return the keys in the first column of the key table of docs/estimate-json.md."""
    keys = []
    for line in DOCS_PAGE.read_text(encoding="utf-8").splitlines():
        if line.startswith("| `"):
            keys.append(line.split("`")[1])
    return keys


def leaf_keys(payload: dict[str, Any], prefix: str = "") -> list[str]:
    """Return the dotted key of every value in ``payload``, descending into every object but the free-form ones."""
    keys = []
    for key, value in payload.items():
        dotted_key = prefix + key
        if isinstance(value, dict) and dotted_key not in FREE_FORM_OBJECTS:
            keys.extend(leaf_keys(value, dotted_key + "."))
        else:
            keys.append(dotted_key)
    return keys


def test_json_keys_match_docs(capsys: pytest.CaptureFixture[str]) -> None:
    # With --gpu the device object is present, so its keys are checked too.
    payload = run_json(capsys, *TINY, "--gpu", "rtx4090")
    documented = documented_keys()

    for dotted_key in leaf_keys(payload):
        assert dotted_key in documented, f"{dotted_key} is missing from {DOCS_PAGE.name}"
    for dotted_key in documented:
        assert has_key(payload, dotted_key), f"{DOCS_PAGE.name} documents {dotted_key}, which the output lacks"
    for dotted_key in JSON_KEY_TYPES:
        assert dotted_key in documented, dotted_key


def test_json_nested_value_types(capsys: pytest.CaptureFixture[str]) -> None:
    payload = run_json(capsys, *TINY)

    for category, nbytes in payload["breakdown_bytes"].items():
        assert type(nbytes) is int, category
    for category, basis in payload["breakdown_basis"].items():
        assert type(basis) is str, category
    for phase, nbytes in payload["peak"]["phase_peaks_bytes"].items():
        assert type(nbytes) is int, phase
    for key in ("layers_with_state", "visited_layers"):
        for index in payload["optimizer_state"][key]:
            assert type(index) is int, key
    for note in payload["notes"]:
        assert type(note) is str


def test_json_schema_string(capsys: pytest.CaptureFixture[str]) -> None:
    payload = run_json(capsys, *TINY)

    assert payload["schema"] == SCHEMA


def test_json_echoes_request(capsys: pytest.CaptureFixture[str]) -> None:
    payload = run_json(capsys, *TINY, "--batch", "3", "--gamma", "1")

    assert payload["model"]["name"] == "tiny-llama"
    assert payload["model"]["layers"] == TINY_LLAMA_LAYERS
    assert payload["config"]["micro_batch_size"] == 3
    assert payload["config"]["sequence_length"] == 16
    assert payload["config"]["gamma"] == 1


def test_json_breakdown_categories(capsys: pytest.CaptureFixture[str]) -> None:
    payload = run_json(capsys, *TINY)

    assert tuple(payload["breakdown_bytes"]) == CATEGORIES
    assert tuple(payload["breakdown_basis"]) == CATEGORIES


@pytest.mark.parametrize(
    "extra",
    [(), ("--gpu", "rtx4090"), ("--device", "cpu"), ("--gamma", "full")],
    ids=["cuda", "cuda-rtx4090", "cpu", "full"],
)
def test_breakdown_sums_to_total(capsys: pytest.CaptureFixture[str], extra: tuple[str, ...]) -> None:
    payload = run_json(capsys, *TINY, *extra)

    assert sum(payload["breakdown_bytes"].values()) == payload["total_bytes"]


@pytest.mark.parametrize("extra", [(), ("--gpu", "rtx4090")], ids=["no-gpu", "rtx4090"])
def test_breakdown_not_negative(capsys: pytest.CaptureFixture[str], extra: tuple[str, ...]) -> None:
    payload = run_json(capsys, *TINY, *extra)

    for category, nbytes in payload["breakdown_bytes"].items():
        assert nbytes >= 0, f"{category}: {nbytes}"


def test_cuda_total_is_device_total(capsys: pytest.CaptureFixture[str]) -> None:
    payload = run_json(capsys, *TINY, "--gpu", "rtx4090")
    device = payload["device"]

    assert payload["total_bytes"] == device["total_bytes"]
    assert device["total_bytes"] == device["reserved_bytes"] + device["cuda_context_bytes"]
    assert device["reserved_bytes"] >= device["allocated_bytes"]
    assert device["allocated_bytes"] >= payload["peak"]["tensor_bytes"]


def test_cpu_total_is_tensor_peak(capsys: pytest.CaptureFixture[str]) -> None:
    payload = run_json(capsys, *TINY, "--device", "cpu")

    assert payload["device"] is None
    assert payload["total_bytes"] == payload["peak"]["tensor_bytes"]


def test_gamma_full_is_full_fine_tuning(capsys: pytest.CaptureFixture[str]) -> None:
    gamma_full = run_json(capsys, *TINY, "--gamma", "full")
    gamma_one = run_json(capsys, *TINY, "--gamma", "1")

    assert gamma_full["config"]["full_fine_tuning"] is True
    assert gamma_full["config"]["gamma"] is None
    assert gamma_full["trainable_parameters"] == gamma_full["model"]["parameters"]
    assert gamma_one["config"]["full_fine_tuning"] is False
    assert gamma_full["total_bytes"] > gamma_one["total_bytes"]


def test_gpu_adds_cuda_context(capsys: pytest.CaptureFixture[str]) -> None:
    with_gpu = run_json(capsys, *TINY, "--gpu", "rtx4090")
    without_gpu = run_json(capsys, *TINY)
    device = with_gpu["device"]

    assert with_gpu["config"]["gpu"] == "rtx4090"
    assert with_gpu["breakdown_bytes"]["cuda_context"] > 0
    assert with_gpu["breakdown_bytes"]["cuda_context"] == (
        device["cuda_context_bytes"] + device["cublas_workspace_bytes"]
    )
    assert without_gpu["breakdown_bytes"]["cuda_context"] == 0
    assert without_gpu["notes"] != []


def test_default_model_llama_2_7b(capsys: pytest.CaptureFixture[str]) -> None:
    # The one run of a full-size model: the llama-2-7b default at its 1024-token default sequence.
    payload = run_json(capsys)

    assert payload["model"]["name"] == "llama-2-7b"
    assert payload["model"]["layers"] == 32
    assert payload["config"]["gamma"] == 2
    assert payload["config"]["sequence_length"] == 1024
    assert sum(payload["breakdown_bytes"].values()) == payload["total_bytes"]
    # bf16 weights take 2 bytes per parameter, so the parameters category is at least twice the parameter count.
    assert payload["breakdown_bytes"]["parameters"] >= 2 * payload["model"]["parameters"]


@pytest.mark.parametrize("model", ["tiny-qwen2", "tiny-gpt2"])
def test_json_other_architectures(capsys: pytest.CaptureFixture[str], model: str) -> None:
    payload = run_json(capsys, "--model", model, "--seq", "16")

    assert payload["model"]["name"] == model
    assert sum(payload["breakdown_bytes"].values()) == payload["total_bytes"]


# Table output --------------------------------------------------------------------------------------------------


def test_table_has_every_label(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    # rich takes its width from COLUMNS, or 80, when stdout is not a terminal. A wide table keeps each label on
    # one line.
    monkeypatch.setenv("COLUMNS", "200")
    status, out, _ = run(capsys, "estimate", *TINY)

    assert status == 0
    for label in TABLE_LABELS:
        assert label in out, label
    assert "total at peak" in out
    assert "Peak in step 2" in out


# Logging and tracebacks ----------------------------------------------------------------------------------------


def log_probe_info() -> None:
    """Log one info message through the package's logger, as any lisa_tune module would."""
    logging.getLogger("lisa_tune.tests").info("probe info message")


def test_default_logs_info(capsys: pytest.CaptureFixture[str]) -> None:
    status, _, _ = run(capsys, "estimate", "--json", *TINY)
    log_probe_info()

    assert status == 0
    assert "probe info message" in capsys.readouterr().err


def test_quiet_hides_info(capsys: pytest.CaptureFixture[str]) -> None:
    status, _, _ = run(capsys, "-q", "estimate", "--json", *TINY)
    log_probe_info()

    assert status == 0
    assert "probe info message" not in capsys.readouterr().err


def test_quiet_keeps_warnings(capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = run(capsys, "-q", "estimate", "--json", "--model", "tiny-llama", "--seq", "2050")

    assert status == 0
    assert "tokens longer" in err


def test_double_quiet_hides_warnings(capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = run(capsys, "-qq", "estimate", "--json", "--model", "tiny-llama", "--seq", "2050")

    assert status == 0
    assert "tokens longer" not in err


# With --policy persistent and two periods the simulator switches layers once, and the switch logs at debug level.
SWITCHING = ("estimate", "--json", *TINY, "--policy", "persistent", "--periods", "2")


def test_verbose_logs_debug(capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = run(capsys, "-v", *SWITCHING)

    assert status == 0
    assert "DEBUG" in err
    assert "LISA switch" in err


def test_default_hides_debug(capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = run(capsys, *SWITCHING)

    assert status == 0
    assert "DEBUG" not in err


def test_error_without_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(capsys, "estimate", "--model", "tiny-lama")

    assert status == 2
    assert out == ""
    assert err.startswith("Error:")
    assert len(err.splitlines()) == 1
    assert "Traceback" not in err


def test_debug_prints_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = run(capsys, "--debug", "estimate", "--model", "tiny-lama")

    assert status == 2
    assert "Traceback (most recent call last)" in err
    assert "InputError" in err
    assert err.splitlines()[-1].startswith("Error:")


# Invalid input -------------------------------------------------------------------------------------------------

# Each case builds its files under tmp_path and returns the arguments after ``estimate`` and the fragments the
# error line must contain: the rejected value and what to do about it.
InvalidCase = Callable[[Path], tuple[list[str], list[str]]]


def config_without_layer_count(tmp_path: Path) -> tuple[list[str], list[str]]:
    config = tiny_llama_config()
    del config["num_hidden_layers"]
    path = write_json(tmp_path / "no-layers.json", config)
    return ["--model", str(path)], ["num_hidden_layers", "pass a complete Hugging Face config.json"]


def config_without_hidden_size(tmp_path: Path) -> tuple[list[str], list[str]]:
    config = tiny_llama_config()
    del config["hidden_size"]
    path = write_json(tmp_path / "no-hidden.json", config)
    return ["--model", str(path)], [str(path), "hidden_size", "pass a complete Hugging Face config.json"]


def unknown_model_name(tmp_path: Path) -> tuple[list[str], list[str]]:
    return ["--model", "tiny-lama"], ["'tiny-lama'", "Did you mean tiny-llama"]


def gamma_zero(tmp_path: Path) -> tuple[list[str], list[str]]:
    return [*TINY, "--gamma", "0"], ["gamma 0", "pass --gamma 1 to 4"]


def gamma_above_layers(tmp_path: Path) -> tuple[list[str], list[str]]:
    return [*TINY, "--gamma", "5"], ["gamma 5", "pass --gamma 1 to 4"]


def gamma_not_a_number(tmp_path: Path) -> tuple[list[str], list[str]]:
    return [*TINY, "--gamma", "abc"], ["'abc'", "'full'"]


def batch_zero(tmp_path: Path) -> tuple[list[str], list[str]]:
    return [*TINY, "--batch", "0"], ["micro-batch size 0", "pass --batch 1 or more"]


def seq_zero(tmp_path: Path) -> tuple[list[str], list[str]]:
    return ["--model", "tiny-llama", "--seq", "0"], ["sequence length 0", "pass --seq 1 or more"]


def missing_config_path(tmp_path: Path) -> tuple[list[str], list[str]]:
    path = tmp_path / "missing" / "config.json"
    return ["--model", str(path)], [str(path)]


def directory_without_config(tmp_path: Path) -> tuple[list[str], list[str]]:
    directory = tmp_path / "empty-model"
    directory.mkdir()
    return ["--model", str(directory)], [str(directory), "no config.json", "Pass a Hugging Face model directory"]


def config_not_json(tmp_path: Path) -> tuple[list[str], list[str]]:
    path = tmp_path / "broken.json"
    path.write_text('{"model_type": "llama",', encoding="utf-8")
    return ["--model", str(path)], [str(path), "not valid JSON", "Pass a Hugging Face config.json"]


def config_json_array(tmp_path: Path) -> tuple[list[str], list[str]]:
    path = write_json(tmp_path / "array.json", [tiny_llama_config()])
    return ["--model", str(path)], [str(path), "must be a JSON object"]


def unknown_gpu(tmp_path: Path) -> tuple[list[str], list[str]]:
    return [*TINY, "--gpu", "rtx409"], ["'rtx409'", "Did you mean rtx4090"]


INVALID_CASES: list[InvalidCase] = [
    config_without_layer_count,
    config_without_hidden_size,
    unknown_model_name,
    gamma_zero,
    gamma_above_layers,
    gamma_not_a_number,
    batch_zero,
    seq_zero,
    missing_config_path,
    directory_without_config,
    config_not_json,
    config_json_array,
    unknown_gpu,
]


@pytest.mark.parametrize("case", INVALID_CASES, ids=lambda case: case.__name__)
def test_invalid_input_rejected(capsys: pytest.CaptureFixture[str], tmp_path: Path, case: InvalidCase) -> None:
    args, fragments = case(tmp_path)
    status, out, err = run(capsys, "estimate", *args)
    lines = err.splitlines()

    assert status == 2
    assert out == ""
    assert len(lines) == 1, err
    assert lines[0].startswith("Error: ")
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], fragment


def test_layer_count_error_names_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    args, _ = config_without_layer_count(tmp_path)
    status, _, err = run(capsys, "estimate", *args)

    assert status == 2
    assert args[-1] in err


def test_missing_path_error_says_check(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    args, _ = missing_config_path(tmp_path)
    status, _, err = run(capsys, "estimate", *args)

    assert status == 2
    assert "check the path" in err.lower()


def test_gpu_with_cpu_target_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = run(capsys, "estimate", *TINY, "--device", "cpu", "--gpu", "rtx4090")

    assert status == 2
    assert "--device cuda" in err


def test_gemma2_sdpa_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = run(capsys, "estimate", "--model", "tiny-gemma2", "--seq", "16")

    assert status == 2
    assert "--attention eager" in err


def test_empty_model_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = run(capsys, "estimate", "--model", "")

    assert status == 2
    assert "--model is empty" in err


def test_unknown_gpu_lists_profiles(capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = run(capsys, "estimate", *TINY, "--gpu", "4090x")

    assert status == 2
    assert "rtx4090" in err
    assert "Known profiles:" in err


# Sequence length and model sources -----------------------------------------------------------------------------


def test_seq_beyond_positions_warns(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(
        capsys, "estimate", "--json", "--model", "tiny-llama", "--seq", str(TINY_LLAMA_POSITIONS + 2)
    )

    assert status == 0
    assert json.loads(out)["config"]["sequence_length"] == TINY_LLAMA_POSITIONS + 2
    assert "WARNING" in err
    assert "2 tokens longer" in err
    assert str(TINY_LLAMA_POSITIONS) in err


def test_seq_at_positions_no_warning(capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = run(capsys, "estimate", "--json", "--model", "tiny-llama", "--seq", str(TINY_LLAMA_POSITIONS))

    assert status == 0
    assert "tokens longer" not in err


@pytest.fixture
def model_directory(tmp_path: Path) -> Path:
    """A model directory holding a copy of the bundled tiny-llama config.json."""
    directory = tmp_path / "my-tiny-llama"
    write_json(directory / "config.json", tiny_llama_config())
    return directory


def test_model_directory_same_total(capsys: pytest.CaptureFixture[str], model_directory: Path) -> None:
    bundled = run_json(capsys, *TINY)
    from_directory = run_json(capsys, "--model", str(model_directory), "--seq", "16")

    assert from_directory["model"]["name"] == str(model_directory)
    assert from_directory["total_bytes"] == bundled["total_bytes"]


def test_model_config_path_same_total(capsys: pytest.CaptureFixture[str], model_directory: Path) -> None:
    bundled = run_json(capsys, *TINY)
    from_file = run_json(capsys, "--model", str(model_directory / "config.json"), "--seq", "16")

    assert from_file["total_bytes"] == bundled["total_bytes"]


# Console script ------------------------------------------------------------------------------------------------


def test_console_script_exit_status(tmp_path: Path) -> None:
    # Look next to the running interpreter first, because a virtual environment need not be on PATH.
    search_path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    script = shutil.which("lisa-tune", path=search_path)
    assert script is not None, "the lisa-tune console script is not installed; run pip install -e ."

    completed = subprocess.run(
        [script, "estimate", "--model", "tiny-lama"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=60,
        check=False,
    )

    assert completed.returncode == 2
    assert completed.stdout == ""
    assert completed.stderr.startswith("Error: unknown model 'tiny-lama'")
    assert "Traceback" not in completed.stderr
