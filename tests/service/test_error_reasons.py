"""Every error reason the contract names, provoked against real in-process servers.

The contract is the protos' comments: every UPPER_SNAKE word in a comment of protos/allot/**/*.proto
that is not a gRPC status code name, an enum value (or the tail of one: ENTERPRISE_MASTER) or
an ALLOT_ setting is an error reason of the service whose proto names it (ClockService's are
under "testing"). `SCENARIOS` maps each (service, reason) to a scenario that makes a real server
answer with it and checks the status code and the ErrorInfo reason; the meta-test fails when
the protos name a reason the table lacks, and when the table holds one they do not name. A new
reason in a proto comment therefore needs a scenario here.

`BEYOND_PROTOS` holds the reasons the services give that no proto comment names (docs/faults.md,
"Error reasons beyond the protos"); their meta-test checks that the code still gives each of
them and that they have not moved into the protos (then they belong in `SCENARIOS`).

Scenarios run on SQLite; CONCURRENT_UPDATE needs PostgreSQL (a real serialization failure).
"""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc
import pytest
from allot.billing.v1 import billing_pb2, billing_service_pb2
from allot.quota.v1 import quota_pb2, quota_service_pb2, quota_service_pb2_grpc
from google.type import date_pb2, money_pb2

from services.quota.service import QuotaService
from shared.server import Server, build_runtime
from shared.settings import REPO_ROOT
from tests.support.billing import (
    TEST_CATALOG,
    BillingCalls,
    BillingHandle,
    billing_settings,
    running_billing,
)
from tests.support.calls import expect_error, ts
from tests.support.databases import (
    POSTGRES_ADMIN_URL,
    create_postgres_database,
    drop_postgres_database,
)
from tests.support.notification import (
    EMAIL,
    contact,
    notification_settings,
    running_notification,
    until,
)
from tests.support.quota import QuotaCalls, last_event_sequence, quota_settings, running_quota
from tests.support.receivers import closed_port
from tests.support.servers import Tokens

PROTOS = REPO_ROOT / "protos" / "allot"  # ours: protos/google and protos/grpc are vendored copies
CODE = (REPO_ROOT / "shared", REPO_ROOT / "services")
START = "2024-01-01T00:00:00Z"
START_TIME = datetime(2024, 1, 1, tzinfo=UTC)
REGION = "ap-southeast-1"
OTHER_REGION = "ap-southeast-2"
API = "passport"
# The tier tests' catalog, whose offer is sold everywhere, and an offer sold in REGION only
# (OFFER_NOT_IN_REGION).
CATALOG = (
    TEST_CATALOG
    + """\
  - {id: passport-hk-100-1y, api: passport, regions: [ap-southeast-1], quantity: 100,
     validity_months: 12, price: "1.00"}
"""
)
OFFER = "passport-100-1y"
HK_ONLY_OFFER = "passport-hk-100-1y"
# How long a scenario waits for something a service does on its own (a consumer catching up).
WITHIN = 30.0

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
EXISTS = grpc.StatusCode.ALREADY_EXISTS
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
ABORTED = grpc.StatusCode.ABORTED
AUTO_REPLENISH = billing_pb2.ORDER_KIND_AUTO_REPLENISH


# --- the contract ------------------------------------------------------------------------

_WORD = re.compile(r"\b[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+\b")
_ENUM_VALUE = re.compile(r"^\s*([A-Z][A-Z0-9_]*)\s*=\s*\d+\s*;")


def contract_reasons() -> dict[tuple[str, str], list[str]]:
    """(service, reason) -> where the protos name it, for every reason in a proto comment."""
    codes = {code.name for code in grpc.StatusCode}
    enum_values: set[str] = set()
    named: dict[tuple[str, str], list[str]] = {}
    files = sorted(PROTOS.rglob("*.proto"))
    assert files, f"no protos under {PROTOS}"
    for path in files:
        service = path.relative_to(PROTOS).parts[0]  # <service>/v1/x.proto
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code, _, comment = line.partition("//")
            if value := _ENUM_VALUE.match(code):
                enum_values.add(value.group(1))
            for word in _WORD.findall(comment):
                named.setdefault((service, word), []).append(f"{path.name}:{number}")

    def is_reason(word: str) -> bool:
        return not (
            word in codes
            or word.startswith("ALLOT_")
            or any(value == word or value.endswith("_" + word) for value in enum_values)
        )

    return {key: where for key, where in named.items() if is_reason(key[1])}


# --- the stage: real servers a scenario starts as it needs them ----------------------------


@dataclass
class Stage:
    tmp: pathlib.Path
    stack: contextlib.AsyncExitStack

    @property
    def catalog(self) -> str:
        path = self.tmp / "catalog.yaml"
        if not path.exists():
            path.write_text(CATALOG)
        return str(path)

    def _dir(self, name: str) -> pathlib.Path:
        path = self.tmp / name
        path.mkdir(exist_ok=True)
        return path

    async def quota(self, **overrides: str) -> QuotaCalls:
        """A quota server (manual clock at START) on its own SQLite database."""
        data = self._dir(f"quota-{len(list(self.tmp.glob('quota-*')))}")
        values = {"clock": "manual", "clock_start": START, "catalog": self.catalog, **overrides}
        settings = quota_settings(f"sqlite+aiosqlite:///{data / 'q.db'}", data, **values)
        handle = await self.stack.enter_async_context(running_quota(settings))
        return QuotaCalls(handle)

    async def billing(self, quota: QuotaCalls | None = None, quota_addr: str = "") -> BillingHandle:
        """A billing server (manual clock at START) following `quota` (or `quota_addr`)."""
        data = self._dir("billing")
        addr = quota.handle.addr if quota is not None else quota_addr
        settings = billing_settings(
            f"sqlite+aiosqlite:///{data / 'b.db'}", data, addr, START, catalog=self.catalog
        )
        return await self.stack.enter_async_context(running_billing(settings))

    async def notification(self):
        data = self._dir("notification")
        settings = notification_settings(
            f"sqlite+aiosqlite:///{data / 'n.db'}", data, f"127.0.0.1:{closed_port()}"
        )
        handle = await self.stack.enter_async_context(running_notification(settings))
        return handle.calls


Scenario = Callable[[Stage], Awaitable[None]]


async def billing_with_quota(stage: Stage) -> tuple[BillingCalls, QuotaCalls, BillingHandle]:
    quota = await stage.quota()
    handle = await stage.billing(quota)
    return handle.calls, quota, handle


async def funded(billing: BillingCalls, account_id: str, amount: str = "") -> None:
    await billing.create_account(account_id)
    if amount:
        await billing.top_up(account_id, amount, request_id=f"fund-{account_id}")


def billing_rpc(billing: BillingCalls, rpc: str, timeout: float | None = None, **fields):
    """BillingService's `rpc` with a request of `fields`, as admin."""
    request = getattr(billing_service_pb2, f"{rpc}Request")(**fields)
    return getattr(billing.stub, rpc)(request, metadata=billing.admin, timeout=timeout)


def purchase(billing: BillingCalls, account_id: str, offer: str = OFFER, **fields):
    return billing_rpc(
        billing,
        "PurchasePackage",
        request_id=f"buy-{account_id}-{offer}",
        account_id=account_id,
        offer_id=offer,
        region=fields.pop("region", REGION),
        **fields,
    )


# --- quota ---------------------------------------------------------------------------------


async def quota_unknown_region(stage: Stage) -> None:
    quota = await stage.quota()
    await expect_error(quota.report("e-1", region="nowhere-1"), INVALID, "UNKNOWN_REGION")


async def quota_unknown_api(stage: Stage) -> None:
    quota = await stage.quota()
    await expect_error(quota.report("e-1", api="no-such-api"), INVALID, "UNKNOWN_API")


async def quota_event_id_reused(stage: Stage) -> None:
    quota = await stage.quota()
    await quota.report("e-1", quantity=1)
    await expect_error(quota.report("e-1", quantity=2), INVALID, "EVENT_ID_REUSED")


async def quota_region_not_served(stage: Stage) -> None:
    quota = await stage.quota(quota_regions=REGION)
    await expect_error(quota.report("e-1", region=OTHER_REGION), PRECONDITION, "REGION_NOT_SERVED")


async def quota_package_not_found(stage: Stage) -> None:
    quota = await stage.quota()
    await expect_error(quota.get("no-such-package"), NOT_FOUND, "PACKAGE_NOT_FOUND")


async def quota_invalid_state_transition(stage: Stage) -> None:
    quota = await stage.quota()
    package = await quota.grant(request_id="grant-1")
    await quota.revoke(package.package_id, request_id="revoke-1")
    await expect_error(
        quota.renew(package.package_id, add=5, request_id="renew-1"),
        PRECONDITION,
        "INVALID_STATE_TRANSITION",
    )


async def quota_usage_event_not_found(stage: Stage) -> None:
    quota = await stage.quota()
    await expect_error(quota.explain("no-such-event"), NOT_FOUND, "USAGE_EVENT_NOT_FOUND")


async def quota_usage_alert_not_found(stage: Stage) -> None:
    quota = await stage.quota()
    await expect_error(
        quota.stub.GetUsageAlert(
            quota_service_pb2.GetUsageAlertRequest(alert_id="no-such-alert"),
            metadata=quota.admin,
        ),
        NOT_FOUND,
        "USAGE_ALERT_NOT_FOUND",
    )


async def quota_usage_alert_owned(stage: Stage) -> None:
    quota = await stage.quota()
    billing = quota.tokens.md(quota.tokens.internal("billing"))
    rule = await quota.stub.CreateUsageAlert(
        quota_service_pb2.CreateUsageAlertRequest(
            usage_alert=quota_pb2.UsageAlert(
                account_id="acct-1", region=REGION, remaining_quantity=5, owner="auto_replenish"
            )
        ),
        metadata=billing,
    )
    await expect_error(
        quota.stub.DeleteUsageAlert(
            quota_service_pb2.DeleteUsageAlertRequest(alert_id=rule.alert_id),
            metadata=quota.account("acct-1"),
        ),
        PRECONDITION,
        "USAGE_ALERT_OWNED",
    )


async def quota_cursor_ahead_of_stream(stage: Stage) -> None:
    quota = await stage.quota()
    await quota.report("e-1")
    stream = quota.stub.WatchEvents(
        quota_service_pb2.WatchEventsRequest(after_sequence=1_000_000),
        metadata=quota.admin,
        timeout=WITHIN,
    )
    await expect_error(stream.read(), PRECONDITION, "CURSOR_AHEAD_OF_STREAM")


async def quota_request_id_reused(stage: Stage) -> None:
    quota = await stage.quota()
    await quota.grant(quantity=10, request_id="grant-1")
    await expect_error(quota.grant(quantity=11, request_id="grant-1"), INVALID, "REQUEST_ID_REUSED")


# --- billing -------------------------------------------------------------------------------


def billing_refuses(rpc: str, code: grpc.StatusCode, reason: str, **fields) -> Scenario:
    """A scenario: billing (with a quota) refuses one call of `rpc` with `fields`."""

    async def scenario(stage: Stage) -> None:
        billing, _, _ = await billing_with_quota(stage)
        await expect_error(billing_rpc(billing, rpc, **fields), code, reason)

    return scenario


async def billing_bill_line_not_found(stage: Stage) -> None:
    billing, _, _ = await billing_with_quota(stage)
    await funded(billing, "acct-1")
    await expect_error(
        billing_rpc(
            billing,
            "ExplainBillLine",
            account_id="acct-1",
            month="2024-01",
            cycle_start_time=ts(START),
            region=REGION,
            api="passport",
        ),
        NOT_FOUND,
        "BILL_LINE_NOT_FOUND",
    )


async def billing_account_already_exists(stage: Stage) -> None:
    billing, _, _ = await billing_with_quota(stage)
    await billing.create_account("acct-1")
    await expect_error(
        billing_rpc(
            billing,
            "CreateAccount",
            request_id="create-again",
            account=billing_pb2.Account(account_id="acct-1"),
        ),
        EXISTS,
        "ACCOUNT_ALREADY_EXISTS",
    )


async def billing_account_in_arrears(stage: Stage) -> None:
    """Unpaid pay-per-use settled at the end of its hour puts the account in GRACE (the real
    path: quota's event, billing's consumer, billing's settlement); a purchase is refused for
    the arrears even though a balance check alone would refuse it too — the reason tells."""
    billing, quota, handle = await billing_with_quota(stage)
    await funded(billing, "late")
    await quota.enable("late", API, REGION, request_id="enable-late")
    await quota.set_time(START_TIME + timedelta(minutes=30))
    await quota.report("late-1", "late", 1)
    last = await last_event_sequence(quota.handle, "pay_per_use_recorded")
    await handle.caught_up(last, quota.handle.addr, within=WITHIN)
    await billing.set_time(START_TIME + timedelta(hours=1))
    assert (await billing.get_account("late")).standing == billing_pb2.ACCOUNT_STANDING_GRACE
    await expect_error(purchase(billing, "late"), PRECONDITION, "ACCOUNT_IN_ARREARS")


async def billing_account_paid_by_master(stage: Stage) -> None:
    billing, _, _ = await billing_with_quota(stage)
    await billing.create_account("corp", billing_pb2.ACCOUNT_KIND_ENTERPRISE_MASTER)
    await billing.create_account(
        "corp-dev", billing_pb2.ACCOUNT_KIND_ENTERPRISE_MEMBER, master_account_id="corp"
    )
    await expect_error(billing.top_up("corp-dev", "5"), PRECONDITION, "ACCOUNT_PAID_BY_MASTER")


async def billing_api_subscription_not_found(stage: Stage) -> None:
    billing, _, _ = await billing_with_quota(stage)
    await funded(billing, "acct-1")
    await expect_error(
        billing_rpc(
            billing,
            "UnsubscribeApi",
            request_id="unsub-1",
            account_id="acct-1",
            region=REGION,
            api=API,
        ),
        NOT_FOUND,
        "API_SUBSCRIPTION_NOT_FOUND",
    )


async def billing_currency_mismatch(stage: Stage) -> None:
    billing, _, _ = await billing_with_quota(stage)
    await funded(billing, "acct-1")
    await expect_error(
        billing_rpc(
            billing,
            "TopUp",
            request_id="eur-1",
            account_id="acct-1",
            amount=money_pb2.Money(currency_code="EUR", units=5),
        ),
        INVALID,
        "CURRENCY_MISMATCH",
    )


async def billing_currency_not_supported(stage: Stage) -> None:
    billing, _, _ = await billing_with_quota(stage)
    await expect_error(
        billing.create_account("acct-eur", currency_code="EUR"),
        INVALID,
        "CURRENCY_NOT_SUPPORTED",
    )


async def billing_insufficient_balance(stage: Stage) -> None:
    billing, _, _ = await billing_with_quota(stage)
    await funded(billing, "poor", "0.50")
    await expect_error(purchase(billing, "poor"), PRECONDITION, "INSUFFICIENT_BALANCE")


async def billing_invalid_master_account(stage: Stage) -> None:
    billing, _, _ = await billing_with_quota(stage)
    await expect_error(
        billing.create_account(
            "orphan", billing_pb2.ACCOUNT_KIND_ENTERPRISE_MEMBER, master_account_id="nobody"
        ),
        PRECONDITION,  # the contract's code (docs/faults.md)
        "INVALID_MASTER_ACCOUNT",
    )


async def billing_offer_not_in_region(stage: Stage) -> None:
    billing, _, _ = await billing_with_quota(stage)
    await funded(billing, "acct-1", "10")
    await expect_error(
        purchase(billing, "acct-1", HK_ONLY_OFFER, region=OTHER_REGION),
        INVALID,
        "OFFER_NOT_IN_REGION",
    )


async def billing_order_not_cancellable(stage: Stage) -> None:
    billing, _, _ = await billing_with_quota(stage)
    await funded(billing, "acct-1", "10")
    order = await purchase(billing, "acct-1")  # effective at once: no longer cancellable
    await expect_error(
        billing_rpc(billing, "CancelOrder", request_id="cancel-1", order_id=order.order_id),
        PRECONDITION,
        "ORDER_NOT_CANCELLABLE",
    )


async def billing_package_not_renewable(stage: Stage) -> None:
    """A purchase cancelled before it took effect leaves a revoked package: not renewable."""
    billing, _, _ = await billing_with_quota(stage)
    await funded(billing, "acct-1", "10")
    later = ts(START_TIME + timedelta(days=3))
    order = await purchase(billing, "acct-1", effective_time=later)
    await billing_rpc(billing, "CancelOrder", request_id="cancel-1", order_id=order.order_id)
    await expect_error(
        billing_rpc(
            billing,
            "RenewPackage",
            request_id="renew-1",
            account_id="acct-1",
            package_id=order.package_id,
        ),
        PRECONDITION,
        "PACKAGE_NOT_RENEWABLE",
    )


async def billing_expire_date_not_after_expiry(stage: Stage) -> None:
    """A batch renewal to a date the package already runs to."""
    billing, _, _ = await billing_with_quota(stage)
    await funded(billing, "acct-1", "10")
    order = await purchase(billing, "acct-1")  # runs a year
    await expect_error(
        billing_rpc(
            billing,
            "RenewPackages",
            request_id="renew-1",
            account_id="acct-1",
            package_ids=[order.package_id],
            expire_date=date_pb2.Date(year=2024, month=6, day=1),
        ),
        PRECONDITION,
        "EXPIRE_DATE_NOT_AFTER_EXPIRY",
    )


async def billing_packages_not_alike(stage: Stage) -> None:
    """A batch renewal of packages of two regions (one order is one bill line)."""
    billing, _, _ = await billing_with_quota(stage)
    await funded(billing, "acct-1", "10")
    here = await purchase(billing, "acct-1")
    there = await billing_rpc(
        billing,
        "PurchasePackage",
        request_id="buy-there",
        account_id="acct-1",
        offer_id=OFFER,
        region=OTHER_REGION,
    )
    await expect_error(
        billing_rpc(
            billing,
            "RenewPackages",
            request_id="renew-1",
            account_id="acct-1",
            package_ids=[here.package_id, there.package_id],
            expire_date=date_pb2.Date(year=2025, month=6, day=1),
        ),
        PRECONDITION,
        "PACKAGES_NOT_ALIKE",
    )


async def billing_quota_unavailable(stage: Stage) -> None:
    """Billing whose region's quota service cannot be reached answers UNAVAILABLE."""
    handle = await stage.billing(quota_addr=f"127.0.0.1:{closed_port()}")
    billing = handle.calls
    await funded(billing, "acct-1")
    await expect_error(
        billing_rpc(
            billing,
            "SubscribeApi",
            timeout=WITHIN,
            request_id="sub-1",
            account_id="acct-1",
            region=REGION,
            api=API,
        ),
        UNAVAILABLE,
        "QUOTA_UNAVAILABLE",
    )


async def billing_request_id_reused(stage: Stage) -> None:
    billing, _, _ = await billing_with_quota(stage)
    await funded(billing, "acct-1")
    await billing.top_up("acct-1", "1", request_id="top-up-1")
    await expect_error(
        billing.top_up("acct-1", "2", request_id="top-up-1"), INVALID, "REQUEST_ID_REUSED"
    )


async def billing_unknown_offer(stage: Stage) -> None:
    billing, _, _ = await billing_with_quota(stage)
    await funded(billing, "acct-1", "10")
    await expect_error(purchase(billing, "acct-1", "no-such-offer"), INVALID, "UNKNOWN_OFFER")


async def notification_contact_not_found(stage: Stage) -> None:
    calls = await stage.notification()
    await expect_error(calls.get_contact("no-such-contact"), NOT_FOUND, "CONTACT_NOT_FOUND")


async def notification_delivery_not_found(stage: Stage) -> None:
    """A notification that exists but has no delivery to the contact named."""
    calls = await stage.notification()
    first = await calls.create("acct-1", EMAIL, "ops@example.com")
    second = await calls.create("acct-1", EMAIL, "finance@example.com")
    sent = await calls.send_test(first.contact_id)
    assert [d.contact_id for d in sent.deliveries] == [first.contact_id]
    await expect_error(
        calls.retry(sent.notification_id, second.contact_id), NOT_FOUND, "DELIVERY_NOT_FOUND"
    )


async def notification_notification_not_found(stage: Stage) -> None:
    calls = await stage.notification()
    contact = await calls.create("acct-1", EMAIL, "ops@example.com")
    await expect_error(
        calls.retry("no-such-notification", contact.contact_id),
        NOT_FOUND,
        "NOTIFICATION_NOT_FOUND",
    )


async def notification_request_id_reused(stage: Stage) -> None:
    calls = await stage.notification()
    await calls.create_contact(contact("acct-1", EMAIL, "ops@example.com"), request_id="c-1")
    await expect_error(
        calls.create_contact(contact("acct-1", EMAIL, "finance@example.com"), request_id="c-1"),
        INVALID,
        "REQUEST_ID_REUSED",
    )


async def notification_test_notification_rate_limited(stage: Stage) -> None:
    """Three tests per contact per hour; the fourth is refused (its clock does not move)."""
    calls = await stage.notification()
    contact = await calls.create("acct-1", EMAIL, "ops@example.com")
    for _ in range(3):
        await calls.send_test(contact.contact_id)
    await expect_error(
        calls.send_test(contact.contact_id),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "TEST_NOTIFICATION_RATE_LIMITED",
    )


async def clock_service_clock_backwards(stage: Stage) -> None:
    quota = await stage.quota()
    await expect_error(
        quota.set_time(START_TIME - timedelta(seconds=1)), PRECONDITION, "CLOCK_BACKWARDS"
    )


# --- beyond the protos ---------------------------------------------------------------------


async def shared_service_starting(stage: Stage) -> None:
    """A server whose database cannot be reached yet listens but is not ready: every call is
    refused with UNAVAILABLE, SERVICE_STARTING (retry shortly)."""
    data = stage._dir("starting")
    unreachable = f"postgresql+asyncpg://postgres@127.0.0.1:{closed_port()}/allot"
    settings = quota_settings(unreachable, data, clock="manual", clock_start=START)
    runtime = build_runtime(settings, "quota")
    server = Server(runtime, QuotaService(runtime), "127.0.0.1:0")
    starting = asyncio.create_task(server.start())
    try:
        for _ in range(400):  # bounded: the port is bound before the database is waited for
            if server.port or starting.done():
                break
            await asyncio.sleep(0.025)
        assert server.port and not starting.done(), "the server did not listen while starting"
        async with grpc.aio.insecure_channel(server.bound_addr) as channel:
            quota = quota_service_pb2_grpc.QuotaServiceStub(channel)
            tokens = Tokens()
            await expect_error(
                quota.GetPackage(
                    quota_service_pb2.GetPackageRequest(package_id="p-1"),
                    metadata=tokens.md(tokens.admin()),
                    timeout=WITHIN,
                ),
                UNAVAILABLE,
                "SERVICE_STARTING",
            )
    finally:
        await server.stop()
        await asyncio.wait_for(asyncio.gather(starting, return_exceptions=True), WITHIN)


async def shared_concurrent_update(stage: Stage) -> None:
    """A write that loses its race on every attempt ends in ABORTED, CONCURRENT_UPDATE.

    PostgreSQL itself answers every attempt with a serialization failure (SQLSTATE 40001, what
    a lost race is): a trigger on quota's packages table, put there from outside like the
    network faults of tests/e2e. The service retries (shared/db.py) and gives up."""
    url = await create_postgres_database()
    try:
        data = stage._dir("concurrent")
        settings = quota_settings(url, data, clock="manual", clock_start=START)
        async with running_quota(settings) as handle:
            quota = QuotaCalls(handle)
            await quota.grant(request_id="before")  # the write path works
            connection = await asyncpg.connect(
                POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + "/" + url.rsplit("/", 1)[1], timeout=10
            )
            try:
                await connection.execute(LOSE_EVERY_RACE)
            finally:
                await connection.close()
            await expect_error(quota.grant(request_id="after"), ABORTED, "CONCURRENT_UPDATE")
    finally:
        await drop_postgres_database(url)


LOSE_EVERY_RACE = """
CREATE FUNCTION lose_every_race() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  RAISE EXCEPTION 'could not serialize access due to concurrent update'
    USING ERRCODE = 'serialization_failure';
END $$;
CREATE TRIGGER lose_every_race BEFORE INSERT OR UPDATE ON packages
  FOR EACH ROW EXECUTE FUNCTION lose_every_race();
"""


async def billing_package_expired(stage: Stage) -> None:
    """An auto-renewal attempt that comes due after the package has expired (billing was down
    across the expiry, or its clock jumped past it) fails with PACKAGE_EXPIRED: it is the
    AutoRenewal's last_failure_reason and the auto_renew_failed event's reason, not a status."""
    billing, _, _ = await billing_with_quota(stage)
    await funded(billing, "acct-1", "10")
    order = await purchase(billing, "acct-1", auto_renew=True)
    package = order.package_id
    renewal = await billing_rpc(billing, "GetAutoRenew", package_id=package)
    assert renewal.enabled and renewal.HasField("next_attempt_time")
    # One year of validity: jump past its end in one move.
    await billing.set_time(START_TIME + timedelta(days=400))
    renewal = await billing_rpc(billing, "GetAutoRenew", package_id=package)
    assert renewal.last_failure_reason == "PACKAGE_EXPIRED", renewal
    failed = await billing.events(types=("auto_renew_failed",))
    assert [e.auto_renew_failed.reason for e in failed] == ["PACKAGE_EXPIRED"], failed


def set_auto_replenish(billing: BillingCalls, request_id: str, **fields):
    values = {
        "account_id": "acct-1",
        "region": REGION,
        "api": API,
        "offer_id": OFFER,
        "below_quantity": 20,
        "max_per_month": 1,
        "enabled": True,
        **fields,
    }
    return billing_rpc(billing, "SetAutoReplenish", request_id=request_id, **values)


async def billing_offer_not_for_api(stage: Stage) -> None:
    billing, _, _ = await billing_with_quota(stage)
    await funded(billing, "acct-1", "10")
    await expect_error(
        set_auto_replenish(billing, "set-1", api="general-text"), INVALID, "OFFER_NOT_FOR_API"
    )


async def billing_auto_replenish_limit_reached(stage: Stage) -> None:
    """A crossing of an auto-replenish threshold after the month's purchases were made buys
    nothing: the auto_replenish_failed event's reason, not a status."""
    billing, quota, _ = await billing_with_quota(stage)
    await funded(billing, "acct-1", "10")
    await purchase(billing, "acct-1")  # 100 calls
    await set_auto_replenish(billing, "set-1")
    await quota.report("e-1", "acct-1", 80)  # 20 left: the one purchase of the month

    async def auto_orders():
        return [o for o in await billing.orders("acct-1") if o.kind == AUTO_REPLENISH]

    await until(auto_orders, lambda found: len(found) == 1, WITHIN, "the first purchase")
    await until(quota_remaining(quota), lambda left: left == 120, WITHIN, "the package granted")
    await quota.report("e-2", "acct-1", 100)  # 20 left again: over the limit of 1
    failed = await until(
        lambda: billing.events(types=("auto_replenish_failed",)), bool, WITHIN, "the failure"
    )
    assert [e.auto_replenish_failed.reason for e in failed] == ["AUTO_REPLENISH_LIMIT_REACHED"]
    assert len(await auto_orders()) == 1


def quota_remaining(quota: QuotaCalls):
    async def read() -> int:
        (item,) = (await quota.summary("acct-1", region=REGION, api=API)).items
        return item.remaining_quantity

    return read


# --- the tables ----------------------------------------------------------------------------

# Every (service, reason) the protos' comments name.
SCENARIOS: dict[tuple[str, str], Scenario] = {
    ("quota", "UNKNOWN_REGION"): quota_unknown_region,
    ("quota", "UNKNOWN_API"): quota_unknown_api,
    ("quota", "EVENT_ID_REUSED"): quota_event_id_reused,
    ("quota", "REGION_NOT_SERVED"): quota_region_not_served,
    ("quota", "PACKAGE_NOT_FOUND"): quota_package_not_found,
    ("quota", "INVALID_STATE_TRANSITION"): quota_invalid_state_transition,
    ("quota", "USAGE_EVENT_NOT_FOUND"): quota_usage_event_not_found,
    ("quota", "REQUEST_ID_REUSED"): quota_request_id_reused,
    ("quota", "USAGE_ALERT_NOT_FOUND"): quota_usage_alert_not_found,
    ("quota", "USAGE_ALERT_OWNED"): quota_usage_alert_owned,
    ("quota", "CURSOR_AHEAD_OF_STREAM"): quota_cursor_ahead_of_stream,
    ("billing", "ACCOUNT_ALREADY_EXISTS"): billing_account_already_exists,
    ("billing", "ACCOUNT_IN_ARREARS"): billing_account_in_arrears,
    ("billing", "ACCOUNT_NOT_FOUND"): billing_refuses(
        "GetAccount", NOT_FOUND, "ACCOUNT_NOT_FOUND", account_id="nobody"
    ),
    ("billing", "ACCOUNT_PAID_BY_MASTER"): billing_account_paid_by_master,
    ("billing", "API_SUBSCRIPTION_NOT_FOUND"): billing_api_subscription_not_found,
    ("billing", "BILL_LINE_NOT_FOUND"): billing_bill_line_not_found,
    ("billing", "CURRENCY_MISMATCH"): billing_currency_mismatch,
    ("billing", "CURRENCY_NOT_SUPPORTED"): billing_currency_not_supported,
    ("billing", "EXPIRE_DATE_NOT_AFTER_EXPIRY"): billing_expire_date_not_after_expiry,
    ("billing", "INSUFFICIENT_BALANCE"): billing_insufficient_balance,
    ("billing", "INVALID_MASTER_ACCOUNT"): billing_invalid_master_account,
    ("billing", "OFFER_NOT_IN_REGION"): billing_offer_not_in_region,
    ("billing", "ORDER_NOT_CANCELLABLE"): billing_order_not_cancellable,
    ("billing", "ORDER_NOT_FOUND"): billing_refuses(
        "GetOrder", NOT_FOUND, "ORDER_NOT_FOUND", order_id="no-such-order"
    ),
    ("billing", "PACKAGE_NOT_FOUND"): billing_refuses(
        "GetAutoRenew", NOT_FOUND, "PACKAGE_NOT_FOUND", package_id="no-such-package"
    ),
    ("billing", "PACKAGE_NOT_RENEWABLE"): billing_package_not_renewable,
    ("billing", "PACKAGES_NOT_ALIKE"): billing_packages_not_alike,
    ("billing", "QUOTA_UNAVAILABLE"): billing_quota_unavailable,
    ("billing", "REQUEST_ID_REUSED"): billing_request_id_reused,
    ("billing", "UNKNOWN_API"): billing_refuses(
        "ListOffers", INVALID, "UNKNOWN_API", api="no-such-api"
    ),
    ("billing", "UNKNOWN_OFFER"): billing_unknown_offer,
    ("billing", "OFFER_NOT_FOR_API"): billing_offer_not_for_api,
    ("billing", "AUTO_REPLENISH_NOT_FOUND"): billing_refuses(
        "GetAutoReplenish",
        NOT_FOUND,
        "AUTO_REPLENISH_NOT_FOUND",
        account_id="acct-1",
        region=REGION,
        api=API,
    ),
    ("billing", "AUTO_REPLENISH_LIMIT_REACHED"): billing_auto_replenish_limit_reached,
    ("billing", "UNKNOWN_REGION"): billing_refuses(
        "ListOffers", INVALID, "UNKNOWN_REGION", region="nowhere-1"
    ),
    ("notification", "CONTACT_NOT_FOUND"): notification_contact_not_found,
    ("notification", "DELIVERY_NOT_FOUND"): notification_delivery_not_found,
    ("notification", "NOTIFICATION_NOT_FOUND"): notification_notification_not_found,
    ("notification", "REQUEST_ID_REUSED"): notification_request_id_reused,
    ("notification", "TEST_NOTIFICATION_RATE_LIMITED"): notification_test_notification_rate_limited,
    ("testing", "CLOCK_BACKWARDS"): clock_service_clock_backwards,
}

# Reasons the services give that no proto comment names (docs/faults.md, "Error reasons
# beyond the protos").
BEYOND_PROTOS: dict[tuple[str, str], Scenario] = {
    ("shared", "SERVICE_STARTING"): shared_service_starting,
    ("shared", "CONCURRENT_UPDATE"): shared_concurrent_update,
    ("billing", "PACKAGE_EXPIRED"): billing_package_expired,
}


def test_the_table_holds_every_reason_the_protos_name_and_no_other():
    named = contract_reasons()
    missing = {key: named[key] for key in sorted(named.keys() - SCENARIOS.keys())}
    assert not missing, f"reasons the protos name without a scenario here: {missing}"
    extra = sorted(SCENARIOS.keys() - named.keys())
    assert not extra, f"scenarios for reasons no proto comment names: {extra}"


def test_reasons_beyond_the_protos_are_still_given_and_still_beyond():
    named = {reason for _, reason in contract_reasons()}
    code = "\n".join(path.read_text() for root in CODE for path in sorted(root.rglob("*.py")))
    for _, reason in BEYOND_PROTOS:
        assert reason not in named, f"{reason} is in the protos now: move it to SCENARIOS"
        assert f'"{reason}"' in code, f"no code gives {reason} any more: drop its scenario"


@pytest.mark.parametrize("key", [*SCENARIOS, *BEYOND_PROTOS], ids=lambda key: f"{key[0]}-{key[1]}")
async def test_the_reason_is_given(key, tmp_path):
    scenario = SCENARIOS.get(key) or BEYOND_PROTOS[key]
    async with contextlib.AsyncExitStack() as stack:
        await scenario(Stage(tmp_path, stack))
