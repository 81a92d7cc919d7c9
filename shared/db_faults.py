"""What a database error means for the transaction that met it (docs/faults.md, "Database
faults"): a race a retry wins (`retryable`), a connection that is gone or a bound that ran out
(`connection_fault`), a server that did not answer at all (`unanswered`)."""

from __future__ import annotations

from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.exc import TimeoutError as PoolTimeout


def retryable(exc: DBAPIError) -> bool:
    if isinstance(exc, IntegrityError):
        # A unique key taken by a concurrent transaction: the retry sees the winner's row.
        return "unique" in str(exc.orig).lower() or "duplicate" in str(exc.orig).lower()
    sqlstate = getattr(exc.orig, "sqlstate", None) or getattr(
        getattr(exc.orig, "__cause__", None), "sqlstate", None
    )
    if sqlstate in ("40001", "40P01"):  # serialization failure, deadlock detected
        return True
    return "database is locked" in str(exc.orig).lower()


# SQLSTATEs of a connection that is gone: class 08 (connection exception), and the server
# ending the session (57P01 admin shutdown, e.g. pg_terminate_backend; 57P02 crash; 57P03
# cannot connect now).
_LOST_SQLSTATES = ("57P01", "57P02", "57P03")
_STATEMENT_TIMEOUT = "57014"  # query_canceled: statement_timeout


def connection_fault(exc: BaseException) -> str | None:
    """Why `exc` is the database's fault rather than ours: "lost" (the connection died or could
    not be opened: retry on a fresh one), "timeout" (a bound ran out: a statement, the pool
    checkout), or None (not an infrastructure fault)."""
    if isinstance(exc, PoolTimeout):
        return "timeout"
    if isinstance(exc, DBAPIError):
        if exc.connection_invalidated:
            return "lost"
        return connection_fault(exc.orig) if exc.orig is not None else None
    for cause in _chain(exc):
        if isinstance(cause, TimeoutError):
            return "timeout"
        if isinstance(cause, OSError):
            return "lost"
        sqlstate = getattr(cause, "sqlstate", None)
        if sqlstate == _STATEMENT_TIMEOUT:
            return "timeout"
        if isinstance(sqlstate, str) and (sqlstate.startswith("08") or sqlstate in _LOST_SQLSTATES):
            return "lost"
        name = type(cause).__name__
        if name in ("ConnectionDoesNotExistError", "ConnectionFailureError"):
            return "lost"
        if name == "InterfaceError" and (
            "connection is closed" in str(cause) or "connection was closed" in str(cause)
        ):
            return "lost"
    return None


def unanswered(exc: BaseException) -> bool:
    """The driver's own timeout ran out (not the server's statement_timeout, not the pool's
    checkout): the server did not even answer in time, so the way to it may be dead."""
    return not isinstance(exc, PoolTimeout) and any(
        isinstance(cause, TimeoutError) for cause in _chain(exc)
    )


def _chain(exc: BaseException) -> list[BaseException]:
    """`exc` and its causes (the driver's error behind the adapter's), at most a few deep."""
    out: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and len(out) < 5:
        out.append(current)
        current = current.__cause__
    return out
