"""The SQLite index of committed chunk versions: (context, chunk index) -> where its record lies and what it holds.

Owns the commit point of the disk tier: a row exists only once its record is durable, and a write-back's rows land in
one transaction (WAL, synchronous=FULL), so after a crash every row points at complete bytes. Ignores the bytes
themselves and the files' lifecycle (chunk_log.py).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmaas.storage.sqlite_db import open_database

SCHEMA_VERSION = 1

_COLUMNS = ("context_id, chunk_index, version, level, token_start, token_end, fill, prefix_hash, segment, "
            "file_offset, record_bytes, header_bytes, section_bytes, n_layers, sections_offset, layer_stride, "
            "group_offset")
_N_COLUMNS = 17
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS chunks (
    context_id TEXT NOT NULL,
    chunk_index INTEGER NOT NULL,
    version INTEGER NOT NULL,
    level INTEGER NOT NULL,
    token_start INTEGER NOT NULL,
    token_end INTEGER NOT NULL,
    fill INTEGER NOT NULL,
    prefix_hash BLOB NOT NULL,
    segment TEXT NOT NULL,
    file_offset INTEGER NOT NULL,
    record_bytes INTEGER NOT NULL,
    header_bytes INTEGER NOT NULL,
    section_bytes INTEGER NOT NULL,
    n_layers INTEGER NOT NULL,
    sections_offset INTEGER NOT NULL,
    layer_stride INTEGER NOT NULL,
    group_offset INTEGER NOT NULL,
    PRIMARY KEY (context_id, chunk_index)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS chunks_by_segment ON chunks(segment);
"""


@dataclass(frozen=True)
class ChunkLocation:
    """A committed chunk version: its identity, what the caller needs to decode it, and where its bytes lie."""

    context_id: str
    chunk_index: int
    version: int
    level: int
    token_start: int
    token_end: int  # exclusive
    fill: int  # valid tokens from token_start
    prefix_hash: bytes
    segment: str  # file name inside the log's directory
    offset: int  # of the chunk's header
    record_bytes: int  # header + sections: the live bytes this chunk holds on disk
    header_bytes: int
    section_bytes: int  # one layer's bytes
    n_layers: int
    sections_offset: int  # file offset of layer 0's section; layer l's is sections_offset + l * layer_stride
    layer_stride: int  # == section_bytes for a lone record; the group's bytes per layer when written in a group
    group_offset: int  # file offset where the write (group) holding this chunk starts

    @property
    def payload_bytes(self) -> int:
        return self.n_layers * self.section_bytes

    @property
    def is_contiguous(self) -> bool:
        """Every layer range of this chunk is one contiguous byte range."""
        return self.layer_stride == self.section_bytes

    def section_offset(self, layer: int) -> int:
        return self.sections_offset + layer * self.layer_stride


class ChunkIndex:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        # One connection shared by the write-back and restore threads, serialised by a lock: statements are short.
        self._db = open_database(self.path, _SCHEMA, SCHEMA_VERSION, "chunk-index")
        self._lock = threading.RLock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def commit(self, rows: Iterable[ChunkLocation], delete: Iterable[ChunkLocation] = ()) -> list[ChunkLocation]:
        """Insert or replace `rows` (and remove the chunks of `delete`) in ONE transaction, the atomic commit point.
        Returns the rows that `rows` replaced."""
        rows = list(rows)
        with self._tx() as db:
            db.executemany("DELETE FROM chunks WHERE context_id=? AND chunk_index=?",
                           [(r.context_id, r.chunk_index) for r in delete])
            replaced = []
            for r in rows:
                old = db.execute(f"SELECT {_COLUMNS} FROM chunks WHERE context_id=? AND chunk_index=?",
                                 (r.context_id, r.chunk_index)).fetchone()
                if old is not None:
                    replaced.append(_row(old))
            db.executemany(f"INSERT OR REPLACE INTO chunks ({_COLUMNS}) VALUES ({', '.join('?' * _N_COLUMNS)})",
                           [_values(r) for r in rows])
        return replaced

    def locations(self, context_id: str) -> dict[int, ChunkLocation]:
        with self._lock:
            cur = self._db.execute(f"SELECT {_COLUMNS} FROM chunks WHERE context_id=? ORDER BY chunk_index",
                                   (context_id,))
            return {row[1]: _row(row) for row in cur}

    def get(self, context_id: str, chunk_index: int) -> ChunkLocation | None:
        with self._lock:
            row = self._db.execute(f"SELECT {_COLUMNS} FROM chunks WHERE context_id=? AND chunk_index=?",
                                   (context_id, chunk_index)).fetchone()
        return None if row is None else _row(row)

    def context_ids(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT DISTINCT context_id FROM chunks ORDER BY context_id")]

    def segment_live_bytes(self, context_id: str) -> dict[str, int]:
        with self._lock:
            cur = self._db.execute("SELECT segment, SUM(record_bytes) FROM chunks WHERE context_id=? GROUP BY segment",
                                   (context_id,))
            return dict(cur.fetchall())

    def group_count(self, context_id: str) -> int:
        """In how many separately written groups the context's live chunks lie (per-layer reads cost one request
        per group and layer)."""
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM (SELECT DISTINCT segment, group_offset FROM chunks "
                                    "WHERE context_id=?)", (context_id,)).fetchone()[0]

    def segment_ends(self) -> dict[str, int]:
        """Every referenced segment -> the end of its last committed record."""
        with self._lock:
            cur = self._db.execute("SELECT segment, MAX(MAX(file_offset + header_bytes), "
                                   "MAX(sections_offset + (n_layers - 1) * layer_stride + section_bytes)) "
                                   "FROM chunks GROUP BY segment")
            return dict(cur.fetchall())

    def delete_context(self, context_id: str) -> list[ChunkLocation]:
        with self._tx() as db:
            rows = [_row(r) for r in db.execute(f"SELECT {_COLUMNS} FROM chunks WHERE context_id=?", (context_id,))]
            db.execute("DELETE FROM chunks WHERE context_id=?", (context_id,))
        return rows

    def live_totals(self) -> tuple[int, int]:
        """(committed records, their bytes) over every context."""
        with self._lock:
            n, total = self._db.execute("SELECT COUNT(*), COALESCE(SUM(record_bytes), 0) FROM chunks").fetchone()
        return int(n), int(total)


def _values(r: ChunkLocation) -> tuple[object, ...]:
    return (r.context_id, r.chunk_index, r.version, r.level, r.token_start, r.token_end, r.fill, r.prefix_hash,
            r.segment, r.offset, r.record_bytes, r.header_bytes, r.section_bytes, r.n_layers, r.sections_offset,
            r.layer_stride, r.group_offset)


def _row(row: tuple[Any, ...]) -> ChunkLocation:  # a SELECT {_COLUMNS} row, as sqlite3 gives it
    return ChunkLocation(row[0], row[1], row[2], row[3], row[4], row[5], row[6], bytes(row[7]), *row[8:])
