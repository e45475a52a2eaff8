"""The on-disk cache of memory fits, keyed by the model config, the settings and the library versions.

Computing the key imports no heavy library: versions come from installed package metadata.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from importlib import metadata
from pathlib import Path
from typing import Any

from lisa_tune.files import write_text_atomically
from lisa_tune.planner.memory_fit import MemoryFit

logger = logging.getLogger(__name__)

# A fit depends on the tracer and on how torch and transformers build and run the model.
VERSIONED_PACKAGES = ("lisa-tune", "torch", "transformers")
FIT_FORMAT = 1


def library_versions() -> dict[str, str]:
    """Return the installed versions of the packages a fit depends on, and a digest of the tracer's source.

    The digest changes the key when the simulator's code changes without a version bump, as in a source checkout.
    """
    versions: dict[str, str] = {}
    for package in VERSIONED_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    package_root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for source in sorted(
        [
            *package_root.glob("memory/*.py"),
            *package_root.glob("lisa/*.py"),
            package_root / "planner" / "fit.py",
            package_root / "modeling.py",
        ]
    ):
        digest.update(source.read_bytes())
    versions["lisa-tune-source"] = digest.hexdigest()[:16]
    return versions


def cache_dir() -> Path:
    """Return the folder of cached fits: ``LISA_TUNE_CACHE_DIR``, else ``$XDG_CACHE_HOME/lisa-tune/fits``."""
    override = os.environ.get("LISA_TUNE_CACHE_DIR")
    if override:
        return Path(override)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lisa-tune" / "fits"


def fit_key(
    model_config: dict[str, Any],
    precision: str,
    gradient_checkpointing: bool,
    attention: str,
    adamw: str,
    accumulating: bool = False,
) -> str:
    """Return the cache key of a fit."""
    payload = json.dumps(
        {
            "format": FIT_FORMAT,
            "config": model_config,
            "precision": precision,
            "gradient_checkpointing": gradient_checkpointing,
            "attention": attention,
            "adamw": adamw,
            "accumulating": accumulating,
            "versions": library_versions(),
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def load_fit(key: str) -> MemoryFit | None:
    """Return the cached fit for ``key``, or None when there is none or it cannot be read."""
    path = cache_dir() / f"{key}.json"
    try:
        return MemoryFit.from_json(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError) as error:
        logger.warning("ignoring unreadable cached memory fit %s: %s", path, error)
        return None


def store_fit(fit: MemoryFit) -> None:
    """Write ``fit`` to the cache atomically; a failure to write is logged, not raised."""
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        text = fit.to_json()
        write_text_atomically(folder / f"{fit.key}.json", text)
    except OSError as error:
        logger.warning("cannot write the memory-fit cache in %s: %s", folder, error)
