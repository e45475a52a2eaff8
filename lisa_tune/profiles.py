"""Bundled GPU profiles and model configs, and resolution of ``--model`` and ``--gpu`` names.

This module imports neither torch nor transformers, so that commands which only read profiles start fast.
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lisa_tune.errors import InputError


def profiles_dir() -> Path:
    """Return the folder holding ``gpus.yaml`` and ``models/``.

    An installed wheel carries it as ``lisa_tune/_profiles``; a source checkout has ``profiles/`` at its root.
    ``LISA_TUNE_PROFILES`` overrides both.
    """
    override = os.environ.get("LISA_TUNE_PROFILES")
    if override:
        return Path(override)
    packaged = Path(__file__).resolve().parent / "_profiles"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "profiles"


@dataclass(frozen=True)
class GpuProfile:
    """Facts about one GPU model, each with its source in ``profiles/gpus.yaml``."""

    name: str
    """Lowercase identifier used on the command line, for example ``rtx4090``."""
    display_name: str
    memory_bytes: int
    """Total device memory in bytes."""
    bf16: bool
    """Whether the architecture has bf16 tensor-core math."""
    bf16_dense_tflops: float
    """Dense (no sparsity) tensor-core peak for bf16, in TFLOP/s."""
    memory_bandwidth_gb_s: float
    """Memory bandwidth in GB/s (10^9 bytes per second)."""
    cuda_context_bytes: int
    """Estimate of the CUDA context of a PyTorch process on this architecture, in bytes."""
    cublas_workspace_bytes: int
    """PyTorch's default cuBLAS workspace for this architecture, in bytes."""
    compute_capability: str = ""
    aliases: tuple[str, ...] = ()
    sources: dict[str, str] = field(default_factory=dict)
    notes: str = ""


def load_gpu_profiles() -> dict[str, GpuProfile]:
    """Load every GPU profile, keyed by name."""
    path = profiles_dir() / "gpus.yaml"
    with path.open(encoding="utf-8") as stream:
        document = yaml.safe_load(stream)
    profiles: dict[str, GpuProfile] = {}
    for entry in document["gpus"]:
        profile = GpuProfile(
            name=str(entry["name"]),
            display_name=str(entry["display_name"]),
            memory_bytes=int(entry["memory_bytes"]),
            bf16=bool(entry["bf16"]),
            bf16_dense_tflops=float(entry["bf16_dense_tflops"]),
            memory_bandwidth_gb_s=float(entry["memory_bandwidth_gb_s"]),
            cuda_context_bytes=int(entry["cuda_context_bytes"]),
            cublas_workspace_bytes=int(entry["cublas_workspace_bytes"]),
            compute_capability=str(entry.get("compute_capability", "")),
            aliases=tuple(str(alias).lower() for alias in entry.get("aliases") or ()),
            sources={str(key): str(value) for key, value in (entry.get("sources") or {}).items()},
            notes=str(entry.get("notes") or ""),
        )
        profiles[profile.name] = profile
    return profiles


def find_gpu_profile(name: str) -> GpuProfile:
    """Return the GPU profile called ``name`` or one of its aliases; suggest close names when none matches."""
    profiles = load_gpu_profiles()
    key = name.strip().lower()
    for profile in profiles.values():
        if key == profile.name or key in profile.aliases:
            return profile
    known = sorted(profiles)
    close = difflib.get_close_matches(key, known + [a for p in profiles.values() for a in p.aliases], n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise InputError(f"unknown GPU profile {name!r}.{hint} Known profiles: {', '.join(known)}.")


@dataclass(frozen=True)
class ModelSource:
    """A model config resolved from a ``--model`` value; no weights are ever read."""

    name: str
    """The bundled name, the directory or file given, or the Hub id."""
    config_path: Path
    config: dict[str, Any]
    """The parsed ``config.json``."""


def bundled_model_names() -> list[str]:
    """List the names of the bundled model configs."""
    models = profiles_dir() / "models"
    return sorted(entry.name for entry in models.iterdir() if (entry / "config.json").is_file())


def _read_config(path: Path, shown_as: str) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise InputError(f"cannot read model config {shown_as}: {error.strerror}. Check the path.") from error
    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:
        raise InputError(
            f"model config {shown_as} is not valid JSON (line {error.lineno}, column {error.colno}: {error.msg}). "
            "Pass a Hugging Face config.json or the directory that contains it."
        ) from error
    if not isinstance(config, dict):
        raise InputError(f"model config {shown_as} must be a JSON object, found {type(config).__name__}.")
    return config


def _hub_cached_config(model_id: str) -> Path | None:
    """Return the cached ``config.json`` of a Hub id, or None; this never downloads."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        cached = try_to_load_from_cache(model_id, "config.json")
    except ValueError:
        return None
    if isinstance(cached, str) and Path(cached).is_file():
        return Path(cached)
    return None


def resolve_model(spec: str) -> ModelSource:
    """Resolve ``--model``: a bundled name, a model directory, a ``config.json`` path, or a cached Hub id."""
    if not spec.strip():
        raise InputError(
            "--model is empty: pass a bundled name such as llama-2-7b, a model directory or a config.json."
        )
    path = Path(spec).expanduser()
    if path.is_dir():
        config_path = path / "config.json"
        if not config_path.is_file():
            raise InputError(f"model directory {spec} has no config.json. Pass a Hugging Face model directory.")
        return ModelSource(spec, config_path, _read_config(config_path, str(config_path)))
    if path.is_file():
        return ModelSource(spec, path, _read_config(path, spec))

    looks_like_path = spec.endswith(".json") or spec.startswith((".", "~", os.sep)) or spec.count("/") > 1
    if looks_like_path:
        raise InputError(f"model path {spec} not found. Check the path, or pass a bundled name or a Hub id.")

    bundled = profiles_dir() / "models" / spec.lower() / "config.json"
    if bundled.is_file():
        return ModelSource(spec.lower(), bundled, _read_config(bundled, str(bundled)))

    if "/" in spec and not spec.endswith(".json"):
        cached = _hub_cached_config(spec)
        if cached is not None:
            return ModelSource(spec, cached, _read_config(cached, str(cached)))
        raise InputError(
            f"model {spec!r} is not a local path and its config.json is not in the Hugging Face cache. "
            f"lisa-tune never downloads: run `hf download {spec} config.json` first, "
            "or pass a local directory or config.json."
        )

    names = bundled_model_names()
    close = difflib.get_close_matches(spec.lower(), names, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise InputError(
        f"unknown model {spec!r}: not a bundled name, a directory or a file.{hint} Bundled models: {', '.join(names)}."
    )
