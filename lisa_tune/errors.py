"""Typed errors that the command line turns into one message and an exit status."""

from __future__ import annotations


class LisaTuneError(Exception):
    """Base class of the errors lisa-tune reports to the user without a traceback."""

    exit_code: int = 1


class InputError(LisaTuneError, ValueError):
    """Invalid user input: a flag value, a config file or a model name. Exit status 2."""

    exit_code = 2


class ModelStructureError(InputError):
    """A model whose decoder layer list cannot be found or is not usable for LISA."""
