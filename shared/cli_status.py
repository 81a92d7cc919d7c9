"""`allot status`: each service's health, outbox depth, stream consumers and deliveries.

Health comes from the gRPC health service at `ALLOT_<SERVICE>_ADDR` (TLS as the settings say);
the rest from the service's Prometheus endpoint at `ALLOT_<SERVICE>_METRICS_ADDR`
(docs/operations.md). Every call and fetch has a deadline, so a service that does not answer
is reported as such within a few seconds. The exit status is 0 when every service is SERVING.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from shared.settings import Settings
from shared.tls import Channels, TlsFiles

SERVICES = ("quota", "billing", "notification")
DEADLINE_SECONDS = 3.0
CONSUMER_GAUGES = (
    "allot_consumer_cursor",
    "allot_consumer_lag_seconds",
    "allot_consumer_connected",
)


@dataclass
class ServiceStatus:
    name: str
    addr: str
    health: str = "UNKNOWN"
    metrics_addr: str = ""
    metrics_error: str = ""
    outbox_depth: int | None = None
    # stream -> (cursor, lag seconds, connected)
    streams: dict[str, tuple[int, float, bool]] = field(default_factory=dict)
    # PENDING / FAILED -> count (notification)
    deliveries: dict[str, int] = field(default_factory=dict)


async def _health(channels: Channels, addr: str) -> str:
    if not addr:
        return "NOT CONFIGURED"
    stub = health_pb2_grpc.HealthStub(channels.get(addr))
    try:
        answer = await stub.Check(health_pb2.HealthCheckRequest(), timeout=DEADLINE_SECONDS)
    except grpc.aio.AioRpcError as exc:
        return f"UNREACHABLE ({exc.code().name})"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)


def _read_metrics(status: ServiceStatus, text: str) -> None:
    streams: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "allot_outbox_depth":
                status.outbox_depth = int(sample.value)
            elif sample.name in CONSUMER_GAUGES:
                streams.setdefault(sample.labels["stream"], {})[sample.name] = sample.value
            elif sample.name == "allot_notification_deliveries_unsent":
                status.deliveries[sample.labels["state"]] = int(sample.value)
    for stream, values in sorted(streams.items()):
        status.streams[stream] = (
            int(values.get("allot_consumer_cursor", 0)),
            values.get("allot_consumer_lag_seconds", 0.0),
            bool(values.get("allot_consumer_connected", 0)),
        )


async def _metrics(client: httpx.AsyncClient, status: ServiceStatus) -> None:
    if not status.metrics_addr:
        status.metrics_error = "metrics off"
        return
    try:
        response = await client.get(f"http://{status.metrics_addr}/metrics")
        response.raise_for_status()
    except httpx.HTTPError as exc:
        status.metrics_error = f"metrics unreachable ({type(exc).__name__})"
        return
    _read_metrics(status, response.text)


async def gather(settings: Settings) -> list[ServiceStatus]:
    statuses = [
        ServiceStatus(
            name,
            getattr(settings, f"{name}_addr"),
            metrics_addr=getattr(settings, f"{name}_metrics_addr"),
        )
        for name in SERVICES
    ]
    channels = Channels(TlsFiles.from_settings(settings))
    try:
        async with httpx.AsyncClient(timeout=DEADLINE_SECONDS) as client:

            async def one(status: ServiceStatus) -> None:
                status.health = await _health(channels, status.addr)
                await _metrics(client, status)

            await asyncio.gather(*(one(s) for s in statuses))
    finally:
        await channels.close()
    return statuses


def render(statuses: list[ServiceStatus]) -> str:
    lines = [f"{'SERVICE':<13} {'ADDRESS':<22} {'HEALTH':<16} OUTBOX"]
    for s in statuses:
        depth = "-" if s.outbox_depth is None else str(s.outbox_depth)
        lines.append(f"{s.name:<13} {s.addr or '-':<22} {s.health:<16} {depth}")
        if s.metrics_error:
            lines.append(f"  {s.metrics_error}")
        for stream, (cursor, lag, connected) in s.streams.items():
            state = "connected" if connected else "disconnected"
            lines.append(f"  stream {stream}: cursor {cursor}, lag {lag:.1f}s, {state}")
        if s.deliveries:
            lines.append(
                f"  deliveries: {s.deliveries.get('PENDING', 0)} pending, "
                f"{s.deliveries.get('FAILED', 0)} failed"
            )
    return "\n".join(lines)


def cmd_status(args, settings: Settings) -> int:
    statuses = asyncio.run(gather(settings))
    print(render(statuses))
    return 0 if all(s.health == "SERVING" for s in statuses) else 1
