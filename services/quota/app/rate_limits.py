"""Rate limits in admission: SetRateLimit, GetRateLimit, and the token taken by a limited
CheckQuota (docs/design/deduction-order.md, "Rate limits").

CheckQuota is the hot path, so a call with no limit pays no query: which (account, region,
API) has a limit is known in memory. The catalog's limits are loaded at start; overrides are
rare, so every process keeps a copy of the override table, read once and then refreshed in the
background when it is older than `REFRESH_SECONDS` (wall-clock seconds: this is about the
copy's freshness, not business time). SetRateLimit updates the copy of the process that took
it at commit; another replica of the region sees it within `REFRESH_SECONDS`. Only a call that
is otherwise admitted and has a limit runs one more statement: the bucket's atomic upsert in
the regional database, shared by every replica, so the limit is exact across replicas.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable

from services.quota.adapters import rate_limits_repository as repo
from services.quota.app.context import QuotaContext
from services.quota.domain.admission import Admission, DenyReason
from services.quota.domain.rate_limits import (
    EffectiveLimit,
    Override,
    effective,
    override_limit,
    retry_after,
)
from shared.db import UnitOfWork
from shared.validation import check_account_id

log = logging.getLogger("allot.quota.rate_limits")

# How stale another replica's copy of the overrides may get (docs: "Rate limits").
REFRESH_SECONDS = 2.0

Key = repo.Key


class RateLimits:
    """One process's view of the rate limits and the use cases that change or apply them."""

    def __init__(
        self,
        ctx: QuotaContext,
        refresh_seconds: float = REFRESH_SECONDS,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ctx = ctx
        self.refresh_seconds = refresh_seconds
        self.monotonic = monotonic
        self._overrides: dict[Key, Override] | None = None
        self._loaded_at = 0.0
        self._loading: asyncio.Task | None = None
        # Local changes committed while a read of the table runs: laid over what it read.
        self._during_read: dict[Key, Override | None] | None = None

    async def close(self) -> None:
        if self._loading is not None:
            self._loading.cancel()
            await asyncio.gather(self._loading, return_exceptions=True)

    # --- the copy of the overrides --------------------------------------------------------

    async def _load(self) -> None:
        self._during_read = {}
        try:
            overrides = await self.ctx.db.read(repo.all_overrides)
            loaded = {(o.account_id, o.region, o.api): o for o in overrides}
            for key, override in self._during_read.items():
                self._put(loaded, key, override)
            self._overrides = loaded
        finally:
            self._during_read = None
            self._loading = None
            self._loaded_at = self.monotonic()  # a failed refresh is retried after the interval

    async def _current(self) -> dict[Key, Override]:
        if self._overrides is None:
            # The first call of the process waits for the first read (shared by its neighbours).
            if self._loading is None:
                self._loading = asyncio.create_task(self._load(), name="rate-limit-overrides")
                # Its failure is heard by its waiters; should they all have left, by nobody.
                self._loading.add_done_callback(lambda t: t.cancelled() or t.exception())
            await asyncio.shield(self._loading)
        elif self._loading is None and self.monotonic() - self._loaded_at > self.refresh_seconds:
            self._loading = asyncio.create_task(self._refresh(), name="rate-limit-overrides")
        assert self._overrides is not None
        return self._overrides

    async def _refresh(self) -> None:
        try:
            await self._load()
        except Exception:  # the old copy serves on; the next call after the interval retries
            log.warning("could not refresh the rate limit overrides", exc_info=True)

    @staticmethod
    def _put(overrides: dict[Key, Override], key: Key, override: Override | None) -> None:
        if override is None:
            overrides.pop(key, None)
        else:
            overrides[key] = override

    def _changed(self, key: Key, override: Override | None) -> None:
        """A change this process committed: into the copy, and over a read under way."""
        if self._overrides is not None:
            self._put(self._overrides, key, override)
        if self._during_read is not None:
            self._during_read[key] = override

    def _effective(self, key: Key, override: Override | None) -> EffectiveLimit:
        return effective(*key, self.ctx.catalog.apis[key[2]].rate_limit_per_second, override)

    # --- admission ------------------------------------------------------------------------

    async def apply(self, key: Key, admission: Admission) -> Admission:
        """The admission after the rate limit: a call denied for another reason takes no
        token; an admitted call of a limited key takes one or is denied RATE_LIMITED."""
        if not admission.allowed:
            return admission
        limit = self._effective(key, (await self._current()).get(key)).limit
        if limit is None:
            return admission

        async def work(uow: UnitOfWork) -> tuple[bool, int]:
            return await repo.take_token(uow, key, limit, self.ctx.now())

        admitted, tokens = await self.ctx.db.transaction(work)
        if admitted:
            return admission
        return dataclasses.replace(
            admission,
            allowed=False,
            deny_reason=DenyReason.RATE_LIMITED,
            retry_after=retry_after(tokens, limit),
        )

    # --- SetRateLimit, GetRateLimit -------------------------------------------------------

    def _key(self, account_id: str, region: str, api: str) -> Key:
        check_account_id(account_id)
        self.ctx.check_region(region)
        self.ctx.check_api(api)
        return account_id, region, api

    async def set(
        self,
        uow: UnitOfWork,
        account_id: str,
        region: str,
        api: str,
        per_second: int,
        burst: int,
    ) -> EffectiveLimit:
        """Set (per_second > 0) or clear (0) the override; the limit in force after it."""
        key = self._key(account_id, region, api)
        limit = override_limit(per_second, burst)
        now = self.ctx.now()
        await repo.put_override(uow, key, limit, now)
        override = Override(*key, limit, now) if limit is not None else None
        uow.after_commit(lambda: self._changed(key, override))
        return self._effective(key, override)

    async def get(self, account_id: str, region: str, api: str) -> EffectiveLimit:
        """The limit in force, read from the database (not the copy: this is no hot path)."""
        key = self._key(account_id, region, api)

        async def work(uow: UnitOfWork) -> Override | None:
            return await repo.get_override(uow, key)

        return self._effective(key, await self.ctx.db.read(work))
