"""Real databases for tests: a SQLite file per test, a PostgreSQL database per test.

PostgreSQL is at ALLOT_TEST_POSTGRES_URL (default the machine's 127.0.0.1:5432, trust auth).
Where it is unreachable its tests are skipped — except under CI=true, where they fail.

A test gets either an empty database or one already at a service's migration head (the
`quota` fixture's tests: `schema_for`), so the service it starts finds nothing to migrate and
`alembic upgrade head` is a no-op check. The migrated ones come from a template made once per
test process and service by the service's own migrations, named by a digest of its migration
files, so a new or edited migration makes a new template: PostgreSQL `CREATE DATABASE …
TEMPLATE`, a copied SQLite file. Migrating itself is tested in tests/integration/test_migrations.py.

CREATE DATABASE costs ~0.1–0.4 s here, more than most tests. So a database a test is done with
is handed to the next test of this process instead of dropped: a migrated one whose schema is
still exactly its template's has every table but the Alembic version truncated and its
sequences restarted (~0.03 s); any other has its `public` schema dropped and created again.
Nothing of the test is left either way; whatever this process still holds is dropped when it
exits.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import hashlib
import os
import pathlib
import shutil
import tempfile
import threading
import uuid
from collections.abc import Iterable

import asyncpg
import pytest
from sqlalchemy import make_url

POSTGRES_ADMIN_URL = os.environ.get(
    "ALLOT_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REQUIRED = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# A test using one of these fixtures gets its database at that service's head.
SCHEMA_OF_FIXTURE = {"quota": "quota"}


def schema_for(fixturenames: Iterable[str]) -> str:
    """The service whose migrated schema a test's database starts with; "" for an empty one."""
    return next((SCHEMA_OF_FIXTURE[f] for f in fixturenames if f in SCHEMA_OF_FIXTURE), "")


async def _admin_connection() -> asyncpg.Connection:
    try:
        return await asyncpg.connect(POSTGRES_ADMIN_URL, timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        if REQUIRED:
            pytest.fail(f"PostgreSQL is required under CI=true but unreachable: {exc}")
        pytest.skip(f"PostgreSQL unreachable at {POSTGRES_ADMIN_URL}: {exc}")


# Databases of this process ready for its next test, by schema ("" = empty).
_SPARE: dict[str, list[str]] = {}
_OURS: set[str] = set()
# database -> the schema it was handed out with
_SCHEMA: dict[str, str] = {}
# service -> (template database, fingerprint of its schema)
_TEMPLATES: dict[str, tuple[str, str]] = {}
# service -> what its migrations wrote into the template: rows by table, sequence positions
_SEEDS: dict[str, tuple[dict[str, list[asyncpg.Record]], dict[str, int | None]]] = {}


def _url(name: str) -> str:
    base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
    return f"{base}/{name}"


def _plain_url(name: str) -> str:
    return POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"


def _service_class(service: str):
    from services.billing.service import BillingService
    from services.notification.service import NotificationService
    from services.quota.service import QuotaService

    return {"quota": QuotaService, "billing": BillingService, "notification": NotificationService}[
        service
    ]


def migrations_digest(service: str) -> str:
    """A digest of the service's migration files: a new or edited migration changes it."""
    root = pathlib.Path(_service_class(service).migrations_dir)
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:10]


async def _migrate(url: str, service: str) -> None:
    from shared.db import create_engine
    from shared.migrations import upgrade

    engine = create_engine(url)
    try:
        await upgrade(engine, service, _service_class(service).migrations_dir)
    finally:
        await engine.dispose()


# Everything a test could change in a schema, as PostgreSQL describes it.
_FINGERPRINT = """
SELECT md5(string_agg(line, E'\\n' ORDER BY line)) FROM (
  SELECT format('column %s.%s %s %s %s', table_name, column_name, data_type, is_nullable,
                column_default) AS line
    FROM information_schema.columns WHERE table_schema = 'public'
  UNION ALL SELECT 'index ' || indexdef FROM pg_indexes WHERE schemaname = 'public'
  UNION ALL SELECT format('constraint %s %s %s', conrelid::regclass, conname,
                          pg_get_constraintdef(oid))
    FROM pg_constraint WHERE connamespace = 'public'::regnamespace
  UNION ALL SELECT format('relation %s %s', relname, relkind)
    FROM pg_class WHERE relnamespace = 'public'::regnamespace
  UNION ALL SELECT format('trigger %s %s', tgrelid::regclass, tgname)
    FROM pg_trigger WHERE NOT tgisinternal
  UNION ALL SELECT format('function %s', oid::regprocedure)
    FROM pg_proc WHERE pronamespace = 'public'::regnamespace
) AS schema
"""


async def _versions(database: asyncpg.Connection) -> list[str]:
    """Every recorded Alembic revision, by version table."""
    tables = await database.fetch(
        "SELECT tablename FROM pg_tables WHERE schemaname = 'public' "
        "AND tablename LIKE 'alembic_version%' ORDER BY tablename"
    )
    out = []
    for (table,) in tables:
        rows = await database.fetch(f'SELECT version_num FROM "{table}" ORDER BY 1')
        out += [f"{table}={r[0]}" for r in rows]
    return out


async def _fingerprint(database: asyncpg.Connection) -> str:
    schema = await database.fetchval(_FINGERPRINT)
    return f"{schema} {' '.join(await _versions(database))}"


async def _template(service: str) -> str:
    """This process's template database of `service` at its head (made on first use)."""
    if service not in _TEMPLATES:
        name = f"allot_tmpl_{service}_{migrations_digest(service)}_{uuid.uuid4().hex[:6]}"
        conn = await _admin_connection()
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        _OURS.add(name)
        await _migrate(_url(name), service)
        database = await asyncpg.connect(_plain_url(name), timeout=5)
        try:
            _TEMPLATES[service] = (name, await _fingerprint(database))
            _SEEDS[service] = await _seeds(database)
        finally:
            await database.close()
    return _TEMPLATES[service][0]


async def create_postgres_database(schema: str = "") -> str:
    """An empty database, or with `schema` one at that service's migration head (new, or
    cleaned after an earlier test); its SQLAlchemy (asyncpg) URL."""
    if spare := _SPARE.get(schema):
        name = spare.pop()
        _SCHEMA[name] = schema
        return _url(name)
    template = await _template(schema) if schema else ""
    name = f"allot_test_{uuid.uuid4().hex[:12]}"
    conn = await _admin_connection()
    try:
        clause = f' TEMPLATE "{template}"' if template else ""
        await conn.execute(f'CREATE DATABASE "{name}"{clause}')
    finally:
        await conn.close()
    _OURS.add(name)
    _SCHEMA[name] = schema
    return _url(name)


async def drop_postgres_database(url: str) -> None:
    """Done with the database: end its connections and clean it for the next test."""
    name = url.rsplit("/", 1)[1]
    schema = _SCHEMA.pop(name, "")
    conn = await _admin_connection()
    try:
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = $1 AND pid <> pg_backend_pid()",
            name,
        )
        try:
            schema = await _clean(name, schema)
        except (OSError, asyncpg.PostgresError):
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            _OURS.discard(name)
            return
    finally:
        await conn.close()
    if name in _OURS:
        _SPARE.setdefault(schema, []).append(name)


async def _clean(name: str, schema: str) -> str:
    """Back to the template's contents while the schema is still exactly the template's,
    else empty; the schema the database now has."""
    database = await asyncpg.connect(_plain_url(name), timeout=5)
    try:
        if schema and await _fingerprint(database) == _TEMPLATES[schema][1]:
            await _truncate(database, schema)
            return schema
        await database.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
        return ""
    finally:
        await database.close()


async def _tables(database: asyncpg.Connection) -> list[str]:
    rows = await database.fetch(
        "SELECT tablename FROM pg_tables WHERE schemaname = 'public' "
        "AND tablename NOT LIKE 'alembic_version%' ORDER BY tablename"
    )
    return [r[0] for r in rows]


async def _seeds(
    database: asyncpg.Connection,
) -> tuple[dict[str, list[asyncpg.Record]], dict[str, int | None]]:
    """The rows the migrations wrote (an outbox counter's first row) and the sequences' places."""
    rows = {t: await database.fetch(f'SELECT * FROM "{t}"') for t in await _tables(database)}
    sequences = await database.fetch(
        "SELECT sequencename, last_value FROM pg_sequences WHERE schemaname = 'public'"
    )
    return {t: r for t, r in rows.items() if r}, {s[0]: s[1] for s in sequences}


async def _truncate(database: asyncpg.Connection, schema: str) -> None:
    """Back to the template's contents: every row of the test gone, the migrations' own rows
    written again, every sequence where the template has it; the schema and revision stay."""
    rows, sequences = _SEEDS[schema]
    async with database.transaction():
        names = ", ".join(f'"{t}"' for t in await _tables(database))
        if names:
            await database.execute(f"TRUNCATE {names} CASCADE")
        for table, records in rows.items():
            await database.copy_records_to_table(
                table, records=records, columns=list(records[0].keys())
            )
        for sequence, last_value in sequences.items():
            if last_value is None:  # never used: its next value is its start
                await database.execute(f'ALTER SEQUENCE "{sequence}" RESTART')
            else:
                await database.execute("SELECT setval($1, $2, true)", sequence, last_value)


# service -> this process's migrated SQLite file of it
_SQLITE_TEMPLATES: dict[str, pathlib.Path] = {}
# The folder of those files, made on first use and removed at exit.
_SQLITE_DIR: list[pathlib.Path] = []


def migrated_sqlite(path: pathlib.Path, service: str) -> None:
    """Put a copy of the service's SQLite database at its migration head at `path`."""
    if service not in _SQLITE_TEMPLATES:
        if not _SQLITE_DIR:
            _SQLITE_DIR.append(pathlib.Path(tempfile.mkdtemp(prefix="allot-templates-")))
        template = _SQLITE_DIR[0] / f"{service}-{migrations_digest(service)}.db"
        url = f"sqlite+aiosqlite:///{template}"
        # A thread of its own: the caller may be inside a running event loop.
        errors: list[BaseException] = []

        def run() -> None:
            try:
                asyncio.run(_migrate(url, service))
            except BaseException as exc:  # re-raised in the caller below
                errors.append(exc)

        thread = threading.Thread(target=run)
        thread.start()
        thread.join(120)
        if thread.is_alive() or errors:
            raise RuntimeError(f"could not migrate the {service} SQLite template: {errors}")
        # The last connection closed: WAL checkpointed into the file, nothing beside it.
        assert not pathlib.Path(f"{template}-wal").exists(), "template not checkpointed"
        _SQLITE_TEMPLATES[service] = template
    shutil.copyfile(_SQLITE_TEMPLATES[service], path)


def migrated_sqlite_if_new(database_url: str, service: str) -> None:
    """`migrated_sqlite` at the file of a SQLite URL when no file is there yet."""
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        path = pathlib.Path(url.database)
        if not path.exists():
            migrated_sqlite(path, service)


async def _drop_ours() -> None:
    conn = await asyncpg.connect(POSTGRES_ADMIN_URL, timeout=5)
    try:
        for name in sorted(_OURS):
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@atexit.register
def _drop_at_exit() -> None:
    for folder in _SQLITE_DIR:
        shutil.rmtree(folder, ignore_errors=True)
    if _OURS:
        try:
            asyncio.run(_drop_ours())
        except (OSError, asyncpg.PostgresError):
            pass  # PostgreSQL is gone already: nothing to clean


class DirectReader:
    """A service's or a test consumer's database read directly from the test (either dialect).
    A query error is raised, never read as a number: the only "nothing yet" is a table that a
    process has not created yet, and that is asked explicitly (`has_table`)."""

    def __init__(self, url: str) -> None:
        from sqlalchemy.ext.asyncio import create_async_engine

        self.engine = create_async_engine(url)

    async def has_table(self, name: str) -> bool:
        from sqlalchemy import inspect

        async with self.engine.connect() as conn:
            return await conn.run_sync(lambda sync: inspect(sync).has_table(name))

    async def scalar(self, sql: str) -> int | None:
        from sqlalchemy import text

        async with self.engine.connect() as conn:
            value = (await conn.execute(text(sql))).scalar_one_or_none()
            return None if value is None else int(value)

    async def scalar_once(self, table: str, sql: str) -> int:
        """`sql`'s number (None read as 0); 0 while `table` does not exist yet."""
        if not await self.has_table(table):
            return 0
        return await self.scalar(sql) or 0

    async def dispose(self) -> None:
        await self.engine.dispose()


@contextlib.asynccontextmanager
async def dialect_database(dialect: str, sqlite_file: pathlib.Path, schema: str = ""):
    """The URL of a fresh database of `dialect`: the SQLite file `sqlite_file` (not created
    here: the service or its template copy makes it), or a new PostgreSQL database (at
    `schema`'s migration head when given), dropped on the way out."""
    if dialect == "sqlite":
        yield f"sqlite+aiosqlite:///{sqlite_file}"
        return
    url = await create_postgres_database(schema)
    try:
        yield url
    finally:
        await drop_postgres_database(url)
