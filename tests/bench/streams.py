"""The streams and soak parts of the bench (docs/faults.md, "Streams"): quota's CPU with idle
`WatchEvents` streams, the write path beside streams that filter its events out, and a soak
(RSS and descriptors over BENCH_SOAK_SECONDS of mixed load, then streams opened and closed)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time

import grpc
from allot.quota.v1 import quota_service_pb2

from shared.auth import ADMIN
from tests.bench.measure import (
    CallFailed,
    Measurement,
    cpu_share,
    describe,
    drive,
    process_memory,
)
from tests.bench.scenarios import QuotaBench, check_deducted, check_pay_per_use, usage_request
from tests.support.servers import Tokens

IDLE_STREAMS = 200
IDLE_SECONDS = 3.0
OTHER_REGION = "eu-west-9"  # streams limited to it never receive the bench's events
SOAK_SECONDS = float(os.environ.get("BENCH_SOAK_SECONDS", "120"))
SOAK_SAMPLE_SECONDS = 30.0
SOAK_CONCURRENCY = 16


async def unary_scenario(
    bench: QuotaBench, name: str, scenario: str, concurrency: int, pay_per_use: bool = False
) -> Measurement:
    account_id = await bench.new_account(scenario, concurrency, package=not pay_per_use)
    check = check_pay_per_use if pay_per_use else check_deducted

    async def unary(_worker: int) -> None:
        await bench.report(account_id, check)

    result = await drive(name, unary, concurrency)
    result.accounts = [] if pay_per_use else [account_id]
    return result


async def idle_streams(bench: QuotaBench, pid: int) -> str:
    """Quota's CPU while idle and ReportUsage at concurrency 16, without and with
    IDLE_STREAMS open WatchEvents streams (distinct callers: one caller may hold 16)."""
    idle_before = await cpu_share(pid, IDLE_SECONDS)
    without = await unary_scenario(bench, "ReportUsage", "streams0", 16)
    # An event type the bench never causes: the streams wait, they never receive.
    async with open_streams(bench, event_types=["package_expiring"]) as refused:
        if refused:
            return refused
        idle_with = await cpu_share(pid, IDLE_SECONDS)
        loaded = await unary_scenario(bench, "ReportUsage", "streams200", 16)
    p50 = without.percentile_ms(50), loaded.percentile_ms(50)
    return (
        f"quota CPU while idle {idle_before:.1%} of a core, {idle_with:.1%} with "
        f"{IDLE_STREAMS} idle WatchEvents streams; ReportUsage c=16 "
        f"{without.throughput:,.0f} -> {loaded.throughput:,.0f} events/s, p50 "
        f"{p50[0]:.2f} -> {p50[1]:.2f} ms ({p50[1] / p50[0]:.2f}x)"
    )


async def streams_beside_events(bench: QuotaBench, pid: int) -> str:
    """Pay-per-use ReportUsage (an event per call) at concurrency 16, without and with
    IDLE_STREAMS streams whose filter leaves those events out: every commit wakes the
    outbox's reader, which must not cost the write path a read per stream."""
    without = await unary_scenario(bench, "pay-per-use", "ppu0", 16, pay_per_use=True)
    async with open_streams(bench, regions=[OTHER_REGION]) as refused:
        if refused:
            return refused
        loaded = await unary_scenario(bench, "pay-per-use", "ppu200", 16, pay_per_use=True)
        cpu = await cpu_share(pid, IDLE_SECONDS)  # the streams, idle again
    p50 = without.percentile_ms(50), loaded.percentile_ms(50)
    errors = without.errors + loaded.errors
    return (
        f"pay-per-use ReportUsage c=16 (an event per call) {without.throughput:,.0f} -> "
        f"{loaded.throughput:,.0f} events/s with {IDLE_STREAMS} WatchEvents streams of "
        f"another region, p50 {p50[0]:.2f} -> {p50[1]:.2f} ms, ratio "
        f"{p50[1] / p50[0]:.2f}x (target <= 1.5x); CPU after, streams idle {cpu:.1%} of a "
        f"core; errors {errors}"
        + (f" (first: {without.first_error or loaded.first_error})" if errors else "")
    )


@contextlib.asynccontextmanager
async def open_streams(bench: QuotaBench, event_types=(), regions: list[str] | None = None):
    """IDLE_STREAMS WatchEvents streams of as many callers (one caller may hold 16), open
    for the block: yields "" or why the streams were refused; cancelled afterwards."""
    calls = [
        bench.stub.WatchEvents(
            quota_service_pb2.WatchEventsRequest(event_types=list(event_types)),
            metadata=Tokens.md(
                bench.tokens.signer.mint(ADMIN, user=f"watcher-{i}", regions=regions)
            ),
        )
        for i in range(IDLE_STREAMS)
    ]
    readers = [asyncio.ensure_future(call.read()) for call in calls]
    try:
        await asyncio.sleep(1.0)  # every stream has read its (empty) history and waits
        failed = [r for r in readers if r.done() and r.exception() is not None]
        received = [r for r in readers if r.done() and r.exception() is None]
        if failed:
            yield f"streams refused: {describe(failed[0].exception())}"
        elif received:
            yield "streams received an event the bench did not mean them to"
        else:
            yield ""
    finally:
        for call in calls:
            call.cancel()
        await asyncio.gather(*readers, return_exceptions=True)


async def soak(bench: QuotaBench, pid: int) -> list[str]:
    """RSS and open descriptors of quota: at the start, every SOAK_SAMPLE_SECONDS of mixed
    load for SOAK_SECONDS, and after IDLE_STREAMS streams were opened and closed."""
    package = await bench.new_account("soak", SOAK_CONCURRENCY)
    pay_per_use = await bench.new_account("soak-ppu", SOAK_CONCURRENCY, package=False)
    gateway, admin = Tokens.md(bench.tokens.gateway()), Tokens.md(bench.tokens.admin())
    samples = [("start", *process_memory(pid), 0)]
    calls = itertools.count()
    errors: list[str] = []
    end = time.perf_counter() + SOAK_SECONDS

    async def one(i: int) -> None:
        kind = i % 8
        if kind < 4:
            response = await bench.stub.ReportUsage(
                usage_request(bench.event_id(), package), metadata=gateway
            )
            check_deducted(response)
            bench.acknowledged[package] += 1
        elif kind < 7 and kind != 5:
            response = await bench.stub.ReportUsage(
                usage_request(bench.event_id(), pay_per_use), metadata=gateway
            )
            check_pay_per_use(response)
        elif kind == 5:
            request = quota_service_pb2.BatchReportUsageRequest(
                requests=[usage_request(bench.event_id(), package) for _ in range(10)]
            )
            response = await bench.stub.BatchReportUsage(request, metadata=gateway)
            for item in response.responses:
                check_deducted(item)
            bench.acknowledged[package] += len(response.responses)
        else:
            await bench.stub.ListPackages(
                quota_service_pb2.ListPackagesRequest(account_id=package), metadata=admin
            )

    async def worker() -> None:
        while time.perf_counter() < end:
            try:
                await one(next(calls))
            except (grpc.aio.AioRpcError, CallFailed) as exc:
                errors.append(describe(exc))

    async def sampler() -> None:
        started = time.perf_counter()
        while (left := end - time.perf_counter()) > SOAK_SAMPLE_SECONDS / 2:
            await asyncio.sleep(min(SOAK_SAMPLE_SECONDS, left))
            label = f"{time.perf_counter() - started:.0f} s of load"
            samples.append((label, *process_memory(pid), next(calls)))

    await asyncio.gather(sampler(), *(worker() for _ in range(SOAK_CONCURRENCY)))
    done = next(calls)
    samples.append(("end of load", *process_memory(pid), done))
    async with open_streams(bench, event_types=["package_expiring"]) as refused:
        opened = process_memory(pid)
    await asyncio.sleep(2.0)  # the server notices the cancellations
    samples.append((f"{IDLE_STREAMS} streams open", *opened, done))
    samples.append((f"{IDLE_STREAMS} streams closed", *process_memory(pid), done))
    lines = [f"  {'when':<24}{'RSS MiB':>10}{'open fds':>10}{'calls':>10}"]
    for label, rss, fds, count in samples:
        lines.append(f"  {label:<24}{rss / 1024:>10.1f}{fds:>10}{count:>10,}")
    # Growth: the first sample under load (allocator and caches warmed) against the end,
    # after the streams were closed.
    base = samples[1] if len(samples) > 3 else samples[0]
    rss_growth = (samples[-1][1] - base[1]) / base[1]
    fd_growth = samples[-1][2] - samples[0][2]
    flags = []
    if rss_growth > 0.10:
        flags.append(f"RSS GREW {rss_growth:.0%} since '{base[0]}'")
    if fd_growth > 5:
        flags.append(f"DESCRIPTORS GREW by {fd_growth} since the start")
    verdict = "; ".join(flags) or (
        f"no growth (RSS {rss_growth:+.1%} since '{base[0]}', descriptors {fd_growth:+d})"
    )
    lines.append(f"  {verdict}")
    if refused:
        lines.append(f"  ! {refused}")
    if errors:
        lines.append(f"  ! {len(errors)} failed calls; first: {errors[0]}")
    return lines
