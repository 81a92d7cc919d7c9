"""One engine factory for both dialects, the unit of work, and retry of lost races.

SQLite (the embedded default): WAL, foreign keys, a busy timeout, and `BEGIN IMMEDIATE` for
writes so concurrent writers queue on the database lock instead of failing at commit.
PostgreSQL: asyncpg, `pool_pre_ping`, READ COMMITTED; rows that are decremented are locked with
`SELECT ... FOR UPDATE` by the repositories.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pathlib
from collections.abc import Awaitable, Callable
from typing import TypeVar

from sqlalchemy import event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from shared.errors import Aborted

log = logging.getLogger("allot.db")
T = TypeVar("T")

READ_ONLY = "allot_read_only"
# Attempts for a transaction that lost a race (unique key taken by a concurrent writer,
# deadlock, serialization failure, SQLite busy). Each attempt starts from scratch.
MAX_ATTEMPTS = 6


def create_engine(url: str) -> AsyncEngine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_engine(url)
    return create_async_engine(
        url,
        pool_pre_ping=True,
        isolation_level="READ COMMITTED",
        pool_size=10,
        max_overflow=20,
    )


def _sqlite_engine(url: str) -> AsyncEngine:
    database = make_url(url).database
    if database and database != ":memory:":
        pathlib.Path(database).parent.mkdir(parents=True, exist_ok=True)
    # Writers of this process queue on Database._write_turn; the busy timeout only covers other
    # processes (a migration, a second replica). It stays short so shutdown is never held up.
    engine = create_async_engine(url, connect_args={"timeout": 5})

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection, _record):
        # Take transaction control from the driver so we can say BEGIN IMMEDIATE ourselves.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        for pragma in (
            "PRAGMA journal_mode=WAL",
            "PRAGMA foreign_keys=ON",
            "PRAGMA busy_timeout=5000",
            "PRAGMA synchronous=NORMAL",
        ):
            cursor.execute(pragma)
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn):
        # Writers take the write lock up front (no upgrade deadlocks); readers use a deferred
        # transaction and read a WAL snapshot alongside writers.
        if conn.get_execution_options().get(READ_ONLY):
            conn.exec_driver_sql("BEGIN")
        else:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def is_sqlite(engine: AsyncEngine) -> bool:
    return engine.dialect.name == "sqlite"


class UnitOfWork:
    """One session, one transaction: commit explicitly, roll back by default."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], read_only: bool = False):
        self._sessions = sessions
        self.read_only = read_only
        self.session: AsyncSession
        # Work that must be the last thing in the transaction (the outbox takes its sequence
        # numbers there, holding the sequence lock as briefly as possible), and work that may
        # only happen once the transaction is durable (waking stream readers).
        self._before_commit: list[Callable[[UnitOfWork], Awaitable[None]]] = []
        self._after_commit: list[Callable[[], None]] = []
        self._on_close: list[Callable[[], None]] = []

    async def rows(self, query) -> list:
        """Every row a query returns."""
        return list((await self.session.execute(query)).all())

    async def __aenter__(self) -> UnitOfWork:
        self.session = self._sessions()
        if self.read_only:
            await self.session.connection(execution_options={READ_ONLY: True})
        return self

    async def __aexit__(self, *exc_info) -> None:
        try:
            await self.session.rollback()
        finally:
            await self.session.close()
            for hook in self._on_close:
                hook()

    def before_commit(self, hook: Callable[[UnitOfWork], Awaitable[None]]) -> None:
        if hook not in self._before_commit:
            self._before_commit.append(hook)

    def after_commit(self, hook: Callable[[], None]) -> None:
        if hook not in self._after_commit:
            self._after_commit.append(hook)

    def on_close(self, hook: Callable[[], None]) -> None:
        """Run when the unit of work ends, committed or not (drop per-transaction state)."""
        self._on_close.append(hook)

    async def commit(self) -> None:
        for hook in self._before_commit:
            await hook(self)
        await self.session.commit()
        for hook in self._after_commit:
            hook()


class Database:
    """The service's engine, its sessions and the transaction runner."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = create_engine(url)
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        # SQLite has one writer at a time. Queueing writers here, in arrival order, replaces
        # SQLite's busy-wait polling (which starves unlucky writers for seconds under load).
        self._write_turn = asyncio.Lock() if self.dialect == "sqlite" else None

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def unit_of_work(self, read_only: bool = False) -> UnitOfWork:
        return UnitOfWork(self.sessions, read_only=read_only)

    async def transaction(self, work: Callable[[UnitOfWork], Awaitable[T]]) -> T:
        """Run `work` in a write transaction and commit; retry it when it lost a race."""
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                async with self._writer_turn(), self.unit_of_work() as uow:
                    result = await work(uow)
                    await uow.commit()
                    return result
            except (IntegrityError, OperationalError, DBAPIError) as exc:
                if not _retryable(exc) or attempt == MAX_ATTEMPTS:
                    if _retryable(exc):
                        raise Aborted(
                            "CONCURRENT_UPDATE", "a concurrent update won; retry"
                        ) from exc
                    raise
                log.debug("transaction lost a race (attempt %d): %s", attempt, exc.orig)
                await asyncio.sleep(0.005 * attempt)
        raise AssertionError("unreachable")

    def _writer_turn(self):
        return self._write_turn if self._write_turn is not None else contextlib.nullcontext()

    async def read(self, work: Callable[[UnitOfWork], Awaitable[T]]) -> T:
        """Run `work` in a read-only transaction."""
        async with self.unit_of_work(read_only=True) as uow:
            return await work(uow)

    async def ping(self) -> None:
        async with self.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    async def dispose(self) -> None:
        await self.engine.dispose()


def _retryable(exc: DBAPIError) -> bool:
    if isinstance(exc, IntegrityError):
        # A unique key taken by a concurrent transaction: the retry sees the winner's row.
        return "unique" in str(exc.orig).lower() or "duplicate" in str(exc.orig).lower()
    sqlstate = getattr(exc.orig, "sqlstate", None) or getattr(
        getattr(exc.orig, "__cause__", None), "sqlstate", None
    )
    if sqlstate in ("40001", "40P01"):  # serialization failure, deadlock detected
        return True
    return "database is locked" in str(exc.orig).lower()
