"""`allot migrate quota` on both dialects: it creates the schema, a second run changes nothing,
and the Alembic head is exactly what the SQLAlchemy metadata describes (no drift)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import BigInteger, Column, MetaData, inspect, text

from services.quota.adapters.tables import metadata
from services.quota.service import QuotaService
from shared.db import create_engine
from shared.migrations import alembic_config
from shared.settings import REPO_ROOT

VERSION_TABLE = "alembic_version_quota"
QUOTA_TABLES = {"packages", "api_subscriptions", "usage_events", "account_standings"}


def allot_command() -> list[str]:
    """The installed `allot` script, as an operator runs it; the module where it is missing."""
    script = pathlib.Path(sys.executable).parent / "allot"
    return [str(script)] if script.exists() else [sys.executable, "-m", "shared.cli"]


def migrate(database_url: str, data_dir) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALLOT_")}
    env.update(ALLOT_QUOTA_DATABASE_URL=database_url, ALLOT_DATA_DIR=str(data_dir))
    result = subprocess.run(
        [*allot_command(), "migrate", "quota"],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return result


def head_revision() -> str:
    script = ScriptDirectory.from_config(alembic_config("quota", QuotaService.migrations_dir))
    return script.get_current_head()


async def schema_snapshot(database_url: str) -> dict:
    """Tables, columns, indexes and the recorded revision, as the database reports them."""

    def read(connection) -> dict:
        inspector = inspect(connection)
        tables = sorted(inspector.get_table_names())
        revisions = connection.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).all()
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


async def schema_drift(database_url: str, target: MetaData = metadata) -> list:
    def compare(connection) -> list:
        # The options of the service's env.py. Server defaults are not compared: Alembic
        # reports SQLite's reflected DEFAULT '' as differing from server_default="" although
        # the DDL is the same (a known false positive of its SQLite default comparison).
        context = MigrationContext.configure(
            connection, opts={"compare_type": True, "version_table": VERSION_TABLE}
        )
        return compare_metadata(context, target)

    engine = create_engine(database_url)
    try:
        async with engine.connect() as connection:
            return await connection.run_sync(compare)
    finally:
        await engine.dispose()


async def test_migrate_creates_the_schema(database_url, tmp_path):
    result = migrate(database_url, tmp_path)
    assert "quota: migrated" in result.stdout
    snapshot = await schema_snapshot(database_url)
    assert QUOTA_TABLES | {"idempotency_keys", VERSION_TABLE} <= set(snapshot["tables"])
    assert snapshot["revisions"] == [head_revision()]


async def test_migrating_twice_changes_nothing(database_url, tmp_path):
    migrate(database_url, tmp_path)
    before = await schema_snapshot(database_url)
    migrate(database_url, tmp_path)
    assert await schema_snapshot(database_url) == before


async def test_head_matches_the_metadata(database_url, tmp_path):
    migrate(database_url, tmp_path)
    assert await schema_drift(database_url) == []


async def test_drift_would_be_noticed(database_url, tmp_path):
    """The comparison above is not vacuous: a column the migrations lack shows up."""
    migrate(database_url, tmp_path)
    drifted = MetaData()
    for table in metadata.tables.values():
        table.to_metadata(drifted)
    drifted.tables["packages"].append_column(Column("extra_quantity", BigInteger))
    diffs = await schema_drift(database_url, drifted)
    assert [(d[0], d[2], d[3].name) for d in diffs] == [
        ("add_column", "packages", "extra_quantity")
    ]
