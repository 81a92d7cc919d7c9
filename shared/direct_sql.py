"""Hot statements run straight on the driver (docs/design/scale.md, "Hot statements below
SQLAlchemy").

Every `ReportUsage` and `CheckQuota` runs the same few SQLAlchemy Core statements. Executing one
through SQLAlchemy costs about 50 µs of CPU before the driver sees it (its cache key, the
parameters, the execution context, the result's metadata; on PostgreSQL also the asyncpg
adapter's greenlet), several times SQLite's own work for it. A repository marks such a
statement with `hot(statement)`: it must be built once (a module constant, or cached per size)
and live as long as the process. A hot statement is compiled once by SQLAlchemy per dialect;
each execution is then the driver's own: `sqlite3`'s `execute` on the inline connections
(`shared/inline_sqlite.py`), asyncpg's `fetch` inside the transaction SQLAlchemy's adapter
began (`shared/db.py`, `TransactionConnection`), the parameters in compiled order and the rows
as named tuples; SQLAlchemy's type processing is applied where a type has one (booleans,
arrays). What SQLAlchemy would raise is raised (its `DBAPIError` wrapping the driver's error,
a lost connection marked invalidated), so the callers' fault handling is the same. Everything
else, and every statement when tracing is on (its spans come from SQLAlchemy's events), goes
through SQLAlchemy as before.

A statement whose compiled form this cannot run as it is (an expanding IN list, a column name
that cannot be a tuple field) is refused when it is first run, loudly: `hot` is a promise the
tests check (tests/integration/test_direct_sql.py runs every hot statement both ways on both
databases).
"""

from __future__ import annotations

import sqlite3
from collections import namedtuple
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError, MultipleResultsFound, NoResultFound

# id(statement) -> (statement, its plans per dialect name). The statement is held, so its id
# is never reused; hot statements are built once, so this stays small.
_HOT: dict[int, tuple[Any, dict[str, _Plan]]] = {}


def hot(statement):
    """Mark `statement` as run on every call (see the module's docstring); returns it."""
    _HOT.setdefault(id(statement), (statement, {}))
    return statement


def plan_of(statement, dialect: Dialect) -> _Plan | None:
    """The driver-level plan of a hot statement (None: not hot, run it through SQLAlchemy)."""
    entry = _HOT.get(id(statement))
    if entry is None:
        return None
    plans = entry[1]
    plan = plans.get(dialect.name)
    if plan is None:
        plan = plans[dialect.name] = _Plan(statement, dialect)
    return plan


class _Plan:
    """One hot statement compiled for one dialect: its text, its parameters in order (with the
    values the statement itself fixes), its bind and result processors, its row type."""

    def __init__(self, statement, dialect: Dialect) -> None:
        if statement.is_dml and not (
            getattr(statement, "_values", None) or getattr(statement, "_select_names", None)
        ):
            # Its columns would follow each call's parameter names (`insert(table)`).
            raise ValueError("not a hot statement: INSERT or UPDATE without its values")
        compiled = statement.compile(dialect=dialect)
        expanding = [b.key for b in compiled.binds.values() if b.expanding]
        if expanding or compiled.positiontup is None:
            raise ValueError(f"not a hot statement: expanding parameters {expanding}")
        self.dialect = dialect
        self.sql = compiled.string
        self.names: tuple[str, ...] = tuple(compiled.positiontup)
        if any(bind.callable for bind in compiled.binds.values()):
            raise ValueError("not a hot statement: a parameter's value is computed per call")
        fixed = compiled.construct_params(_check=False)
        required = {name for bind, name in compiled.bind_names.items() if bind.required}
        self.fixed = {n: v for n, v in fixed.items() if n not in required}
        binds = compiled._bind_processors
        self.bind_processors = [binds.get(n) for n in self.names]
        self.any_bind_processor = any(self.bind_processors)
        keys = [entry[0] for entry in compiled._result_columns]
        self.result_processors: list[Callable | None] = [
            entry[3]._cached_result_processor(dialect, None) for entry in compiled._result_columns
        ]
        self.any_result_processor = any(self.result_processors)
        self.row = namedtuple("Row", keys, rename=True) if keys else None  # type: ignore[misc]
        if self.row is not None and list(self.row._fields) != keys:
            raise ValueError(f"not a hot statement: result columns {keys} are not field names")

    def values(self, params: dict | None) -> tuple:
        fixed = self.fixed
        given = params or {}
        values = [given[n] if n in given else fixed[n] for n in self.names]
        if self.any_bind_processor:
            values = [p(v) if p else v for p, v in zip(self.bind_processors, values, strict=True)]
        return tuple(values)

    def rows(self, fetched) -> list:
        """Driver rows as named tuples, SQLAlchemy's result processing applied."""
        if self.row is None:
            return []
        if self.any_result_processor:
            processors = self.result_processors
            fetched = [
                tuple(p(v) if p else v for p, v in zip(processors, r, strict=True)) for r in fetched
            ]
        make = self.row._make
        return [make(r) for r in fetched]

    def run_sqlite(self, driver: sqlite3.Connection, params: dict | Sequence[dict] | None) -> Rows:
        many = isinstance(params, list | tuple)
        try:
            if many:
                cursor = driver.executemany(self.sql, [self.values(p) for p in params])
            else:
                cursor = driver.execute(self.sql, self.values(params))  # type: ignore[arg-type]
            fetched = cursor.fetchall() if self.row is not None else []
            rowcount = cursor.rowcount
        except sqlite3.Error as exc:
            raise _wrapped(self.sql, params, exc, self.dialect) from exc
        return Rows(self.rows(fetched), rowcount)

    async def run_asyncpg(self, connection, params: dict | None) -> Rows:
        """Run on the asyncpg connection under SQLAlchemy's `connection` (an AsyncConnection
        of the asyncpg dialect), in its transaction: SQLAlchemy's is begun first, so its commit
        or rollback ends what ran here, and the adapter's BEGIN is sent as the adapter would
        (none in autocommit, a read's isolation)."""
        if not connection.in_transaction():
            await connection.begin()
        sync = connection.sync_connection
        # The pooled connection itself (checked out already: no I/O, no greenlet).
        fairy = await connection.get_raw_connection() if sync.invalidated else sync.connection
        adapter = fairy.dbapi_connection
        values = self.values(params)
        async with adapter._execute_mutex:
            try:
                if adapter._transaction is None:
                    await adapter._start_transaction()
                if self.row is not None:
                    fetched = await adapter._connection.fetch(self.sql, *values)
                    return Rows(self.rows(fetched), len(fetched))
                status = await adapter._connection.execute(self.sql, *values)
            except Exception as exc:  # the adapter's translation, then SQLAlchemy's wrapping
                raise self._asyncpg_error(adapter, exc, params) from exc
        count = status.rsplit(" ", 1)[-1]
        return Rows([], int(count) if count.isdigit() else -1)

    def _asyncpg_error(self, adapter, exc: Exception, params) -> BaseException:
        try:
            adapter._handle_exception(exc)  # raises the adapter's DB-API error for exc
        except Exception as translated:  # noqa: BLE001 - wrapped below, as SQLAlchemy does
            exc = translated
        if not isinstance(exc, self.dialect.loaded_dbapi.Error):
            return exc  # not the database's (a timeout, a cancellation): as it is
        lost = self.dialect.is_disconnect(exc, adapter, None)
        return DBAPIError.instance(
            self.sql, params, exc, self.dialect.loaded_dbapi.Error,
            dialect=self.dialect, connection_invalidated=lost,
        )  # fmt: skip


def run_text(driver: sqlite3.Connection, sql: str, params, dialect: Dialect) -> Rows:
    """A statement given as the driver's own text (`exec_driver_sql`), on the driver."""
    try:
        if isinstance(params, list | tuple) and params and isinstance(params[0], dict | tuple):
            cursor = driver.executemany(sql, params)
        else:
            cursor = driver.execute(sql, params or ())
        return Rows(cursor.fetchall(), cursor.rowcount)
    except sqlite3.Error as exc:
        raise _wrapped(sql, params, exc, dialect) from exc


def _wrapped(sql: str, params, exc: sqlite3.Error, dialect: Dialect) -> BaseException:
    """The driver's error as SQLAlchemy raises it (OperationalError, IntegrityError, ...)."""
    return DBAPIError.instance(sql, params, exc, sqlite3.Error, dialect=dialect)


class Rows:
    """The part of SQLAlchemy's `Result` the repositories use, over rows already fetched."""

    __slots__ = ("_rows", "rowcount")

    def __init__(self, rows: list, rowcount: int) -> None:
        self._rows = rows
        self.rowcount = rowcount

    def __iter__(self):
        return iter(self._rows)

    def all(self) -> list:
        return self._rows

    def first(self):
        return self._rows[0] if self._rows else None

    def one(self):
        if not self._rows:
            raise NoResultFound("No row was found when one was required")
        return self.one_or_none()

    def one_or_none(self):
        if len(self._rows) > 1:
            raise MultipleResultsFound("Multiple rows were found when one or none was required")
        return self.first()

    def scalar(self):
        return self._rows[0][0] if self._rows else None

    def scalar_one(self):
        return self.one()[0]

    def scalars(self) -> Rows:
        return Rows([r[0] for r in self._rows], self.rowcount)
