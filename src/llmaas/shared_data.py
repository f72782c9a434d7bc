"""Reading the shared data sets (JSONL), with an error that says what is missing. Where they live is paths.py's
business (`$LLMAAS_DATA`). Ignores what any set means."""

from __future__ import annotations

import json
from pathlib import Path


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: this needs the shared data sets (../shared/data beside the "
                                "checkout, or set LLMAAS_DATA)")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
