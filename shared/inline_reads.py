"""Reads of a SQLite file run on the event loop's own thread (docs/design/scale.md, "Inline
reads on SQLite").

aiosqlite runs every statement on a worker thread and hands its answer back to the loop: a
read transaction is five such hand-offs (connect, BEGIN, statement, ROLLBACK, close), each two
thread wake-ups. For CheckQuota's admission read, a statement of about 10 µs of SQLite work,
that cost about 600 µs of CPU per read on this machine. A reader of a WAL database never waits
for writers (it reads its snapshot), so a short, bounded read may run where it is asked for,
through a plain `sqlite3` connection: no hand-off at all.

Only reads that are known to be short take this path (`Database.read_inline`); a long one
(statistics over months, a replay) would hold every other call up, and keeps the worker thread.
The connection has no busy timeout and is `query_only`: in the rare moment a WAL reader must
wait (recovery, a checkpoint resetting the log) it fails at once with "database is locked", and
the read is run again the usual way, which waits as every read does.
"""

from __future__ import annotations

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import OperationalError


def inline_engine(url: str, writes: bool = False) -> Engine | None:
    """A synchronous engine on the same SQLite file, for reads on the loop's thread; None where
    there is no file to share (an in-memory database is private to its connection)."""
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

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        conn.exec_driver_sql("BEGIN IMMEDIATE" if writes else "BEGIN")

    return engine


def would_wait(exc: BaseException) -> bool:
    """The inline read met a lock it may not wait for (SQLITE_BUSY / SQLITE_LOCKED)."""
    return isinstance(exc, OperationalError) and "locked" in str(exc.orig).lower()


class InlineConnection:
    """A synchronous connection behind the awaitable surface the repositories use
    (`execute`, `scalar`, `scalars`, `connection`): awaiting it never suspends."""

    def __init__(self, connection: Connection) -> None:
        self.sync_connection = connection

    async def execute(self, statement, parameters=None, **kwargs):
        return self.sync_connection.execute(statement, parameters, **kwargs)

    async def scalar(self, statement, parameters=None, **kwargs):
        return self.sync_connection.scalar(statement, parameters, **kwargs)

    async def scalars(self, statement, parameters=None, **kwargs):
        return self.sync_connection.scalars(statement, parameters, **kwargs)

    async def connection(self, **_options) -> InlineConnection:
        return self

    async def exec_driver_sql(self, statement, parameters=None, **kwargs):
        return self.sync_connection.exec_driver_sql(statement, parameters, **kwargs)

    async def commit(self) -> None:
        self.sync_connection.commit()

    async def rollback(self) -> None:
        self.sync_connection.rollback()

    async def invalidate(self) -> None:
        self.sync_connection.invalidate()

    async def close(self) -> None:
        self.sync_connection.close()
