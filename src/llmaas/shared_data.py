"""Where the shared data sets live (`../shared/data` beside the checkout; `$LLMAAS_DATA` overrides) and reading them.

Owns the location and the JSONL reader with an error that says what is missing. Ignores what any set means.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

DATA_DIR = Path(os.environ.get("LLMAAS_DATA", Path(__file__).resolve().parents[2].parent / "shared" / "data"))


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: this needs the shared data sets (../shared/data beside the "
                                "checkout, or set LLMAAS_DATA)")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
