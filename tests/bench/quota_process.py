"""Quota as the bench runs it: its own process on a database (optionally recorded by py-spy,
BENCH_PROFILE), and the history seeded into a database before quota starts on it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import asyncpg
import grpc
from allot.quota.v1 import quota_service_pb2_grpc

from shared.settings import DEFAULT_CATALOG
from tests.bench.database import EVENT_COLUMNS, PACKAGE_COLUMNS, BenchDatabase, history
from tests.bench.measure import served_by
from tests.bench.scenarios import API, REGION, QuotaBench
from tests.support.databases import POSTGRES_ADMIN_URL
from tests.support.servers import TEST_SECRET, ServiceProcess, Tokens, free_port

SEED_EVENTS = int(os.environ.get("BENCH_SEED_EVENTS", "1000000"))
SEED_ACCOUNTS = int(os.environ.get("BENCH_SEED_ACCOUNTS", "100000"))
# What the main PostgreSQL database holds before quota starts on it (tests/bench/report_usage.py
# `measure_one`): other accounts' history, analysed, as in a database in service.
BASE_EVENTS = int(os.environ.get("BENCH_BASE_EVENTS", "100000"))
BASE_ACCOUNTS = int(os.environ.get("BENCH_BASE_ACCOUNTS", "10000"))
PROFILE = os.environ.get("BENCH_PROFILE", "")  # a flame graph (SVG) of quota under the load
# More `py-spy record` options, e.g. "--idle" (waits shown too) or "--rate 250".
PROFILE_ARGS = os.environ.get("BENCH_PROFILE_ARGS", "").split()


class QuotaProcess(ServiceProcess):
    def log_summary(self) -> str:
        """How many WARNING/ERROR lines the server logged, and the first of them."""
        lines = [
            line
            for line in self.log_path.read_text(errors="replace").splitlines()
            if " WARNING " in line or " ERROR " in line or " CRITICAL " in line
        ]
        if not lines:
            return "no warnings or errors"
        return f"{len(lines)} warning/error lines; first: {lines[0][:160]}"


def quota_env(database_url: str, workdir: pathlib.Path) -> dict[str, str]:
    return {
        "ALLOT_DATA_DIR": str(workdir),
        "ALLOT_QUOTA_DATABASE_URL": database_url,
        "ALLOT_QUOTA_ADDR": f"127.0.0.1:{free_port()}",
        "ALLOT_AUTH_SECRET": TEST_SECRET,
        "ALLOT_CATALOG": str(DEFAULT_CATALOG),
        "ALLOT_QUOTA_REGIONS": "",
        "ALLOT_CLOCK": "system",
        "ALLOT_DEDUCTION_POLICY": "standard",
        "ALLOT_BILLING_ADDR": "",  # no billing here: quota does not follow its stream
    }


@contextlib.asynccontextmanager
async def quota_session(label: str, database_url: str, workdir: pathlib.Path, profile=True):
    """Quota started on `database_url`; yields (QuotaBench, the process); stopped afterwards.
    With BENCH_PROFILE (and `profile`), py-spy records quota while the block runs."""
    await asyncio.to_thread(workdir.mkdir, parents=True, exist_ok=True)
    process = QuotaProcess("quota", quota_env(database_url, workdir), workdir / "quota.log")
    try:
        addr = await asyncio.to_thread(process.start)
        channel = grpc.aio.insecure_channel(addr)
        try:
            stub = quota_service_pb2_grpc.QuotaServiceStub(channel)
            bench = QuotaBench(stub, Tokens(), label, BenchDatabase(database_url))
            assert process.proc is not None
            pid = process.proc.pid
            with served_by(pid):
                async with recording(pid, PROFILE if profile else ""):
                    yield bench, process
        finally:
            await channel.close()
        await asyncio.to_thread(process.terminate)
    finally:
        process.kill()


@contextlib.asynccontextmanager
async def recording(pid: int, svg: str):
    """`py-spy record --pid` on quota while the block runs (nothing when `svg` is empty)."""
    if not svg:
        yield
        return
    proc, out, spy_log = await asyncio.to_thread(_start_spy, pid, svg)
    await asyncio.sleep(1.0)  # attached before the load starts
    if proc.poll() is not None:
        raise SystemExit(f"py-spy could not record quota: {spy_log.read_text()}")
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)  # py-spy writes the flame graph when interrupted
        try:
            await asyncio.to_thread(proc.wait, 60)
        except subprocess.TimeoutExpired:
            proc.kill()
        print(f"  profile: {out} (py-spy log {spy_log.name})")


def _start_spy(pid: int, svg: str) -> tuple[subprocess.Popen, pathlib.Path, pathlib.Path]:
    spy = shutil.which("py-spy", path=str(pathlib.Path(sys.executable).parent)) or shutil.which(
        "py-spy"
    )
    if not spy:
        raise SystemExit("py-spy is not installed: `make venv` (it is a dev dependency)")
    out = pathlib.Path(svg).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    # The output's suffix picks the format: .svg a flame graph, .txt collapsed stacks (one
    # line per stack with its sample count, for grep and sort), .json speedscope.
    form = {".txt": "raw", ".json": "speedscope"}.get(out.suffix, "flamegraph")
    command = [spy, "record", "--pid", str(pid), "--format", form, "-o", str(out)]
    command += PROFILE_ARGS
    spy_log = out.with_suffix(".log")
    with open(spy_log, "wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    return proc, out, spy_log


async def seed_history(
    database_url: str, events: int = SEED_EVENTS, accounts: int = SEED_ACCOUNTS
) -> tuple[int, float]:
    """`events` usage events over `accounts` accounts (one package each) into the database,
    before quota starts on it, then settled (analysed); how many events and how long it took."""
    database = BenchDatabase(database_url)
    started = time.perf_counter()
    packages, events = history(events, accounts, REGION, API)
    await database.insert("packages", PACKAGE_COLUMNS, packages)
    count = await database.insert("usage_events", EVENT_COLUMNS, events)
    await database.settle()
    return count, time.perf_counter() - started


async def postgres_version() -> str:
    try:
        conn = await asyncpg.connect(POSTGRES_ADMIN_URL, timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        return f"unreachable ({exc})"
    try:
        return str(await conn.fetchval("SHOW server_version"))
    finally:
        await conn.close()
