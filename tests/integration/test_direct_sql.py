"""Hot statements on the driver (shared/direct_sql.py): every statement quota marks hot runs
on SQLite's driver and on asyncpg with the same rows and errors as through SQLAlchemy; a
write transaction mixing hot statements, the driver's own text and SQLAlchemy's statements
commits or rolls back as one; statements the driver path cannot run as they are are
refused."""

from __future__ import annotations

import pytest
from sqlalchemy import bindparam, insert, select, text
from sqlalchemy.dialects import sqlite
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.exc import DBAPIError, IntegrityError

from services.quota.adapters import alerts_repository as alerts_repo
from services.quota.adapters import (
    history_repository,
    usage_repository,  # noqa: F401
)
from services.quota.adapters import packages_repository as packages_repo
from services.quota.adapters import subscriptions_repository as subscriptions_repo
from services.quota.adapters import tables as t
from shared import direct_sql, tracing
from shared.db import Database, _InlineUnitOfWork
from shared.db_faults import connection_fault
from shared.timeutil import from_epoch_us
from tests.support.databases import dialect_database

T = 1_000_000_000  # every integer parameter (µs): the seeded rows are in force then
WORD = "a"  # every string parameter: account, region, API, project, month, ids below


async def _seed(db: Database) -> None:
    scope = {"account_id": WORD, "region": WORD, "api": WORD}
    async with db.engine.begin() as c:
        await c.run_sync(t.metadata.create_all)
        for i, project in enumerate(["", WORD]):
            await c.execute(
                insert(t.packages).values(
                    package_id=f"{WORD}{i or ''}",
                    **scope,
                    enterprise_project_id=project,
                    source=1,
                    total_quantity=10 * T,
                    used_quantity=i,
                    effective_time_us=0,
                    expire_time_us=2 * T,
                    create_time_us=0,
                    expiring_announced=bool(i),
                )
            )
        await c.execute(
            insert(t.api_subscriptions).values(**scope, state=1, create_time_us=0, update_time_us=0)
        )
        await c.execute(
            insert(t.account_standings).values(
                account_id=WORD, standing=2, update_time_us=0, block_pay_per_use_in_grace=True
            )
        )
        await c.execute(
            insert(t.usage_alerts).values(
                alert_id=WORD,
                **scope,
                threshold_quantity=5,
                enabled=True,
                create_time_us=0,
                update_time_us=0,
            )  # fmt: skip
        )
        await c.execute(
            insert(t.usage_alert_states).values(alert_id=WORD, api=WORD, state=1, update_time_us=0)
        )
        await c.execute(insert(t.history_counter).values(id=1, last_seq=7))
        await c.execute(
            insert(t.usage_events).values(
                event_id=WORD,
                fingerprint="f",
                **scope,
                user_id="u",
                enterprise_project_id="",
                quantity=1,
                http_status=200,
                billable=True,
                occur_time_us=T,
                record_time_us=T,
                package_quantity=1,
                pay_per_use_quantity=0,
                remaining_quantity=3,
                deductions="[]",
                explanation="{}",
            )  # fmt: skip
        )


@pytest.fixture(params=["sqlite", "postgresql"])
async def database(request, tmp_path):
    async with dialect_database(request.param, tmp_path / "direct.db") as url:
        db = Database(url)
        try:
            await _seed(db)
            yield db
        finally:
            await db.dispose()


def _hot_statements() -> list:
    # The statements built per size: sizes 1 and 3 registered.
    for size in (1, 3):
        packages_repo._lock_scopes(size)
        alerts_repo._rules_with_states_of(size)
        subscriptions_repo._admission_query(size)
    return [statement for statement, _plans in list(direct_sql._HOT.values())]


def _parameters(statement, dialect=None) -> dict:
    compiled = statement.compile(dialect=dialect or sqlite.dialect())
    params = {}
    for bind in compiled.binds.values():
        if not bind.required:
            continue
        kind = bind.type
        if isinstance(kind, ARRAY):  # PostgreSQL's batches: two of each
            item = _value(kind.item_type)
            params[bind.key] = [item, item if isinstance(item, int) else "b"]
        elif bind.key == "ids":  # SQLite's id look-up: a JSON array
            params[bind.key] = f'["{WORD}", "b"]'
        else:
            params[bind.key] = _value(kind, bind.key)
    return params


def _value(kind, key: str = ""):
    affinity = kind._type_affinity.__name__ if kind._type_affinity is not None else ""
    affinity = "" if affinity == "NullType" else affinity
    if affinity in ("Integer", "BigInteger", "SmallInteger"):
        return T
    if not affinity and any(word in key for word in ("now", "after", "step", "_us")):
        return T  # untyped: an instant or a step
    return True if affinity == "Boolean" else WORD


def _unit_of_work(db: Database):
    """SQLite: an inline write transaction (its driver path); PostgreSQL: the usual one."""
    return _InlineUnitOfWork(db._inline_writes) if db.dialect == "sqlite" else db.unit_of_work()


async def _run(db: Database, statement, params, direct: bool, monkeypatch):
    """Rows (as tuples) and column names, or the error's type; rolled back either way."""
    monkeypatch.setattr(tracing, "enabled", lambda: not direct)
    async with _unit_of_work(db) as uow:
        try:
            result = await uow.session.execute(statement, params)
        except DBAPIError as exc:
            return type(exc)
        if statement.is_select or _returns(statement):
            return [tuple(row) for row in result.all()], list(result.keys()) if not direct else None
        return result.rowcount, None


def _returns(statement) -> bool:
    return bool(getattr(statement, "_returning", ()))


async def test_every_hot_statement_gives_what_sqlalchemy_gives(database, monkeypatch):
    statements = _hot_statements()
    assert len(statements) >= 9  # quota's hot path, two sizes of those built per size
    seen_rows = 0
    for statement in statements:
        try:
            params = _parameters(statement, database.engine.dialect)
        except NotImplementedError:  # the other database's statement (a sequence: PostgreSQL)
            continue
        through_sqlalchemy = await _run(database, statement, params, False, monkeypatch)
        on_the_driver = await _run(database, statement, params, True, monkeypatch)
        if isinstance(through_sqlalchemy, type):
            assert on_the_driver is through_sqlalchemy, statement
            continue
        assert on_the_driver[0] == through_sqlalchemy[0], statement
        if isinstance(on_the_driver[0], list):
            seen_rows += len(on_the_driver[0])
    assert seen_rows >= 10  # the seeded rows were found: the comparison compared something


async def test_rows_keep_sqlalchemys_types_and_names(database, monkeypatch):
    monkeypatch.setattr(tracing, "enabled", lambda: False)
    async with _unit_of_work(database) as uow:
        candidates = await packages_repo.lock_candidates(
            uow, [(WORD, WORD, WORD)], from_epoch_us(T), from_epoch_us(T)
        )
        facts = await subscriptions_repo.admission_facts_of(
            uow, [(WORD, WORD, WORD, WORD)], from_epoch_us(T), WORD
        )
    assert [r.package.package_id for r in candidates.records] == [WORD, f"{WORD}1"]
    assert [r.expiring_announced for r in candidates.records] == [False, True]  # booleans
    assert candidates.in_force == {(WORD, WORD, WORD): 20 * T}  # both in force
    assert facts[0].state == 1 and facts[0].standing == 2 and facts[0].block is True


async def _count(db: Database) -> int:
    async def work(uow):
        return (await uow.session.execute(text("SELECT count(*) FROM history_counter"))).scalar()

    return await db.read(work)


async def test_a_transaction_of_hot_and_other_statements_commits_and_rolls_back_whole(database):
    bump = history_repository._BUMP
    add = text("INSERT INTO history_counter (id, last_seq) VALUES (:id, 0)")

    async def mixed(uow, fail: bool):
        await uow.session.execute(bump, {"step": 1})  # hot: on the driver (SQLite: its BEGIN)
        await uow.session.execute(add, {"id": 2})  # SQLAlchemy's, in the same transaction
        await uow.session.exec_driver_sql("INSERT INTO history_counter VALUES (3, 0)")
        if fail:  # a broken CHECK: the whole transaction is undone
            await uow.session.execute(text("UPDATE packages SET used_quantity = -1"))

    with pytest.raises(IntegrityError):
        await database.transaction_inline(lambda uow: mixed(uow, True))
    assert await _count(database) == 1
    await database.transaction_inline(lambda uow: mixed(uow, False))
    assert await _count(database) == 3

    async def last(uow):
        return (await uow.session.execute(select(t.history_counter.c.last_seq))).scalar()

    assert await database.read(last) == 8


async def test_the_drivers_errors_are_sqlalchemys(database, monkeypatch):
    """A constraint broken on the driver is SQLAlchemy's IntegrityError, with the driver's
    error behind it (the fault handling and the fallback read these)."""
    monkeypatch.setattr(tracing, "enabled", lambda: False)
    async with _unit_of_work(database) as uow:
        with pytest.raises(IntegrityError) as raised:
            await uow.session.execute(
                packages_repo._UPDATE_USED, {"b_id": WORD, "b_used": 11 * T, "b_announced": 1}
            )
    assert isinstance(raised.value.orig, database.engine.dialect.loaded_dbapi.IntegrityError)


@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
async def test_a_connection_lost_under_a_hot_statement_is_a_lost_connection(database, monkeypatch):
    """PostgreSQL: the server ends the session under a hot statement; the error says the
    connection is gone (`connection_fault` "lost"), so the transaction runs again on a fresh
    one, as it does through SQLAlchemy (docs/faults.md, "Database faults")."""
    monkeypatch.setattr(tracing, "enabled", lambda: False)
    statement = packages_repo._lock_scopes(1)
    params = _parameters(statement)
    async with database.unit_of_work() as uow:
        pid = (await uow.session.execute(text("SELECT pg_backend_pid()"))).scalar()
        async with database.engine.connect() as other:
            await other.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        with pytest.raises(DBAPIError) as raised:
            await uow.session.execute(statement, params)
        assert connection_fault(raised.value) == "lost"
    attempts = []

    async def work(uow):
        attempts.append(1)
        return len((await uow.session.execute(statement, params)).all())

    assert await database.transaction(work) == 2  # a fresh connection: the pool was renewed
    assert len(attempts) <= 2


def test_statements_it_cannot_run_as_they_are_are_refused():
    dialect = sqlite.dialect()
    expanding = select(t.packages).where(
        t.packages.c.package_id.in_(bindparam("ids", expanding=True))
    )
    bare_insert = insert(t.history_counter)
    try:
        with pytest.raises(ValueError, match="expanding"):
            direct_sql.plan_of(direct_sql.hot(expanding), dialect)
        with pytest.raises(ValueError, match="without its values"):
            direct_sql.plan_of(direct_sql.hot(bare_insert), dialect)
    finally:  # the other tests run every hot statement
        for statement in (expanding, bare_insert):
            direct_sql._HOT.pop(id(statement), None)
    assert direct_sql.plan_of(select(t.packages), dialect) is None  # not hot: SQLAlchemy's
