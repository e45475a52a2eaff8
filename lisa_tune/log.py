"""The single ``lisa_tune`` root logger; every module logs through ``logging.getLogger(__name__)``."""

from __future__ import annotations

import logging
import os
import sys

ROOT_LOGGER_NAME = "lisa_tune"


def configure_logging(verbosity: int = 0) -> logging.Logger:
    """Set the ``lisa_tune`` logger's level from ``-v``/``-q`` counts and attach one stderr handler.

    ``verbosity`` 0 logs warnings and info, 1 or more adds debug, -1 keeps warnings, -2 or less keeps errors.
    """
    if verbosity >= 1:
        level = logging.DEBUG
    elif verbosity == 0:
        level = logging.INFO
    elif verbosity == -1:
        level = logging.WARNING
    else:
        level = logging.ERROR

    logger = logging.getLogger(ROOT_LOGGER_NAME)
    logger.setLevel(level)
    # Replace the handler on every call: it binds the current sys.stderr, which test runners and notebooks swap.
    for handler in [h for h in logger.handlers if getattr(h, "_lisa_tune", False)]:
        logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler._lisa_tune = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.propagate = False
    # Libraries lisa-tune drives log through their own loggers; -q quiets their warnings too.
    library_level = logging.ERROR if verbosity < 0 else logging.WARNING
    for library in ("transformers", "torch", "accelerate"):
        logging.getLogger(library).setLevel(library_level)
    # transformers reads this variable when it is first imported, which comes later; a value the user set stays.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error" if verbosity < 0 else "warning")

    return logger
