"""Bundled GPU profiles, model resolution and size units."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lisa_tune.errors import InputError
from lisa_tune.profiles import bundled_model_names, find_gpu_profile, load_gpu_profiles, resolve_model
from lisa_tune.units import GB, GIB, parse_size

REQUIRED_GPUS = (
    "rtx3060-12gb",
    "rtx4060ti-16gb",
    "rtx4080",
    "rtx3090",
    "rtx4090",
    "rtx5090",
    "t4",
    "l4",
    "a10g",
    "a100-40gb",
    "a100-80gb",
    "h100-80gb",
    "h200",
)
SOURCED_FIELDS = ("memory_bytes", "bf16_dense_tflops", "memory_bandwidth_gb_s", "cuda_context_bytes")


@pytest.mark.parametrize("name", REQUIRED_GPUS)
def test_gpu_profile_complete(name: str) -> None:
    profile = find_gpu_profile(name)
    assert profile.memory_bytes >= 12 * GIB
    assert profile.bf16_dense_tflops > 0
    assert profile.memory_bandwidth_gb_s > 0
    assert profile.cublas_workspace_bytes > 0
    for field_name in SOURCED_FIELDS:
        assert profile.sources.get(field_name), f"{name}: no source for {field_name}"


def test_gpu_24gb_cards_hold_24_gib() -> None:
    assert find_gpu_profile("rtx4090").memory_bytes == 24 * GIB
    assert find_gpu_profile("rtx3090").memory_bytes == 24 * GIB


def test_gpu_t4_lacks_bf16() -> None:
    assert find_gpu_profile("t4").bf16 is False


def test_gpu_alias_lookup() -> None:
    assert find_gpu_profile("4090").name == "rtx4090"


def test_gpu_unknown_suggests_close() -> None:
    with pytest.raises(InputError, match="rtx4090"):
        find_gpu_profile("rtx4909")


def test_gpu_aliases_unique() -> None:
    seen: dict[str, str] = {}
    for profile in load_gpu_profiles().values():
        for alias in (profile.name, *profile.aliases):
            assert alias not in seen, f"{alias} is used by {seen.get(alias)} and {profile.name}"
            seen[alias] = profile.name


def test_bundled_models_cover_required() -> None:
    names = set(bundled_model_names())
    required = {
        "llama-2-7b",
        "llama-3.1-8b",
        "mistral-7b",
        "qwen2.5-7b",
        "qwen2.5-0.5b",
        "tinyllama-1.1b",
        "gemma-2-2b",
        "phi-3-mini",
        "gpt2",
    }
    assert required <= names
    assert len([name for name in names if not name.startswith("tiny-")]) >= 10


def test_model_from_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A Hub id resolves from the local Hugging Face cache layout, with no network.
    cache = tmp_path / "hub"
    repo = cache / "models--example--tiny"
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    config = json.loads((Path(resolve_model("tiny-llama").config_path)).read_text())
    (snapshot / "config.json").write_text(json.dumps(config))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    source = resolve_model("example/tiny")
    assert source.config == config


def test_model_hub_id_not_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(InputError, match="never downloads"):
        resolve_model("example/absent")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("24GB", 24 * GB), ("24GiB", 24 * GIB), ("24 gb", 24 * GB), ("1.5GiB", int(1.5 * GIB)), ("1000", 1000)],
)
def test_parse_size_units(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["24XB", "0", "-4GB", "GB", ""])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=repr(text)):
        parse_size(text)
