"""The single ``lisa_tune`` root logger; every module logs through ``logging.getLogger(__name__)``."""

from __future__ import annotations

import logging

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
    if not any(getattr(handler, "_lisa_tune", False) for handler in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        handler._lisa_tune = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.propagate = False
    return logger
