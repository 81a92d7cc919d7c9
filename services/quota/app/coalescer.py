"""Merges concurrent `ReportUsage` calls into shared batch transactions.

While one batch transaction runs, calls that arrive queue up; when it commits, the queue is
applied as the next batch. A lone call is applied at once (no timer, no added latency); under
load, many calls share one transaction, one lock round and one commit. Each call still gets its
own result or error: `record_usage` isolates invalid events and applies events in arrival order,
so the rules are exactly those of a batch of one.

Faults (docs/faults.md "Database faults"): the batch transaction retries a dropped connection
itself and then fails with UNAVAILABLE, which every caller of the batch hears; every statement
is bounded, so a batch never holds its queue for longer than the database bounds; a caller whose
deadline passes is cancelled by gRPC and stops waiting: still queued, it leaves the queue (not
applied); already in a running batch, the batch goes on for its neighbours.
"""

from __future__ import annotations

import asyncio

from services.quota.app.context import QuotaContext
from services.quota.app.usage import UsageInput, UsageResult, record_usage
from shared.errors import AllotError, Unavailable

# Bounded so one transaction's locks and statements stay small.
MAX_COALESCED = 250
# How long close() waits for a cancelled batch to unwind before it stops waiting. It covers
# SQLite's busy timeout (5 s): an aiosqlite thread abandoned mid-statement keeps the process
# alive after the loop ends, so the batch must get to close its connection. On PostgreSQL a
# statement that never returns is bounded by ALLOT_DB_COMMAND_TIMEOUT_SECONDS as well.
CANCEL_WAIT = 5.0


class UsageCoalescer:
    def __init__(self, ctx: QuotaContext, max_batch: int = MAX_COALESCED) -> None:
        self.ctx = ctx
        self.max_batch = max_batch
        self._queue: list[tuple[UsageInput, asyncio.Future]] = []
        self._flusher: asyncio.Task | None = None

    async def report(self, item: UsageInput) -> UsageResult | AllotError:
        future = asyncio.get_running_loop().create_future()
        entry = (item, future)
        self._queue.append(entry)
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush(), name="usage-coalescer")
        try:
            # shield: a cancelled caller must not cancel the batch its neighbours wait on.
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            if entry in self._queue:
                # Its deadline passed while it queued behind a slow batch: not applied, so a
                # slow database is not handed work nobody waits for (the gateway retries it).
                self._queue.remove(entry)
                future.cancel()
            else:
                future.add_done_callback(_nobody_listens)
            raise

    async def close(self, grace: float) -> None:
        """Let the running batch finish (bounded), so the engine is not disposed under it; a
        batch that does not finish is cancelled, and that wait is bounded too (a cancelled
        statement on a silent connection may never return)."""
        flusher = self._flusher
        if flusher is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(flusher), grace)
        except TimeoutError:
            flusher.cancel()
            await asyncio.wait({flusher}, timeout=CANCEL_WAIT)
        for _, future in self._queue:
            if not future.done():
                future.set_exception(_shutting_down())
        self._queue.clear()

    async def _flush(self) -> None:
        try:
            while self._queue:
                batch = self._queue[: self.max_batch]
                del self._queue[: self.max_batch]
                try:
                    results = await record_usage(self.ctx, [item for item, _ in batch])
                except BaseException as exc:  # the whole transaction failed: every caller hears
                    answer = exc if isinstance(exc, Exception) else _shutting_down()
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(answer)
                    if not isinstance(exc, Exception):
                        raise
                    continue
                for (_, future), result in zip(batch, results, strict=True):
                    if not future.done():
                        future.set_result(result)
        finally:
            self._flusher = None


def _nobody_listens(future: asyncio.Future) -> None:
    # The caller went away: read the outcome so asyncio does not report it as never retrieved.
    if not future.cancelled():
        future.exception()


def _shutting_down() -> Unavailable:
    return Unavailable("SHUTTING_DOWN", "the service is stopping: retry on another replica")
