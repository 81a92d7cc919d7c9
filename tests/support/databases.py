"""Real databases for tests: a SQLite file per test, a fresh PostgreSQL database per test.

PostgreSQL is at ALLOT_TEST_POSTGRES_URL (default the machine's 127.0.0.1:5432, trust auth).
Where it is unreachable its tests are skipped — except under CI=true, where they fail.
"""

from __future__ import annotations

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


async def create_postgres_database() -> str:
    """Create an empty database and return its SQLAlchemy (asyncpg) URL."""
    name = f"allot_test_{uuid.uuid4().hex[:12]}"
    conn = await _admin_connection()
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
    return f"{base}/{name}"


async def drop_postgres_database(url: str) -> None:
    name = url.rsplit("/", 1)[1]
    conn = await _admin_connection()
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()
