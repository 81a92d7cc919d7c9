"""The quota service for tests: as a real process (end-to-end), in-process on port 0 (service
tests), and short calls to it. billing.py and notification.py offer the same names for theirs:
`<service>_env` / `<service>_process` / `<Service>Process`, `<service>_settings` /
`running_<service>` / `<Service>Handle`, and `<Service>Calls` (with `admin` and
`account(account_id, read_only)` metadata).

`QuotaProcess` is `WatchedProcess` for `python -m services.quota`. `QuotaCalls` wraps a
`QuotaHandle`: every method builds one real request, sends it through the real stub with a real
token (admin by default, the gateway's `service` token for usage) and returns the real
response; `quota_calls` gives the same over a plain channel to a quota process. A call that
must fail is checked with `tests.support.calls.expect_error`.
"""

from __future__ import annotations

import contextlib
import pathlib
from collections.abc import Awaitable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import grpc
from allot.quota.v1 import quota_pb2, quota_service_pb2, quota_service_pb2_grpc
from allot.testing.v1 import clock_service_pb2_grpc
from google.protobuf import timestamp_pb2

from services.quota.service import QuotaService
from shared.server import Server, build_runtime
from shared.settings import Settings
from tests.support.calls import Metadata, ServiceCalls, ts
from tests.support.databases import migrated_sqlite_if_new
from tests.support.processes import WatchedProcess
from tests.support.servers import METRICS_OFF_SETTINGS, TEST_SECRET, Tokens, free_port

REGION = "ap-southeast-1"
OTHER_REGION = "ap-southeast-2"
API = "passport"
OTHER_API = "id-card"
ACCOUNT = "acct-1"
OTHER_ACCOUNT = "acct-2"
# The `quota` fixture's manual clock starts here.
START = datetime(2024, 1, 1, tzinfo=UTC)
# A default expiry well after every instant the tests move the clock to.
END_OF_YEAR = datetime(2024, 12, 31, 23, 59, 59, tzinfo=UTC)

FREE = quota_pb2.PACKAGE_SOURCE_FREE
PROMOTION = quota_pb2.PACKAGE_SOURCE_PROMOTION
SUBSCRIPTION = quota_pb2.PACKAGE_SOURCE_SUBSCRIPTION

PENDING = quota_pb2.PACKAGE_STATE_PENDING
ACTIVE = quota_pb2.PACKAGE_STATE_ACTIVE
EXHAUSTED = quota_pb2.PACKAGE_STATE_EXHAUSTED
EXPIRED = quota_pb2.PACKAGE_STATE_EXPIRED
REVOKED = quota_pb2.PACKAGE_STATE_REVOKED

# --- as a process ------------------------------------------------------------------------


def quota_env(database_url: str, data_dir: pathlib.Path, **extra: str) -> dict[str, str]:
    """The settings of a quota process on a fresh loopback port. A SQLite database not there
    yet starts as a copy of quota's migrated template, so the process's own migration is a
    no-op check (migrating: tests/integration/test_migrations.py)."""
    migrated_sqlite_if_new(database_url, "quota")
    env = {
        "ALLOT_QUOTA_DATABASE_URL": database_url,
        "ALLOT_QUOTA_ADDR": f"127.0.0.1:{free_port()}",
        "ALLOT_AUTH_SECRET": TEST_SECRET,
        "ALLOT_DATA_DIR": str(data_dir),
        # Not following billing unless a test says where it is: never a developer's suite.
        "ALLOT_BILLING_ADDR": "",
    }
    env.update(extra)
    return env


class QuotaProcess(WatchedProcess):
    """`python -m services.quota` with a deadline on every wait."""

    def __init__(self, env: dict[str, str], log_path: pathlib.Path) -> None:
        super().__init__("quota", env, log_path)


@contextlib.contextmanager
def quota_process(env: dict[str, str], log_path: pathlib.Path) -> Iterator[QuotaProcess]:
    """A started quota process, killed on the way out if it still runs."""
    process = QuotaProcess(env, log_path)
    try:
        process.start()
        yield process
    finally:
        process.kill()


# --- in process --------------------------------------------------------------------------


def quota_settings(database_url: str, data_dir: pathlib.Path, **overrides: str) -> Settings:
    values = {
        **METRICS_OFF_SETTINGS,
        "data_dir": str(data_dir),
        "quota_database_url": database_url,
        "quota_addr": "127.0.0.1:0",
        "auth_secret": TEST_SECRET,
        "shutdown_grace": "2",
        # Not following billing unless a test says where it is: never a developer's suite.
        "billing_addr": "",
    }
    values.update(overrides)
    return Settings.from_env(environ={}, **values)


@dataclass
class QuotaHandle:
    server: Server
    channel: grpc.aio.Channel
    stub: quota_service_pb2_grpc.QuotaServiceStub
    clock: clock_service_pb2_grpc.ClockServiceStub
    tokens: Tokens = field(default_factory=Tokens)

    @property
    def addr(self) -> str:
        return self.server.bound_addr


@contextlib.asynccontextmanager
async def running_quota(settings: Settings):
    """An in-process quota server on a free loopback port, with a channel to it. A SQLite
    database not there yet starts as a copy of quota's migrated template, so the server's own
    migration is a no-op check (migrating: tests/integration/test_migrations.py)."""
    migrated_sqlite_if_new(settings.quota_database_url, "quota")
    runtime = build_runtime(settings, "quota")
    server = Server(
        runtime, QuotaService(runtime), settings.quota_addr, settings.quota_metrics_addr
    )
    await server.start()
    channel = grpc.aio.insecure_channel(server.bound_addr)
    try:
        yield QuotaHandle(
            server=server,
            channel=channel,
            stub=quota_service_pb2_grpc.QuotaServiceStub(channel),
            clock=clock_service_pb2_grpc.ClockServiceStub(channel),
        )
    finally:
        await channel.close()
        await server.stop()


# --- calls -------------------------------------------------------------------------------


def deductions(response) -> list[tuple[str, int]]:
    return [(d.package_id, d.quantity) for d in response.deductions]


def sqlite_in(directory: pathlib.Path) -> str:
    """The URL of a SQLite database file in `directory` (made if missing)."""
    directory.mkdir(parents=True, exist_ok=True)
    return f"sqlite+aiosqlite:///{directory / 'db.sqlite'}"


@contextlib.asynccontextmanager
async def regional_quota(data_dir: pathlib.Path, region: str, catalog: str, clock_start: str):
    """An in-process quota serving `region` alone from its own SQLite database in `data_dir`,
    on a manual clock: one regional deployment of several in a test."""
    settings = quota_settings(
        sqlite_in(data_dir),
        data_dir,
        clock="manual",
        clock_start=clock_start,
        catalog=catalog,
        quota_regions=region,
    )
    async with running_quota(settings) as handle:
        yield QuotaCalls(handle)


@contextlib.asynccontextmanager
async def quota_server(database_url: str, data_dir: pathlib.Path, **overrides: str):
    """A quota server like the `quota` fixture's (manual clock at START) with other settings."""
    values = {"clock": "manual", "clock_start": "2024-01-01T00:00:00Z", **overrides}
    async with running_quota(quota_settings(database_url, data_dir, **values)) as handle:
        yield QuotaCalls(handle)


class QuotaCalls(ServiceCalls):
    """One method per RPC of QuotaService (and ClockService), with test defaults."""

    def __init__(self, handle: QuotaHandle, tokens: Tokens | None = None) -> None:
        self.handle = handle
        self.stub = handle.stub
        self.clock = handle.clock
        self.tokens = tokens or handle.tokens
        self.admin = self.tokens.md(self.tokens.admin())
        self.gateway = self.tokens.md(self.tokens.gateway())

    def account(self, account_id: str = ACCOUNT, read_only: bool = False) -> Metadata:
        return super().account(account_id, read_only)

    # --- packages ------------------------------------------------------------------------

    @staticmethod
    def package(
        account_id: str = ACCOUNT,
        quantity: int = 10,
        *,
        source: int = SUBSCRIPTION,
        region: str = REGION,
        api: str = API,
        project: str = "",
        effective: datetime | str | None = None,
        expire: datetime | str | None = END_OF_YEAR,
        order_id: str = "",
    ) -> quota_pb2.Package:
        package = quota_pb2.Package(
            account_id=account_id,
            region=region,
            api=api,
            enterprise_project_id=project,
            source=source,
            total_quantity=quantity,
            order_id=order_id,
        )
        if effective is not None:
            package.effective_time.CopyFrom(ts(effective))
        if expire is not None:
            package.expire_time.CopyFrom(ts(expire))
        return package

    def grant_package(
        self,
        package: quota_pb2.Package,
        request_id: str = "",
        metadata: Metadata | None = None,
    ) -> Awaitable[quota_pb2.Package]:
        return self.stub.GrantPackage(
            quota_service_pb2.GrantPackageRequest(request_id=request_id, package=package),
            metadata=metadata or self.admin,
        )

    async def grant(self, account_id: str = ACCOUNT, quantity: int = 10, **fields):
        """Grant a package built by `package()` (keywords: its fields and request_id/metadata)."""
        request_id = fields.pop("request_id", "")
        metadata = fields.pop("metadata", None)
        return await self.grant_package(
            self.package(account_id, quantity, **fields), request_id, metadata
        )

    def get(self, package_id: str, metadata: Metadata | None = None):
        return self.stub.GetPackage(
            quota_service_pb2.GetPackageRequest(package_id=package_id),
            metadata=metadata or self.admin,
        )

    def list_packages(
        self,
        account_id: str = ACCOUNT,
        *,
        states: Sequence[int] = (),
        page_size: int = 0,
        page_token: str = "",
        metadata: Metadata | None = None,
        **filters: str,
    ):
        return self.stub.ListPackages(
            quota_service_pb2.ListPackagesRequest(
                account_id=account_id,
                states=list(states),
                page_size=page_size,
                page_token=page_token,
                **filters,
            ),
            metadata=metadata or self.admin,
        )

    async def package_ids(self, account_id: str = ACCOUNT, **kwargs) -> list[str]:
        return [p.package_id for p in (await self.list_packages(account_id, **kwargs)).packages]

    def renew(
        self,
        package_id: str,
        *,
        expire: datetime | str | None = None,
        add: int = 0,
        request_id: str = "",
        metadata: Metadata | None = None,
    ):
        request = quota_service_pb2.RenewPackageRequest(
            request_id=request_id, package_id=package_id, add_quantity=add
        )
        if expire is not None:
            request.expire_time.CopyFrom(ts(expire))
        return self.stub.RenewPackage(request, metadata=metadata or self.admin)

    def revoke(
        self,
        package_id: str,
        reason: str = "refund",
        request_id: str = "",
        metadata: Metadata | None = None,
    ):
        return self.stub.RevokePackage(
            quota_service_pb2.RevokePackageRequest(
                request_id=request_id, package_id=package_id, reason=reason
            ),
            metadata=metadata or self.admin,
        )

    def summary(
        self,
        account_id: str = ACCOUNT,
        region: str = "",
        api: str = "",
        metadata: Metadata | None = None,
    ):
        return self.stub.GetQuotaSummary(
            quota_service_pb2.GetQuotaSummaryRequest(account_id=account_id, region=region, api=api),
            metadata=metadata or self.admin,
        )

    def forecast(
        self,
        account_id: str = ACCOUNT,
        region: str = "",
        api: str = "",
        metadata: Metadata | None = None,
    ):
        return self.stub.GetQuotaForecast(
            quota_service_pb2.GetQuotaForecastRequest(
                account_id=account_id, region=region, api=api
            ),
            metadata=metadata or self.admin,
        )

    # --- usage ---------------------------------------------------------------------------

    def simulate(
        self,
        start: datetime | str,
        end: datetime | str,
        *,
        account_id: str = ACCOUNT,
        region: str = REGION,
        api: str = API,
        policy: str = "",
        packages: Sequence[quota_service_pb2.HypotheticalPackage] = (),
        use_real: bool | None = None,
        metadata: Metadata | None = None,
    ):
        """SimulateUsage over [start, end) (docs/design/what-if.md)."""
        request = quota_service_pb2.SimulateUsageRequest(
            account_id=account_id,
            region=region,
            api=api,
            start_time=ts(start),
            end_time=ts(end),
            policy=policy,
            packages=packages,
        )
        if use_real is not None:
            request.use_real_packages = use_real
        return self.stub.SimulateUsage(request, metadata=metadata or self.admin)

    @staticmethod
    def hypothetical(
        offer_id: str, start: datetime | str, count: int = 0, project: str = ""
    ) -> quota_service_pb2.HypotheticalPackage:
        return quota_service_pb2.HypotheticalPackage(
            offer_id=offer_id, start_time=ts(start), count=count, enterprise_project_id=project
        )

    @staticmethod
    def usage(
        event_id: str,
        account_id: str = ACCOUNT,
        quantity: int = 1,
        *,
        http_status: int = 200,
        region: str = REGION,
        api: str = API,
        project: str = "",
        occur: datetime | str | timestamp_pb2.Timestamp | None = None,
        user_id: str = "user-1",
    ) -> quota_service_pb2.ReportUsageRequest:
        request = quota_service_pb2.ReportUsageRequest(
            event_id=event_id,
            account_id=account_id,
            user_id=user_id,
            region=region,
            api=api,
            enterprise_project_id=project,
            quantity=quantity,
            http_status=http_status,
        )
        if isinstance(occur, timestamp_pb2.Timestamp):
            request.occur_time.CopyFrom(occur)
        elif occur is not None:
            request.occur_time.CopyFrom(ts(occur))
        return request

    def report_request(
        self, request: quota_service_pb2.ReportUsageRequest, metadata: Metadata | None = None
    ):
        return self.stub.ReportUsage(request, metadata=metadata or self.gateway)

    async def report(self, event_id: str, account_id: str = ACCOUNT, quantity: int = 1, **fields):
        """Report one usage event built by `usage()` (keyword `metadata` picks the caller)."""
        metadata = fields.pop("metadata", None)
        return await self.report_request(
            self.usage(event_id, account_id, quantity, **fields), metadata
        )

    def batch(self, requests: Sequence, metadata: Metadata | None = None):
        return self.stub.BatchReportUsage(
            quota_service_pb2.BatchReportUsageRequest(requests=list(requests)),
            metadata=metadata or self.gateway,
        )

    def explain(self, event_id: str, metadata: Metadata | None = None):
        return self.stub.ExplainUsage(
            quota_service_pb2.ExplainUsageRequest(event_id=event_id),
            metadata=metadata or self.admin,
        )

    # --- subscriptions and admission -----------------------------------------------------

    def enable(
        self,
        account_id: str = ACCOUNT,
        api: str = API,
        region: str = REGION,
        request_id: str = "",
        metadata: Metadata | None = None,
    ):
        return self.stub.EnableApi(
            quota_service_pb2.EnableApiRequest(
                request_id=request_id, account_id=account_id, region=region, api=api
            ),
            metadata=metadata or self.admin,
        )

    def disable(self, account_id: str = ACCOUNT, api: str = API, region: str = REGION):
        return self.stub.DisableApi(
            quota_service_pb2.DisableApiRequest(account_id=account_id, region=region, api=api),
            metadata=self.admin,
        )

    def subscriptions(
        self,
        account_id: str = ACCOUNT,
        region: str = "",
        page_size: int = 0,
        page_token: str = "",
        metadata: Metadata | None = None,
    ):
        return self.stub.ListApiSubscriptions(
            quota_service_pb2.ListApiSubscriptionsRequest(
                account_id=account_id, region=region, page_size=page_size, page_token=page_token
            ),
            metadata=metadata or self.admin,
        )

    def check(
        self,
        account_id: str = ACCOUNT,
        quantity: int = 1,
        *,
        api: str = API,
        region: str = REGION,
        project: str = "",
        metadata: Metadata | None = None,
    ):
        return self.stub.CheckQuota(
            quota_service_pb2.CheckQuotaRequest(
                account_id=account_id,
                region=region,
                api=api,
                enterprise_project_id=project,
                quantity=quantity,
            ),
            metadata=metadata or self.gateway,
        )

    # --- rate limits ---------------------------------------------------------------------

    def set_rate_limit(
        self,
        per_second: int,
        burst: int = 0,
        account_id: str = ACCOUNT,
        *,
        api: str = API,
        region: str = REGION,
        request_id: str = "",
        metadata: Metadata | None = None,
    ):
        return self.stub.SetRateLimit(
            quota_service_pb2.SetRateLimitRequest(
                request_id=request_id,
                account_id=account_id,
                region=region,
                api=api,
                per_second=per_second,
                burst=burst,
            ),
            metadata=metadata or self.admin,
        )

    def get_rate_limit(
        self,
        account_id: str = ACCOUNT,
        *,
        api: str = API,
        region: str = REGION,
        metadata: Metadata | None = None,
    ):
        return self.stub.GetRateLimit(
            quota_service_pb2.GetRateLimitRequest(account_id=account_id, region=region, api=api),
            metadata=metadata or self.admin,
        )


async def last_event_sequence(handle: QuotaHandle, event_type: str = "") -> int:
    """The sequence of the last event (of `event_type`, when given) quota has written, 0 when
    none: what a consumer of its stream has to reach to have seen everything written so far."""
    from sqlalchemy import func, select

    from services.quota.adapters import tables

    events = tables.outbox_events.c

    async def last(uow) -> int:
        query = select(func.coalesce(func.max(events.sequence), 0))
        if event_type:
            query = query.where(events.event_type == event_type)
        return (await uow.session.execute(query)).scalar_one()

    return await handle.server.runtime.db.read(last)


def quota_calls(channel: grpc.aio.Channel, tokens: Tokens | None = None) -> QuotaCalls:
    """The quota helpers of this module over a channel to a quota process
    (with the tokens of `tokens`, the test secret's by default)."""
    handle = QuotaHandle(
        server=None,  # type: ignore[arg-type] - only the stubs are used
        channel=channel,
        stub=quota_service_pb2_grpc.QuotaServiceStub(channel),
        clock=clock_service_pb2_grpc.ClockServiceStub(channel),
    )
    return QuotaCalls(handle, tokens)
