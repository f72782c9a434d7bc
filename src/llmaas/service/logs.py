"""Structured logs: one JSON object per line (time, level, logger, event and its fields), to stderr and a file.

Owns the format and where it goes. Code logs with `log.info("event", extra={"fields": {...}})`.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": round(record.created, 3), "level": record.levelname.lower(), "logger": record.name,
                 "event": record.getMessage(), **getattr(record, "fields", {})}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup_logging(log_dir: Path, quiet: bool = False) -> Path:
    """Log llmaas.* as JSON lines to log_dir/service-<date>.jsonl and (unless quiet) to stderr."""
    path = log_dir / f"service-{time.strftime('%Y%m%d')}.jsonl"
    root = logging.getLogger("llmaas")
    root.setLevel(logging.INFO)
    root.handlers.clear()
    handlers: list[logging.Handler] = [logging.FileHandler(path)]
    if not quiet:
        handlers.append(logging.StreamHandler(sys.stderr))
    for h in handlers:
        h.setFormatter(JsonFormatter())
        root.addHandler(h)
    root.propagate = False
    return path
