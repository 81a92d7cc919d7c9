"""Merges concurrent `CheckQuota` reads into shared statements.

The same shape as the usage coalescer (`app/coalescer.py`): while one read runs, calls that
arrive queue up; when it answers, the queue is read as the next batch, in one statement for all
its distinct (account, region, API, project) keys. A lone call is read at once (no timer, no
added latency); with company, the next read first waits a little for more callers
(`shared/batching.py`), which under load is what fills the batches: a read alone takes less
time than the calls take to arrive. Every call's facts are read by a statement that started
after the call arrived, so an answer is never older than the call (what a read of its own would
see). The decision stays in `domain/admission.py`.

Faults (docs/faults.md "Database faults"): the batch read retries a dropped connection itself
and then fails with UNAVAILABLE, which every caller of the batch hears; a caller whose deadline
passes stops waiting, and the read goes on for the callers that share it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime

from services.quota.adapters import subscriptions_repository as subscriptions_repo
from shared.batching import Alone
from shared.db import Database, UnitOfWork

# Distinct keys read by one statement (one compiled form per size, cached by SQLAlchemy).
MAX_KEYS = 64

Key = tuple[str, str, str, str]  # account, region, API, project
Facts = subscriptions_repo.AdmissionFacts


class AdmissionReads:
    def __init__(
        self,
        db: Database,
        now,
        max_keys: int = MAX_KEYS,
        month_of: Callable[[datetime], str] | None = None,
    ) -> None:
        self.db = db
        self.now = now
        self.max_keys = max_keys
        # The billing time zone's month of an instant: the spending cap's month
        # (docs/design/spending-cap.md); None reads no month (no cap counts).
        self.month_of = month_of
        self._queue: dict[Key, asyncio.Future] = {}
        self._reader: asyncio.Task | None = None
        # Whether a check is alone: with company, a read waits a little for more of them.
        self._alone = Alone()

    async def facts(self, key: Key) -> Facts:
        future = self._queue.get(key)
        if future is None:
            future = asyncio.get_running_loop().create_future()
            self._queue[key] = future
        if self._reader is None:
            self._reader = asyncio.create_task(self._read(), name="admission-reads")
        self._alone.enter()
        try:
            # shield: a cancelled caller must not cancel the read its neighbours wait on.
            return await asyncio.shield(future)
        finally:
            self._alone.leave()

    async def _read(self) -> None:
        try:
            while self._queue:
                # With company, let more callers join this read (shared/batching.py).
                await self._alone.gather()
                keys = list(self._queue)[: self.max_keys]
                futures = [self._queue.pop(key) for key in keys]

                async def work(uow: UnitOfWork, keys: list[Key] = keys) -> list[Facts]:
                    now = self.now()
                    month = self.month_of(now) if self.month_of is not None else ""
                    return await subscriptions_repo.admission_facts_of(uow, keys, now, month)

                try:
                    # Short, so on the loop's thread on SQLite (shared/inline_sqlite.py).
                    answers = await self.db.read_inline(work)
                except BaseException as exc:  # every caller of the batch hears
                    answer = exc if isinstance(exc, Exception) else asyncio.CancelledError()
                    for future in futures:
                        if not future.done():
                            future.set_exception(answer)
                            future.exception()  # nobody may be listening any more
                    if not isinstance(exc, Exception):
                        raise
                    continue
                for future, facts in zip(futures, answers, strict=True):
                    if not future.done():
                        future.set_result(facts)
        finally:
            self._reader = None
