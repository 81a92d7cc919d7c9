"""The injected clock and the due-work scheduler that time-driven work hangs on.

Every service reads time from a `Clock`. `SystemClock` is the wall clock; due work runs in a
background loop. `ManualClock` only moves through `ClockService` (tests, demos), and moving it
runs all due work before the call returns, so a test can walk through months in seconds.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Protocol

log = logging.getLogger("allot.clock")

# A unit of due work: handles everything due at or before `now`, returns how many items it did.
DueWork = Callable[[datetime], Awaitable[int]]

# Due work may make more work due (an expiry re-arms an alert...); passes are bounded.
MAX_DUE_PASSES = 100


class Clock(Protocol):
    def now(self) -> datetime: ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)


class ClockBackwards(ValueError):
    pass


class ManualClock:
    """A clock that moves only when told to; never backwards."""

    def __init__(self, start: datetime | None = None) -> None:
        start = start or datetime.now(UTC)
        if start.tzinfo is None:
            raise ValueError("the manual clock needs an aware start time")
        self._now = start.astimezone(UTC)

    def now(self) -> datetime:
        return self._now

    def set(self, value: datetime) -> None:
        if value.tzinfo is None:
            raise ValueError("naive datetime")
        value = value.astimezone(UTC)
        if value < self._now:
            raise ClockBackwards(f"the clock is at {self._now.isoformat()}; it cannot move back")
        self._now = value


class Scheduler:
    """Runs registered due work: in a loop on the system clock, on demand on the manual one."""

    def __init__(self, clock: Clock, interval: float = 5.0) -> None:
        self.clock = clock
        self.interval = interval
        self._work: list[tuple[str, DueWork]] = []
        self._lock = asyncio.Lock()
        self._task: asyncio.Task | None = None

    def register(self, name: str, work: DueWork) -> None:
        self._work.append((name, work))

    async def run_due(self) -> int:
        """Run every piece of due work until none has anything left (bounded)."""
        done = 0
        async with self._lock:
            for _ in range(MAX_DUE_PASSES):
                progress = 0
                for name, work in self._work:
                    count = await work(self.clock.now())
                    if count:
                        log.debug("due work %s handled %d items", name, count)
                    progress += count
                done += progress
                if not progress:
                    break
        return done

    async def advance(self, delta: timedelta) -> datetime:
        if not isinstance(self.clock, ManualClock):
            raise ClockBackwards("only the manual clock can be moved")
        if delta < timedelta(0):
            raise ClockBackwards("the clock cannot move back")
        self.clock.set(self.clock.now() + delta)
        await self.run_due()
        return self.clock.now()

    async def set_time(self, value: datetime) -> datetime:
        if not isinstance(self.clock, ManualClock):
            raise ClockBackwards("only the manual clock can be set")
        self.clock.set(value)
        await self.run_due()
        return self.clock.now()

    def start(self) -> None:
        """On the system clock, look for due work every `interval` seconds."""
        if isinstance(self.clock, ManualClock) or not self._work:
            return
        self._task = asyncio.create_task(self._loop(), name="due-work")

    async def _loop(self) -> None:
        while True:
            try:
                await self.run_due()
            except Exception:  # keep the loop alive; the next pass retries
                log.exception("due work failed")
            await asyncio.sleep(self.interval)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None


class KickedWork:
    """Due work that can also be asked to run at once (``kick``): a new notification to
    deliver, a cycle that is over already. Register ``run`` with the scheduler and start
    ``loop`` as a task; rounds never overlap in this process."""

    def __init__(self, clock: Clock, work: DueWork, what: str) -> None:
        self.clock = clock
        self._work = work
        self._what = what
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()

    async def run(self, now: datetime) -> int:
        async with self._lock:  # one round at a time in this process
            return await self._work(now)

    def kick(self) -> None:
        self._wake.set()

    async def loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self.run(self.clock.now())
            except Exception:  # keep the worker alive; the scheduler runs the work too
                log.exception("%s failed", self._what)
