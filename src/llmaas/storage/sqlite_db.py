"""Opening llmaas's SQLite files the one way they are all opened: shared connection, WAL, synchronous=FULL.

Owns the connection settings every durable store relies on (a committed row survives kill -9 and power loss) and the
schema-version check. Ignores tables: each store passes its own schema.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path


def open_database(path: Path, schema_sql: str, schema_version: int | None = None, what: str = "database",
                  error: type[Exception] = RuntimeError,
                  migrations: dict[int, str] | None = None) -> sqlite3.Connection:
    """A connection usable from several threads (callers serialise statements with a lock), with `schema_sql`
    applied. With schema_version, the file's `meta` table must say that version, else `error` is raised; a file at
    an older version v is first brought forward by `migrations[v]` (SQL taking v to v + 1), each in one transaction."""
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30.0)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.executescript(schema_sql)
    if schema_version is not None:
        db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(schema_version),))
        version = int(db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0])
        while version < schema_version and migrations and version in migrations:
            db.executescript(f"BEGIN IMMEDIATE; {migrations[version]}; "
                             f"UPDATE meta SET value='{version + 1}' WHERE key='schema_version'; COMMIT;")
            version += 1
        if version != schema_version:
            db.close()
            raise error(f"{path} has {what} schema {version}; this llmaas reads {schema_version}")
    return db
