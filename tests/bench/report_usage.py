"""`python -m tests.bench.report_usage` (`make bench`): quota's hot path beside a bare echo.

Prints figures and writes them as JSON; asserts nothing (not a test, so no `test_` prefix and
pytest never collects it).

What runs (BENCH_ONLY, a comma list of these names, selects; default all):
- a bare grpc.aio echo server (`tests.bench.echo_server`, its own process), always, measured
  before each database at each concurrency with a payload the size of a typical
  ReportUsageRequest: the reference for what gRPC + asyncio in Python cost on this machine
  (the database's ratios are to the echo measured just before it);
- quota as its own process (`python -m services.quota`, via `ServiceProcess`) on each database
  of BENCH_DATABASES (default `sqlite,postgresql`): SQLite a file in a temp dir, PostgreSQL a
  new database at 127.0.0.1:5432 holding BENCH_BASE_EVENTS (100,000) events of
  BENCH_BASE_ACCOUNTS (10,000) other accounts, analysed (an empty one's statistics mislead the
  planner until autovacuum's first analysis), dropped afterwards (skipped with a note when
  unreachable);
- per database, each scenario against accounts of its own holding one package of 10^9 calls
  (so every event deducts from it), with distinct event ids:
  - `report_usage`: ReportUsage, one event per call, at each of BENCH_CONCURRENCIES
    (default 1,16,64);
  - `report_usage_alerts`: the same with five alert rules on the account (evaluated on every
    event, never reached);
  - `batch`: BatchReportUsage, 100 events per call, at each concurrency;
  - `check_quota`: CheckQuota (API enabled, 10 events reported before) at each concurrency;
  - `contention`: ReportUsage at 64, all callers on one account's one package beside each on
    an account of its own;
  - `growth_packages`: ReportUsage at 64 on an account with one package beside one holding
    1,000 (999 seeded directly: expired long ago, expired lately, used up);
  - `growth_events`: ReportUsage at 64 on a migrated database beside one into which
    BENCH_SEED_EVENTS (1,000,000) usage events over BENCH_SEED_ACCOUNTS (100,000) accounts
    were seeded (COPY / one executemany transaction) before quota started on it (the
    pairs of these three are measured in turns A B B A, half of BENCH_SECONDS each, so a
    drift of the machine's load falls on both alike);
  - `idle_streams`, `busy_streams`, `soak`: quota's CPU with 200 idle WatchEvents streams;
    pay-per-use ReportUsage beside 200 streams filtering its events out; RSS and descriptors
    over BENCH_SOAK_SECONDS (120) of mixed load (tests/bench/streams.py).
- per database, the goals of issue 13 beside their figures, met or not.

Every row has its consistency check (tests/bench/scenarios.py): per account, the packages' used
quantity grew by exactly the events acknowledged and the database holds that many events.

A scenario runs a 1 s warm-up, then BENCH_SECONDS (default 5) measured (tests/bench/measure.py).
Throughput is events/s (echo: requests/s); latency is per call (a batch call carries 100
events). "vs echo" is events/s over the echo's requests/s at the same concurrency, "p50/echo"
the p50 over the echo's p50. "srv us" is the serving process's CPU time per call in the measured
window (from /proc), "/echo" that over the echo server's: the machine's other load moves calls/s
a lot and CPU per call little, so this is the figure to compare between runs on a busy machine.

Every run writes build/bench/<UTC timestamp>-<short commit>.json (git commit and dirty flag,
machine, versions, settings, every row, the goals). BENCH_PROFILE=<file.svg> records quota
under `py-spy record` while the selected scenarios run (`make profile`).

The load generator runs in this process on one event loop with one channel per server.
NOTE: client and servers share this machine's cores (2 on the reference box), so the client's
own CPU use is part of every figure, the echo's included; the ratios are the meaningful part.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pathlib
import platform
import sqlite3
import sys
import tempfile
import time

import grpc
import pytest
from allot.quota.v1 import quota_service_pb2

from tests.bench import streams
from tests.bench.echo import EchoProcess, measure_echo
from tests.bench.measure import (
    BENCH_SECONDS,
    CONCURRENCIES,
    WARMUP_SECONDS,
    abba,
    env_list,
    served_by,
)
from tests.bench.output import (
    git_state,
    goals,
    measurement_json,
    print_goals,
    print_table,
    write_json,
)
from tests.bench.quota_process import (
    BASE_ACCOUNTS,
    BASE_EVENTS,
    postgres_version,
    quota_session,
    seed_history,
)
from tests.bench.scenarios import BATCH_SIZE, RATIO_CONCURRENCY, RUN_TAG, usage_request
from tests.support.databases import (
    create_postgres_database,
    drop_postgres_database,
    migrated_sqlite,
)
from tests.support.servers import Tokens

SCENARIOS = (
    "report_usage",
    "report_usage_alerts",
    "batch",
    "check_quota",
    "contention",
    "growth_packages",
    "growth_events",
    "idle_streams",
    "busy_streams",
    "soak",
)
DATABASES = ("sqlite", "postgresql")


def selection() -> tuple[list[str], list[str]]:
    only = env_list("BENCH_ONLY", ",".join(SCENARIOS))
    databases = env_list("BENCH_DATABASES", ",".join(DATABASES))
    unknown = [s for s in only if s not in SCENARIOS] + [d for d in databases if d not in DATABASES]
    if unknown:
        sys.exit(
            f"unknown BENCH_ONLY / BENCH_DATABASES names {unknown}; scenarios: "
            f"{', '.join(SCENARIOS)}; databases: {', '.join(DATABASES)}"
        )
    return [s for s in SCENARIOS if s in only], [d for d in DATABASES if d in databases]


async def run_scenarios(bench, pid: int, only: list[str]) -> tuple[list, list[str]]:
    """The selected scenarios except growth_events, in SCENARIOS order; rows and text lines."""
    rows, lines = [], []
    for c in CONCURRENCIES if "report_usage" in only else ():
        rows.append(await bench.report_usage(c))
    for c in CONCURRENCIES if "report_usage_alerts" in only else ():
        rows.append(await bench.report_usage(c, rules=5))
    for c in CONCURRENCIES if "batch" in only else ():
        rows.append(await bench.batch(c))
    for c in CONCURRENCIES if "check_quota" in only else ():
        rows.append(await bench.check_quota(c))
    if "contention" in only:
        rows.extend(await bench.contention())
    if "growth_packages" in only:
        rows.extend(await bench.growth_packages())
    if "idle_streams" in only:
        lines.append(f"idle streams: {await streams.idle_streams(bench, pid)}")
    if "busy_streams" in only:
        lines.append(f"busy streams: {await streams.streams_beside_events(bench, pid)}")
    if "soak" in only:
        lines.append(
            f"soak ({streams.SOAK_SECONDS:g} s of mixed load at concurrency "
            f"{streams.SOAK_CONCURRENCY}, then {streams.IDLE_STREAMS} streams opened and closed):"
        )
        lines.extend(await streams.soak(bench, pid))
    return rows, lines


async def growth_events(label: str, root: pathlib.Path) -> tuple[list, list[str]]:
    """ReportUsage at RATIO_CONCURRENCY on two migrated databases, one of them seeded with a
    history before quota starts on it: a quota process on each, measured in turns (`abba`)."""
    urls: list[str] = []
    workdirs = [root / f"{label}-growth-{kind}" for kind in ("empty", "seeded")]
    try:
        for workdir in workdirs:
            await asyncio.to_thread(workdir.mkdir, parents=True, exist_ok=True)
            if label == "sqlite":
                await asyncio.to_thread(migrated_sqlite, workdir / "quota.db", "quota")
                urls.append(f"sqlite+aiosqlite:///{workdir / 'quota.db'}")
            else:
                urls.append(await create_postgres_database("quota"))
        seeded, seconds = await seed_history(urls[1])
        c = RATIO_CONCURRENCY
        async with (
            quota_session(f"{label}-empty", urls[0], workdirs[0], profile=False) as (
                empty,
                empty_process,
            ),
            quota_session(f"{label}-seeded", urls[1], workdirs[1]) as (full, process),
        ):
            accounts = [await b.new_account("growth-events", c) for b in (empty, full)]
            name = f"ReportUsage {seeded:,} events"

            async def on_empty(t: float):
                # The inner session's `served_by` names the seeded process: CPU per call of
                # this row is the empty one's.
                assert empty_process.proc is not None
                with served_by(empty_process.proc.pid):
                    return await empty.unary(
                        "ReportUsage empty database", "growth_events", c, accounts[:1], t
                    )

            before, after = await abba(
                on_empty, lambda t: full.unary(name, "growth_events", c, accounts[1:], t)
            )
            before.consistency = await empty.consistency(before.accounts)
            after.consistency = await full.consistency(after.accounts)
        log = process.log_summary()
    finally:
        if label != "sqlite":
            for url in urls:
                await drop_postgres_database(url)
    before.note = "a migrated database, quota's own events only"
    after.note = f"seeded in {seconds:.0f} s before quota started"
    text = f"growth_events: seeded {seeded:,} usage events in {seconds:.1f} s; server log: {log}"
    return [before, after], [text]


async def measure_database(label: str, url: str, root: pathlib.Path, only: list[str]):
    rows, lines, log = [], [], "-"
    main = [s for s in only if s != "growth_events"]
    if main:
        workdir = root / label
        async with quota_session(label, url, workdir) as (bench, process):
            assert process.proc is not None
            rows, lines = await run_scenarios(bench, process.proc.pid, main)
            for m in rows:
                m.consistency = await bench.consistency(m.accounts)
            counted = {a for m in rows for a in m.accounts}
            if rest := [a for a in bench.acknowledged if a not in counted]:
                lines.append(f"streams and soak consistency: {await bench.consistency(rest)}")
        log = process.log_summary()
    if "growth_events" in only:
        more, text = await growth_events(label, root)
        rows.extend(more)
        lines.extend(text)
    return rows, lines, log


async def measure_one(label, root, only, record, echo_addr, payload, tokens) -> None:
    """The echo measured again, then quota on one database: so each database's ratios are
    to an echo of the same minutes (the machine's other load drifts over a run)."""
    if label == "sqlite":
        url = f"sqlite+aiosqlite:///{root / 'sqlite' / 'quota.db'}"
        title = "quota on SQLite (file in a temp dir, WAL)"
    else:
        try:
            url = await create_postgres_database("quota")
        except (pytest.skip.Exception, pytest.fail.Exception, OSError) as exc:
            print(f"\nquota on PostgreSQL: skipped — {exc}")
            record["notes"][label] = [f"skipped: {exc}"]
            return
        # Not empty: an empty table's planner statistics last until autovacuum's first
        # analysis (within a minute), and with them the lookup of a batch's event ids scans the
        # whole table, which grows by thousands of rows a second here (docs/design/scale.md).
        based, _ = await seed_history(url, BASE_EVENTS, BASE_ACCOUNTS)
        title = (
            f"quota on PostgreSQL (database {url.rsplit('/', 1)[1]} holding {based:,} events "
            "of other accounts, analysed; dropped)"
        )
    at_ratio = {"contention", "growth_packages", "growth_events"} & set(only)
    levels = sorted(set(CONCURRENCIES) | ({RATIO_CONCURRENCY} if at_ratio else set()))
    try:
        echo = await measure_echo(echo_addr, payload, Tokens.md(tokens.gateway()), levels)
        print_table(
            f"echo before {label} (bare grpc.aio, generic handler returning the request bytes)",
            list(echo.values()),
            None,
        )
        record["echo"].extend(measurement_json(label, m, None) for m in echo.values())
        rows, lines, log = await measure_database(label, url, root, only)
    finally:
        if label != "sqlite":
            await drop_postgres_database(url)
    print_table(title, rows, echo)
    for line in lines:
        print(f"  {line}")
    print(f"  server log (main quota process): {log}")
    met = goals(label, rows, echo)
    print_goals(met)
    record["results"].extend(measurement_json(label, m, echo) for m in rows)
    record["goals"].extend(vars(g) for g in met)
    record["notes"][label] = [*lines, f"server log: {log}"]


async def main() -> None:
    started = time.perf_counter()
    only, databases = selection()
    sample = usage_request(f"ev-{RUN_TAG}-sqlite-0", f"bench-{RUN_TAG}-sqlite-unary-c1")
    payload = sample.SerializeToString()
    batch_bytes = quota_service_pb2.BatchReportUsageRequest(
        requests=[sample] * BATCH_SIZE
    ).ByteSize()
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "?"
    pg_version = await postgres_version()
    from google.protobuf.internal import api_implementation

    versions = {
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "grpcio": grpc.__version__,
        "protobuf_backend": api_implementation.Type(),
        "sqlite": sqlite3.sqlite_version,
        "postgresql": pg_version,
    }
    machine = {
        "cores": os.cpu_count(),
        "usable_cores": affinity,
        "arch": platform.machine(),
        "system": f"{platform.system()} {platform.release()}",
        "node": platform.node(),
    }
    git = git_state()
    print("Allot benchmark: quota's hot path beside a bare grpc.aio echo server")
    print(f"  commit      {git['short_commit']}{' (dirty)' if git['dirty'] else ''}")
    print(
        f"  machine     {machine['cores']} cores ({affinity} usable), {machine['arch']}, "
        f"{machine['system']}"
    )
    print("  python      " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    print(
        f"  timing      {WARMUP_SECONDS:g} s warm-up + {BENCH_SECONDS:g} s measured per "
        f"scenario (BENCH_SECONDS)"
    )
    print(f"  selected    {', '.join(only)} on {', '.join(databases)} (BENCH_ONLY, "
          f"BENCH_DATABASES); concurrencies {', '.join(map(str, CONCURRENCIES))}")  # fmt: skip
    print(
        f"  payload     ReportUsageRequest {len(payload)} B (echo sends the same size), "
        f"BatchReportUsageRequest x{BATCH_SIZE} {batch_bytes} B"
    )
    print(
        "  latency     per call (a batch call carries 100 events); vs echo = events/s over "
        "echo req/s at the same concurrency; p50/echo = p50 over echo's p50"
    )
    print("  srv us      the server's CPU time per call (µs); /echo = over the echo server's")

    tokens = Tokens()
    record: dict = {
        "git": git,
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine,
        "versions": versions,
        "settings": {
            "bench_seconds": BENCH_SECONDS,
            "warmup_seconds": WARMUP_SECONDS,
            "scenarios": only,
            "databases": databases,
            "concurrencies": list(CONCURRENCIES),
            "soak_seconds": streams.SOAK_SECONDS,
        },
        "echo": [],
        "results": [],
        "goals": [],
        "notes": {},
    }
    with tempfile.TemporaryDirectory(prefix="allot-bench-") as tmp:
        root = pathlib.Path(tmp)
        echo_process = EchoProcess(root / "echo.log")
        try:
            addr = await asyncio.to_thread(echo_process.start)
            assert echo_process.proc is not None
            with served_by(echo_process.proc.pid):  # quota's sessions name their own process
                for label in databases:
                    await measure_one(label, root, only, record, addr, payload, tokens)
        finally:
            echo_process.stop()

    record["total_seconds"] = round(time.perf_counter() - started, 1)
    path = write_json(record)
    print(f"\nfigures written to {path.relative_to(path.parents[2])}")
    print(f"total run time {record['total_seconds']:.0f} s")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
