"""The usage coalescer's batching (services/quota/app/coalescer.py), with record_usage replaced
by a recorder: a lone call goes at once, calls queued behind a running batch share the next one
(whole calls, in arrival order, each caller its own answers), with company the next batch
waits a little for more callers, the batch size follows how long recent batches took, and
batch calls merge on either database."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from services.quota.app import coalescer as module
from services.quota.app.coalescer import UsageCoalescer
from shared import batching


class Recorder:
    """Stands in for record_usage: answers each item with ("ok", item), keeps each batch."""

    def __init__(self, delay: float = 0.0) -> None:
        self.batches: list[list] = []
        self.inline: list[bool] = []  # per batch: recorded on the loop's thread (a short one)
        self.delay = delay
        self.release = asyncio.Event()
        self.release.set()

    async def __call__(self, ctx, items, inline=False):
        self.batches.append(list(items))
        self.inline.append(inline)
        await self.release.wait()
        if self.delay:
            await asyncio.sleep(self.delay)
        return [("ok", item) for item in items]


def coalescer(monkeypatch, recorder: Recorder, dialect: str = "sqlite") -> UsageCoalescer:
    monkeypatch.setattr(module, "record_usage", recorder)
    return UsageCoalescer(SimpleNamespace(db=SimpleNamespace(dialect=dialect)))


async def test_a_lone_call_is_applied_at_once(monkeypatch):
    recorder = Recorder()
    c = coalescer(monkeypatch, recorder)
    assert await asyncio.wait_for(c.report("e1"), 1) == ("ok", "e1")
    assert recorder.batches == [["e1"]]
    assert recorder.inline == [True]  # alone: on the loop's thread (shared/inline_sqlite.py)


async def test_with_company_the_next_batch_waits_for_more_callers(monkeypatch):
    """A call that finds another in flight marks the coalescer busy: the next batch waits a
    step for more callers (shared/batching.py), so one arriving meanwhile joins it; batches
    this short still run on the loop's thread."""
    monkeypatch.setattr(batching, "GATHER_STEP", 0.05)
    recorder = Recorder()
    c = coalescer(monkeypatch, recorder)
    recorder.release.clear()
    first = asyncio.create_task(c.report("a"))
    await asyncio.sleep(0)
    second = asyncio.create_task(c.report("b"))
    await asyncio.sleep(0.01)
    recorder.release.set()
    await asyncio.sleep(0.01)  # "a" is answered; the batch of "b" waits for company
    third = asyncio.create_task(c.report("c"))
    assert await asyncio.gather(first, second, third) == [("ok", "a"), ("ok", "b"), ("ok", "c")]
    assert recorder.batches == [["a"], ["b", "c"]]
    assert recorder.inline == [True, True]


async def test_a_batch_of_many_events_is_never_inline(monkeypatch):
    recorder = Recorder()
    c = coalescer(monkeypatch, recorder)
    many = [f"e{i}" for i in range(module.INLINE_EVENTS + 1)]
    await asyncio.wait_for(c.report_many(many), 1)
    assert recorder.inline == [False]


async def test_calls_queued_behind_a_batch_share_the_next_whole_and_in_order(monkeypatch):
    recorder = Recorder()
    c = coalescer(monkeypatch, recorder)
    recorder.release.clear()
    first = asyncio.create_task(c.report("a"))
    await asyncio.sleep(0)
    queued = [
        asyncio.create_task(c.report("b")),
        asyncio.create_task(c.report_many(["c1", "c2", "c3"])),
        asyncio.create_task(c.report("d")),
    ]
    await asyncio.sleep(0.01)
    recorder.release.set()
    assert await first == ("ok", "a")
    b, many, d = await asyncio.gather(*queued)
    # The first batch held the queue for 10 ms, so the adaptive bound (about 5 events) may
    # leave "d" to a third batch; the calls stay whole and in arrival order either way.
    assert recorder.batches[0] == ["a"]
    assert recorder.batches[1][:4] == ["b", "c1", "c2", "c3"]
    assert [e for batch in recorder.batches[1:] for e in batch] == ["b", "c1", "c2", "c3", "d"]
    assert (b, d) == (("ok", "b"), ("ok", "d"))
    assert many == [("ok", "c1"), ("ok", "c2"), ("ok", "c3")]


async def test_the_next_batch_is_bounded_by_the_time_recent_batches_took(monkeypatch):
    recorder = Recorder(delay=0.02)
    c = coalescer(monkeypatch, recorder)
    monkeypatch.setattr(module, "MIN_COALESCED", 1)  # the floor would hide the bound here
    await c.report_many(["w1", "w2"])  # 10 ms per event: TARGET_SECONDS holds about 5
    assert 0.005 < c._per_event < 0.05
    recorder.release.clear()
    running = asyncio.create_task(c.report("x"))
    await asyncio.sleep(0)
    calls = [asyncio.create_task(c.report_many([f"q{i}a", f"q{i}b"])) for i in range(6)]
    await asyncio.sleep(0.01)
    recorder.release.set()
    await running
    await asyncio.gather(*calls)
    sizes = [len(b) for b in recorder.batches[2:]]
    bound = max(2, int(module.TARGET_SECONDS / c._per_event) + 2)
    assert sum(sizes) == 12 and len(sizes) > 1
    assert all(size % 2 == 0 and size <= bound for size in sizes)  # whole calls only


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
async def test_batch_calls_queue_and_merge_on_either_database(monkeypatch, dialect):
    """Batch calls wait behind the running transaction and the queued ones share the next one;
    on PostgreSQL too, where batches of one account side by side would queue on its row lock."""
    recorder = Recorder()
    c = coalescer(monkeypatch, recorder, dialect)
    recorder.release.clear()
    single = asyncio.create_task(c.report("s"))
    await asyncio.sleep(0)
    first = asyncio.create_task(c.report_many(["m1", "m2"]))
    second = asyncio.create_task(c.report_many(["n1", "n2"]))
    await asyncio.sleep(0.01)
    assert recorder.batches == [["s"]]  # both batch calls wait behind the running one
    recorder.release.set()
    assert await single == ("ok", "s")
    assert await first == [("ok", "m1"), ("ok", "m2")]
    assert await second == [("ok", "n1"), ("ok", "n2")]
    assert recorder.batches == [["s"], ["m1", "m2", "n1", "n2"]]
