"""Fixtures shared by every test folder: real databases and real quota servers."""

from __future__ import annotations

import pytest

from tests.support.databases import (
    create_postgres_database,
    drop_postgres_database,
    schema_for,
)
from tests.support.servers import Tokens, running_quota, test_settings


@pytest.fixture(params=["sqlite", "postgresql"])
async def database_url(request, tmp_path):
    """A fresh database of each dialect: empty, or for the tests of the `quota` fixture on
    PostgreSQL at quota's migration head (tests/support/databases.py `schema_for`; SQLite's
    migrated copy is made by `running_quota`)."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'quota.db'}"
        return
    url = await create_postgres_database(schema_for(request.fixturenames))
    try:
        yield url
    finally:
        await drop_postgres_database(url)


@pytest.fixture(params=["sqlite", "postgresql"])
async def quota_and_billing_urls(request, tmp_path):
    """(quota, billing): a fresh quota database and a fresh billing database of each dialect."""
    if request.param == "sqlite":
        yield (
            f"sqlite+aiosqlite:///{tmp_path / 'quota.db'}",
            f"sqlite+aiosqlite:///{tmp_path / 'billing.db'}",
        )
        return
    quota_url = await create_postgres_database()
    billing_url = await create_postgres_database()
    try:
        yield quota_url, billing_url
    finally:
        await drop_postgres_database(quota_url)
        await drop_postgres_database(billing_url)


@pytest.fixture
def tokens() -> Tokens:
    return Tokens()


@pytest.fixture
async def quota(database_url, tmp_path):
    """A quota server (manual clock at 2024-01-01T00:00:00Z) serving every catalog region."""
    settings = test_settings(
        database_url, tmp_path, clock="manual", clock_start="2024-01-01T00:00:00Z"
    )
    async with running_quota(settings) as handle:
        yield handle
