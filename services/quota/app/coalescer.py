"""Merges concurrent `ReportUsage` and `BatchReportUsage` calls into shared batch transactions.

While one batch transaction runs, calls that arrive queue up; when it commits, the queue is
applied as the next batch. A lone call is applied at once (no timer, no added latency); with
company, the next batch first waits a little for more callers (`shared/batching.py`: steps of
1 ms while each brings someone, at most 4 ms), so under load many calls share one transaction,
one lock round and one commit (group commit). Each call still gets its own results or error:
`record_usage` isolates invalid events and applies events in arrival order (a batch call's
events stay together, in their order), so the rules are exactly those of each call on its own.

How long a call waits is bounded adaptively: the next batch takes queued calls up to the events
the last batches managed in TARGET_SECONDS, but never fewer than MIN_COALESCED events (a
transaction's fixed cost, e.g. reading an account's many packages, is paid once per batch) nor
more than MAX_COALESCED, and always at least one call. So a queued call waits for about two
such batches however deep the queue, and a fast database gets big batches.

Faults (docs/faults.md "Database faults"): the batch transaction retries a dropped connection
itself and then fails with UNAVAILABLE, which every caller of the batch hears; every statement
is bounded, so a batch never holds its queue for longer than the database bounds; a caller whose
deadline passes is cancelled by gRPC and stops waiting: still queued, it leaves the queue (not
applied); already in a running batch, the batch goes on for its neighbours.
"""

from __future__ import annotations

import asyncio
import time

from services.quota.app.context import QuotaContext
from services.quota.app.usage import MAX_BATCH, UsageInput, UsageResult, record_usage
from shared.batching import Alone
from shared.errors import AllotError, Unavailable

Answers = list[UsageResult | AllotError]

# Bounded so one transaction's locks and statements stay small (record_usage's own bound).
MAX_COALESCED = MAX_BATCH
# What one batch transaction should take, for the adaptive bound on its size, and the size
# below which the bound does not go.
TARGET_SECONDS = 0.05
MIN_COALESCED = 250
# How long close() waits for a cancelled batch to unwind before it stops waiting. It covers
# SQLite's busy timeout (5 s): an aiosqlite thread abandoned mid-statement keeps the process
# alive after the loop ends, so the batch must get to close its connection. On PostgreSQL a
# statement that never returns is bounded by ALLOT_DB_COMMAND_TIMEOUT_SECONDS as well.
CANCEL_WAIT = 5.0
# A batch of at most INLINE_EVENTS events is recorded on the event loop's thread on SQLite
# (shared/inline_sqlite.py, docs/design/scale.md); a longer one on aiosqlite's worker, so the
# loop is not held for long (about 25 µs per event).
INLINE_EVENTS = 100


class UsageCoalescer:
    def __init__(self, ctx: QuotaContext, max_batch: int = MAX_COALESCED) -> None:
        self.ctx = ctx
        self.max_batch = max_batch
        self._queue: list[tuple[list[UsageInput | AllotError], asyncio.Future]] = []
        self._flusher: asyncio.Task | None = None
        # Seconds per event of the recent batches (moving average): sizes the next batch.
        self._per_event = 0.0
        # Whether a caller is alone: then its small batch runs on the loop's thread (_flush).
        self._alone = Alone()

    async def report(self, item: UsageInput) -> UsageResult | AllotError:
        """One event (`ReportUsage`): its result, or its error."""
        return (await self.report_many([item]))[0]

    async def report_many(self, items: list[UsageInput | AllotError]) -> Answers:
        """A batch call's events, in order (`BatchReportUsage`): one answer per slot, as
        `record_usage` gives them. A batch over MAX_BATCH is refused as record_usage does,
        without holding up anyone else's.

        Batch calls are merged like single events on both databases. On PostgreSQL each batch
        call once ran its own transaction beside the others, so their round trips overlapped;
        but concurrent batches of one account then queue on its package's row lock, one
        transaction after another, and the unlucky wait for seconds (`make bench`, batch x100
        at concurrency 16: 7,600 events/s, p99 1.2 s; merged: 18,700 events/s, p99 130 ms)."""
        if len(items) > MAX_BATCH:
            return await record_usage(self.ctx, items)
        future = asyncio.get_running_loop().create_future()
        entry = (items, future)
        self._queue.append(entry)
        self._alone.enter()
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
        finally:
            self._alone.leave()

    def _take(self) -> list[tuple[list[UsageInput | AllotError], asyncio.Future]]:
        """The next batch: queued calls in arrival order, whole, up to the adaptive bound."""
        bound = self.max_batch
        if self._per_event > 0:
            bound = min(bound, max(MIN_COALESCED, int(TARGET_SECONDS / self._per_event)))
        count = events = 0
        for items, _ in self._queue:
            if count and events + len(items) > bound:
                break
            count += 1
            events += len(items)
        batch = self._queue[:count]
        del self._queue[:count]
        return batch

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
                # With company, let more callers join this batch (shared/batching.py).
                await self._alone.gather()
                if not self._queue:  # every caller that waited went away meanwhile
                    break
                batch = self._take()
                items = [item for entry_items, _ in batch for item in entry_items]
                started = time.monotonic()
                inline = len(items) <= INLINE_EVENTS
                try:
                    results = await record_usage(self.ctx, items, inline=inline)
                except BaseException as exc:  # the whole transaction failed: every caller hears
                    answer = exc if isinstance(exc, Exception) else _shutting_down()
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(answer)
                    if not isinstance(exc, Exception):
                        raise
                    continue
                per_event = (time.monotonic() - started) / max(1, len(items))
                self._per_event = (
                    per_event if not self._per_event else 0.8 * self._per_event + 0.2 * per_event
                )
                offset = 0
                for entry_items, future in batch:
                    answers = results[offset : offset + len(entry_items)]
                    offset += len(entry_items)
                    if not future.done():
                        future.set_result(answers)
        finally:
            self._flusher = None


def _nobody_listens(future: asyncio.Future) -> None:
    # The caller went away: read the outcome so asyncio does not report it as never retrieved.
    if not future.cancelled():
        future.exception()


def _shutting_down() -> Unavailable:
    return Unavailable("SHUTTING_DOWN", "the service is stopping: retry on another replica")
