"""The bench's own access to quota's database: rows seeded directly (fast, into the real tables
the migrations create, services/quota/adapters/tables.py) and the consistency count of
recorded events. SQLite through `sqlite3` in a thread, PostgreSQL through asyncpg."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import time
import uuid
from collections.abc import Iterator

import asyncpg
from sqlalchemy import make_url

from services.quota.domain.packages import PackageSource, PackageState

DAY_US = 86_400 * 1_000_000

PACKAGE_COLUMNS = (
    "package_id",
    "account_id",
    "region",
    "api",
    "enterprise_project_id",
    "source",
    "total_quantity",
    "used_quantity",
    "effective_time_us",
    "expire_time_us",
    "create_time_us",
    "revoke_time_us",
    "revoke_reason",
    "order_id",
    "announced_state",
    "expiring_announced",
)
EVENT_COLUMNS = (
    "event_id",
    "fingerprint",
    "account_id",
    "user_id",
    "region",
    "api",
    "enterprise_project_id",
    "quantity",
    "http_status",
    "billable",
    "occur_time_us",
    "record_time_us",
    "package_quantity",
    "pay_per_use_quantity",
    "remaining_quantity",
    "deductions",
    "explanation",
)


def now_us() -> int:
    return time.time_ns() // 1000


def package_row(
    package_id: str,
    account_id: str,
    region: str,
    api: str,
    total: int,
    used: int,
    effective_us: int,
    expire_us: int,
    state: PackageState,
) -> tuple:
    return (
        package_id,
        account_id,
        region,
        api,
        "",
        int(PackageSource.SUBSCRIPTION),
        total,
        used,
        effective_us,
        expire_us,
        effective_us,
        None,
        "",
        "",
        int(state),
        False,
    )


def dead_packages(account_id: str, count: int, region: str, api: str) -> Iterator[tuple]:
    """`count` packages of the scope that cannot pay: a third expired long ago (more than the
    31 days after which the hot path leaves them out), a third expired within the last weeks
    (still candidates), a third in force but used up; states as the outbox announced them."""
    now = now_us()
    tag = uuid.uuid4().hex[:20]
    for i in range(count):
        package_id = f"pkg-bench-{tag}-{i:04d}"
        kind = i % 3
        if kind == 0:  # expired 40 to 400 days ago
            expire = now - (40 + i % 360) * DAY_US
            yield package_row(
                package_id, account_id, region, api, 100, 7, expire - 365 * DAY_US, expire,
                PackageState.EXPIRED,
            )  # fmt: skip
        elif kind == 1:  # expired 1 to 25 days ago
            expire = now - (1 + i % 25) * DAY_US
            yield package_row(
                package_id, account_id, region, api, 100, 7, expire - 365 * DAY_US, expire,
                PackageState.EXPIRED,
            )  # fmt: skip
        else:  # in force, nothing left
            yield package_row(
                package_id, account_id, region, api, 10, 10, now - 30 * DAY_US,
                now + 300 * DAY_US, PackageState.EXHAUSTED,
            )  # fmt: skip


def history(events: int, accounts: int, region: str, api: str) -> tuple[list[tuple], Iterator]:
    """A past of `events` usage events over `accounts` accounts (one package each, every event
    paid by it, spread over the last 30 days): the package rows and a generator of event rows."""
    now = now_us()
    per_account = max(1, events // accounts)
    packages = [
        package_row(
            f"pkg-seed-{a:07d}",
            f"seed-acct-{a:07d}",
            region,
            api,
            10**6,
            per_account,
            now - 60 * DAY_US,
            now + 300 * DAY_US,
            PackageState.ACTIVE,
        )  # fmt: skip
        for a in range(accounts)
    ]

    def rows() -> Iterator[tuple]:
        for i in range(events):
            a, n = divmod(i, per_account)
            a %= accounts
            package_id = f"pkg-seed-{a:07d}"
            occur = now - 30 * DAY_US + (i * 2_592_000_000_000 // events)
            explanation = {
                "policy": "standard",
                "decisive_rule": "ONLY_CANDIDATE",
                "candidates": [[package_id, 1, True, "", 1]],
            }
            yield (
                f"seed-ev-{i:08d}", f"{i:064x}", f"seed-acct-{a:07d}", "seed-user-0001",
                region, api, "0", 1, 200, True, occur, occur, 1, 0, 10**6 - n - 1,
                json.dumps([[package_id, 1]]), json.dumps(explanation, separators=(",", ":")),
            )  # fmt: skip

    return packages, rows()


class BenchDatabase:
    """Quota's database as the bench sees it (never while a transaction of quota needs a row
    the bench writes: the rows are for accounts no call has named yet)."""

    def __init__(self, url: str) -> None:
        parsed = make_url(url)
        self.dialect = parsed.get_backend_name()
        if self.dialect == "sqlite":
            self.path = parsed.database or ""
            self.plain_url = ""
        else:
            self.path = ""
            self.plain_url = parsed.set(drivername="postgresql").render_as_string(
                hide_password=False
            )

    def _sqlite(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=60, isolation_level=None)

    async def insert(self, table: str, columns: tuple[str, ...], rows) -> int:
        """Rows into `table` in one transaction (PostgreSQL: COPY); how many."""
        if self.dialect == "sqlite":
            return await asyncio.to_thread(self._sqlite_insert, table, columns, rows)
        counted = _Counted(rows)
        conn = await asyncpg.connect(self.plain_url, timeout=10)
        try:
            async with conn.transaction():
                await conn.copy_records_to_table(table, records=counted, columns=list(columns))
        finally:
            await conn.close()
        return counted.count

    def _sqlite_insert(self, table: str, columns: tuple[str, ...], rows) -> int:
        counted = _Counted(rows)
        conn = self._sqlite()
        try:
            conn.execute("PRAGMA synchronous=OFF")  # this connection only: a bulk seed
            conn.execute("BEGIN IMMEDIATE")
            marks = ", ".join("?" for _ in columns)
            conn.executemany(
                f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})", counted
            )
            conn.execute("COMMIT")
        finally:
            conn.close()
        return counted.count

    async def settle(self) -> None:
        """After a bulk load, the database as it stands once it has held those rows a while:
        PostgreSQL vacuumed and analysed (autovacuum would) and checkpointed, SQLite's WAL
        checkpointed into the file; so the measurement after it does not pay for the load."""
        if self.dialect == "sqlite":

            def checkpoint() -> None:
                conn = self._sqlite()
                try:
                    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                finally:
                    conn.close()
                # The load ran with synchronous=OFF: its pages may still wait in the OS's
                # cache, and quota's first checkpoint (on the loop's thread) would flush them
                # all, a stall of a second or more that belongs to the load, not to quota.
                fd = os.open(self.path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)

            await asyncio.to_thread(checkpoint)
            return
        conn = await asyncpg.connect(self.plain_url, timeout=10)
        try:
            await conn.execute("VACUUM (ANALYZE) packages, usage_events")
            await conn.execute("CHECKPOINT")
        finally:
            await conn.close()

    async def recorded_events(self, account_ids: list[str]) -> dict[str, tuple[int, int]]:
        """Per account: usage events recorded and their quantity (0s when none)."""
        if not account_ids:
            return {}
        sql = (
            "SELECT account_id, count(*), sum(quantity) FROM usage_events "
            "WHERE account_id IN ({}) GROUP BY account_id"
        )
        if self.dialect == "sqlite":

            def read() -> list:
                conn = self._sqlite()
                try:
                    marks = ", ".join("?" for _ in account_ids)
                    return conn.execute(sql.format(marks), account_ids).fetchall()
                finally:
                    conn.close()

            rows = await asyncio.to_thread(read)
        else:
            conn = await asyncpg.connect(self.plain_url, timeout=10)
            try:
                marks = ", ".join(f"${i + 1}" for i in range(len(account_ids)))
                rows = await conn.fetch(sql.format(marks), *account_ids)
            finally:
                await conn.close()
        found = {r[0]: (int(r[1]), int(r[2] or 0)) for r in rows}
        return {a: found.get(a, (0, 0)) for a in account_ids}


class _Counted:
    """An iterable that counts what was taken from it."""

    def __init__(self, rows) -> None:
        self.rows = rows
        self.count = 0

    def __iter__(self):
        for row in self.rows:
            self.count += 1
            yield row
