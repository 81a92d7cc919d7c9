"""Alembic, once for all services: apply a service's migrations at start or from `allot migrate`.

Each service's `migrations/env.py` calls `run_env(metadata)`. When we run migrations from a
running service the connection is handed over through `config.attributes` (Alembic's
connection-sharing recipe), so no second event loop is started.
"""

from __future__ import annotations

import asyncio
import pathlib

from alembic import command, context
from alembic.config import Config
from sqlalchemy import MetaData, pool, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from shared.db import create_engine


def alembic_config(service: str, migrations_dir: pathlib.Path, url: str = "") -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir))
    cfg.set_main_option("version_table", f"alembic_version_{service}")
    if url:
        cfg.set_main_option("sqlalchemy.url", url)
    return cfg


async def upgrade(engine: AsyncEngine, service: str, migrations_dir: pathlib.Path) -> None:
    """Bring the service's database to the newest revision."""
    cfg = alembic_config(service, migrations_dir)

    def _run(sync_connection) -> None:
        if sync_connection.dialect.name == "postgresql":
            # Two replicas starting together must not both migrate: serialize on a lock.
            sync_connection.execute(
                text("SELECT pg_advisory_xact_lock(hashtext(:name))"), {"name": service}
            )
        cfg.attributes["connection"] = sync_connection
        command.upgrade(cfg, "head")

    if engine.dialect.name != "postgresql":
        async with engine.begin() as conn:
            await conn.run_sync(_run)
        return
    # The service's engine bounds a statement by seconds; a migration (an index on a big table,
    # the advisory lock held by another replica's migration) gets its own, longer bound
    # (ALLOT_DB_MIGRATION_TIMEOUT_SECONDS, docs/faults.md "Database faults").
    migration_engine = create_engine(
        engine.url.render_as_string(hide_password=False), migration=True
    )
    try:
        async with migration_engine.begin() as conn:
            await conn.run_sync(_run)
    finally:
        await migration_engine.dispose()


def run_env(target_metadata: MetaData) -> None:
    """The body of every service's Alembic env.py."""
    config = context.config
    version_table = config.get_main_option("version_table") or "alembic_version"

    def _configure_and_run(connection) -> None:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            version_table=version_table,
            render_as_batch=connection.dialect.name == "sqlite",
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()

    connection = config.attributes.get("connection")
    if connection is not None:
        _configure_and_run(connection)
        return
    if context.is_offline_mode():
        context.configure(
            url=config.get_main_option("sqlalchemy.url"),
            target_metadata=target_metadata,
            version_table=version_table,
            literal_binds=True,
        )
        with context.begin_transaction():
            context.run_migrations()
        return

    async def _online() -> None:
        engine = create_async_engine(
            config.get_main_option("sqlalchemy.url"), poolclass=pool.NullPool
        )
        async with engine.connect() as conn:
            await conn.run_sync(_configure_and_run)
            await conn.commit()
        await engine.dispose()

    asyncio.run(_online())
