"""A stream consumer killed at random points resumes from its cursor: nothing lost, nothing twice.

Quota runs as a process with 3,000 `pay_per_use_recorded` events (an account with no packages,
reported with BatchReportUsage). The consumer (`tests/support/consumer_app.py`) runs as a process
too and is SIGKILLed several times while it applies; each restart is a new replica that must
wait for the dead one's lease to expire. Its `applied` table has no unique constraint, so an
event applied twice would show as a second row (docs/design/ownership-and-regions.md). Two consumers
started together on one database must split the work through the lease and never both apply
(docs/design/scale.md).
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import queue
import random
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest
from allot.quota.v1 import quota_service_pb2, quota_service_pb2_grpc
from sqlalchemy import text

from shared.settings import REPO_ROOT
from tests.support.databases import (
    DirectReader,
)
from tests.support.quota import QuotaProcess, quota_env, quota_process
from tests.support.servers import Tokens

# The point is the kills and the handovers, not the volume: enough events that each kill lands
# mid-stream with work before and after it (thresholds keep 300 events clear of either end).
EVENTS = 3_000
REPLICA_EVENTS = 900
BATCH = 500
ACCOUNT = "acct-consumer"
REGION = "ap-southeast-1"
API = "passport"
STREAM = f"quota:{REGION}"
LEASE_TTL = 1.5
REPLICA_TTL = 6.0
KILLS = 5
START_TIMEOUT = 60.0
# Generous bounds for a loaded 2-core machine; each wait stops as soon as its goal is reached.
PROGRESS_TIMEOUT = 60.0
FINISH_TIMEOUT = 90.0

TOKENS = Tokens()


def produce(quota_addr: str, usage_ids: list[str]) -> None:
    """Report each id as one pay-per-use call (the account has no packages)."""
    gateway = TOKENS.md(TOKENS.gateway())
    with grpc.insecure_channel(quota_addr) as channel:
        stub = quota_service_pb2_grpc.QuotaServiceStub(channel)
        for start in range(0, len(usage_ids), BATCH):
            chunk = usage_ids[start : start + BATCH]
            request = quota_service_pb2.BatchReportUsageRequest(
                requests=[
                    quota_service_pb2.ReportUsageRequest(
                        event_id=event_id,
                        account_id=ACCOUNT,
                        user_id="u1",
                        region=REGION,
                        api=API,
                        quantity=1,
                        http_status=200,
                    )
                    for event_id in chunk
                ]
            )
            response = stub.BatchReportUsage(request, metadata=gateway, timeout=60)
            assert [r.pay_per_use_quantity for r in response.responses] == [1] * len(chunk)


def _producing(tmp_path_factory, count: int):
    data = tmp_path_factory.mktemp("quota")
    env = quota_env(f"sqlite+aiosqlite:///{data / 'quota.db'}", data)
    with quota_process(env, data / "quota.log") as quota:
        usage_ids = [f"use-{i:05d}" for i in range(count)]
        produce(quota.addr, usage_ids)
        yield quota.addr, usage_ids


@pytest.fixture(scope="module")
def produced(tmp_path_factory):
    """A quota process holding EVENTS pay-per-use events; yields (address, usage event ids)."""
    yield from _producing(tmp_path_factory, EVENTS)


@pytest.fixture(scope="module")
def produced_for_replicas(tmp_path_factory):
    """REPLICA_EVENTS events: the replicas apply one event per transaction, so fewer will do
    to see one replica apply, be killed mid-stream, and the other take over."""
    yield from _producing(tmp_path_factory, REPLICA_EVENTS)


class ConsumerProcess:
    """`python -m tests.support.consumer_app` with a deadline on its start."""

    def __init__(
        self,
        db_url: str,
        quota_addr: str,
        holder: str,
        log_path: pathlib.Path,
        max_batch: int = 100,
        lease_ttl: float = LEASE_TTL,
    ):
        self.args = [
            sys.executable,
            "-m",
            "tests.support.consumer_app",
            "--db",
            db_url,
            "--quota",
            quota_addr,
            "--token",
            TOKENS.internal("billing"),
            "--stream",
            STREAM,
            "--lease-ttl",
            str(lease_ttl),
            "--holder",
            holder,
            "--max-batch",
            str(max_batch),
        ]
        self.holder = holder
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> ConsumerProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ALLOT_")}
        lines: queue.Queue[str | None] = queue.Queue()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.args, env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=log
            )

        def read(proc: subprocess.Popen) -> None:
            assert proc.stdout is not None
            for raw in proc.stdout:
                lines.put(raw.decode(errors="replace"))
            lines.put(None)

        threading.Thread(target=read, args=(self.proc,), daemon=True).start()
        deadline = time.monotonic() + START_TIMEOUT
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                break
            if line.startswith("READY consumer"):
                return self
        self.kill()
        raise RuntimeError(f"consumer did not start; log:\n{self.log_path.read_text()}")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


class ConsumerDatabase(DirectReader):
    """Reads of the consumer's own tables, on either dialect; 0 before the first consumer
    created its schema, any query error raised."""

    async def count(self) -> int:
        return await self.scalar_once("applied", "SELECT count(*) FROM applied")

    async def wait_count(self, at_least: int, within: float) -> int:
        deadline = time.monotonic() + within
        while (count := await self.count()) < at_least:
            if time.monotonic() > deadline:
                raise AssertionError(f"applied {count} of {at_least} within {within}s")
            await asyncio.sleep(0.01)
        return count

    async def rows(self) -> list[tuple[int, str, str]]:
        async with self.engine.connect() as conn:
            result = await conn.execute(text("SELECT seq, usage_event_id, holder FROM applied"))
            return [(r.seq, r.usage_event_id, r.holder) for r in result]

    async def cursor(self) -> int:
        value = await self.scalar("SELECT sequence FROM consumer_cursors")
        assert value is not None, "the consumer stored no cursor"
        return value


def assert_applied_exactly_once(rows: list[tuple[int, str, str]], usage_ids: list[str]) -> None:
    count = len(usage_ids)
    sequences = sorted(seq for seq, _, _ in rows)
    assert len(rows) == count, f"{len(rows)} rows for {count} events"
    assert len(set(sequences)) == count, "an event was applied twice"
    # Only pay-per-use events exist (the account has no packages): sequences are 1..count.
    assert sequences == list(range(1, count + 1))
    # Sequence order is report order here (one writer, batches in order).
    assert [u for _, u, _ in sorted(rows)] == usage_ids


async def test_a_consumer_killed_at_random_points_resumes_exactly(produced, seed, tmp_path):
    quota_addr, usage_ids = produced
    url = f"sqlite+aiosqlite:///{tmp_path / 'consumer.db'}"
    db = ConsumerDatabase(url)
    rng = random.Random(seed)
    # Kill after a random amount of progress each time (sorted so every run has work left).
    thresholds = sorted(rng.sample(range(300, EVENTS - 300), KILLS))
    counts_at_kill = []
    try:
        for n, threshold in enumerate(thresholds):
            # Small batches make many commits (more instants between effect and cursor to
            # land a kill in); large ones exercise grouping.
            consumer = ConsumerProcess(
                url,
                quota_addr,
                f"r{n}",
                tmp_path / f"consumer-{n}.log",
                max_batch=rng.choice([1, 1, 10, 100]),
            )
            consumer.start()
            try:
                await db.wait_count(threshold, PROGRESS_TIMEOUT)
                await asyncio.sleep(rng.uniform(0, 0.05))  # land anywhere in a transaction
            finally:
                consumer.kill()
            counts_at_kill.append(await db.count())
        last = ConsumerProcess(url, quota_addr, "final", tmp_path / "consumer-final.log").start()
        try:
            await db.wait_count(EVENTS, FINISH_TIMEOUT)
            await asyncio.sleep(0.5)  # anything applied twice would land now
            assert last.terminate() == 0
        finally:
            last.kill()
        assert all(0 < c < EVENTS for c in counts_at_kill), counts_at_kill
        assert counts_at_kill == sorted(counts_at_kill)
        assert_applied_exactly_once(await db.rows(), usage_ids)
        assert await db.cursor() == EVENTS
    finally:
        await db.engine.dispose()


async def test_two_replicas_never_both_apply(produced_for_replicas, service_url, tmp_path):
    """Two consumers on one database: one applies, the other waits; when the one applying is
    killed, the other takes over at its cursor. Each row names the replica that applied it."""
    quota_addr, usage_ids = produced_for_replicas
    db = ConsumerDatabase(service_url)
    # A longer lease than elsewhere: on a loaded machine a leader's event loop can stall past
    # a short ttl, and a correct handover would then look like "both applied".
    replicas = {
        holder: ConsumerProcess(
            service_url,
            quota_addr,
            holder,
            tmp_path / f"{holder}.log",
            # One event per transaction: the leader is still busy when it is killed, so the
            # survivor always has work left (a fast leader could otherwise finish first).
            max_batch=1,
            lease_ttl=REPLICA_TTL,
        )
        for holder in ("a", "b")
    }
    try:
        for replica in replicas.values():
            replica.start()
        await db.wait_count(REPLICA_EVENTS // 3, PROGRESS_TIMEOUT)
        holders = {holder for _, _, holder in await db.rows()}
        assert len(holders) == 1, f"both replicas applied: {holders}"
        leader = holders.pop()
        replicas[leader].kill()
        await db.wait_count(REPLICA_EVENTS, FINISH_TIMEOUT)
        await asyncio.sleep(0.5)
        for replica in replicas.values():
            if replica.holder != leader:
                assert replica.terminate() == 0
        rows = await db.rows()
        assert_applied_exactly_once(rows, usage_ids)
        # The work splits at one point: the killed leader's rows, then the survivor's.
        order = [holder for _, _, holder in sorted(rows)]
        switch = next((i for i, holder in enumerate(order) if holder != leader), len(order))
        assert 0 < switch < len(order), "one replica applied everything"
        assert set(order[:switch]) == {leader}
        assert leader not in order[switch:]
    finally:
        for replica in replicas.values():
            replica.kill()
        await db.engine.dispose()


async def test_the_consumer_reconnects_when_quota_restarts(tmp_path):
    """The producer is killed under an open stream and comes back on the same database and
    address: the consumer backs off, reconnects after its cursor and misses nothing."""
    env = quota_env(f"sqlite+aiosqlite:///{tmp_path / 'quota.db'}", tmp_path)
    usage_ids = [f"restart-{i:05d}" for i in range(1500)]
    url = f"sqlite+aiosqlite:///{tmp_path / 'consumer.db'}"
    db = ConsumerDatabase(url)
    quota = QuotaProcess(env, tmp_path / "quota.log")
    consumer = None
    try:
        addr = quota.start()
        produce(addr, usage_ids[:1000])
        consumer = ConsumerProcess(url, addr, "c", tmp_path / "consumer.log").start()
        await db.wait_count(350, PROGRESS_TIMEOUT)
        quota.kill()
        # Events already received still commit; then the consumer sees UNAVAILABLE and backs
        # off while nobody listens on the address.
        await asyncio.sleep(1.0)
        assert await db.count() < len(usage_ids)
        assert quota.start() == addr
        produce(addr, usage_ids[1000:])
        await db.wait_count(len(usage_ids), FINISH_TIMEOUT)
        await asyncio.sleep(0.5)
        assert consumer.terminate() == 0
        assert_applied_exactly_once(await db.rows(), usage_ids)
        assert "reconnecting" in (tmp_path / "consumer.log").read_text()
    finally:
        if consumer is not None:
            consumer.kill()
        quota.kill()
        await db.engine.dispose()
