"""The bootstrap every service shares.

settings -> clock -> database -> service -> grpc.aio server with the call interceptor ->
health (NOT_SERVING until the database answers and migrations ran; `liveness` SERVING from
the start) -> reflection -> start.
After start, a periodic database check turns health NOT_SERVING after
ALLOT_HEALTH_DATABASE_GRACE_SECONDS without the database and SERVING again when it answers.
On SIGTERM/SIGINT: health NOT_SERVING, `server.stop(grace)`, stop due work, dispose the engine;
every step is bounded, so the process exits within the grace plus a few seconds whatever the
database does (docs/faults.md).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import pathlib
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import grpc
from google.protobuf.internal import api_implementation
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from shared import logs, migrations, tracing
from shared.auth import Policy
from shared.catalog import Catalog, load_catalog
from shared.channels import CHANNEL_OPTIONS, KEEPALIVE_OPTIONS
from shared.clock import Clock, ManualClock, Scheduler, SystemClock
from shared.clock_service import CLOCK_POLICIES, CLOCK_SERVICE, add_clock_service
from shared.db import Database
from shared.event_loop import new_event_loop, run_until_done
from shared.interceptors import CallInterceptor
from shared.metrics import Metrics, MetricsEndpoint, MetricsInterceptor
from shared.reflection import SourcePool, load_sources
from shared.settings import Settings, SettingsError
from shared.tls import Channels, TlsFiles, server_credentials
from shared.tokens import TokenSigner, signer_for, verifier_for

log = logging.getLogger("allot.server")

MAX_REQUEST_BYTES = 4 * 1024 * 1024
MAX_METADATA_BYTES = 16 * 1024
# The database check behind health (docs/faults.md): how often, and how long one ping may take
# (a hung connection must not stall the check).
HEALTH_CHECK_INTERVAL = 2.0
# While the database is lost every call is refused: look again often, so calls resume within
# a second or so of its return (docs/faults.md).
HEALTH_RECHECK_INTERVAL = 0.5
HEALTH_PING_TIMEOUT = 2.0
# The health name of the liveness probe (docs/faults.md, "Health, probes and shutdown"): SERVING
# from the moment the server listens until shutdown, whatever the database does. It is answered
# by the event loop, so a wedged loop fails it (a TCP check would still pass: the kernel
# accepts the connection).
LIVENESS = "liveness"
# Shutdown: what the steps after `server.stop(grace)` may take together, and at least each.
SHUTDOWN_MARGIN = 2.5
SHUTDOWN_STEP_MIN = 0.25


@dataclass
class Runtime:
    """What a service is built from: settings, the clock, due work, its database, the catalog."""

    settings: Settings
    clock: Clock
    scheduler: Scheduler
    db: Database
    catalog: Catalog
    # Outbound channels to the other services (TLS when configured) and the signer of
    # `internal` tokens (local runs only; None in production, where mTLS identifies callers).
    channels: Channels
    signer: TokenSigner | None
    # This service's Prometheus registry (one per server; shared/metrics.py).
    metrics: Metrics = field(default_factory=Metrics)


class Service(Protocol):
    """A service of the suite, as the bootstrap sees it."""

    name: str  # "quota"
    migrations_dir: pathlib.Path
    service_names: tuple[str, ...]  # full proto names, for health and reflection

    def policies(self) -> dict[str, Policy]: ...
    def register(self, server: grpc.aio.Server) -> None: ...
    async def start(self) -> None: ...  # after migrations: register due work, start consumers
    def quiesce(self) -> None: ...  # shutdown begins: end long-lived streams
    async def stop(self) -> None: ...  # after the server stopped: finish background work


def _connection_age_options(settings: Settings) -> list[tuple[str, int]]:
    """A connection older than ALLOT_MAX_CONNECTION_AGE_SECONDS is sent a GOAWAY: its client
    connects again and, dialling `dns:///` targets, resolves the name anew, so replicas added
    since (a scale-up) get calls too (docs/operations.md, "Spreading calls")."""
    if not settings.max_connection_age:
        return []
    return [
        ("grpc.max_connection_age_ms", settings.max_connection_age * 1000),
        ("grpc.max_connection_age_grace_ms", settings.max_connection_age_grace * 1000),
    ]


def build_runtime(settings: Settings, service_name: str) -> Runtime:
    start = settings.clock_start
    try:
        signer = signer_for(settings)
    except ValueError as exc:  # a secret too short to sign with: the service does not start
        raise SettingsError(f"ALLOT_AUTH_SECRET: {exc}") from exc
    clock: Clock = ManualClock(start) if settings.clock == "manual" else SystemClock()
    return Runtime(
        settings=settings,
        clock=clock,
        scheduler=Scheduler(clock, interval=settings.due_work_interval),
        db=Database(settings.database_url(service_name), settings.database_bounds),
        catalog=load_catalog(settings.catalog),
        channels=Channels(TlsFiles.from_settings(settings), CHANNEL_OPTIONS),
        signer=signer,
        metrics=Metrics(service_name),
    )


class Server:
    """A running service: `await start()`, then `await wait()` until a signal, or `await stop()`."""

    def __init__(
        self, runtime: Runtime, service: Service, addr: str, metrics_addr: str = ""
    ) -> None:
        self.runtime = runtime
        self.service = service
        self.addr = addr
        # ALLOT_<SERVICE>_METRICS_ADDR as `run_service` passes it; empty: no metrics port.
        self.metrics_addr = metrics_addr
        self.port = 0
        self.health = health.aio.HealthServicer()
        self._stopping = asyncio.Event()
        self._ready = asyncio.Event()
        # Set while the database has been away longer than the grace: health NOT_SERVING and
        # calls refused with UNAVAILABLE at once (shared/interceptors.py).
        self._database_lost = asyncio.Event()
        self._names: tuple[str, ...] = ()
        self._watcher: asyncio.Task | None = None
        self._server: grpc.aio.Server | None = None
        self._health_server: grpc.aio.Server | None = None
        self.metrics_endpoint = MetricsEndpoint(runtime.metrics)

    async def start(self) -> int:
        settings = self.runtime.settings
        policies = dict(self.service.policies())
        names = list(self.service.service_names)
        manual = isinstance(self.runtime.clock, ManualClock)
        if manual:
            policies.update(CLOCK_POLICIES)
            names.append(CLOCK_SERVICE)
        try:
            verifier = verifier_for(settings)
        except ValueError as exc:
            raise SettingsError(str(exc)) from exc
        files = TlsFiles.from_settings(settings)
        interceptor = CallInterceptor(
            policies,
            verifier,
            self._ready,
            settings.max_streams_per_caller,
            database_lost=self._database_lost,
            members_of=getattr(self.service, "members_of", None),  # for Policy.master_reads
            tls=files.serves_tls,
        )
        server = grpc.aio.server(
            # Metrics outermost (refusals counted with their codes), then tracing (none unless
            # OTEL_* turns it on), so refused calls have spans too.
            interceptors=[
                MetricsInterceptor(self.runtime.metrics),
                *tracing.server_interceptors(),
                interceptor,
            ],
            # Calls past this many at once are refused with RESOURCE_EXHAUSTED by gRPC itself.
            maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
            options=[
                ("grpc.so_reuseport", 0),
                # Bounded requests (docs/security.md): the largest legitimate one is a batch of
                # 1,000 usage reports (~300 KB); metadata holds a token and a request id.
                ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
                ("grpc.max_metadata_size", MAX_METADATA_BYTES),
                # Let callers ping idle connections every few seconds (every 5 s: KEEPALIVE_SECONDS
                # in shared/channels.py), so a dead peer is noticed quickly rather than after the
                # 5-minute default. The margin below 5 s keeps a ping that arrives a little early
                # from counting as abuse (a GOAWAY after three).
                ("grpc.http2.min_ping_interval_without_data_ms", 2000),
                ("grpc.keepalive_permit_without_calls", 1),
                # And ping the callers the same way: a caller gone behind a silent network
                # (docs/faults.md, "The network between the services") would otherwise keep
                # its streams open here for hours, each holding one of its
                # ALLOT_MAX_STREAMS_PER_CALLER, until its consumer, dialling again, is refused.
                *KEEPALIVE_OPTIONS,
                *_connection_age_options(settings),
            ],
        )
        self.service.register(server)
        if manual:
            add_clock_service(server, self.runtime.scheduler)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        for name in ("", *names):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.health.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
        # Reflection serves the protos' comments too (shared/reflection.py).
        reflection.enable_server_reflection(
            (*names, health.SERVICE_NAME, reflection.SERVICE_NAME),
            server,
            pool=SourcePool(load_sources()),
        )
        if files.serves_tls:
            self.port = server.add_secure_port(self.addr, server_credentials(files))
        else:
            self.port = server.add_insecure_port(self.addr)
        if self.port == 0:
            raise OSError(f"cannot listen on {self.addr}")
        await server.start()
        self._server = server
        await self._start_health_port()
        if self.metrics_addr:  # served while starting too: health and refusals show there
            setting = f"ALLOT_{self.service.name.upper()}_METRICS_ADDR"
            await self.metrics_endpoint.start(self.metrics_addr, setting)
        await self._wait_for_database()
        if self._stopping.is_set():
            return self.port
        await migrations.upgrade(
            self.runtime.db.engine, self.service.name, self.service.migrations_dir
        )
        await self.service.start()
        await self.runtime.scheduler.run_due()  # whatever came due while we were down
        self.runtime.scheduler.start()
        self._ready.set()
        self._names = ("", *names)
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        self._watcher = asyncio.create_task(self._watch_database(), name="health-database")
        log.info("%s serving on %s", self.service.name, self.bound_addr)
        return self.port

    async def _start_health_port(self) -> None:
        """With ALLOT_HEALTH_ADDR, a second, plaintext server with health only (the same
        statuses): kubelet's gRPC probes cannot speak TLS, and health tells nothing secret
        (docs/security.md)."""
        addr = self.runtime.settings.health_addr
        if not addr:
            return
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        if server.add_insecure_port(addr) == 0:
            raise OSError(f"cannot listen on {addr} (ALLOT_HEALTH_ADDR)")
        await server.start()
        self._health_server = server

    @property
    def bound_addr(self) -> str:
        host = self.addr.rsplit(":", 1)[0] or "127.0.0.1"
        return f"{host}:{self.port}"

    async def _wait_for_database(self) -> None:
        delay = 0.2
        while not self._stopping.is_set():  # a SIGTERM while the database is down ends the wait
            try:
                await self.runtime.db.ping()
                return
            except Exception as exc:  # not reachable yet: stay NOT_SERVING and retry
                log.warning("database not answering (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _set_health(self, status) -> None:
        for name in self._names:
            await self.health.set(name, status)

    async def _watch_database(self) -> None:
        """Ping the database every HEALTH_CHECK_INTERVAL (each ping bounded; every
        HEALTH_RECHECK_INTERVAL while it is lost): NOT_SERVING after the grace without an
        answer, SERVING again at the first answer. The process keeps
        running either way: a lost database is a reason to route elsewhere, not to restart."""
        loop = asyncio.get_running_loop()
        grace = self.runtime.settings.health_database_grace
        last_answer = loop.time()
        ping: asyncio.Task | None = None
        while not self._stopping.is_set():
            # A ping is a task waited for with a timeout, not awaited under asyncio.timeout: a
            # ping stuck on a dead connection may not end promptly even when cancelled, and the
            # check must go on. A new ping starts only once the previous one ended.
            if ping is None or ping.done():
                ping = asyncio.create_task(self.runtime.db.ping(), name="health-ping")
            done, _ = await asyncio.wait({ping}, timeout=HEALTH_PING_TIMEOUT)
            if not done:
                ping.cancel()
                failure = f"no answer within {HEALTH_PING_TIMEOUT:.0f}s"
            elif ping.cancelled():
                failure = "ping cancelled"
            elif ping.exception() is not None:
                error = ping.exception()
                failure = (str(error) or type(error).__name__).splitlines()[0]
            else:
                failure = None
            if failure is not None:
                away = loop.time() - last_answer
                if away >= grace and not self._database_lost.is_set():
                    self._database_lost.set()
                    await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
                    log.error("no database for %.0fs (%s): NOT_SERVING", away, failure)
                elif not self._database_lost.is_set():
                    log.warning("database check failed: %s", failure)
            else:
                last_answer = loop.time()
                if self._database_lost.is_set() and not self._stopping.is_set():
                    # Connections pooled before the outage may be dead for good: start afresh.
                    await self.runtime.db.forget_connections()
                    self._database_lost.clear()
                    await self._set_health(health_pb2.HealthCheckResponse.SERVING)
                    log.warning("the database answers again: SERVING")
            lost = self._database_lost.is_set()
            try:
                async with asyncio.timeout(
                    HEALTH_RECHECK_INTERVAL if lost else HEALTH_CHECK_INTERVAL
                ):
                    await self._stopping.wait()
            except TimeoutError:
                pass
        if ping is not None and not ping.done():
            ping.cancel()

    @property
    def stop_requested(self) -> bool:
        return self._stopping.is_set()

    def request_stop(self) -> None:
        self._stopping.set()

    async def wait(self) -> None:
        await self._stopping.wait()
        await self.stop()

    async def stop(self) -> None:
        if self._server is None:
            return
        server, self._server = self._server, None
        self._stopping.set()  # also ends the database check
        await self.health.enter_graceful_shutdown()
        self.service.quiesce()
        grace = self.runtime.settings.shutdown_grace
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace + SHUTDOWN_MARGIN
        await _bounded("the gRPC server", server.stop(grace), grace + SHUTDOWN_STEP_MIN)
        steps = [
            ("the database check", _finish(self._watcher)),
            ("due work", self.runtime.scheduler.stop()),
            ("the service", self.service.stop()),
            ("outbound channels", self.runtime.channels.close()),
            ("the database engine", self.runtime.db.dispose()),
        ]
        steps.insert(0, ("the metrics port", self.metrics_endpoint.stop()))
        if self._health_server is not None:
            steps.insert(0, ("the health port", self._health_server.stop(None)))
            self._health_server = None
        for what, step in steps:
            left = max(deadline - loop.time(), SHUTDOWN_STEP_MIN)
            await _bounded(what, step, left)
        log.info("%s stopped", self.service.name)


async def _finish(task: asyncio.Task | None) -> None:
    if task is not None:
        await asyncio.wait({task})


async def _bounded(what: str, step, seconds: float) -> None:
    """Run a shutdown step for at most `seconds`. A step still running then is cancelled and
    left behind, not awaited: work stuck on a dead database connection may ignore cancellation
    (a ROLLBACK that never comes), and waiting for it would hold the process forever."""
    task = asyncio.ensure_future(step)
    done, _ = await asyncio.wait({task}, timeout=seconds)
    if not done:
        task.cancel()
        log.error("shutdown: %s did not stop within %.1fs; abandoned", what, seconds)
    elif not task.cancelled() and task.exception() is not None:
        log.error("shutdown: stopping %s failed: %s", what, task.exception())


def run_service(
    service_name: str, make_service: Callable[[Runtime], Service], on_ready=None
) -> None:
    """The `main` of a service process."""
    # Whatever the process creates is its own (docs/security.md, "Secrets at rest"): SQLite
    # files and their journals, the outbox folders, anything a library writes.
    os.umask(0o077)
    try:
        settings = Settings.from_env()
    except SettingsError as exc:  # a refused setting stops the process with its message only
        sys.exit(f"{service_name}: {exc}")
    logs.configure(service_name, settings.log_level, settings.log_format)
    try:
        tracing.configure_from_env(service_name)  # off unless OTEL_* asks (docs/operations.md)
    except SettingsError as exc:
        sys.exit(f"{service_name}: {exc}")

    async def main() -> None:
        runtime = build_runtime(settings, service_name)
        server = Server(
            runtime,
            make_service(runtime),
            getattr(settings, f"{service_name}_addr"),
            getattr(settings, f"{service_name}_metrics_addr"),
        )
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, server.request_stop)
        await server.start()
        if server.stop_requested:  # stopped before the database ever answered
            await server.stop()
            return
        # What the start built lives as long as the process (modules, the schema, protobuf
        # descriptors, the catalog): frozen, the collector's full passes no longer walk it,
        # which on the usage hot path cost about 15% of the CPU (docs/design/scale.md).
        gc.collect()
        gc.freeze()
        # One line the supervisor (and tests) wait for before sending traffic.
        print(f"READY {service_name} {server.bound_addr}", flush=True)
        if on_ready:
            on_ready(server)
        await server.wait()

    loop, loop_name = new_event_loop(settings.event_loop)
    log.info("event loop %s, protobuf backend %s", loop_name, api_implementation.Type())
    try:
        run_until_done(main(), loop)
    except SettingsError as exc:  # found while building the service: still no traceback
        sys.exit(f"{service_name}: {exc}")
    finally:
        tracing.shutdown()  # the last spans, bounded
