"""How long a batch waits for company (shared/batching.py): not at all alone; with company a
step at a time while callers keep arriving, never past the bound."""

from __future__ import annotations

import asyncio
import time

from shared import batching
from shared.batching import Alone


async def test_alone_the_batch_does_not_wait():
    alone = Alone()
    alone.enter()
    started = time.monotonic()
    await alone.gather()
    assert time.monotonic() - started < batching.GATHER_STEP
    alone.leave()


async def test_with_company_it_waits_one_step_when_nobody_else_comes(monkeypatch):
    monkeypatch.setattr(batching, "GATHER_STEP", 0.05)
    company = Alone()
    company.enter()
    company.enter()  # a second caller in flight: busy
    started = time.monotonic()
    await company.gather()
    assert 0.04 < time.monotonic() - started < 0.5


async def test_it_waits_while_callers_keep_arriving_but_never_past_the_bound(monkeypatch):
    monkeypatch.setattr(batching, "GATHER_STEP", 0.02)
    monkeypatch.setattr(batching, "GATHER_BOUND", 0.1)
    company = Alone()
    company.enter()
    company.enter()

    async def keep_arriving() -> None:
        for _ in range(100):  # bounded: far longer than the wait
            await asyncio.sleep(0.005)
            company.enter()
            company.leave()  # arrivals count even when the callers already left

    arriving = asyncio.create_task(keep_arriving())
    started = time.monotonic()
    await company.gather()
    waited = time.monotonic() - started
    arriving.cancel()
    assert 0.09 < waited < 0.5
