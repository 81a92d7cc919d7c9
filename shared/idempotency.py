"""Idempotency keys (AIP-155): `(scope, request_id) -> fingerprint + stored response`.

The key is written in the same transaction as the mutation it guards, never before it, so a
failed write leaves no claimed key behind and a retried request either finds the stored
response or performs the mutation once. The same id with other content is REQUEST_ID_REUSED.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TypeVar

from google.protobuf.message import Message
from sqlalchemy import BigInteger, Column, LargeBinary, MetaData, String, Table, insert, select

from shared.db import Database, UnitOfWork
from shared.errors import InvalidArgument
from shared.timeutil import to_micros

M = TypeVar("M", bound=Message)


def idempotency_table(metadata: MetaData) -> Table:
    return Table(
        "idempotency_keys",
        metadata,
        Column("scope", String(100), primary_key=True),
        Column("request_id", String(200), primary_key=True),
        Column("fingerprint", String(64), nullable=False),
        Column("response", LargeBinary, nullable=False),
        Column("create_time_us", BigInteger, nullable=False),
    )


def fingerprint(request: Message) -> str:
    """A digest of the request's content without its request_id."""
    copy = type(request)()
    copy.CopyFrom(request)
    copy.ClearField("request_id")
    return hashlib.sha256(copy.SerializeToString(deterministic=True)).hexdigest()


class IdempotencyStore:
    def __init__(self, table: Table) -> None:
        self.table = table

    async def lookup(
        self, uow: UnitOfWork, scope: str, request_id: str, digest: str
    ) -> bytes | None:
        row = (
            await uow.session.execute(
                select(self.table.c.fingerprint, self.table.c.response).where(
                    self.table.c.scope == scope, self.table.c.request_id == request_id
                )
            )
        ).first()
        if row is None:
            return None
        if row.fingerprint != digest:
            raise InvalidArgument(
                "request_id",
                f"request_id {request_id!r} was used for a different {scope} request",
                reason="REQUEST_ID_REUSED",
                request_id=request_id,
            )
        return row.response

    async def save(
        self,
        uow: UnitOfWork,
        scope: str,
        request_id: str,
        digest: str,
        response: bytes,
        now: datetime,
    ) -> None:
        # A concurrent twin inserting the same key fails on the primary key; Database.transaction
        # retries the loser, which then finds the stored response.
        await uow.session.execute(
            insert(self.table).values(
                scope=scope,
                request_id=request_id,
                fingerprint=digest,
                response=response,
                create_time_us=to_micros(now),
            )
        )

    async def run(
        self,
        db: Database,
        scope: str,
        request: Message,
        response_type: type[M],
        work: Callable[[UnitOfWork], Awaitable[M]],
        now: Callable[[], datetime],
    ) -> M:
        """Run `work` once per request_id in one transaction with the stored response.

        Requests without a request_id are simply run (they are not idempotent).
        """
        request_id = getattr(request, "request_id", "")
        if len(request_id) > 200:
            raise InvalidArgument("request_id", "request_id is longer than 200 characters")
        digest = fingerprint(request) if request_id else ""

        async def attempt(uow: UnitOfWork) -> M:
            if request_id:
                stored = await self.lookup(uow, scope, request_id, digest)
                if stored is not None:
                    return response_type.FromString(stored)
            response = await work(uow)
            if request_id:
                await self.save(uow, scope, request_id, digest, response.SerializeToString(), now())
            return response

        return await db.transaction(attempt)
