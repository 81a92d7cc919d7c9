"""Pooled PostgreSQL connections that died while idle, recovered without a pre-ping.

The engine does not ping a connection before every transaction (that was one more round trip
on the hot path). A pooled connection ended while idle (`pg_terminate_backend`: a restart, a
failover, an administrator) fails the first statement of the next transaction on it; that is a
lost connection, the whole pool is invalidated and the transaction runs again on a fresh
connection (docs/faults.md "Database faults"). The caller sees nothing of it.
"""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
from sqlalchemy import text

from shared.db import Database
from shared.settings import DatabaseBounds
from tests.support.databases import (
    POSTGRES_ADMIN_URL,
    create_postgres_database,
    drop_postgres_database,
)


@pytest.fixture
async def postgres_url():
    url = await create_postgres_database()  # skips when PostgreSQL is unreachable (not on CI)
    try:
        yield url
    finally:
        await drop_postgres_database(url)


async def _terminate_all(database: str) -> int:
    admin = await asyncpg.connect(POSTGRES_ADMIN_URL, timeout=5)
    try:
        killed = await admin.fetch(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = $1 AND pid <> pg_backend_pid()",
            database,
        )
    finally:
        await admin.close()
    await asyncio.sleep(0.2)  # the terminations reach the (idle) client sockets
    return len(killed)


async def test_idle_pooled_connections_killed_are_replaced_by_a_retry(postgres_url):
    db = Database(postgres_url, DatabaseBounds(retry_attempts=2))
    database = postgres_url.rsplit("/", 1)[1]
    attempts: list[int] = []

    async def backend(uow) -> int:
        attempts.append(1)
        return int((await uow.session.execute(text("SELECT pg_backend_pid()"))).scalar_one())

    try:
        # Fill the pool with several connections, then end every one of them while idle.
        before = set(await asyncio.gather(*(db.transaction(backend) for _ in range(5))))
        assert len(before) > 1
        assert await _terminate_all(database) >= len(before)
        attempts.clear()

        # Every transaction after that succeeds (two attempts at most: the retry runs on a
        # fresh connection), concurrent ones too, and none runs on a dead backend.
        after = await asyncio.gather(*(db.transaction(backend) for _ in range(5)))
        assert not set(after) & before
        assert len(attempts) <= 2 * len(after)
        assert await db.read(backend) not in before
    finally:
        await db.dispose()


async def test_reads_recover_from_a_killed_idle_connection_too(postgres_url):
    db = Database(postgres_url, DatabaseBounds(retry_attempts=2))
    database = postgres_url.rsplit("/", 1)[1]
    try:
        assert await db.read(lambda uow: uow.rows(text("SELECT 1"))) == [(1,)]
        await _terminate_all(database)
        assert await db.read(lambda uow: uow.rows(text("SELECT 2"))) == [(2,)]
    finally:
        await db.dispose()
