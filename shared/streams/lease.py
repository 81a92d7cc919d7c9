"""A stream consumer's cursor and lease, kept in the consuming service's own database.

The cursor is the last sequence whose effect is committed; it moves in the same transaction as
the effect, so a crash keeps both or neither (docs/faults.md, "Streams"). The lease lets one
replica consume a stream at a time: every applying transaction first re-checks and extends it
with a conditional UPDATE, which also locks the lease row until commit, so a replica that lost
its lease (paused past the ttl while another took over) applies nothing, and two replicas never
apply concurrently even on a lease that is about to expire.
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from collections.abc import Callable

from sqlalchemy import BigInteger, Column, MetaData, String, Table, insert, or_, select, update

from shared.db import Database, UnitOfWork

DEFAULT_LEASE_TTL = 15.0


def consumer_tables(metadata: MetaData) -> tuple[Table, Table]:
    """The consumer's cursor and lease tables, added to a service's own metadata."""
    cursors = Table(
        "consumer_cursors",
        metadata,
        # e.g. "quota:ap-southeast-1": one row per stream this service consumes.
        Column("stream", String(128), primary_key=True),
        # The last sequence whose effect is committed.
        Column("sequence", BigInteger, nullable=False),
        Column("update_time_us", BigInteger, nullable=False),
    )
    leases = Table(
        "consumer_leases",
        metadata,
        Column("stream", String(128), primary_key=True),
        Column("holder", String(200), nullable=False),
        # Wall-clock microseconds (time.time()), never a service's manual clock: leases are
        # infrastructure and must expire while a test holds the business clock still.
        Column("expire_us", BigInteger, nullable=False),
    )
    return cursors, leases


def default_holder() -> str:
    """hostname-pid-random: unique per process, readable in the lease table."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class LeaseLost(Exception):
    """Another holder has the stream's lease; this replica must stop applying."""


class StreamLease:
    """One stream's cursor row and lease row, as one holder sees them."""

    def __init__(
        self,
        stream: str,
        db: Database,
        cursors: Table,
        leases: Table,
        holder: str,
        ttl: float = DEFAULT_LEASE_TTL,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if ttl <= 0:
            raise ValueError("lease_ttl must be positive")
        self.stream = stream
        self.db = db
        self.cursors = cursors
        self.leases = leases
        self.holder = holder
        self.ttl = ttl
        self._wall_clock = wall_clock

    def now_us(self) -> int:
        return int(self._wall_clock() * 1_000_000)

    def _expire_us(self) -> int:
        return self.now_us() + int(self.ttl * 1_000_000)

    # --- the lease -----------------------------------------------------------------------

    async def acquire(self) -> bool:
        """Take the lease if it is free, expired or already ours; make sure a cursor row exists."""
        leases = self.leases

        async def work(uow: UnitOfWork) -> bool:
            now = self.now_us()
            expire = now + int(self.ttl * 1_000_000)
            # The condition is re-checked after a row lock wait (PostgreSQL READ COMMITTED), so
            # of two replicas racing for an expired lease exactly one wins.
            taken = await uow.session.execute(
                update(leases)
                .where(
                    leases.c.stream == self.stream,
                    or_(leases.c.holder == self.holder, leases.c.expire_us < now),
                )
                .values(holder=self.holder, expire_us=expire)
            )
            if taken.rowcount != 1:
                exists = (
                    await uow.session.execute(
                        select(leases.c.holder).where(leases.c.stream == self.stream)
                    )
                ).first()
                if exists is not None:
                    return False
                # A concurrent first insert makes this fail on the primary key; the retry of
                # the transaction then finds that replica's lease.
                await uow.session.execute(
                    insert(leases).values(stream=self.stream, holder=self.holder, expire_us=expire)
                )
            await self._ensure_cursor(uow, now)
            return True

        return await self.db.transaction(work)

    async def _ensure_cursor(self, uow: UnitOfWork, now_us: int) -> None:
        if await self.cursor_in(uow) is None:
            await uow.session.execute(
                insert(self.cursors).values(stream=self.stream, sequence=0, update_time_us=now_us)
            )

    async def extend(self, uow: UnitOfWork) -> None:
        """Inside an applying transaction: prove we still hold the lease and extend it. The
        UPDATE locks the lease row until commit, which fences out a replica taking over."""
        leases = self.leases
        result = await uow.session.execute(
            update(leases)
            .where(leases.c.stream == self.stream, leases.c.holder == self.holder)
            .values(expire_us=self._expire_us())
        )
        if result.rowcount != 1:
            raise LeaseLost(self.stream)

    async def renew(self) -> None:
        await self.db.transaction(self.extend)

    async def release(self) -> None:
        """Give the lease up (it expires now), so a replica can take over at once."""
        leases = self.leases

        async def work(uow: UnitOfWork) -> None:
            await uow.session.execute(
                update(leases)
                .where(leases.c.stream == self.stream, leases.c.holder == self.holder)
                .values(expire_us=0)
            )

        await self.db.transaction(work)

    # --- the cursor ----------------------------------------------------------------------

    async def cursor_in(self, uow: UnitOfWork) -> int | None:
        """The stored cursor as `uow` sees it (None: no row yet)."""
        return (
            await uow.session.execute(
                select(self.cursors.c.sequence).where(self.cursors.c.stream == self.stream)
            )
        ).scalar_one_or_none()

    async def stored_cursor(self) -> int:
        """The committed cursor of this stream (0 before the first event)."""

        async def work(uow: UnitOfWork) -> int:
            return await self.cursor_in(uow) or 0

        return await self.db.read(work)

    async def move_cursor(self, uow: UnitOfWork, found: int | None, sequence: int) -> None:
        """Store `sequence` as the cursor in `uow`; `found` is what `cursor_in` read."""
        values = {"sequence": sequence, "update_time_us": self.now_us()}
        if found is None:
            await uow.session.execute(insert(self.cursors).values(stream=self.stream, **values))
        else:
            await uow.session.execute(
                update(self.cursors).where(self.cursors.c.stream == self.stream).values(**values)
            )
