"""Fixtures of the end-to-end tests, which start services as processes."""

from __future__ import annotations

import pytest

from tests.support.databases import dialect_database


@pytest.fixture(params=["sqlite", "postgresql"])
async def service_url(request, tmp_path):
    """A fresh, empty database of each dialect for the service process a test starts (the
    process applies its own migrations)."""
    async with dialect_database(request.param, tmp_path / "service.db") as url:
        yield url
