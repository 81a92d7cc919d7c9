"""Every service's migrations on both dialects: they create the schema, a second run changes
nothing, and the Alembic head is exactly what the SQLAlchemy metadata describes.

The migrations run once per service and database, in-process through `shared.migrations.upgrade`
(what a starting service and `allot migrate` both call); one smoke test runs `allot migrate` as
an operator does, as its own process."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import BigInteger, Column, MetaData, inspect, text

from services.billing.adapters import tables as billing_tables
from services.billing.service import BillingService
from services.notification.adapters import tables as notification_tables
from services.notification.service import NotificationService
from services.quota.adapters import tables as quota_tables
from services.quota.service import QuotaService
from shared.db import create_engine
from shared.migrations import alembic_config, upgrade
from shared.settings import REPO_ROOT

# service -> (its metadata, its service class, tables it must have)
SERVICES = {
    "quota": (
        quota_tables.metadata,
        QuotaService,
        {"packages", "api_subscriptions", "usage_events", "account_standings", "usage_alerts"},
    ),
    "billing": (
        billing_tables.metadata,
        BillingService,
        {"accounts", "ledger", "consumer_cursors", "consumer_leases"},
    ),
    "notification": (
        notification_tables.metadata,
        NotificationService,
        {"contacts", "notifications", "deliveries", "consumer_cursors", "consumer_leases"},
    ),
}


@pytest.fixture(params=sorted(SERVICES))
def service(request) -> str:
    return request.param


def version_table(service: str) -> str:
    return f"alembic_version_{service}"


def allot_command() -> list[str]:
    """The installed `allot` script, as an operator runs it; the module where it is missing."""
    script = pathlib.Path(sys.executable).parent / "allot"
    return [str(script)] if script.exists() else [sys.executable, "-m", "shared.cli"]


def migrate(service: str, database_url: str, data_dir) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALLOT_")}
    env[f"ALLOT_{service.upper()}_DATABASE_URL"] = database_url
    env["ALLOT_DATA_DIR"] = str(data_dir)
    result = subprocess.run(
        [*allot_command(), "migrate", service],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return result


def head_revision(service: str) -> str:
    migrations_dir = SERVICES[service][1].migrations_dir
    script = ScriptDirectory.from_config(alembic_config(service, migrations_dir))
    return script.get_current_head()


async def schema_snapshot(service: str, database_url: str) -> dict:
    """Tables, columns, indexes and the recorded revision, as the database reports them."""

    def read(connection) -> dict:
        inspector = inspect(connection)
        tables = sorted(inspector.get_table_names())
        revisions = connection.execute(
            text(f"SELECT version_num FROM {version_table(service)}")
        ).all()
        return {
            "tables": tables,
            "columns": {
                t: [(c["name"], str(c["type"]), c["nullable"]) for c in inspector.get_columns(t)]
                for t in tables
            },
            "indexes": {
                t: sorted((i["name"], tuple(i["column_names"])) for i in inspector.get_indexes(t))
                for t in tables
            },
            "revisions": [r[0] for r in revisions],
        }

    engine = create_engine(database_url)
    try:
        async with engine.connect() as connection:
            return await connection.run_sync(read)
    finally:
        await engine.dispose()


async def schema_drift(service: str, database_url: str, target: MetaData | None = None) -> list:
    target = target if target is not None else SERVICES[service][0]

    def compare(connection) -> list:
        # The options of the service's env.py. Server defaults are not compared: Alembic
        # reports SQLite's reflected DEFAULT '' as differing from server_default="" although
        # the DDL is the same (a known false positive of its SQLite default comparison).
        context = MigrationContext.configure(
            connection, opts={"compare_type": True, "version_table": version_table(service)}
        )
        return compare_metadata(context, target)

    engine = create_engine(database_url)
    try:
        async with engine.connect() as connection:
            return await connection.run_sync(compare)
    finally:
        await engine.dispose()


async def table_names(database_url: str) -> list[str]:
    engine = create_engine(database_url)
    try:
        async with engine.connect() as connection:
            return await connection.run_sync(lambda c: inspect(c).get_table_names())
    finally:
        await engine.dispose()


async def migrate_in_process(service: str, database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        await upgrade(engine, service, SERVICES[service][1].migrations_dir)
    finally:
        await engine.dispose()


async def test_migrations_create_the_schema_once_and_for_all(service, database_url):
    """From empty to the head: the service's tables, the head recorded, nothing to add on a
    second run, and no drift from the metadata."""
    assert await table_names(database_url) == []
    await migrate_in_process(service, database_url)
    snapshot = await schema_snapshot(service, database_url)
    expected = SERVICES[service][2] | {"idempotency_keys", "outbox_events", version_table(service)}
    assert expected <= set(snapshot["tables"])
    assert snapshot["revisions"] == [head_revision(service)]
    await migrate_in_process(service, database_url)
    assert await schema_snapshot(service, database_url) == snapshot
    assert await schema_drift(service, database_url) == []


async def test_allot_migrate_migrates_as_an_operator_runs_it(tmp_path):
    """The CLI smoke test: `allot migrate quota` as a process, on the embedded default."""
    database_url = f"sqlite+aiosqlite:///{tmp_path / 'quota.db'}"
    result = migrate("quota", database_url, tmp_path)
    assert f"quota: migrated {database_url}" in result.stdout
    snapshot = await schema_snapshot("quota", database_url)
    assert snapshot["revisions"] == [head_revision("quota")]
    assert SERVICES["quota"][2] <= set(snapshot["tables"])


async def test_drift_would_be_noticed(database_url, tmp_path):
    """The comparison above is not vacuous: a column the migrations lack shows up."""
    await migrate_in_process("quota", database_url)
    drifted = MetaData()
    for table in quota_tables.metadata.tables.values():
        table.to_metadata(drifted)
    drifted.tables["packages"].append_column(Column("extra_quantity", BigInteger))
    diffs = await schema_drift("quota", database_url, drifted)
    assert [(d[0], d[2], d[3].name) for d in diffs] == [
        ("add_column", "packages", "extra_quantity")
    ]


async def test_simulation_history_numbers_the_events_recorded_before_it(database_url):
    """Quota's 0010_simulation_history numbers existing usage events by record time (then
    event id), and the history counter goes on after them (docs/design/what-if.md)."""
    from alembic import command

    engine = create_engine(database_url)
    cfg = alembic_config("quota", QuotaService.migrations_dir)

    def to(revision: str):
        def run(sync_connection) -> None:
            cfg.attributes["connection"] = sync_connection
            command.upgrade(cfg, revision)

        return run

    row = (
        "INSERT INTO usage_events (event_id, fingerprint, account_id, user_id, region, api,"
        " enterprise_project_id, quantity, http_status, billable, occur_time_us, record_time_us,"
        " package_quantity, pay_per_use_quantity, remaining_quantity, deductions, explanation)"
        " VALUES (:id, '', 'a', 'u', 'r', 'p', '0', 1, 200, true, 0, :at, 0, 1, 0, '[]', '{}')"
    )
    try:
        async with engine.begin() as connection:
            await connection.run_sync(to("0009_forecast_alerts"))
            for event_id, at in (("late", 30), ("b", 10), ("a", 10), ("c", 20)):
                await connection.execute(text(row), {"id": event_id, "at": at})
        async with engine.begin() as connection:
            await connection.run_sync(to("0010_simulation_history"))
            numbered = (
                await connection.execute(
                    text("SELECT event_id, record_seq FROM usage_events ORDER BY record_seq")
                )
            ).all()
            counter = (
                await connection.execute(text("SELECT last_seq FROM history_counter"))
            ).scalar_one()
            assert [tuple(r) for r in numbered] == [("a", 1), ("b", 2), ("c", 3), ("late", 4)]
            assert counter == 4
            if engine.dialect.name == "postgresql":
                next_value = (
                    await connection.execute(text("SELECT nextval('quota_history_seq')"))
                ).scalar_one()
                assert next_value == 5
    finally:
        await engine.dispose()


async def test_usage_alert_owner_leaves_existing_rules_the_customers(database_url):
    """Quota's 0011_usage_alert_owner: every rule that existed before is the customer's own
    (owner ''), rules made before it by billing for auto-replenish included
    (docs/design/auto-replenish.md); downgrading drops the column again."""
    from alembic import command

    engine = create_engine(database_url)
    cfg = alembic_config("quota", QuotaService.migrations_dir)

    def run(step, revision: str):
        def go(sync_connection) -> None:
            cfg.attributes["connection"] = sync_connection
            step(cfg, revision)

        return go

    row = (
        "INSERT INTO usage_alerts (alert_id, account_id, region, api, threshold_quantity,"
        " enabled, create_time_us, update_time_us) VALUES (:id, 'a', 'r', 'p', 20, true, 0, 0)"
    )
    try:
        async with engine.begin() as connection:
            await connection.run_sync(run(command.upgrade, "0010_simulation_history"))
            await connection.execute(text(row), {"id": "alr-old"})
        async with engine.begin() as connection:
            await connection.run_sync(run(command.upgrade, "0011_usage_alert_owner"))
            owners = (
                await connection.execute(text("SELECT alert_id, owner FROM usage_alerts"))
            ).all()
            assert [tuple(r) for r in owners] == [("alr-old", "")]
        async with engine.begin() as connection:
            await connection.run_sync(run(command.downgrade, "0010_simulation_history"))
            columns = await connection.run_sync(
                lambda sync: {c["name"] for c in inspect(sync).get_columns("usage_alerts")}
            )
            assert "owner" not in columns and "threshold_quantity" in columns
    finally:
        await engine.dispose()
