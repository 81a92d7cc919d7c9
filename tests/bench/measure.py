"""The bench's measuring: settings read from the environment, the load driver, /proc samples.

A scenario runs a fixed time: a WARMUP_SECONDS warm-up, then BENCH_SECONDS (default 5)
measured. A call counts when it finishes inside the measured window; calls still in flight at
the end are awaited (so the next scenario starts on an idle server) but not counted. Inside
`served_by(pid)` each measurement also records the serving process's CPU time per call.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import math
import os
import pathlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc

BENCH_SECONDS = float(os.environ.get("BENCH_SECONDS", "5"))
WARMUP_SECONDS = 1.0


def env_list(name: str, default: str) -> list[str]:
    """A comma list from the environment (empty or unset: `default`), lower-cased."""
    raw = os.environ.get(name, "").strip() or default
    return [item.strip().lower() for item in raw.split(",") if item.strip()]


CONCURRENCIES = tuple(int(c) for c in env_list("BENCH_CONCURRENCIES", "1,16,64"))


@dataclass
class Measurement:
    name: str
    concurrency: int
    events_per_call: int
    seconds: float
    latencies: list[float] = field(default_factory=list)  # seconds, calls that succeeded
    errors: int = 0
    first_error: str = ""
    scenario: str = ""  # the BENCH_ONLY name that ran it
    accounts: list[str] = field(default_factory=list)  # checked for consistency afterwards
    consistency: str = "-"  # "ok" or what is wrong; "-" where nothing is counted
    note: str = ""  # what the row is (e.g. "1,000 packages"), printed beside the name
    # CPU seconds the server process (`served_by`) used in the measured window: per call it is
    # a figure the machine's other load hardly moves, unlike calls per second.
    server_cpu_s: float | None = None

    @property
    def server_cpu_us_per_call(self) -> float | None:
        calls = len(self.latencies) + self.errors
        if self.server_cpu_s is None or not calls:
            return None
        return self.server_cpu_s / calls * 1e6

    @property
    def calls_per_second(self) -> float:
        return len(self.latencies) / self.seconds

    @property
    def throughput(self) -> float:
        return len(self.latencies) * self.events_per_call / self.seconds

    def percentile_ms(self, p: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        index = min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))  # rank
        return ordered[index] * 1000


class CallFailed(Exception):
    """A call answered, but not as the scenario expects (an error slot, no deduction, ...)."""


def describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return str(exc)


# The process serving the calls `drive` makes (quota, or the echo server): its CPU time over
# the measured window is recorded with the measurement. Set by `served_by`.
_server_pid: contextvars.ContextVar[int | None] = contextvars.ContextVar("server_pid", default=None)


@contextlib.contextmanager
def served_by(pid: int):
    """Measurements taken inside the block record process `pid`'s CPU time per call."""
    token = _server_pid.set(pid)
    try:
        yield
    finally:
        _server_pid.reset(token)


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) process `pid` has used so far, from /proc."""
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def drive(
    name: str,
    call: Callable[[int], Awaitable[None]],
    concurrency: int,
    events_per_call: int = 1,
    seconds: float | None = None,
) -> Measurement:
    """`concurrency` workers (`call` gets the worker's index) call back to back: warm-up, then
    the measured window (`seconds`, default BENCH_SECONDS), then drain."""
    seconds = BENCH_SECONDS if seconds is None else seconds
    result = Measurement(name, concurrency, events_per_call, seconds)
    start = time.perf_counter()
    measure_from = start + WARMUP_SECONDS
    end = measure_from + seconds

    async def worker(index: int) -> None:
        while (began := time.perf_counter()) < end:
            error = ""
            try:
                await call(index)
            except (grpc.aio.AioRpcError, CallFailed) as exc:
                error = describe(exc)
            finished = time.perf_counter()
            if not measure_from <= finished <= end:
                continue
            if error:
                result.errors += 1
                result.first_error = result.first_error or error
            else:
                result.latencies.append(finished - began)

    async def server_cpu(pid: int) -> None:
        await asyncio.sleep(max(0.0, measure_from - time.perf_counter()))
        before = cpu_seconds(pid)
        await asyncio.sleep(max(0.0, end - time.perf_counter()))
        result.server_cpu_s = cpu_seconds(pid) - before

    pid = _server_pid.get()
    watch = [server_cpu(pid)] if pid else []
    await asyncio.gather(*(worker(i) for i in range(concurrency)), *watch)
    return result


def merge(parts: list[Measurement]) -> Measurement:
    """Measurements of one thing taken in turns, as one."""
    first = parts[0]
    merged = Measurement(
        first.name, first.concurrency, first.events_per_call, sum(p.seconds for p in parts)
    )
    merged.latencies = [x for p in parts for x in p.latencies]
    merged.errors = sum(p.errors for p in parts)
    merged.first_error = next((p.first_error for p in parts if p.first_error), "")
    merged.scenario, merged.accounts, merged.note = first.scenario, first.accounts, first.note
    cpu = [p.server_cpu_s for p in parts]
    merged.server_cpu_s = None if None in cpu else sum(cpu)
    return merged


async def abba(
    run_a: Callable[[float], Awaitable[Measurement]],
    run_b: Callable[[float], Awaitable[Measurement]],
) -> tuple[Measurement, Measurement]:
    """Two figures to compare, measured in turns A B B A, each turn half of BENCH_SECONDS: a
    drift of the machine's other load over the minute falls on both alike."""
    half = BENCH_SECONDS / 2
    a1 = await run_a(half)
    b1 = await run_b(half)
    b2 = await run_b(half)
    a2 = await run_a(half)
    return merge([a1, a2]), merge([b1, b2])


async def cpu_share(pid: int, seconds: float) -> float:
    """The share of one core process `pid` used over the next `seconds` (from /proc)."""

    before, started = cpu_seconds(pid), time.perf_counter()
    await asyncio.sleep(seconds)
    return (cpu_seconds(pid) - before) / (time.perf_counter() - started)


def process_memory(pid: int) -> tuple[int, int]:
    """Process `pid`'s resident set (KiB, VmRSS) and open file descriptors, from /proc."""
    rss = 0
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    return rss, len(os.listdir(f"/proc/{pid}/fd"))
