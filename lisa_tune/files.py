"""Writing files so that a failure or an interruption never leaves a partial file behind."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """Write through a temporary file in the same folder and rename it, so no partial file is left behind."""
    path = path.expanduser()
    handle, temporary_name = tempfile.mkstemp(dir=path.resolve().parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    temporary = Path(temporary_name)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(temporary)
        # mkstemp creates the file readable by its owner only; give it the mode a plain open() would.
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_text_atomically(path: Path, text: str) -> None:
    """Write ``text`` as UTF-8 to ``path`` through ``write_atomically``."""
    write_atomically(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def write_png_atomically(path: Path, figure: Any, dpi: int = 110) -> None:
    """Save a matplotlib figure to ``path`` as PNG through ``write_atomically``."""
    write_atomically(path, lambda temporary: figure.savefig(temporary, format="png", dpi=dpi))
