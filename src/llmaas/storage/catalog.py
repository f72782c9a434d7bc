"""The SQLite catalogue: apps (keys stored only as hashes, quotas), contexts, their messages and exact token ids.

Owns durability of everything but KV: WAL journal with synchronous=FULL, so a committed turn survives kill -9 and power
loss; every change is one transaction (a turn is its two messages plus the new token ids, or nothing). Ignores KV
and the model: token ids are stored as given, and the KV that covers them is the engine's business.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import secrets
import sqlite3
import threading
import time
from array import array
from pathlib import Path
from types import TracebackType

from llmaas.errors import LlmaasError, StorageError
from llmaas.records import OVERFLOW_MODES, App, ContextRecord, Message
from llmaas.storage.sqlite_db import open_database

SCHEMA_VERSION = 3
DEFAULT_MAX_CONTEXTS = 8  # K of LLMS: contexts per app
DEFAULT_MAX_CONTEXT_TOKENS = 2048
MAX_PENDING_LIMIT = 10_000  # per-app queue bound: anything larger is a typo, not a plan
APP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS apps (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    key_hash TEXT NOT NULL UNIQUE,
    max_contexts INTEGER NOT NULL,
    max_context_tokens INTEGER NOT NULL,
    created_at REAL NOT NULL,
    max_pending INTEGER  -- calls the app may have waiting; NULL: the service's default (serve --max-queue)
);
CREATE TABLE IF NOT EXISTS contexts (
    id TEXT PRIMARY KEY,
    app_id INTEGER NOT NULL REFERENCES apps(id) ON DELETE CASCADE,
    token_ids BLOB NOT NULL,
    num_calls INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    overflow TEXT NOT NULL DEFAULT 'window',  -- past the limit: 'window' (attention-sink window) or 'error'
    dropped_tokens INTEGER NOT NULL DEFAULT 0  -- ids that left the window (token_ids holds the retained ones)
);
CREATE INDEX IF NOT EXISTS contexts_by_app ON contexts(app_id);
CREATE TABLE IF NOT EXISTS messages (
    context_id TEXT NOT NULL REFERENCES contexts(id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (context_id, seq)
);
"""
_MIGRATIONS = {1: "ALTER TABLE apps ADD COLUMN max_pending INTEGER",
               2: "ALTER TABLE contexts ADD COLUMN overflow TEXT NOT NULL DEFAULT 'window'; "
                  "ALTER TABLE contexts ADD COLUMN dropped_tokens INTEGER NOT NULL DEFAULT 0"}
_CONTEXT_COLUMNS = "id, app_id, token_ids, num_calls, created_at, updated_at, overflow, dropped_tokens"
_APP_COLUMNS = "id, name, max_contexts, max_context_tokens, created_at, max_pending"


class CatalogError(LlmaasError):
    """A catalogue operation was refused (duplicate or invalid app name, unknown app)."""


class QuotaError(LlmaasError):
    """An app is at one of its limits."""


def hash_key(key: str) -> str:
    """Keys are 256-bit random strings, so a plain SHA-256 is enough (nothing to brute-force)."""
    return hashlib.sha256(key.encode()).hexdigest()


def _new_key() -> str:
    return "llmaas-" + secrets.token_urlsafe(32)


def _ids_to_blob(ids: tuple[int, ...] | list[int]) -> bytes:
    return array("i", ids).tobytes()


def _blob_to_ids(blob: bytes) -> tuple[int, ...]:
    a = array("i")
    a.frombytes(blob)
    return tuple(a)


class Catalog:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        # One connection shared by the HTTP and engine threads, serialised by a lock: every statement is short.
        self._db = open_database(self.path, "PRAGMA foreign_keys=ON;" + _SCHEMA, SCHEMA_VERSION, "catalogue",
                                 CatalogError, _MIGRATIONS)
        self._lock = threading.RLock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _tx(self) -> _Transaction:
        return _Transaction(self._db, self._lock)

    # -- apps ----------------------------------------------------------------------------------------------------

    def add_app(self, name: str, max_contexts: int = DEFAULT_MAX_CONTEXTS,
                max_context_tokens: int = DEFAULT_MAX_CONTEXT_TOKENS,
                max_pending: int | None = None) -> tuple[App, str]:
        """Register an app; returns it and its key (shown once, stored only as a hash)."""
        if not APP_NAME.match(name):
            raise CatalogError(f"app name {name!r} must be 1-64 of letters, digits, '.', '_' or '-'")
        if max_contexts < 1 or max_context_tokens < 16:
            raise CatalogError("max_contexts must be >= 1 and max_context_tokens >= 16")
        if max_pending is not None and not 1 <= max_pending <= MAX_PENDING_LIMIT:
            raise CatalogError(f"max_pending must be in 1..{MAX_PENDING_LIMIT}")
        key = _new_key()
        now = time.time()
        with self._tx() as db:
            if db.execute("SELECT 1 FROM apps WHERE name=?", (name,)).fetchone():
                raise CatalogError(f"an app named {name!r} already exists; remove it first or pick another name")
            cur = db.execute("INSERT INTO apps (name, key_hash, max_contexts, max_context_tokens, created_at, "
                             "max_pending) VALUES (?, ?, ?, ?, ?, ?)",
                             (name, hash_key(key), max_contexts, max_context_tokens, now, max_pending))
        assert cur.lastrowid is not None  # set by the INSERT above
        return App(int(cur.lastrowid), name, max_contexts, max_context_tokens, now, max_pending), key

    def rotate_key(self, name: str) -> str:
        """Give an app a new key; the old one stops working at once (every request looks its key up here)."""
        key = _new_key()
        with self._tx() as db:
            if db.execute("UPDATE apps SET key_hash=? WHERE name=?", (hash_key(key), name)).rowcount != 1:
                raise CatalogError(f"no app named {name!r}")
        return key

    def remove_app(self, name: str) -> list[str]:
        """Remove an app and all its contexts; returns the removed context ids."""
        with self._tx() as db:
            row = db.execute("SELECT id FROM apps WHERE name=?", (name,)).fetchone()
            if row is None:
                raise CatalogError(f"no app named {name!r}")
            ids = [r[0] for r in db.execute("SELECT id FROM contexts WHERE app_id=?", (row[0],))]
            db.execute("DELETE FROM apps WHERE id=?", (row[0],))
        return ids

    def list_apps(self) -> list[tuple[App, int]]:
        """Every app with its number of contexts."""
        with self._lock:
            rows = self._db.execute(
                "SELECT a.id, a.name, a.max_contexts, a.max_context_tokens, a.created_at, a.max_pending, COUNT(c.id) "
                "FROM apps a LEFT JOIN contexts c ON c.app_id = a.id GROUP BY a.id ORDER BY a.name").fetchall()
        return [(App(*r[:6]), r[6]) for r in rows]

    def app_for_key(self, key: str) -> App | None:
        with self._lock:
            row = self._db.execute(f"SELECT {_APP_COLUMNS} FROM apps WHERE key_hash=?", (hash_key(key),)).fetchone()
        return App(*row) if row else None

    # -- contexts ------------------------------------------------------------------------------------------------

    def create_context(self, app: App, system_prompt: str | None, overflow: str = "window") -> ContextRecord:
        """A new context of `app`; overflow: what its calls do past the limit (records.OVERFLOW_MODES)."""
        if overflow not in OVERFLOW_MODES:
            raise CatalogError(f"overflow must be one of {', '.join(OVERFLOW_MODES)}; got {overflow!r}")
        ctx_id = "ctx-" + secrets.token_urlsafe(18)
        now = time.time()
        with self._tx() as db:
            (count,) = db.execute("SELECT COUNT(*) FROM contexts WHERE app_id=?", (app.id,)).fetchone()
            if count >= app.max_contexts:
                raise QuotaError(
                    f"app {app.name!r} already holds {count} contexts, its limit; delete one first"
                )
            db.execute("INSERT INTO contexts (id, app_id, token_ids, created_at, updated_at, overflow) "
                       "VALUES (?, ?, ?, ?, ?, ?)", (ctx_id, app.id, b"", now, now, overflow))
            messages: tuple[Message, ...] = ()
            if system_prompt is not None:
                db.execute("INSERT INTO messages VALUES (?, 0, 'system', ?, ?)", (ctx_id, system_prompt, now))
                messages = (Message("system", system_prompt),)
        return ContextRecord(ctx_id, app.id, messages, (), 0, now, now, overflow)

    def get_context(self, app_id: int, ctx_id: str) -> ContextRecord | None:
        """The context if it exists and belongs to app_id; another app's context is indistinguishable from none."""
        with self._lock:
            row = self._db.execute(f"SELECT {_CONTEXT_COLUMNS} FROM contexts WHERE id=? AND app_id=?",
                                   (ctx_id, app_id)).fetchone()
            if row is None:
                return None
            msgs = self._db.execute("SELECT role, content FROM messages WHERE context_id=? ORDER BY seq",
                                    (ctx_id,)).fetchall()
        return ContextRecord(row[0], row[1], tuple(Message(*m) for m in msgs), _blob_to_ids(row[2]), *row[3:])

    def all_context_ids(self) -> set[str]:
        with self._lock:
            return {r[0] for r in self._db.execute("SELECT id FROM contexts")}

    def list_contexts(self, app_id: int) -> list[ContextRecord]:
        with self._lock:
            ids = [r[0] for r in self._db.execute("SELECT id FROM contexts WHERE app_id=? ORDER BY created_at",
                                                  (app_id,))]
        return [c for c in (self.get_context(app_id, i) for i in ids) if c is not None]

    def delete_context(self, app_id: int, ctx_id: str) -> bool:
        with self._tx() as db:
            return db.execute("DELETE FROM contexts WHERE id=? AND app_id=?", (ctx_id, app_id)).rowcount == 1

    def commit_turn(self, app_id: int, ctx_id: str, base_tokens: int, user: str, assistant: str,
                    token_ids: list[int] | tuple[int, ...], dropped_tokens: int = 0) -> bool:
        """Append a user and an assistant message and set the context's token ids, atomically and durably;
        dropped_tokens: ids that left its window in this turn (token_ids is then the retained window).

        Refused (False) if the context is gone or no longer has `base_tokens` tokens (changed under the call)."""
        now = time.time()
        with self._tx() as db:
            row = db.execute("SELECT length(token_ids) FROM contexts WHERE id=? AND app_id=?",
                             (ctx_id, app_id)).fetchone()
            if row is None or row[0] != base_tokens * array("i").itemsize:
                return False
            (seq,) = db.execute("SELECT COALESCE(MAX(seq), 0) FROM messages WHERE context_id=?", (ctx_id,)).fetchone()
            db.executemany("INSERT INTO messages VALUES (?, ?, ?, ?, ?)",
                           [(ctx_id, seq + 1, "user", user, now), (ctx_id, seq + 2, "assistant", assistant, now)])
            db.execute("UPDATE contexts SET token_ids=?, num_calls=num_calls+1, updated_at=?, "
                       "dropped_tokens=dropped_tokens+? WHERE id=?", (_ids_to_blob(token_ids), now, dropped_tokens,
                                                                      ctx_id))
        return True


class _Transaction:
    """`with catalog._tx() as db:` one IMMEDIATE transaction under the connection lock; rolled back on error. A write
    the disk refuses (full, read-only, I/O error) becomes a StorageError: nothing of it was saved."""

    def __init__(self, db: sqlite3.Connection, lock: threading.RLock) -> None:
        self._db, self._lock = db, lock

    def __enter__(self) -> sqlite3.Connection:
        self._lock.acquire()
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            self._lock.release()
            raise _storage_error(exc) from exc
        return self._db

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            if exc_type is not None:
                with contextlib.suppress(sqlite3.OperationalError):  # SQLite may have rolled back already (SQLITE_FULL)
                    self._db.execute("ROLLBACK")
                if isinstance(exc, sqlite3.OperationalError):
                    raise _storage_error(exc) from exc
                return
            try:
                self._db.execute("COMMIT")
            except sqlite3.OperationalError as commit_exc:
                with contextlib.suppress(sqlite3.OperationalError):
                    self._db.execute("ROLLBACK")
                raise _storage_error(commit_exc) from commit_exc
        finally:
            self._lock.release()


def _storage_error(exc: sqlite3.OperationalError) -> LlmaasError:
    """The caller's error for a catalogue write that failed: a StorageError when the disk refused it."""
    text = str(exc).lower()
    if any(s in text for s in ("full", "readonly", "read-only", "i/o error", "unable to open")):
        return StorageError(f"the service could not save to its data directory ({exc}): nothing of this request was "
                            "saved; the operator must free disk space or make the directory writable, then retry")
    return CatalogError(f"the catalogue refused a write ({exc}); nothing of this request was saved")
