"""Real databases for tests: a SQLite file per test, an empty PostgreSQL database per test.

PostgreSQL is at ALLOT_TEST_POSTGRES_URL (default the machine's 127.0.0.1:5432, trust auth).
Where it is unreachable its tests are skipped — except under CI=true, where they fail.

CREATE DATABASE costs ~0.4 s here (it copies and syncs the template), more than most tests.
So a database a test is done with is emptied instead of dropped (its connections ended, its
`public` schema dropped and created again: nothing of the test is left) and handed to the next
test of this process; whatever this process still holds is dropped when it exits.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import uuid

import asyncpg
import pytest

POSTGRES_ADMIN_URL = os.environ.get(
    "ALLOT_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REQUIRED = os.environ.get("CI", "").lower() in ("1", "true", "yes")


async def _admin_connection() -> asyncpg.Connection:
    try:
        return await asyncpg.connect(POSTGRES_ADMIN_URL, timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        if REQUIRED:
            pytest.fail(f"PostgreSQL is required under CI=true but unreachable: {exc}")
        pytest.skip(f"PostgreSQL unreachable at {POSTGRES_ADMIN_URL}: {exc}")


# Emptied databases of this process, ready for its next test.
_SPARE: list[str] = []
_OURS: set[str] = set()


def _url(name: str) -> str:
    base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
    return f"{base}/{name}"


async def create_postgres_database() -> str:
    """An empty database (new, or emptied after an earlier test); its SQLAlchemy (asyncpg) URL."""
    if _SPARE:
        return _url(_SPARE.pop())
    name = f"allot_test_{uuid.uuid4().hex[:12]}"
    conn = await _admin_connection()
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    _OURS.add(name)
    return _url(name)


async def drop_postgres_database(url: str) -> None:
    """Done with the database: end its connections and empty it for the next test."""
    name = url.rsplit("/", 1)[1]
    conn = await _admin_connection()
    try:
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = $1 AND pid <> pg_backend_pid()",
            name,
        )
        try:
            await _empty(name)
        except (OSError, asyncpg.PostgresError):
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            _OURS.discard(name)
            return
    finally:
        await conn.close()
    if name in _OURS:
        _SPARE.append(name)


async def _empty(name: str) -> None:
    database = await asyncpg.connect(POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}", timeout=5)
    try:
        await database.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    finally:
        await database.close()


async def _drop_ours() -> None:
    conn = await asyncpg.connect(POSTGRES_ADMIN_URL, timeout=5)
    try:
        for name in sorted(_OURS):
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@atexit.register
def _drop_at_exit() -> None:
    if _OURS:
        try:
            asyncio.run(_drop_ours())
        except (OSError, asyncpg.PostgresError):
            pass  # PostgreSQL is gone already: nothing to clean
