"""Fixtures shared by every test folder: real databases and real quota servers."""

from __future__ import annotations

import os
import random
from datetime import timedelta

import hypothesis
import pytest

from tests.support.databases import (
    dialect_database,
    schema_for,
)
from tests.support.quota import quota_settings, running_quota
from tests.support.servers import Tokens

# --- skips under CI=true: tests/support/ci_skips.py fails a CI session on unexpected skips ---
pytest_plugins = ["tests.support.ci_skips"]

# --- Hypothesis: deadlines that fit a loaded 2-core machine -----------------------------------
# `dev` (the default): random examples, a generous 2 s deadline per example, and the blob to
# reproduce a failure printed. `ci` (chosen by CI=true): no deadline (timing is not what these
# properties test) and derandomized, so a CI run is repeatable. HYPOTHESIS_PROFILE or
# --hypothesis-profile choose another.
hypothesis.settings.register_profile("dev", deadline=timedelta(seconds=2), print_blob=True)
hypothesis.settings.register_profile(
    "ci",
    deadline=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[hypothesis.HealthCheck.too_slow],
)


def pytest_configure(config: pytest.Config) -> None:
    from tests.support.ci_skips import ci  # loaded as a plugin above: imported once, rewritten

    if config.getoption("hypothesis_profile", None) is None:
        hypothesis.settings.load_profile(
            os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if ci() else "dev")
        )


# --- seeds: a test's randomness is reproducible from its failure report -----------------------
@pytest.fixture
def seed(request) -> int:
    """A seed for the test's `random.Random`: ALLOT_TEST_SEED when set, else a fresh one. It is
    attached to the test's report, so a failure shows `ALLOT_TEST_SEED=<n>` to rerun with."""
    value = int(os.environ.get("ALLOT_TEST_SEED") or random.SystemRandom().randrange(1 << 32))
    request.node.add_report_section("setup", "seed", f"ALLOT_TEST_SEED={value}")
    return value


@pytest.fixture(params=["sqlite", "postgresql"])
async def database_url(request, tmp_path):
    """A fresh database of each dialect: empty, or for the tests of the `quota` fixture on
    PostgreSQL at quota's migration head (tests/support/databases.py `schema_for`; SQLite's
    migrated copy is made by `running_quota`)."""
    schema = schema_for(request.fixturenames)
    async with dialect_database(request.param, tmp_path / "quota.db", schema) as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
async def quota_and_billing_urls(request, tmp_path):
    """(quota, billing): a fresh quota database and a fresh billing database of each dialect."""
    async with (
        dialect_database(request.param, tmp_path / "quota.db") as quota_url,
        dialect_database(request.param, tmp_path / "billing.db") as billing_url,
    ):
        yield quota_url, billing_url


@pytest.fixture
def tokens() -> Tokens:
    return Tokens()


@pytest.fixture
async def quota(database_url, tmp_path):
    """A quota server (manual clock at 2024-01-01T00:00:00Z) serving every catalog region."""
    settings = quota_settings(
        database_url, tmp_path, clock="manual", clock_start="2024-01-01T00:00:00Z"
    )
    async with running_quota(settings) as handle:
        yield handle
