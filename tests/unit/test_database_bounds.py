"""The database bounds settings (docs/faults.md "Database faults"): defaults, parsing, refusals."""

from __future__ import annotations

import pytest

from shared.settings import DatabaseBounds, Settings, SettingsError


def test_defaults_are_a_few_seconds_and_a_long_migration_bound():
    assert Settings.from_env({}).database_bounds == DatabaseBounds()
    bounds = DatabaseBounds()
    assert bounds.connect_timeout <= 10 and bounds.command_timeout <= 30
    assert bounds.migration_timeout > bounds.command_timeout


def test_values_come_from_the_environment():
    bounds = Settings.database_bounds_from_env(
        {"ALLOT_DB_COMMAND_TIMEOUT_SECONDS": "3", "ALLOT_DB_RETRY_ATTEMPTS": "5"}
    )
    assert bounds.command_timeout == 3 and bounds.retry_attempts == 5


@pytest.mark.parametrize("value", ["0", "-1", "2.5", "ten", ""])
def test_a_bound_that_is_not_a_positive_whole_number_stops_the_service(value):
    with pytest.raises(SettingsError, match="ALLOT_DB_POOL_TIMEOUT_SECONDS"):
        Settings.from_env({"ALLOT_DB_POOL_TIMEOUT_SECONDS": value})


async def test_a_service_opens_its_database_with_the_bounds_of_its_settings(tmp_path):
    """Settings built in code (in-process servers, `allot migrate`) reach the engine, not only
    the process environment."""
    from shared.server import build_runtime
    from tests.support.servers import TEST_SECRET

    settings = Settings.from_env(
        environ={},
        data_dir=str(tmp_path),
        auth_secret=TEST_SECRET,
        quota_database_url=f"sqlite+aiosqlite:///{tmp_path / 'q.db'}",
        db_command_timeout="7",
        db_retry_attempts="2",
    )
    runtime = build_runtime(settings, "quota")
    try:
        assert runtime.db.bounds.command_timeout == 7
        assert runtime.db.bounds.retry_attempts == 2
    finally:
        await runtime.db.dispose()
