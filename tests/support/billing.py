"""The billing service for tests: as a real process (end-to-end), in-process on port 0 (service
tests), short calls to it, and a small catalog whose tiers a test can walk through.

`BillingProcess` is `WatchedProcess` for `python -m services.billing`: every wait has a deadline
and the child gets exactly the `ALLOT_*` settings the test chose. `running_billing` is the same
`BillingService` in the test's own event loop.
"""

from __future__ import annotations

import contextlib
import pathlib
import time
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from zoneinfo import ZoneInfo

import grpc
from allot.billing.v1 import billing_pb2, billing_service_pb2, billing_service_pb2_grpc
from allot.testing.v1 import clock_service_pb2_grpc
from google.type import money_pb2
from sqlalchemy import func, select

from services.billing.service import BillingService
from services.quota.adapters import tables as quota_tables
from shared.server import Server, build_runtime
from shared.settings import Settings
from tests.support.calls import Metadata, ServiceCalls
from tests.support.events import events as stream_events
from tests.support.processes import WatchedProcess
from tests.support.quota import quota_env
from tests.support.servers import METRICS_OFF_SETTINGS, TEST_SECRET, Tokens, free_port

# How long a test waits for something the services do on their own (a consumer catching up,
# a settlement); every wait ends as soon as it is met.
SETTLE_TIMEOUT = 30.0
POLL = 0.05


# A catalog for tier tests: tier 1 ends at 10 calls, so a test reaches tier 2 with 11 calls.
TEST_CATALOG = """\
currency: USD
regions:
  - {id: ap-southeast-1, name: CN-Hong Kong}
  - {id: ap-southeast-2, name: AP-Bangkok}
apis:
  - id: passport
    name: Passport OCR
    price_tiers:
      - {up_to: 10, unit_price: "0.10"}
      - {unit_price: "0.05"}
  - id: general-text
    name: General Text OCR
    free_monthly_quantity: 3
    price_tiers:
      - {up_to: 10, unit_price: "0.10"}
      - {unit_price: "0.05"}
  - id: id-card
    name: ID Card OCR
    price_tiers:
      - {unit_price: "0.0025"}
offers:
  - id: passport-100-1y
    api: passport
    quantity: 100
    validity_months: 12
    price: "1.00"
"""
# Tier 1 of passport and general-text ends here.
TIER_1_UP_TO = 10


def write_catalog(directory: pathlib.Path) -> pathlib.Path:
    path = directory / "catalog.yaml"
    path.write_text(TEST_CATALOG)
    return path


# --- as a process ------------------------------------------------------------------------


def billing_env(
    database_url: str, data_dir: pathlib.Path, quota_addr: str, clock_start: str, **extra: str
) -> dict[str, str]:
    """The settings of a billing process on a fresh loopback port, consuming the quota at
    `quota_addr` (every region), on a manual clock at `clock_start` with a short lease."""
    env = {
        "ALLOT_BILLING_DATABASE_URL": database_url,
        "ALLOT_BILLING_ADDR": f"127.0.0.1:{free_port()}",
        "ALLOT_QUOTA_ADDR": quota_addr,
        "ALLOT_AUTH_SECRET": TEST_SECRET,
        "ALLOT_DATA_DIR": str(data_dir),
        "ALLOT_CLOCK": "manual",
        "ALLOT_CLOCK_START": clock_start,
        "ALLOT_CONSUMER_LEASE_SECONDS": "2",
        "ALLOT_SHUTDOWN_GRACE_SECONDS": "2",
    }
    env.update(extra)
    return env


def paired_env(tmp_path, clock_start: str) -> tuple[dict[str, str], dict[str, str]]:
    """The settings of a quota and a billing process that follow each other."""
    billing_addr = f"127.0.0.1:{free_port()}"
    quota_data = tmp_path / "quota"
    quota_data.mkdir()
    q_env = quota_env(
        f"sqlite+aiosqlite:///{quota_data / 'quota.db'}",
        quota_data,
        ALLOT_CLOCK="manual",
        ALLOT_CLOCK_START=clock_start,
        ALLOT_BILLING_ADDR=billing_addr,
        ALLOT_CONSUMER_LEASE_SECONDS="2",
    )
    b_env = billing_env(
        f"sqlite+aiosqlite:///{tmp_path / 'billing.db'}",
        tmp_path,
        "",  # filled in once quota has its address
        clock_start,
        ALLOT_BILLING_ADDR=billing_addr,
    )
    return q_env, b_env


class BillingProcess(WatchedProcess):
    """`python -m services.billing` with a deadline on every wait."""

    def __init__(self, env: dict[str, str], log_path: pathlib.Path) -> None:
        super().__init__("billing", env, log_path)


@contextlib.contextmanager
def billing_process(env: dict[str, str], log_path: pathlib.Path) -> Iterator[BillingProcess]:
    """A started billing process, killed on the way out if it still runs."""
    process = BillingProcess(env, log_path)
    try:
        process.start()
        yield process
    finally:
        process.kill()


# --- in process --------------------------------------------------------------------------


def billing_settings(
    database_url: str,
    data_dir: pathlib.Path,
    quota_addr: str,
    clock_start: str,
    **overrides: str,
) -> Settings:
    values = {
        **METRICS_OFF_SETTINGS,
        "data_dir": str(data_dir),
        "billing_database_url": database_url,
        "billing_addr": "127.0.0.1:0",
        "quota_addr": quota_addr,
        "auth_secret": TEST_SECRET,
        "shutdown_grace": "2",
        "clock": "manual",
        "clock_start": clock_start,
        "consumer_lease_seconds": "2",
    }
    values.update(overrides)
    return Settings.from_env(environ={}, **values)


@dataclass
class BillingHandle:
    server: Server
    service: BillingService
    channel: grpc.aio.Channel
    calls: BillingCalls

    async def caught_up_with(self, quota) -> None:
        """Wait until billing has taken in every pay-per-use event the in-process quota server
        `quota` (a QuotaHandle) has written so far."""
        events = quota_tables.outbox_events.c

        async def last(uow):
            query = select(func.coalesce(func.max(events.sequence), 0)).where(
                events.event_type == "pay_per_use_recorded"
            )
            return (await uow.session.execute(query)).scalar_one()

        await self.caught_up(await quota.server.runtime.db.read(last), quota.addr)

    async def caught_up(
        self, sequence: int, quota_addr: str = "", within: float = SETTLE_TIMEOUT
    ) -> None:
        """Wait until billing's consumer of the quota at `quota_addr` (every quota's, when
        empty) has applied that quota's events up to `sequence`."""
        for consumer in self.service.pay_per_use.consumers:
            if quota_addr and consumer.stream != f"quota@{quota_addr}":
                continue
            assert await consumer.wait_for(sequence, within), (
                f"{consumer.stream} at {consumer.last_sequence}, not {sequence}"
            )


@contextlib.asynccontextmanager
async def running_billing(settings: Settings):
    """An in-process billing server on a free loopback port."""
    runtime = build_runtime(settings, "billing")
    service = BillingService(runtime)
    server = Server(runtime, service, settings.billing_addr, settings.billing_metrics_addr)
    await server.start()
    channel = grpc.aio.insecure_channel(server.bound_addr)
    try:
        yield BillingHandle(server, service, channel, BillingCalls(channel))
    finally:
        await channel.close()
        await server.stop()


# --- calls -------------------------------------------------------------------------------

# The test catalog's billing time zone (write_catalog): cycles, months and expiry dates are its.
BILLING_TZ = ZoneInfo("Asia/Shanghai")


def local(text: str) -> datetime:
    """`"2024-05-01 08:45"` in the billing time zone."""
    return datetime.fromisoformat(text).replace(tzinfo=BILLING_TZ)


def usd(amount: str) -> money_pb2.Money:
    """`"1.25"` as google.type.Money in USD (exactly)."""
    micros = money_micros_of(amount)
    units = int(micros / 1_000_000)
    return money_pb2.Money(
        currency_code="USD", units=units, nanos=(micros - units * 1_000_000) * 1000
    )


def money_micros_of(amount: str) -> int:
    from decimal import Decimal

    from shared.money import to_micros

    return to_micros(Decimal(amount))


def micros(money: money_pb2.Money) -> int:
    """google.type.Money as integer micro-units."""
    return money.units * 1_000_000 + money.nanos // 1000


@dataclass
class BillingCalls(ServiceCalls):
    """One method per BillingService RPC the pay-per-use tests use (and ClockService)."""

    channel: grpc.aio.Channel
    tokens: Tokens = field(default_factory=Tokens)
    CLOCK_TIMEOUT = SETTLE_TIMEOUT

    def __post_init__(self) -> None:
        self.stub = billing_service_pb2_grpc.BillingServiceStub(self.channel)
        self.clock = clock_service_pb2_grpc.ClockServiceStub(self.channel)
        self.admin = self.tokens.md(self.tokens.admin())

    async def create_account(
        self, account_id: str, kind: int = billing_pb2.ACCOUNT_KIND_STANDALONE, **fields
    ) -> billing_pb2.Account:
        return await self.stub.CreateAccount(
            billing_service_pb2.CreateAccountRequest(
                request_id=f"create-{account_id}",
                account=billing_pb2.Account(account_id=account_id, kind=kind, **fields),
            ),
            metadata=self.admin,
        )

    async def top_up(
        self, account_id: str, amount: str, request_id: str = ""
    ) -> billing_pb2.Account:
        return await self.stub.TopUp(
            billing_service_pb2.TopUpRequest(
                request_id=request_id or f"top-up-{account_id}-{amount}-{time.monotonic_ns()}",
                account_id=account_id,
                amount=usd(amount),
            ),
            metadata=self.admin,
        )

    def purchase(
        self, account_id: str, offer_id: str, region: str, request_id: str, timeout: float
    ) -> Awaitable[billing_pb2.Order]:
        return self.stub.PurchasePackage(
            billing_service_pb2.PurchasePackageRequest(
                request_id=request_id, account_id=account_id, offer_id=offer_id, region=region
            ),
            metadata=self.admin,
            timeout=timeout,
        )

    async def orders(self, account_id: str) -> list[billing_pb2.Order]:
        """Every order of the account, newest first (every page)."""
        out: list[billing_pb2.Order] = []
        token = ""
        for _ in range(1000):  # bounded: each page moves the token on
            page = await self.stub.ListOrders(
                billing_service_pb2.ListOrdersRequest(
                    account_id=account_id, page_size=100, page_token=token
                ),
                metadata=self.admin,
                timeout=SETTLE_TIMEOUT,
            )
            out.extend(page.orders)
            token = page.next_page_token
            if not token:
                break
        return out

    async def set_balance_alert(self, account_id: str, threshold: str) -> billing_pb2.Account:
        return await self.stub.SetBalanceAlert(
            billing_service_pb2.SetBalanceAlertRequest(
                account_id=account_id, threshold=usd(threshold)
            ),
            metadata=self.admin,
        )

    async def get_account(self, account_id: str) -> billing_pb2.Account:
        return await self.stub.GetAccount(
            billing_service_pb2.GetAccountRequest(account_id=account_id), metadata=self.admin
        )

    def get_bill(self, account_id: str, month: str, metadata: Metadata | None = None):
        return self.stub.GetBill(
            billing_service_pb2.GetBillRequest(account_id=account_id, month=month),
            metadata=metadata or self.admin,
        )

    def export_bill(self, account_id: str, month: str, metadata: Metadata | None = None):
        return self.stub.ExportBill(
            billing_service_pb2.ExportBillRequest(account_id=account_id, month=month),
            metadata=metadata or self.admin,
        )

    async def events(self, after: int = 0, types: tuple[str, ...] = ()) -> list:
        """Billing's events after `after` up to its outbox's last sequence now (read to that
        position, not until a quiet moment: tests/support/events.py)."""
        return await stream_events(
            self.stub,
            self.admin,
            after,
            types,
            request_type=billing_service_pb2.WatchEventsRequest,
            within=SETTLE_TIMEOUT,
        )
