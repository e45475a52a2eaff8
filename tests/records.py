"""Small training files that the test modules write to their temporary folders."""

from __future__ import annotations

import json
from pathlib import Path


def write_records(path: Path, count: int = 120) -> Path:
    """Write ``count`` Alpaca-layout records of simple sums to ``path`` as JSONL and return the path."""
    records = [
        {"instruction": f"Add {i} and {i + 3}.", "input": "", "output": f"The sum is {2 * i + 3}.", "status": "ok"}
        for i in range(count)
    ]
    path.write_text("\n".join(json.dumps(record) for record in records) + "\n", encoding="utf-8")
    return path
