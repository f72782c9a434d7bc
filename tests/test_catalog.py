"""The SQLite catalogue: keys stored only hashed, quotas, isolation between apps, atomic and guarded turns."""

from __future__ import annotations

import sqlite3

import pytest

from llmaas.engine.scheduler import FairQueue, QueueFullError
from llmaas.errors import StorageError
from llmaas.storage.catalog import Catalog, CatalogError, QuotaError, hash_key


@pytest.fixture
def catalog(tmp_path):
    c = Catalog(tmp_path / "c.sqlite3")
    yield c
    c.close()


def test_keys_are_stored_only_as_hashes(catalog, tmp_path):
    app, key = catalog.add_app("mail")
    assert catalog.app_for_key(key) == app
    assert catalog.app_for_key(key + "x") is None
    raw = sqlite3.connect(tmp_path / "c.sqlite3").execute("SELECT key_hash FROM apps").fetchall()
    assert raw == [(hash_key(key),)] and key not in str(raw)


def test_app_names_are_validated_and_unique(catalog):
    catalog.add_app("notes")
    for bad in ("", "has space", "x" * 65, "../etc"):
        with pytest.raises(CatalogError):
            catalog.add_app(bad)
    with pytest.raises(CatalogError, match="already exists"):
        catalog.add_app("notes")


def test_context_quota_and_isolation(catalog):
    a, _ = catalog.add_app("a", max_contexts=2)
    b, _ = catalog.add_app("b")
    c1 = catalog.create_context(a, "sys")
    catalog.create_context(a, None)
    with pytest.raises(QuotaError, match="limit"):
        catalog.create_context(a, None)
    assert catalog.get_context(b.id, c1.id) is None  # another app's context does not exist for b
    assert not catalog.delete_context(b.id, c1.id)
    assert catalog.get_context(a.id, c1.id).messages[0].content == "sys"
    assert catalog.delete_context(a.id, c1.id)
    catalog.create_context(a, None)  # room again after a delete


def test_turns_commit_atomically_and_only_on_the_expected_base(catalog):
    app, _ = catalog.add_app("a")
    ctx = catalog.create_context(app, None)
    assert catalog.commit_turn(app.id, ctx.id, 0, "hi", "hello", [1, 2, 3])
    assert not catalog.commit_turn(app.id, ctx.id, 0, "again", "stale", [9])  # the context moved on
    rec = catalog.get_context(app.id, ctx.id)
    assert rec.token_ids == (1, 2, 3) and [m.content for m in rec.messages] == ["hi", "hello"] and rec.num_calls == 1
    catalog.delete_context(app.id, ctx.id)
    assert not catalog.commit_turn(app.id, ctx.id, 3, "x", "y", [1, 2, 3, 4])  # deleted meanwhile


def test_removing_an_app_removes_its_contexts(catalog):
    app, key = catalog.add_app("gone")
    ids = {catalog.create_context(app, None).id for _ in range(3)}
    assert set(catalog.remove_app("gone")) == ids
    assert catalog.app_for_key(key) is None and catalog.list_contexts(app.id) == []


def test_fair_queue_round_robins_apps_and_bounds_each_apps_backlog():
    q: FairQueue[str] = FairQueue(max_pending_per_app=3)
    for job in ("a1", "a2", "a3"):
        q.push(1, job)
    with pytest.raises(QueueFullError):
        q.push(1, "a4")  # app 1 is at its bound...
    q.push(2, "b1")  # ...which never refuses app 2
    q.push(3, "c1", limit=1)
    with pytest.raises(QueueFullError):
        q.push(3, "c2", limit=1)  # an app's own bound
    assert (len(q), q.pending(1), q.pending(4)) == (5, 3, 0)
    assert [q.pop(0.1) for _ in range(5)] == ["a1", "b1", "c1", "a2", "a3"]
    assert q.pop(0.01) is None


def test_an_old_catalogue_is_migrated(tmp_path):
    """A version-1 catalogue (before per-app queue bounds and context windows) opens, keeps its apps, keys and
    contexts, and gains the columns: its contexts slide their window past the limit, like new ones."""
    path = tmp_path / "old.sqlite3"
    catalog = Catalog(path)
    app, key = catalog.add_app("old")
    ctx = catalog.create_context(app, "sys")
    catalog.close()
    db = sqlite3.connect(path)
    db.executescript("ALTER TABLE apps DROP COLUMN max_pending; ALTER TABLE contexts DROP COLUMN overflow; "
                     "ALTER TABLE contexts DROP COLUMN dropped_tokens; "
                     "UPDATE meta SET value='1' WHERE key='schema_version';")
    db.close()
    catalog = Catalog(path)
    assert catalog.app_for_key(key) == app and app.max_pending is None
    assert catalog.add_app("new", max_pending=3)[0].max_pending == 3
    assert catalog.get_context(app.id, ctx.id) == ctx and ctx.overflow == "window" and ctx.dropped_tokens == 0
    catalog.close()


def test_a_write_the_disk_refuses_is_a_storage_error_and_saves_nothing(tmp_path):
    """A read-only (or full) data directory: the turn is refused with a StorageError that tells the operator what to
    do, nothing of it is saved, and the catalogue takes writes again once the disk does."""
    catalog = Catalog(tmp_path / "c.sqlite3")
    app, _ = catalog.add_app("x")
    ctx = catalog.create_context(app, "sys")
    catalog._db.execute("PRAGMA query_only=ON")  # SQLite's own read-only switch: writes fail as on a read-only disk
    with pytest.raises(StorageError, match="free disk space or make the directory writable"):
        catalog.commit_turn(app.id, ctx.id, 0, "hi", "hello", [1, 2, 3])
    with pytest.raises(StorageError):
        catalog.create_context(app, None)
    assert catalog.get_context(app.id, ctx.id) == ctx  # reads still work, and nothing was saved
    catalog._db.execute("PRAGMA query_only=OFF")
    assert catalog.commit_turn(app.id, ctx.id, 0, "hi", "hello", [1, 2, 3])
    assert catalog.get_context(app.id, ctx.id).num_calls == 1
    catalog.close()
