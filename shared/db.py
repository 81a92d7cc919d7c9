"""One engine factory for both dialects, the unit of work, and retry of lost races.

SQLite (the embedded default): WAL, foreign keys, a busy timeout, and `BEGIN IMMEDIATE` for
writes so concurrent writers queue on the database lock instead of failing at commit.
PostgreSQL: asyncpg, READ COMMITTED; rows that are decremented are locked with
`SELECT ... FOR UPDATE` by the repositories. Every wait on the database is bounded (connect,
statement, pool checkout, TCP keepalive), and a transaction whose connection died is retried on
a fresh connection, then answered UNAVAILABLE (docs/faults.md "Database faults"). There is no
pre-ping on checkout: that retry is also what recovers a pooled connection that died while idle.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pathlib
import socket
from collections.abc import Awaitable, Callable
from typing import TypeVar

from sqlalchemy import event, pool, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from shared import direct_sql, tracing
from shared.db_faults import connection_fault, retryable, unanswered
from shared.errors import Aborted, Unavailable
from shared.inline_sqlite import InlineEngine, inline_engine, would_wait
from shared.settings import DatabaseBounds, Settings

log = logging.getLogger("allot.db")
T = TypeVar("T")

READ_ONLY = "allot_read_only"
# Attempts for a transaction that lost a race (unique key taken by a concurrent writer,
# deadlock, serialization failure, SQLite busy). Each attempt starts from scratch.
MAX_ATTEMPTS = 6


def create_engine(
    url: str, bounds: DatabaseBounds | None = None, migration: bool = False
) -> AsyncEngine:
    """The engine for `url`; `migration` raises the statement bound for long migrations."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_engine(url)
    bounds = bounds or Settings.database_bounds_from_env()
    statement = bounds.migration_timeout if migration else bounds.command_timeout
    interval = max(1, bounds.keepalive // 3)
    connect_args = {
        "timeout": bounds.connect_timeout,
        # The server cancels a statement after `statement`; the driver gives up one second
        # later, which also bounds a wait on a connection whose peer went silent.
        "command_timeout": statement + 1,
        "server_settings": {
            "statement_timeout": str(int(statement * 1000)),
            "idle_in_transaction_session_timeout": str(int(max(60, 6 * statement) * 1000)),
            "tcp_keepalives_idle": str(bounds.keepalive),
            "tcp_keepalives_interval": str(interval),
            "tcp_keepalives_count": "3",
        },
    }
    if migration:
        engine = create_async_engine(
            url,
            isolation_level="READ COMMITTED",
            poolclass=pool.NullPool,
            connect_args=connect_args,
        )
    else:
        # No pool_pre_ping: a SELECT 1 before every transaction was a round trip on the hot
        # path. A pooled connection that died while idle fails its transaction's first
        # statement instead; SQLAlchemy then invalidates the whole pool (every connection
        # opened before the failure is replaced at its next checkout) and `Database._run`
        # runs the transaction again on a fresh connection (docs/faults.md "Database faults").
        engine = create_async_engine(
            url,
            isolation_level="READ COMMITTED",
            pool_size=10,
            max_overflow=20,
            pool_timeout=bounds.pool_timeout,
            connect_args=connect_args,
        )

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection, _record):
        _client_keepalive(dbapi_connection, bounds.keepalive, interval)

    return engine


def _client_keepalive(dbapi_connection, idle: int, interval: int) -> None:
    """TCP keepalive and a user timeout on our end of the socket, so a peer that went silent
    (failover without reset) is noticed within about `idle + 3 * interval` seconds even when
    no statement is running. asyncpg has no option for it; the socket is set directly."""
    transport = getattr(getattr(dbapi_connection, "_connection", None), "_transport", None)
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (
        ("TCP_KEEPIDLE", idle),
        ("TCP_KEEPINTVL", interval),
        ("TCP_KEEPCNT", 3),
        ("TCP_USER_TIMEOUT", (idle + 3 * interval) * 1000),
    ):
        if hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


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


class TransactionConnection(AsyncConnection):
    """The connection of a unit of work (`uow.session`). Repositories run SQLAlchemy Core
    statements on it (`execute`); there is no ORM session in between, whose bookkeeping cost
    more per statement than the statement itself on the hot path (docs/architecture.md)."""

    async def connection(self, **_options) -> TransactionConnection:
        """Itself: code written for a session's `connection()` keeps working."""
        return self

    async def execute(self, statement, parameters=None, **kwargs):
        """Hot statements on asyncpg itself (shared/direct_sql.py), unless traced."""
        if not kwargs and isinstance(parameters, dict | None) and self.dialect.driver == "asyncpg":
            plan = direct_sql.plan_of(statement, self.dialect) if not tracing.enabled() else None
            if plan is not None:
                return await plan.run_asyncpg(self, parameters)
        return await super().execute(statement, parameters, **kwargs)


class UnitOfWork:
    """One connection, one transaction: commit explicitly, roll back by default."""

    def __init__(self, engine: AsyncEngine | Engine, read_only: bool = False):
        self._engine = engine
        self.read_only = read_only
        self.session: TransactionConnection
        # Work that must be the last thing in the transaction (the outbox takes its sequence
        # numbers there, holding the sequence lock as briefly as possible), and work that may
        # only happen once the transaction is durable (waking stream readers).
        self._before_commit: list[Callable[[UnitOfWork], Awaitable[None]]] = []
        self._after_commit: list[Callable[[], None]] = []
        self._on_close: list[Callable[[], None]] = []

    async def rows(self, query) -> list:
        """Every row a query returns."""
        return list((await self.session.execute(query)).all())

    @property
    def dialect(self) -> str:
        """ "sqlite" or "postgresql": a repository may shape a hot statement per dialect."""
        return self._engine.dialect.name

    async def connection(self) -> TransactionConnection:
        """The transaction's connection (the same object as `session`)."""
        return self.session

    async def __aenter__(self) -> UnitOfWork:
        # The transaction begins with the first statement (SQLite: BEGIN IMMEDIATE for
        # writers, see _sqlite_engine).
        connection = TransactionConnection(self._engine)
        await connection.start()
        self.session = connection
        if self.read_only:
            options: dict = {READ_ONLY: True}
            if self._engine.dialect.name == "postgresql":
                # Under READ COMMITTED every statement takes its own snapshot, inside a
                # transaction or not: a read needs no BEGIN and no ROLLBACK, two round trips
                # fewer (docs/faults.md, "Database faults").
                options["isolation_level"] = "AUTOCOMMIT"
            await connection.execution_options(**options)
        return self

    async def __aexit__(self, *exc_info) -> None:
        try:
            if exc_info[1] is not None and connection_fault(exc_info[1]) is not None:
                # The connection died or its state is unknown (a statement cut short): drop it
                # from the pool without a ROLLBACK that might never be answered.
                await self.session.invalidate()
            else:
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


class _InlineUnitOfWork(UnitOfWork):
    """A unit of work on the loop's own thread (shared/inline_sqlite.py)."""

    def __init__(self, inline: InlineEngine) -> None:
        super().__init__(inline.engine, read_only=not inline.writes)
        self._inline = inline

    async def __aenter__(self) -> UnitOfWork:
        self.session = self._inline.connect()  # type: ignore[assignment]
        return self


class Database:
    """The service's engine, its sessions and the transaction runner."""

    def __init__(self, url: str, bounds: DatabaseBounds | None = None) -> None:
        self.url = url
        self.bounds = bounds or Settings.database_bounds_from_env()
        self.engine = create_engine(url, self.bounds)
        tracing.instrument_engine(self.engine)  # database spans, when traced
        # SQLite: short transactions on the loop's thread (*_inline).
        self._inline = inline_engine(url)
        self._inline_writes = inline_engine(url, writes=True)
        for inline in (self._inline, self._inline_writes):
            if inline is not None:
                tracing.instrument_engine(inline.engine)
        # SQLite has one writer at a time. Queueing writers here, in arrival order, replaces
        # SQLite's busy-wait polling (which starves unlucky writers for seconds under load).
        self._write_turn = asyncio.Lock() if self.dialect == "sqlite" else None

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def unit_of_work(self, read_only: bool = False) -> UnitOfWork:
        return UnitOfWork(self.engine, read_only=read_only)

    async def transaction(self, work: Callable[[UnitOfWork], Awaitable[T]]) -> T:
        """Run `work` in a write transaction and commit; retry it when it lost a race or its
        connection died (each attempt starts from scratch; idempotency keys written in the same
        transaction make a repeat of a commit whose answer was lost harmless)."""
        return await self._run(work, read_only=False)

    async def read(self, work: Callable[[UnitOfWork], Awaitable[T]]) -> T:
        """Run `work` in a read-only transaction (retried on a fresh connection if its own
        died)."""
        return await self._run(work, read_only=True)

    async def read_inline(self, work: Callable[[UnitOfWork], Awaitable[T]]) -> T:
        """`read`, for a short read of one statement: on SQLite it runs on the event loop's
        thread, without aiosqlite's hand-offs and without a BEGIN, so each statement reads its
        own snapshot (shared/inline_sqlite.py); elsewhere, or where it would wait for a lock,
        it is `read`."""
        if self._inline is None:
            return await self.read(work)
        try:
            async with _InlineUnitOfWork(self._inline) as uow:
                return await work(uow)
        except DBAPIError as exc:
            # Locked, or any other database error: once more the usual way, which waits for
            # locks and maps faults (a read runs again harmlessly).
            _log_inline_fallback(exc)
        return await self.read(work)

    async def transaction_inline(self, work: Callable[[UnitOfWork], Awaitable[T]]) -> T:
        """`transaction`, for a short one: on SQLite on the event loop's thread
        (shared/inline_sqlite.py), after this process's writers before it; elsewhere, or where
        it would wait for another process's lock, it is `transaction`."""
        if self._inline_writes is None:
            return await self.transaction(work)
        async with self._writer_turn():
            try:
                async with _InlineUnitOfWork(self._inline_writes) as uow:
                    result = await work(uow)
                    await uow.commit()
                    return result
            except DBAPIError as exc:
                # Rolled back: run again the usual way, which waits for locks, retries lost
                # races and maps faults, as it would for any attempt of `transaction`.
                _log_inline_fallback(exc)
        return await self.transaction(work)

    async def _run(self, work: Callable[[UnitOfWork], Awaitable[T]], read_only: bool) -> T:
        races = faults = 0
        while True:
            try:
                if read_only:
                    async with self.unit_of_work(read_only=True) as uow:
                        return await work(uow)
                async with self._writer_turn(), self.unit_of_work() as uow:
                    result = await work(uow)
                    await uow.commit()
                    return result
            except Exception as exc:
                if connection_fault(exc) is not None:
                    faults += 1
                    await self._after_fault(exc, faults)
                    continue
                if read_only or not isinstance(exc, DBAPIError) or not retryable(exc):
                    raise
                races += 1
                if races == MAX_ATTEMPTS:
                    raise Aborted("CONCURRENT_UPDATE", "a concurrent update won; retry") from exc
                log.debug("transaction lost a race (attempt %d): %s", races, exc.orig)
                await asyncio.sleep(0.005 * races)

    async def _after_fault(self, exc: BaseException, faults: int) -> None:
        """Retry a dropped connection (bounded); a timeout or an exhausted pool at once becomes
        UNAVAILABLE — waiting again would only double the caller's wait."""
        fault = connection_fault(exc)
        if fault == "timeout" and unanswered(exc):
            await self.forget_connections()
        if fault != "lost" or faults >= self.bounds.retry_attempts:
            log.warning("database unavailable (%s after %d attempts): %r", fault, faults, exc)
            raise Unavailable(
                "DATABASE_UNAVAILABLE",
                "the database did not answer; retry shortly",
                retry_after_ms=500,
            ) from exc
        log.info("database connection lost (attempt %d), retrying: %r", faults, exc)
        await asyncio.sleep(0.05 * faults)

    def _writer_turn(self):
        return self._write_turn if self._write_turn is not None else contextlib.nullcontext()

    async def ping(self) -> None:
        async with self.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    async def forget_connections(self) -> None:
        """Drop every pooled connection without a goodbye and start a new pool: after a
        connection did not answer at all, or when the database is back after an outage, the
        pooled connections may be dead for good (a failover without reset), and a transaction
        would wait out the command bound on each of them (docs/faults.md). Connections
        in use are left to finish; nothing is sent on the old ones."""
        if not is_sqlite(self.engine):
            log.warning("forgetting pooled database connections; new ones will be opened")
            await self.engine.dispose(close=False)

    async def dispose(self) -> None:
        await self.engine.dispose()
        for inline in (self._inline, self._inline_writes):
            if inline is not None:
                inline.dispose()


def _log_inline_fallback(exc: DBAPIError) -> None:
    if not would_wait(exc):
        log.debug("inline transaction failed, running it on the worker: %s", exc.orig)
