"""A small consumer process for end-to-end tests of `shared.streams.consumer.StreamConsumer`.

    python -m tests.support.consumer_app --db URL --quota ADDR --token TOKEN --stream NAME

It consumes quota's `pay_per_use_recorded` events and records each application as one row of
its own table `applied`, which has no unique constraint on purpose: an event applied twice
shows up as two rows. It prints `READY consumer <holder>` once its schema exists and stops
cleanly on SIGTERM (a SIGKILL is what the tests use to crash it).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

import grpc
from allot.quota.v1 import quota_service_pb2, quota_service_pb2_grpc
from sqlalchemy import BigInteger, Column, MetaData, String, Table, insert

from shared.channels import CHANNEL_OPTIONS
from shared.db import Database, UnitOfWork
from shared.streams.consumer import StreamConsumer
from shared.streams.lease import consumer_tables, default_holder
from shared.streams.subscriptions import grpc_stream

metadata = MetaData()
cursors, leases = consumer_tables(metadata)
applied = Table(
    "applied",
    metadata,
    Column("seq", BigInteger, nullable=False),
    Column("event_id", String(64), nullable=False),
    Column("usage_event_id", String(200), nullable=False),
    # Which replica applied the row: shows how the work was split between holders.
    Column("holder", String(200), nullable=False),
)

SCHEMA_ATTEMPTS = 10


async def create_schema(db: Database) -> None:
    # Two replicas may start together; on PostgreSQL their CREATE TABLEs can race.
    for attempt in range(1, SCHEMA_ATTEMPTS + 1):
        try:
            async with db.engine.begin() as conn:
                await conn.run_sync(metadata.create_all)
            return
        except Exception:
            if attempt == SCHEMA_ATTEMPTS:
                raise
            await asyncio.sleep(0.2 * attempt)


async def main(args: argparse.Namespace) -> None:
    db = Database(args.db)
    await create_schema(db)
    holder = args.holder or default_holder()

    async def apply(uow: UnitOfWork, event) -> None:
        await uow.session.execute(
            insert(applied).values(
                seq=event.sequence,
                event_id=event.event_id,
                usage_event_id=event.pay_per_use_recorded.usage_event_id,
                holder=holder,
            )
        )

    async with grpc.aio.insecure_channel(args.quota, options=CHANNEL_OPTIONS) as channel:
        stub = quota_service_pb2_grpc.QuotaServiceStub(channel)
        consumer = StreamConsumer(
            args.stream,
            db,
            cursors,
            leases,
            grpc_stream(
                stub.WatchEvents,
                lambda after: quota_service_pb2.WatchEventsRequest(
                    after_sequence=after, event_types=["pay_per_use_recorded"]
                ),
                metadata=(("authorization", f"Bearer {args.token}"),),
            ),
            apply,
            holder=holder,
            lease_ttl=args.lease_ttl,
            max_batch=args.max_batch,
        )
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, consumer.stop)
        print(f"READY consumer {holder}", flush=True)
        try:
            await consumer.run()
        finally:
            await db.dispose()


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.support.consumer_app")
    parser.add_argument("--db", required=True, help="the consumer's own SQLAlchemy URL")
    parser.add_argument("--quota", required=True, help="quota's address, host:port")
    parser.add_argument("--token", required=True, help="an internal or admin bearer token")
    parser.add_argument("--stream", required=True, help="cursor and lease name")
    parser.add_argument("--lease-ttl", type=float, default=15.0, help="lease ttl in seconds")
    parser.add_argument("--holder", default="", help="lease holder id (default host-pid-rand)")
    parser.add_argument("--max-batch", type=int, default=100, help="events per transaction")
    return parser.parse_args(argv)


if __name__ == "__main__":
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s"
    )
    asyncio.run(main(parse(sys.argv[1:])))
