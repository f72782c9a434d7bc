"""Durable density accumulators (LLMS Eq. 1 running sums per token) of every context, in SQLite.

Owns one small table in the KV directory: context id -> float64 prob_sum and row_count arrays. Written by the
write-back thread after each call and read when a context is first used after a restart, so levels keep moving only
down across restarts. Ignores chunks (derived from the arrays on demand) and text (the catalogue).
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from llmaas.storage.sqlite_db import open_database

_SCHEMA = "CREATE TABLE IF NOT EXISTS density (context_id TEXT PRIMARY KEY, prob_sum BLOB, row_count BLOB)"


class DensityStore:
    def __init__(self, path: Path) -> None:
        self._db = open_database(path, _SCHEMA)
        self._lock = threading.Lock()  # one connection shared by the compute and write-back threads

    def save(self, context_id: str, prob_sum: np.ndarray, row_count: np.ndarray) -> None:
        with self._lock:
            row = (context_id, prob_sum.astype(np.float64).tobytes(), row_count.astype(np.float64).tobytes())
            self._db.execute("INSERT OR REPLACE INTO density VALUES (?, ?, ?)", row)

    def load(self, context_id: str) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            row = self._db.execute("SELECT prob_sum, row_count FROM density WHERE context_id = ?",
                                   (context_id,)).fetchone()
        if row is None:
            return np.zeros(0), np.zeros(0)
        return np.frombuffer(row[0], dtype=np.float64).copy(), np.frombuffer(row[1], dtype=np.float64).copy()

    def delete(self, context_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM density WHERE context_id = ?", (context_id,))

    def retain(self, live_context_ids: set[str]) -> None:
        """Forget contexts that no longer exist (deleted while the service was down)."""
        with self._lock:
            ids = [r[0] for r in self._db.execute("SELECT context_id FROM density")]
            for cid in ids:
                if cid not in live_context_ids:
                    self._db.execute("DELETE FROM density WHERE context_id = ?", (cid,))

    def close(self) -> None:
        with self._lock:
            self._db.close()
