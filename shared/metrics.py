"""Prometheus metrics: one registry per running service, its RPC interceptor and `/metrics`.

Each `Server` gets its own `Metrics` (through `Runtime.metrics`), so several services in one
process (the tests run them so) never share or collide on a metric; a deployment tells them
apart by the scrape job, and the RPC metrics carry the proto service name besides.

- `MetricsInterceptor` counts every call and times it, by proto service, method and status
  code (`allot_rpc_requests_total`, `allot_rpc_duration_seconds`). It is the outermost
  interceptor, so refusals by authentication and policy are counted with their codes.
- Business counters live with the service that owns them (`services/<svc>/adapters/metrics.py`)
  in the same registry, moved after the commit of the transaction that did the work.
- Gauges that need the database (the outbox's depth, pending deliveries) are refreshed when
  `/metrics` is scraped, each query bounded by `SCRAPE_QUERY_SECONDS`, never on a call's path;
  the stream consumers' state is read from their attributes at the same moment.
- `serve()` answers `GET /metrics` on `ALLOT_<SERVICE>_METRICS_ADDR` with a small asyncio
  HTTP server on the service's own loop (no thread); empty = no metrics port.

The metric names and meanings are listed in docs/operations.md.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.process_collector import ProcessCollector

log = logging.getLogger("allot.metrics")

# A gauge's database query on scrape may take this long before its old value is served.
SCRAPE_QUERY_SECONDS = 2.0
# Bounds on one HTTP request to /metrics: its head, and how long the client may take to send it.
MAX_REQUEST_HEAD = 8192
REQUEST_SECONDS = 5.0
RPC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """The metrics of one running service: its registry, the RPC metrics, the outbox and
    stream gauges, and the refreshers run on each scrape."""

    def __init__(self, service: str = "") -> None:
        self.service = service
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        labels = ["service", "method", "code"]
        self.rpc_requests = Counter(
            "allot_rpc_requests", "RPCs handled", labels, registry=self.registry
        )
        self.rpc_duration = Histogram(
            "allot_rpc_duration_seconds",
            "time to handle an RPC (streams: until they end)",
            labels,
            buckets=RPC_BUCKETS,
            registry=self.registry,
        )
        self.outbox_depth = Gauge(
            "allot_outbox_depth",
            "events in this service's outbox (its last sequence; followers read by cursor)",
            registry=self.registry,
        )
        self.scrape_errors = Counter(
            "allot_metrics_refresh_errors",
            "gauge queries on scrape that failed or timed out (the old value was served)",
            ["gauge"],
            registry=self.registry,
        )
        self._refreshers: list[tuple[str, Callable[[], Awaitable[None]]]] = []
        self._consumers: list[Iterable[Any]] = []
        self.registry.register(_ConsumerCollector(self._consumers))

    def on_scrape(self, name: str, refresh: Callable[[], Awaitable[None]]) -> None:
        """Run `refresh` (bounded) before each exposition; it sets its gauges."""
        self._refreshers.append((name, refresh))

    def track_outbox(self, outbox: Any) -> None:
        """`allot_outbox_depth` from the outbox's last sequence (one indexed row)."""

        async def refresh() -> None:
            self.outbox_depth.set(await outbox.last_sequence())

        self.on_scrape("outbox_depth", refresh)

    def track_consumers(self, consumers: Iterable[Any]) -> None:
        """Stream consumers (`shared.streams.consumer.StreamConsumer`) whose state is exposed;
        a list given here may grow later."""
        self._consumers.append(consumers)

    async def refresh(self) -> None:
        for name, refresh in self._refreshers:
            try:
                async with asyncio.timeout(SCRAPE_QUERY_SECONDS):
                    await refresh()
            except Exception as exc:  # a scrape still answers, with the last values
                self.scrape_errors.labels(name).inc()
                log.warning("metrics: refreshing %s failed: %s", name, exc or type(exc).__name__)

    async def exposition(self) -> bytes:
        await self.refresh()
        return generate_latest(self.registry)


class _ConsumerCollector:
    """Gauges of the stream consumers, read from their attributes at collection."""

    def __init__(self, sources: list[Iterable[Any]]) -> None:
        self.sources = sources

    def describe(self):
        return []

    def collect(self):
        cursor = GaugeMetricFamily(
            "allot_consumer_cursor", "last applied sequence of a followed stream", labels=["stream"]
        )
        lag = GaugeMetricFamily(
            "allot_consumer_lag_seconds",
            "age of the last applied event while more are waiting (0: caught up)",
            labels=["stream"],
        )
        connected = GaugeMetricFamily(
            "allot_consumer_connected", "1 while the stream is open and read", labels=["stream"]
        )
        applied = GaugeMetricFamily(
            "allot_consumer_applied_events", "events applied since start", labels=["stream"]
        )
        errors = GaugeMetricFamily(
            "allot_consumer_errors",
            "failures that paused the consumer since start",
            labels=["stream"],
        )
        for source in self.sources:
            for consumer in list(source):
                name = [consumer.stream]
                cursor.add_metric(name, consumer.last_sequence)
                lag.add_metric(name, consumer.lag_seconds)
                connected.add_metric(name, 1 if consumer.connected else 0)
                applied.add_metric(name, consumer.applied)
                errors.add_metric(name, consumer.errors)
        return [cursor, lag, connected, applied, errors]


def _split_method(method: str) -> tuple[str, str]:
    """`/allot.quota.v1.QuotaService/ReportUsage` -> (`allot.quota.v1.QuotaService`, name)."""
    _, _, rest = method.partition("/")
    service, _, name = rest.partition("/")
    return service or "unknown", name or "unknown"


def _code_of(context, error: BaseException | None) -> str:
    code = context.code()
    if code is None:
        code = grpc.StatusCode.OK if error is None else grpc.StatusCode.UNKNOWN
    if isinstance(code, int):  # some grpc versions keep the raw cygrpc value
        code = next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)
    if error is not None and code is grpc.StatusCode.OK:
        code = grpc.StatusCode.CANCELLED if isinstance(error, asyncio.CancelledError) else code
    return code.name


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts and times every call by service, method and final status code."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._wrapped: dict[str, tuple[object, object]] = {}
        self._children: dict[tuple, tuple[Any, Any]] = {}

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        known = self._wrapped.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        wrapped = self._wrap(method, handler)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _observe(self, labels: tuple[str, str], context, started: float, error) -> None:
        code = _code_of(context, error)
        children = self._children.get((labels, code))
        if children is None:  # looked up once per method and code: labels() takes a lock
            children = self._children[(labels, code)] = (
                self.metrics.rpc_requests.labels(*labels, code),
                self.metrics.rpc_duration.labels(*labels, code),
            )
        children[0].inc()
        children[1].observe(time.perf_counter() - started)

    async def _timed(self, labels: tuple[str, str], context, call):
        """Await `call`, then count and time it with its final code."""
        started, error = time.perf_counter(), None
        try:
            return await call
        except BaseException as exc:
            error = exc
            raise
        finally:
            self._observe(labels, context, started, error)

    def _wrap(self, method: str, handler):
        labels = _split_method(method)
        if handler.unary_unary or (
            handler.unary_stream and not inspect.isasyncgenfunction(handler.unary_stream)
        ):
            # A unary call, or a stream that writes with `context.write` and returns (gRPC's
            # health Watch): awaited, not iterated.
            behavior = handler.unary_unary or handler.unary_stream

            async def awaited(request, context):
                return await self._timed(labels, context, behavior(request, context))

            make = (
                grpc.unary_unary_rpc_method_handler
                if handler.unary_unary
                else grpc.unary_stream_rpc_method_handler
            )
            return make(
                awaited,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            behavior = handler.unary_stream

            async def stream(request, context):
                started, error = time.perf_counter(), None
                try:
                    async for item in behavior(request, context):
                        yield item
                except BaseException as exc:
                    error = exc
                    raise
                finally:
                    self._observe(labels, context, started, error)

            return grpc.unary_stream_rpc_method_handler(
                stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler  # no client-streaming RPCs in the contract


def _host_port(addr: str) -> tuple[str | None, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected host:port, got {addr!r}")
    host = host.strip("[]")
    return (host or None), int(port)


class MetricsEndpoint:
    """`GET /metrics` over plain HTTP/1.1 on the service's event loop; one request per
    connection, every read bounded."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.port = 0
        self._server: asyncio.base_events.Server | None = None

    async def start(self, addr: str, setting: str) -> int:
        try:
            host, port = _host_port(addr)
            self._server = await asyncio.start_server(
                self._handle, host, port, limit=MAX_REQUEST_HEAD
            )
        except (OSError, ValueError) as exc:
            raise OSError(f"cannot listen on {addr} ({setting}): {exc}") from exc
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("metrics on http://%s:%d/metrics", host or "0.0.0.0", self.port)
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            server, self._server = self._server, None
            server.close()
            await server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(REQUEST_SECONDS):
                head = await reader.readuntil(b"\r\n\r\n")
            parts = head.split(b"\r\n", 1)[0].split()
            path = parts[1].split(b"?", 1)[0] if len(parts) >= 2 else b""
            status, body, kind = "404 Not Found", b"only GET /metrics\n", "text/plain"
            if len(parts) >= 2 and parts[0] == b"GET" and path in (b"/metrics", b"/"):
                try:
                    status, body = "200 OK", await self.metrics.exposition()
                    kind = CONTENT_TYPE_LATEST
                except Exception:  # a bug in a collector: say so, keep serving
                    log.exception("metrics: exposition failed")
                    status, body = "500 Internal Server Error", b"exposition failed\n"
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n".encode()
                + body
            )
            async with asyncio.timeout(REQUEST_SECONDS):
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass  # a slow, oversized or vanished client gets nothing
        finally:
            writer.close()
