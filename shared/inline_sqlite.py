"""Short transactions of a SQLite file on the event loop's own thread (docs/design/scale.md,
"SQLite on the loop's thread").

aiosqlite runs every statement on a worker thread and hands its answer back to the loop: a
transaction is a hand-off per step (connect, BEGIN, each statement, COMMIT or ROLLBACK, close),
each two thread wake-ups. CheckQuota's admission read, about 10 µs of SQLite work, cost about
600 µs of CPU that way on the reference machine; through a plain `sqlite3` connection on the
loop's thread it costs about 100 µs (SQLAlchemy's part included).

The hand-offs have one virtue: while a transaction is on the worker, the loop serves other
calls, and the callers that arrive meanwhile share the next transaction (the coalescers'
batches). Run inline, a transaction leaves no such window; the batches make one on purpose
instead: with company, a batch waits a little for more callers (`shared/batching.py`) and then
runs inline as well, if it is short (an admission read of up to 64 keys, a usage batch of up
to 100 events); a longer one (a merged batch of `BatchReportUsage` calls) goes to the worker,
so the loop is never held for long.

The inline connections have no busy timeout: where a transaction would wait for a lock (another
process writing, a checkpoint resetting the log) it fails at once with "database is locked"
before doing anything, and `Database` runs it again the usual way, which waits as every
transaction does. The reading connection is `query_only`.
"""

from __future__ import annotations

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import OperationalError

from shared import direct_sql, tracing


class InlineEngine:
    """A synchronous engine on the service's SQLite file for transactions on the loop's thread,
    and the one connection it keeps open between them: checking a connection out of the pool
    and back cost more than a short read."""

    def __init__(self, engine: Engine, writes: bool) -> None:
        self.engine = engine
        self.writes = writes
        self._idle: Connection | None = None

    def connect(self) -> InlineConnection:
        """The kept connection, or a new one while the kept one is in use."""
        connection, self._idle = self._idle, None
        if connection is None or connection.closed or connection.invalidated:
            connection = self.engine.connect()
        # Hot statements on the driver, unless traced (spans come from SQLAlchemy's events).
        return InlineConnection(connection, self, direct=not tracing.enabled())

    def keep(self, connection: Connection) -> None:
        """Keep a connection whose transaction ended (else close it: the pool resets it)."""
        reusable = not (connection.closed or connection.invalidated) and not (
            connection.in_transaction() or connection.connection.dbapi_connection.in_transaction
        )
        if self._idle is None and reusable:
            self._idle = connection
        else:
            connection.close()

    def dispose(self) -> None:
        idle, self._idle = self._idle, None
        if idle is not None:
            idle.close()
        self.engine.dispose()


def inline_engine(url: str, writes: bool = False) -> InlineEngine | None:
    """A synchronous engine on the same SQLite file, for transactions on the loop's thread
    (`writes`: BEGIN IMMEDIATE, else read-only); None where there is no file to share (an
    in-memory database is private to its connection)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    # check_same_thread off: the pool may close a connection from the collector's thread.
    engine = create_engine(
        parsed.set(drivername="sqlite"), connect_args={"timeout": 0, "check_same_thread": False}
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record):
        dbapi_connection.isolation_level = None  # we say BEGIN ourselves
        cursor = dbapi_connection.cursor()
        pragmas = ["PRAGMA busy_timeout=0", "PRAGMA foreign_keys=ON", "PRAGMA synchronous=NORMAL"]
        if not writes:
            pragmas.append("PRAGMA query_only=ON")
        for pragma in pragmas:
            cursor.execute(pragma)
        cursor.close()

    if writes:

        @event.listens_for(engine, "begin")
        def _on_begin(conn):
            # Begun already where a hot statement came first (InlineConnection._driver).
            if not conn.connection.dbapi_connection.in_transaction:
                conn.exec_driver_sql("BEGIN IMMEDIATE")

    # Reads say no BEGIN: each statement reads its own snapshot (the read is one statement,
    # `Database.read_inline`), and a BEGIN was a statement as costly as the read.

    return InlineEngine(engine, writes)


def would_wait(exc: BaseException) -> bool:
    """An inline transaction met a lock it may not wait for (SQLITE_BUSY / SQLITE_LOCKED)."""
    return isinstance(exc, OperationalError) and "locked" in str(exc.orig).lower()


class InlineConnection:
    """A synchronous connection behind the awaitable surface the repositories and the unit of
    work use (`execute`, `scalar`, `commit`, ...): awaiting it never suspends.

    `direct`: hot statements, and the driver's own text, go straight to the driver
    (`shared/direct_sql.py`), and so do a write transaction's BEGIN IMMEDIATE and its end.
    A statement SQLAlchemy runs after them joins the transaction begun (the engine's begin
    hook sees it open), and SQLAlchemy then ends it."""

    def __init__(self, connection: Connection, owner: InlineEngine, direct: bool = True) -> None:
        self.sync_connection = connection
        self._owner = owner
        self._direct = direct

    def _driver(self):
        driver = self.sync_connection.connection.dbapi_connection
        if self._owner.writes and not driver.in_transaction:
            direct_sql.run_text(driver, "BEGIN IMMEDIATE", None, self.sync_connection.dialect)
        return driver

    async def execute(self, statement, parameters=None, **kwargs):
        if self._direct and not kwargs:
            plan = direct_sql.plan_of(statement, self.sync_connection.dialect)
            if plan is not None:
                return plan.run_sqlite(self._driver(), parameters)
        return self.sync_connection.execute(statement, parameters, **kwargs)

    async def scalar(self, statement, parameters=None, **kwargs):
        return (await self.execute(statement, parameters, **kwargs)).scalar()

    async def scalars(self, statement, parameters=None, **kwargs):
        return (await self.execute(statement, parameters, **kwargs)).scalars()

    async def connection(self, **_options) -> InlineConnection:
        return self

    async def exec_driver_sql(self, statement, parameters=None, **kwargs):
        if self._direct and not kwargs:
            dialect = self.sync_connection.dialect
            return direct_sql.run_text(self._driver(), statement, parameters, dialect)
        return self.sync_connection.exec_driver_sql(statement, parameters, **kwargs)

    async def commit(self) -> None:
        self._end("COMMIT")

    async def rollback(self) -> None:
        self._end("ROLLBACK")

    def _end(self, verb: str) -> None:
        connection = self.sync_connection
        if connection.in_transaction():  # SQLAlchemy's own (it ends the driver's too)
            connection.commit() if verb == "COMMIT" else connection.rollback()
            return
        if connection.closed or connection.invalidated:
            return
        driver = connection.connection.dbapi_connection
        if driver.in_transaction:
            direct_sql.run_text(driver, verb, None, connection.dialect)

    async def invalidate(self) -> None:
        self.sync_connection.invalidate()

    async def close(self) -> None:
        self._owner.keep(self.sync_connection)
