"""`python -m tests.bench.report_usage` (`make bench`): usage-reporting throughput and latency.

Prints figures; asserts nothing (not a test, so no `test_` prefix and pytest never collects it).

What runs:
- a bare grpc.aio echo server (`tests.bench.echo_server`, its own process) measured at
  concurrency 1, 16 and 64 with a payload the size of a typical ReportUsageRequest: the
  reference for what gRPC + asyncio in Python cost on this machine;
- the quota service as its own process (`python -m services.quota`, via `ServiceProcess`),
  once on SQLite (a file in a temp dir) and once on PostgreSQL (a fresh database at
  127.0.0.1:5432, dropped afterwards; skipped with a note when unreachable);
- per database: ReportUsage (one event per call) without alert rules and with five rules on
  the account (evaluated on every event, never reached), and BatchReportUsage (100 events per
  call), each at concurrency 1, 16 and 64, each against its own account holding one package of
  10^9 calls (so every event deducts from it), with distinct event ids;
- per database, idle streams: quota's CPU while idle and ReportUsage at concurrency 16, each
  without and then with 200 open `WatchEvents` streams of 200 callers (streams that never
  receive anything: they ask for an event type the bench never causes), so what a stream costs
  while it waits is a figure;
- per database, streams beside events: pay-per-use ReportUsage (an account without packages,
  so every call writes a `pay_per_use_recorded` event) at concurrency 16 without and then with
  200 open `WatchEvents` streams whose filter leaves those events out (tokens limited to
  another region: quota's streams filter by the caller's regions, not by account), so what the
  outbox's live reader costs the write path is a figure: p50 with over without, as a ratio;
- per database, a soak: the quota process's RSS (VmRSS) and open descriptors (/proc/<pid>/fd)
  at the start, every 30 s over BENCH_SOAK_SECONDS (default 120) of mixed load at concurrency
  16 (package deductions, pay-per-use, batches of 10, ListPackages), and after 200 streams were
  opened and closed; printed as a table, growth flagged.

Each scenario runs a fixed time: a 1 s warm-up, then BENCH_SECONDS (default 5) measured. A call
counts when it finishes inside the measured window; calls still in flight at the end are
awaited (so the next scenario starts on an idle server) but not counted. Throughput is events/s
(echo: requests/s); latency is per call (a batch call carries 100 events). "vs echo" is the
scenario's events/s over the echo's requests/s at the same concurrency.

The load generator runs in this process on one event loop with one channel per server.
NOTE: client and servers share this machine's cores (2 on the reference box), so the client's
own CPU use is part of every figure, the echo's included; the ratios are the meaningful part.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import os
import pathlib
import platform
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc
import pytest
from allot.quota.v1 import quota_pb2, quota_service_pb2, quota_service_pb2_grpc
from google.protobuf import timestamp_pb2

from shared.auth import ADMIN
from shared.settings import DEFAULT_CATALOG, REPO_ROOT
from tests.bench.echo_server import METHOD as ECHO_METHOD
from tests.support.databases import (
    POSTGRES_ADMIN_URL,
    create_postgres_database,
    drop_postgres_database,
)
from tests.support.servers import TEST_SECRET, ServiceProcess, Tokens, free_port

BENCH_SECONDS = float(os.environ.get("BENCH_SECONDS", "5"))
WARMUP_SECONDS = 1.0
CONCURRENCIES = (1, 16, 64)
BATCH_SIZE = 100
IDLE_STREAMS = 200
IDLE_SECONDS = 3.0
OTHER_REGION = "eu-west-9"  # streams limited to it never receive the bench's events
SOAK_SECONDS = float(os.environ.get("BENCH_SOAK_SECONDS", "120"))
SOAK_SAMPLE_SECONDS = 30.0
SOAK_CONCURRENCY = 16
ALERT_RULES = 5  # the issue asks for ReportUsage with five alert rules beside none
REGION = "ap-southeast-1"
API = "passport"
PACKAGE_QUANTITY = 10**9
RUN_TAG = uuid.uuid4().hex[:8]  # event ids stay distinct across runs against the same database


# --- measuring -------------------------------------------------------------------------------


@dataclass
class Measurement:
    name: str
    concurrency: int
    events_per_call: int
    seconds: float
    latencies: list[float] = field(default_factory=list)  # seconds, calls that succeeded
    errors: int = 0
    first_error: str = ""

    @property
    def throughput(self) -> float:
        return len(self.latencies) * self.events_per_call / self.seconds

    def percentile_ms(self, p: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        index = min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))  # rank
        return ordered[index] * 1000


async def drive(
    name: str,
    call: Callable[[], Awaitable[None]],
    concurrency: int,
    events_per_call: int = 1,
) -> Measurement:
    """`concurrency` workers call back to back: warm-up, then the measured window, then drain."""
    result = Measurement(name, concurrency, events_per_call, BENCH_SECONDS)
    start = time.perf_counter()
    measure_from = start + WARMUP_SECONDS
    end = measure_from + BENCH_SECONDS

    async def worker() -> None:
        while (began := time.perf_counter()) < end:
            error = ""
            try:
                await call()
            except (grpc.aio.AioRpcError, CallFailed) as exc:
                error = _describe(exc)
            finished = time.perf_counter()
            if not measure_from <= finished <= end:
                continue
            if error:
                result.errors += 1
                result.first_error = result.first_error or error
            else:
                result.latencies.append(finished - began)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return result


class CallFailed(Exception):
    """A call answered, but not as a healthy deduction (an error slot, no deduction)."""


def _describe(exc: Exception) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return str(exc)


# --- the echo reference ----------------------------------------------------------------------


class EchoProcess:
    """`python -m tests.bench.echo_server` as its own process, like ServiceProcess does quota."""

    def __init__(self, log_path: pathlib.Path) -> None:
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.addr = ""

    def start(self, timeout: float = 30.0) -> str:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.bench.echo_server", f"127.0.0.1:{free_port()}"],
                cwd=REPO_ROOT,
                stdout=subprocess.PIPE,
                stderr=log,
            )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline().decode()
            if line.startswith("READY echo "):
                self.addr = line.split()[2]
                return self.addr
            if not line and self.proc.poll() is not None:
                break
        raise RuntimeError(f"echo server did not become ready; log: {self.log_path.read_text()}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


async def measure_echo(addr: str, payload: bytes, metadata) -> dict[int, Measurement]:
    channel = grpc.aio.insecure_channel(addr)
    # Identity (de)serializers: the bytes go out and come back as they are.
    echo = channel.unary_unary(ECHO_METHOD)
    try:
        await channel.channel_ready()

        async def call() -> None:
            # The same authorization metadata as the quota calls, so the bytes on the wire match.
            await echo(payload, metadata=metadata)

        return {c: await drive("echo", call, c) for c in CONCURRENCIES}
    finally:
        await channel.close()


# --- quota -----------------------------------------------------------------------------------


def usage_request(event_id: str, account_id: str) -> quota_service_pb2.ReportUsageRequest:
    """What a gateway reports for one call: ids, where, what, how it answered, when."""
    occur = timestamp_pb2.Timestamp()
    occur.GetCurrentTime()
    return quota_service_pb2.ReportUsageRequest(
        event_id=event_id,
        account_id=account_id,
        user_id="bench-user-0001",
        region=REGION,
        api=API,
        enterprise_project_id="0",
        quantity=1,
        http_status=200,
        occur_time=occur,
    )


def _check(response: quota_service_pb2.ReportUsageResponse) -> None:
    if response.HasField("error"):
        raise CallFailed(f"error slot: {response.error.message}")
    if not response.deductions or response.pay_per_use_quantity:
        raise CallFailed(f"event {response.event_id} was not deducted from the package")


def _check_pay_per_use(response: quota_service_pb2.ReportUsageResponse) -> None:
    if response.HasField("error"):
        raise CallFailed(f"error slot: {response.error.message}")
    if response.deductions or response.pay_per_use_quantity != 1:
        raise CallFailed(f"event {response.event_id} was not recorded as pay-per-use")


@dataclass
class QuotaBench:
    stub: quota_service_pb2_grpc.QuotaServiceStub
    tokens: Tokens
    label: str  # "sqlite" / "postgresql", part of account ids
    ids: itertools.count = field(default_factory=itertools.count)
    acknowledged: dict[str, int] = field(default_factory=dict)  # account -> events answered

    def event_id(self) -> str:
        return f"ev-{RUN_TAG}-{self.label}-{next(self.ids)}"

    async def new_account(
        self, scenario: str, concurrency: int, alert_rules: int = 0, package: bool = True
    ) -> str:
        account_id = f"bench-{RUN_TAG}-{self.label}-{scenario}-c{concurrency}"
        if not package:
            return account_id  # every call is pay-per-use (checked apart from the packages)
        expire = timestamp_pb2.Timestamp(seconds=int(time.time()) + 366 * 86400)
        await self.stub.GrantPackage(
            quota_service_pb2.GrantPackageRequest(
                request_id=f"grant-{account_id}",
                package=quota_pb2.Package(
                    account_id=account_id,
                    region=REGION,
                    api=API,
                    source=quota_pb2.PACKAGE_SOURCE_SUBSCRIPTION,
                    total_quantity=PACKAGE_QUANTITY,
                    expire_time=expire,
                ),
            ),
            metadata=Tokens.md(self.tokens.admin()),
        )
        for i in range(alert_rules):
            # Thresholds the bench never reaches (the package is huge): every event still pays
            # for evaluating the rules, which is what this measures.
            alert = quota_pb2.UsageAlert(account_id=account_id, region=REGION, enabled=True)
            if i % 2:
                alert.remaining_percent = float(i)
                alert.api = API
            else:
                alert.remaining_quantity = 10**i
            await self.stub.CreateUsageAlert(
                quota_service_pb2.CreateUsageAlertRequest(
                    request_id=f"alert-{account_id}-{i}", usage_alert=alert
                ),
                metadata=Tokens.md(self.tokens.admin()),
            )
        self.acknowledged[account_id] = 0
        return account_id

    async def run(self) -> list[Measurement]:
        metadata = Tokens.md(self.tokens.gateway())
        results = []
        for rules, name in (
            (0, "ReportUsage"),
            (ALERT_RULES, f"ReportUsage +{ALERT_RULES} alerts"),
        ):
            for concurrency in CONCURRENCIES:
                account_id = await self.new_account(f"unary{rules}", concurrency, rules)

                async def unary(account_id: str = account_id) -> None:
                    response = await self.stub.ReportUsage(
                        usage_request(self.event_id(), account_id), metadata=metadata
                    )
                    _check(response)
                    self.acknowledged[account_id] += 1

                results.append(await drive(name, unary, concurrency))
        for concurrency in CONCURRENCIES:
            account_id = await self.new_account("batch", concurrency)

            async def batch(account_id: str = account_id) -> None:
                request = quota_service_pb2.BatchReportUsageRequest(
                    requests=[usage_request(self.event_id(), account_id) for _ in range(BATCH_SIZE)]
                )
                response = await self.stub.BatchReportUsage(request, metadata=metadata)
                for item in response.responses:
                    _check(item)
                self.acknowledged[account_id] += len(response.responses)

            name = f"BatchReportUsage x{BATCH_SIZE}"
            results.append(await drive(name, batch, concurrency, BATCH_SIZE))
        return results

    async def unary_scenario(
        self, name: str, scenario: str, concurrency: int, pay_per_use: bool = False
    ) -> Measurement:
        account_id = await self.new_account(scenario, concurrency, package=not pay_per_use)
        metadata = Tokens.md(self.tokens.gateway())
        check = _check_pay_per_use if pay_per_use else _check

        async def unary() -> None:
            response = await self.stub.ReportUsage(
                usage_request(self.event_id(), account_id), metadata=metadata
            )
            check(response)
            if not pay_per_use:
                self.acknowledged[account_id] += 1

        return await drive(name, unary, concurrency)

    async def idle_streams(self, pid: int) -> str:
        """Quota's CPU while idle and ReportUsage at concurrency 16, without and with
        IDLE_STREAMS open WatchEvents streams (distinct callers: one caller may hold 16)."""
        idle_before = await cpu_share(pid, IDLE_SECONDS)
        without = await self.unary_scenario("ReportUsage", "streams0", 16)
        # An event type the bench never causes: the streams wait, they never receive.
        async with self.open_streams(event_types=["package_expiring"]) as refused:
            if refused:
                return refused
            idle_with = await cpu_share(pid, IDLE_SECONDS)
            loaded = await self.unary_scenario("ReportUsage", "streams200", 16)
        p50 = without.percentile_ms(50), loaded.percentile_ms(50)
        return (
            f"quota CPU while idle {idle_before:.1%} of a core, {idle_with:.1%} with "
            f"{IDLE_STREAMS} idle WatchEvents streams; ReportUsage c=16 "
            f"{without.throughput:,.0f} -> {loaded.throughput:,.0f} events/s, p50 "
            f"{p50[0]:.2f} -> {p50[1]:.2f} ms ({p50[1] / p50[0]:.2f}x)"
        )

    async def streams_beside_events(self, pid: int) -> str:
        """Pay-per-use ReportUsage (an event per call) at concurrency 16, without and with
        IDLE_STREAMS streams whose filter leaves those events out: every commit wakes the
        outbox's reader, which must not cost the write path a read per stream."""
        without = await self.unary_scenario("pay-per-use", "ppu0", 16, pay_per_use=True)
        async with self.open_streams(regions=[OTHER_REGION]) as refused:
            if refused:
                return refused
            loaded = await self.unary_scenario("pay-per-use", "ppu200", 16, pay_per_use=True)
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
    async def open_streams(self, event_types=(), regions: list[str] | None = None):
        """IDLE_STREAMS WatchEvents streams of as many callers (one caller may hold 16), open
        for the block: yields "" or why the streams were refused; cancelled afterwards."""
        calls = [
            self.stub.WatchEvents(
                quota_service_pb2.WatchEventsRequest(event_types=list(event_types)),
                metadata=Tokens.md(
                    self.tokens.signer.mint(ADMIN, user=f"watcher-{i}", regions=regions)
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
                yield f"streams refused: {_describe(failed[0].exception())}"
            elif received:
                yield "streams received an event the bench did not mean them to"
            else:
                yield ""
        finally:
            for call in calls:
                call.cancel()
            await asyncio.gather(*readers, return_exceptions=True)

    async def soak(self, pid: int) -> list[str]:
        """RSS and open descriptors of quota: at the start, every SOAK_SAMPLE_SECONDS of mixed
        load for SOAK_SECONDS, and after IDLE_STREAMS streams were opened and closed."""
        package = await self.new_account("soak", SOAK_CONCURRENCY)
        pay_per_use = await self.new_account("soak-ppu", SOAK_CONCURRENCY, package=False)
        gateway, admin = Tokens.md(self.tokens.gateway()), Tokens.md(self.tokens.admin())
        samples = [("start", *process_memory(pid), 0)]
        calls = itertools.count()
        errors: list[str] = []
        end = time.perf_counter() + SOAK_SECONDS

        async def one(i: int) -> None:
            kind = i % 8
            if kind < 4:
                response = await self.stub.ReportUsage(
                    usage_request(self.event_id(), package), metadata=gateway
                )
                _check(response)
                self.acknowledged[package] += 1
            elif kind < 7 and kind != 5:
                response = await self.stub.ReportUsage(
                    usage_request(self.event_id(), pay_per_use), metadata=gateway
                )
                _check_pay_per_use(response)
            elif kind == 5:
                request = quota_service_pb2.BatchReportUsageRequest(
                    requests=[usage_request(self.event_id(), package) for _ in range(10)]
                )
                response = await self.stub.BatchReportUsage(request, metadata=gateway)
                for item in response.responses:
                    _check(item)
                self.acknowledged[package] += len(response.responses)
            else:
                await self.stub.ListPackages(
                    quota_service_pb2.ListPackagesRequest(account_id=package), metadata=admin
                )

        async def worker() -> None:
            while time.perf_counter() < end:
                try:
                    await one(next(calls))
                except (grpc.aio.AioRpcError, CallFailed) as exc:
                    errors.append(_describe(exc))

        async def sampler() -> None:
            started = time.perf_counter()
            while (left := end - time.perf_counter()) > SOAK_SAMPLE_SECONDS / 2:
                await asyncio.sleep(min(SOAK_SAMPLE_SECONDS, left))
                label = f"{time.perf_counter() - started:.0f} s of load"
                samples.append((label, *process_memory(pid), next(calls)))

        await asyncio.gather(sampler(), *(worker() for _ in range(SOAK_CONCURRENCY)))
        done = next(calls)
        samples.append(("end of load", *process_memory(pid), done))
        async with self.open_streams(event_types=["package_expiring"]) as refused:
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

    async def consistency(self) -> str:
        """Whether each package's used quantity equals the events the bench saw acknowledged."""
        admin = Tokens.md(self.tokens.admin())
        wrong = []
        for account_id, acked in self.acknowledged.items():
            listing = await self.stub.ListPackages(
                quota_service_pb2.ListPackagesRequest(account_id=account_id), metadata=admin
            )
            used = sum(p.used_quantity for p in listing.packages)
            if used != acked:
                wrong.append(f"{account_id}: used {used}, acknowledged {acked}")
        total = sum(self.acknowledged.values())
        if wrong:
            return "MISMATCH — " + "; ".join(wrong)
        return f"ok (used_quantity = acknowledged events on every account; {total:,} events)"


async def cpu_share(pid: int, seconds: float) -> float:
    """The share of one core process `pid` used over the next `seconds` (from /proc)."""

    def ticks() -> int:
        fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime

    before, started = ticks(), time.perf_counter()
    await asyncio.sleep(seconds)
    used = (ticks() - before) / os.sysconf("SC_CLK_TCK")
    return used / (time.perf_counter() - started)


def process_memory(pid: int) -> tuple[int, int]:
    """Process `pid`'s resident set (KiB, VmRSS) and open file descriptors, from /proc."""
    rss = 0
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


async def measure_quota(label: str, database_url: str, workdir: pathlib.Path):
    """Start quota on `database_url`, run every scenario, stop it."""
    await asyncio.to_thread(workdir.mkdir, parents=True, exist_ok=True)
    env = {
        "ALLOT_DATA_DIR": str(workdir),
        "ALLOT_QUOTA_DATABASE_URL": database_url,
        "ALLOT_QUOTA_ADDR": f"127.0.0.1:{free_port()}",
        "ALLOT_AUTH_SECRET": TEST_SECRET,
        "ALLOT_CATALOG": str(DEFAULT_CATALOG),
        "ALLOT_QUOTA_REGIONS": "",
        "ALLOT_CLOCK": "system",
        "ALLOT_DEDUCTION_POLICY": "standard",
    }
    process = ServiceProcess("quota", env, workdir / "quota.log")
    try:
        addr = await asyncio.to_thread(process.start)
        channel = grpc.aio.insecure_channel(addr)
        try:
            bench = QuotaBench(quota_service_pb2_grpc.QuotaServiceStub(channel), Tokens(), label)
            results = await bench.run()
            assert process.proc is not None
            streams = [
                f"idle streams: {await bench.idle_streams(process.proc.pid)}",
                f"busy streams: {await bench.streams_beside_events(process.proc.pid)}",
                f"soak ({SOAK_SECONDS:g} s of mixed load at concurrency {SOAK_CONCURRENCY}, "
                f"then {IDLE_STREAMS} streams opened and closed):",
                *await bench.soak(process.proc.pid),
            ]
            check = await bench.consistency()
        finally:
            await channel.close()
        await asyncio.to_thread(process.terminate)
    finally:
        process.kill()
    log = await asyncio.to_thread(_log_summary, workdir / "quota.log")
    return results, check, log, streams


def _log_summary(path: pathlib.Path) -> str:
    """How many WARNING/ERROR lines the server logged, and the first of them."""
    lines = [
        line
        for line in path.read_text(errors="replace").splitlines()
        if " WARNING " in line or " ERROR " in line or " CRITICAL " in line
    ]
    if not lines:
        return "no warnings or errors"
    return f"{len(lines)} warning/error lines; first: {lines[0][:160]}"


# --- output ----------------------------------------------------------------------------------


def print_table(title: str, rows: list[Measurement], echo: dict[int, Measurement] | None) -> None:
    print(f"\n{title}")
    unit = "events/s" if echo is not None else "req/s"
    header = f"  {'scenario':<24}{'conc':>5}{unit:>12}{'p50 ms':>10}{'p99 ms':>10}"
    if echo is not None:
        header += f"{'vs echo':>9}"
    print(header + f"{'errors':>8}")
    print("  " + "-" * (len(header) + 6))
    notes = []
    for m in rows:
        line = (
            f"  {m.name:<24}{m.concurrency:>5}{m.throughput:>12,.0f}"
            f"{m.percentile_ms(50):>10.2f}{m.percentile_ms(99):>10.2f}"
        )
        if echo is not None:
            reference = echo[m.concurrency].throughput
            line += f"{m.throughput / reference:>8.2f}x" if reference else f"{'-':>9}"
        print(line + f"{m.errors:>8}")
        if m.first_error:
            notes.append(f"  ! {m.name} c={m.concurrency}: first error: {m.first_error}")
    for note in notes:
        print(note)


def print_lines(lines: list[str]) -> None:
    for line in lines:
        print(f"  {line}")


async def postgres_version() -> str:
    import asyncpg

    try:
        conn = await asyncpg.connect(POSTGRES_ADMIN_URL, timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        return f"unreachable ({exc})"
    try:
        return str(await conn.fetchval("SHOW server_version"))
    finally:
        await conn.close()


async def main() -> None:
    started = time.perf_counter()
    sample = usage_request(f"ev-{RUN_TAG}-sqlite-0", f"bench-{RUN_TAG}-sqlite-unary-c1")
    payload = sample.SerializeToString()
    batch_bytes = quota_service_pb2.BatchReportUsageRequest(
        requests=[sample] * BATCH_SIZE
    ).ByteSize()
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "?"
    print("Allot benchmark: ReportUsage / BatchReportUsage beside a bare grpc.aio echo server")
    print(
        f"  machine     {os.cpu_count()} cores ({affinity} usable), {platform.machine()}, "
        f"{platform.system()} {platform.release()}"
    )
    print(
        f"  python      {platform.python_implementation()} {platform.python_version()}, "
        f"grpcio {grpc.__version__}, SQLite {sqlite3.sqlite_version}, "
        f"PostgreSQL {await postgres_version()}"
    )
    print(
        f"  timing      {WARMUP_SECONDS:g} s warm-up + {BENCH_SECONDS:g} s measured per "
        f"scenario (BENCH_SECONDS)"
    )
    print(
        f"  payload     ReportUsageRequest {len(payload)} B (echo sends the same size), "
        f"BatchReportUsageRequest x{BATCH_SIZE} {batch_bytes} B"
    )
    print(
        "  load        this process, one asyncio loop, one channel per server; client and "
        "servers share the cores"
    )
    print(
        "  latency     per call (a batch call carries 100 events); vs echo = events/s over "
        "echo req/s at the same concurrency"
    )

    tokens = Tokens()
    with tempfile.TemporaryDirectory(prefix="allot-bench-") as tmp:
        root = pathlib.Path(tmp)
        echo_process = EchoProcess(root / "echo.log")
        try:
            addr = await asyncio.to_thread(echo_process.start)
            echo = await measure_echo(addr, payload, Tokens.md(tokens.gateway()))
        finally:
            echo_process.stop()
        print_table(
            "echo (bare grpc.aio, generic handler returning the request bytes)",
            list(echo.values()),
            None,
        )

        sqlite_url = f"sqlite+aiosqlite:///{root / 'sqlite' / 'quota.db'}"
        results, check, log, streams = await measure_quota("sqlite", sqlite_url, root / "sqlite")
        print_table("quota on SQLite (file in a temp dir, WAL)", results, echo)
        print_lines(streams)
        print(f"  consistency: {check}")
        print(f"  server log:  {log}")

        try:
            postgres_url = await create_postgres_database()
        except (pytest.skip.Exception, pytest.fail.Exception, OSError) as exc:
            print(f"\nquota on PostgreSQL: skipped — {exc}")
        else:
            try:
                results, check, log, streams = await measure_quota(
                    "postgresql", postgres_url, root / "postgresql"
                )
            finally:
                await drop_postgres_database(postgres_url)
            name = postgres_url.rsplit("/", 1)[1]
            print_table(f"quota on PostgreSQL (fresh database {name}, dropped)", results, echo)
            print_lines(streams)
            print(f"  consistency: {check}")
            print(f"  server log:  {log}")

    print(f"\ntotal run time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
