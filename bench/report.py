"""What every benchmark ends with: its numbers printed, and the same JSON written to a file."""
from __future__ import annotations

import json
import os


def report(result: dict, path: str) -> None:
    """Prints `result` as JSON and writes it to `path` (folders created)."""
    print(json.dumps(result, indent=2))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
