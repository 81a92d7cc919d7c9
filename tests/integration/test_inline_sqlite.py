"""SQLite transactions on the event loop's thread (shared/inline_sqlite.py): what they read and
write is what the worker's transactions see, a read never writes, and where an inline
transaction would wait for another process's lock it does not hold the loop up: it runs on the
worker, which waits for the lock while the loop goes on serving."""

from __future__ import annotations

import asyncio
import sqlite3
import time

import pytest
from sqlalchemy import text

from shared.db import Database


@pytest.fixture
async def database(tmp_path):
    path = tmp_path / "inline.db"
    db = Database(f"sqlite+aiosqlite:///{path}")

    async def create(uow):
        await uow.session.execute(text("CREATE TABLE t (k TEXT PRIMARY KEY, v INTEGER)"))

    await db.transaction(create)
    try:
        yield db, path
    finally:
        await db.dispose()


async def _put(uow, key: str, value: int) -> None:
    await uow.session.execute(text("INSERT INTO t VALUES (:k, :v)"), {"k": key, "v": value})


async def _get(uow, key: str):
    return (await uow.session.execute(text("SELECT v FROM t WHERE k = :k"), {"k": key})).scalar()


async def test_inline_and_worker_transactions_see_each_others_commits(database):
    db, _ = database
    await db.transaction_inline(lambda uow: _put(uow, "inline", 1))
    await db.transaction(lambda uow: _put(uow, "worker", 2))
    assert await db.read_inline(lambda uow: _get(uow, "worker")) == 2
    assert await db.read(lambda uow: _get(uow, "inline")) == 1


async def test_an_inline_transaction_that_fails_leaves_nothing(database):
    db, _ = database

    async def half(uow):
        await _put(uow, "half", 1)
        raise RuntimeError("the work failed after its first write")

    with pytest.raises(RuntimeError):
        await db.transaction_inline(half)
    assert await db.read(lambda uow: _get(uow, "half")) is None


async def test_a_write_in_an_inline_read_leaves_nothing(database):
    """The reading connection is query_only, so the write fails there; the read then runs on
    the worker like any read, whose transaction is rolled back: nothing is committed."""
    db, _ = database
    await db.read_inline(lambda uow: _put(uow, "sneaky", 1))
    assert await db.read(lambda uow: _get(uow, "sneaky")) is None


async def test_a_lock_held_by_another_process_does_not_stop_the_loop(database):
    db, path = database
    other = sqlite3.connect(path, isolation_level=None, timeout=0)
    other.execute("BEGIN IMMEDIATE")  # another writer (a replica, a migration) holds the lock
    try:
        started = time.monotonic()
        write = asyncio.create_task(db.transaction_inline(lambda uow: _put(uow, "waited", 7)))
        for _ in range(50):  # the loop keeps turning while the write waits on the worker
            await asyncio.sleep(0.01)
        # Had the inline attempt waited for the lock on the loop's thread, it would have held
        # the loop for the busy timeout (5 s) before these ticks could run.
        assert time.monotonic() - started < 2.5
        assert not write.done()
        # Reads of a WAL database do not wait for the writer at all.
        assert await asyncio.wait_for(db.read_inline(lambda uow: _get(uow, "waited")), 1) is None
    finally:
        other.execute("ROLLBACK")
        other.close()
    await asyncio.wait_for(write, 10)
    assert await db.read_inline(lambda uow: _get(uow, "waited")) == 7
