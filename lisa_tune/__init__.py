"""lisa-tune: plan, tune and run LISA fine-tuning of large language models.

``LisaCallback`` runs LISA inside a Hugging Face ``Trainer``. The command line lives in ``lisa_tune.cli``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lisa_tune.lisa.callback import LisaCallback

__all__ = ["LisaCallback"]


def __getattr__(name: str) -> Any:
    # Importing ``LisaCallback`` imports torch and transformers, which take seconds, so the package root loads it
    # on first access and commands that need neither stay fast.
    if name == "LisaCallback":
        from lisa_tune.lisa.callback import LisaCallback

        return LisaCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
