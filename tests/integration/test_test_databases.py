"""The migrated PostgreSQL databases tests are handed (tests/support/databases.py) are as new:
one reused after a test holds nothing of it, and one whose schema a test changed is never
handed out as migrated again."""

from __future__ import annotations

import asyncpg

from tests.support import databases
from tests.support.databases import create_postgres_database, drop_postgres_database


def plain(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://")


async def contents(url: str) -> dict:
    """Every row of every table and every sequence's place."""
    database = await asyncpg.connect(plain(url), timeout=5)
    try:
        tables = await database.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1"
        )
        out = {
            t: sorted(map(tuple, await database.fetch(f'SELECT * FROM "{t}"'))) for (t,) in tables
        }
        sequences = await database.fetch(
            "SELECT sequencename, last_value FROM pg_sequences WHERE schemaname = 'public'"
        )
        out["sequences"] = sorted(map(tuple, sequences))
        return out
    finally:
        await database.close()


async def test_a_reused_migrated_database_holds_nothing_of_the_last_test():
    url = await create_postgres_database("quota")
    new = await contents(url)
    assert new["outbox_counter"] == [(1, 0)]  # the migrations' own row
    database = await asyncpg.connect(plain(url), timeout=5)
    try:
        await database.execute("UPDATE outbox_counter SET last_sequence = 7")
        await database.execute(
            "INSERT INTO outbox_events (sequence, event_id, event_type, envelope, "
            "create_time_us, account_id, region) VALUES (1, 'e1', 't', '', 0, 'a', 'r')"
        )
    finally:
        await database.close()
    assert await contents(url) != new
    await drop_postgres_database(url)
    again = await create_postgres_database("quota")
    try:
        assert again == url, "the cleaned database is handed out again"
        assert await contents(again) == new
    finally:
        await drop_postgres_database(again)


async def test_a_database_whose_schema_changed_is_not_handed_out_as_migrated():
    url = await create_postgres_database("quota")
    database = await asyncpg.connect(plain(url), timeout=5)
    try:
        await database.execute("ALTER TABLE packages ADD COLUMN leftover bigint")
    finally:
        await database.close()
    await drop_postgres_database(url)
    name = url.rsplit("/", 1)[1]
    assert name not in databases._SPARE.get("quota", [])
    assert name in databases._SPARE.get("", [])
    empty = await create_postgres_database()
    try:
        assert empty == url
        assert await contents(empty) == {"sequences": []}
    finally:
        await drop_postgres_database(empty)
