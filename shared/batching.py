"""Batches of concurrent callers: whether a caller is alone, and how long a batch waits for
company (docs/design/scale.md, "Batches wait for company").

The quota hot paths merge concurrent calls: usage reports into one transaction
(`services/quota/app/coalescer.py`), admission reads into one statement
(`services/quota/app/admission_reads.py`). A lone caller is served at once. With company, a
batch taken the moment its runner is free catches only the callers that happened to be queued
by then; under load the process's one thread is busy with the calls themselves, arrivals
trickle in, and batches of one or two make every call pay a transaction (or a read) of its own,
which keeps the thread busier still. So with company the runner first waits, in steps of
`GATHER_STEP`, for as long as each step brought another caller, at most `GATHER_BOUND`: under
load the batches fill, and a few callers (all of them queued after one step) wait one step.
"""

from __future__ import annotations

import asyncio
import time

# One step of the wait for company, and the most a batch waits in all. Measured with `make
# bench` on the reference machine (steps of 0.5, 1 and 2 ms, bounds of 2 and 4 ms).
GATHER_STEP = 0.001
GATHER_BOUND = 0.004


class Alone:
    """Whether the caller of a path is alone: `enter` and `leave` around each call; a call that
    finds another in flight marks the path busy for `busy_seconds`."""

    def __init__(self, busy_seconds: float = 1.0) -> None:
        self.busy_seconds = busy_seconds
        self._calls = 0
        self._arrived = 0  # calls that entered, ever: gather() counts arrivals
        self._busy_until = 0.0

    def enter(self) -> None:
        if self._calls:
            self._busy_until = time.monotonic() + self.busy_seconds
        self._calls += 1
        self._arrived += 1

    def leave(self) -> None:
        self._calls -= 1

    def __bool__(self) -> bool:
        return time.monotonic() >= self._busy_until

    async def gather(self) -> None:
        """With company, wait for more callers to join the next batch: a step (GATHER_STEP) at
        a time while each step brought another caller into the path, at most GATHER_BOUND.
        Alone: no wait."""
        if self:
            return
        step, bound = GATHER_STEP, GATHER_BOUND
        waited, before = 0.0, self._arrived
        while waited < bound:
            await asyncio.sleep(step)
            waited += step
            if self._arrived == before:
                return
            before = self._arrived
