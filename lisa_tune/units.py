"""Byte sizes: GB is 10^9 bytes and GiB is 2^30 bytes, in parsing and in printing."""

from __future__ import annotations

import re
from decimal import Decimal

GB = 10**9
GIB = 2**30
MIB = 2**20

_SIZE_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": GB,
    "tb": 10**12,
    "kib": 2**10,
    "mib": MIB,
    "gib": GIB,
    "tib": 2**40,
}
_SIZE_PATTERN = re.compile(r"^\s*(?P<number>[+-]?\d+(?:\.\d+)?)\s*(?P<unit>[a-zA-Z]*)\s*$")


def parse_size(text: str) -> int:
    """Parse ``24GB`` (24 x 10^9 bytes), ``24GiB`` (24 x 2^30 bytes) or a plain byte count into bytes.

    Raises ``ValueError`` with the accepted units when the text is not a positive size.
    """
    match = _SIZE_PATTERN.match(text)
    if match is None:
        raise ValueError(f"invalid size {text!r}: expected a number and a unit such as 24GB or 24GiB")
    unit = match.group("unit").lower() or "b"
    if unit not in _SIZE_UNITS:
        accepted = ", ".join(sorted(_SIZE_UNITS))
        raise ValueError(f"invalid size unit in {text!r}: use one of {accepted} (GB = 10^9 bytes, GiB = 2^30 bytes)")
    # Decimal keeps 2.01GB at exactly 2,010,000,000 bytes, which binary floating point would round down.
    value = Decimal(match.group("number")) * _SIZE_UNITS[unit]
    if value <= 0:
        raise ValueError(f"invalid size {text!r}: a size must be greater than zero")
    return int(value)


def format_gib(nbytes: float) -> str:
    """Format a byte count in GiB with two decimals, for tables."""
    return f"{nbytes / GIB:.2f} GiB"


def format_bytes(nbytes: float) -> str:
    """Format a byte count with a binary unit that keeps the number readable."""
    size = float(nbytes)
    for unit, factor in (("GiB", GIB), ("MiB", MIB), ("KiB", 2**10)):
        if abs(size) >= factor:
            return f"{size / factor:.2f} {unit}"
    return f"{int(size)} B"
