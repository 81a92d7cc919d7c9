"""Idempotency keys (AIP-155): `(scope, request_id) -> fingerprint + stored response`.

The key is written in the same transaction as the mutation it guards, never before it, so a
failed write leaves no claimed key behind and a retried request either finds the stored
response or performs the mutation once. The same id with other content is REQUEST_ID_REUSED.

Request ids belong to their caller (docs/security.md, "Idempotency belongs to its caller"):
the stored scope is the method plus the calling principal's `idempotency_owner`
(`account:<id>` for an account's tokens; nothing for operators, whose keys keep the bare
method scope that billing's commands to quota have always used). So nobody can replay another
account's reply or reserve its ids. A stored reply is returned only to a caller that may see
it (its `account_id` and `region`, `check_scope`), and a reply can be stored redacted
(`stored=`): secrets are shown by the first answer only.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TypeVar

from google.protobuf.message import Message
from sqlalchemy import BigInteger, Column, LargeBinary, MetaData, String, Table, insert, select

from shared.auth import check_scope, current_principal
from shared.db import Database, UnitOfWork
from shared.errors import InvalidArgument
from shared.timeutil import to_epoch_us

M = TypeVar("M", bound=Message)

# The width of the `scope` column: a method name and an owner (`account:` + an account id of
# at most 64 characters, as tokens carry them) fit.
SCOPE_CHARS = 100


def idempotency_table(metadata: MetaData) -> Table:
    return Table(
        "idempotency_keys",
        metadata,
        Column("scope", String(SCOPE_CHARS), primary_key=True),
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


def owned_scope(scope: str) -> str:
    """The stored scope of `scope` (a method name) for the calling principal."""
    owner = current_principal().idempotency_owner
    if not owner:
        return scope
    owned = f"{scope} {owner}"
    if len(owned) > SCOPE_CHARS:  # not with tokens' account ids (<= 64); never truncated
        owned = f"{scope} sha256:{hashlib.sha256(owner.encode()).hexdigest()}"
    return owned


def check_replay(response: Message) -> None:
    """A stored reply goes only to a caller that may see it: the account and region it is
    about, when the message names them (a region-limited token of the same account does not
    read a reply about another region)."""
    fields = response.DESCRIPTOR.fields_by_name
    account_id = response.account_id if "account_id" in fields else ""
    region = response.region if "region" in fields else ""
    if account_id:
        check_scope(account_id, region)
    elif region:
        current_principal().check_region(region)


class IdempotencyStore:
    def __init__(self, table: Table) -> None:
        self.table = table

    def bound(self, db: Database, now: Callable[[], datetime]) -> Idempotent:
        """This store run against one service's database and clock: what its servicer calls."""
        return Idempotent(self, db, now)

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
            method = scope.partition(" ")[0]
            raise InvalidArgument(
                "request_id",
                f"request_id {request_id!r} was used for a different {method} request",
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
                create_time_us=to_epoch_us(now),
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
        *,
        stored: Callable[[M], M] | None = None,
        authorize: Callable[[UnitOfWork, M], Awaitable[None]] | None = None,
    ) -> M:
        """Run `work` once per request_id (of the calling principal) in one transaction with
        the stored response.

        Requests without a request_id are simply run (they are not idempotent). `stored`
        turns the response into what is kept for replays (a copy without secrets): the first
        call answers the full response, a replay the stored one. `authorize` checks a replay
        beyond the reply's own `account_id` and `region` (for a reply that does not name the
        region of what it is about).
        """
        request_id, digest, key_scope = _key(scope, request)

        async def attempt(uow: UnitOfWork) -> M:
            if request_id:
                replay = await self._replay(uow, key_scope, request_id, digest, response_type)
                if replay is not None:
                    if authorize is not None:
                        await authorize(uow, replay)
                    return replay
            response = await work(uow)
            if request_id:
                kept = stored(response) if stored is not None else response
                await self.save(uow, key_scope, request_id, digest, kept.SerializeToString(), now())
            return response

        return await db.transaction(attempt)

    async def replay(
        self, db: Database, scope: str, request: Message, response_type: type[M]
    ) -> M | None:
        """The stored reply of a request done before, or None (also without a request_id).

        For a use case that calls another service before its own transaction: a replay is
        answered here without calling it again; the write then goes through `run`, which still
        settles a race with a concurrent twin."""
        request_id, digest, key_scope = _key(scope, request)
        if not request_id:
            return None
        return await db.read(
            lambda uow: self._replay(uow, key_scope, request_id, digest, response_type)
        )

    async def _replay(
        self, uow: UnitOfWork, scope: str, request_id: str, digest: str, response_type: type[M]
    ) -> M | None:
        found = await self.lookup(uow, scope, request_id, digest)
        if found is None:
            return None
        reply = response_type.FromString(found)
        check_replay(reply)
        return reply


class Idempotent:
    """`IdempotencyStore.run` with the database and clock given once (`IdempotencyStore.bound`):
    ``await idempotent("CreateAccount", request, Account, work)``."""

    def __init__(self, store: IdempotencyStore, db: Database, now: Callable[[], datetime]):
        self.store = store
        self.db = db
        self.now = now

    async def __call__(
        self,
        scope: str,
        request: Message,
        response_type: type[M],
        work: Callable[[UnitOfWork], Awaitable[M]],
        *,
        stored: Callable[[M], M] | None = None,
        authorize: Callable[[UnitOfWork, M], Awaitable[None]] | None = None,
    ) -> M:
        return await self.store.run(
            self.db,
            scope,
            request,
            response_type,
            work,
            self.now,
            stored=stored,
            authorize=authorize,
        )

    async def replay(self, scope: str, request: Message, response_type: type[M]) -> M | None:
        """`IdempotencyStore.replay` against this database."""
        return await self.store.replay(self.db, scope, request, response_type)


def _key(scope: str, request: Message) -> tuple[str, str, str]:
    """(request_id, fingerprint, stored scope) of a request; ("", "", scope) without an id."""
    request_id = getattr(request, "request_id", "")
    if len(request_id) > 200:
        raise InvalidArgument("request_id", "request_id is longer than 200 characters")
    if not request_id:
        return "", "", scope
    return request_id, fingerprint(request), owned_scope(scope)
