"""Probes (docs/faults.md, "Health, probes and shutdown"): the `liveness` health name answers
SERVING while the database is unreachable, readiness (the service's health) does not."""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.quota.service import QuotaService
from shared.server import LIVENESS, Server, build_runtime
from tests.support.quota import quota_settings
from tests.support.servers import free_port

SERVICE = "allot.quota.v1.QuotaService"
CALL_TIMEOUT = 5.0
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def statuses(health) -> dict[str, int]:
    answers = {}
    for name in (LIVENESS, "", SERVICE):
        request = health_pb2.HealthCheckRequest(service=name)
        answers[name] = (await health.Check(request, timeout=CALL_TIMEOUT)).status
    return answers


async def test_liveness_answers_while_the_database_is_unreachable(tmp_path):
    # Nothing listens on this port: the database never answers, as at a slow first connection.
    unreachable = f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/test"
    health_addr = f"127.0.0.1:{free_port()}"
    settings = quota_settings(unreachable, tmp_path, health_addr=health_addr)
    runtime = build_runtime(settings, "quota")
    server = Server(runtime, QuotaService(runtime), settings.quota_addr)
    starting = asyncio.create_task(server.start())
    try:
        async with grpc.aio.insecure_channel(health_addr) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            # The health port listens before the database wait.
            await asyncio.wait_for(channel.channel_ready(), CALL_TIMEOUT)
            for _ in range(3):  # it stays so while the start keeps waiting
                assert await statuses(health) == {
                    LIVENESS: SERVING,
                    "": NOT_SERVING,
                    SERVICE: NOT_SERVING,
                }
                assert not starting.done()
                await asyncio.sleep(0.3)
    finally:
        server.request_stop()  # ends the wait for the database
        await asyncio.wait_for(starting, 10)
        await server.stop()
