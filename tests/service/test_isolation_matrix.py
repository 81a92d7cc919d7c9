"""The isolation matrix (docs/security.md): every RPC of every service, from the proto
descriptors, x every kind of caller x own account / foreign account / foreign region.

Each call is allowed or refused exactly as the policy tables say (`POLICIES` of each service,
`CLOCK_POLICIES` for the manual clock), and a refusal (PERMISSION_DENIED, or UNAUTHENTICATED
with TOKEN_REGION_MISMATCH) changes no row of any database. A call that passed authorization
may still fail for business reasons (NOT_FOUND, FAILED_PRECONDITION, INVALID_ARGUMENT...): it
was not refused. The expectation is computed from the table (`Policy.allows`, and the account
and region of the resource the request names), and for the most sensitive RPCs it is also
written out by hand below, so a wrong table cannot make the test agree with itself.

A new RPC cannot be forgotten: it appears in the descriptors, and the test fails until it has
a request factory here and a row in its service's policy table.

One set of real servers (quota, billing, notification; in-process, manual clocks) per dialect
for the whole module; resources are seeded with admin tokens and belong to the victim.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta

import grpc
import pytest
import pytest_asyncio
from allot.billing.v1 import billing_pb2, billing_service_pb2, billing_service_pb2_grpc
from allot.notification.v1 import (
    notification_pb2,
    notification_service_pb2,
    notification_service_pb2_grpc,
)
from allot.quota.v1 import quota_pb2, quota_service_pb2, quota_service_pb2_grpc
from allot.testing.v1 import clock_service_pb2, clock_service_pb2_grpc
from google.protobuf import duration_pb2, field_mask_pb2
from google.protobuf.message import Message
from google.type import date_pb2, money_pb2
from sqlalchemy import inspect, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from services.billing.service import POLICIES as BILLING_POLICIES
from services.notification.service import POLICIES as NOTIFICATION_POLICIES
from services.quota.service import POLICIES as QUOTA_POLICIES
from shared.auth import Policy, Principal
from shared.clock_service import CLOCK_POLICIES
from shared.status import error_info
from shared.tokens import TokenVerifier
from tests.support.billing import billing_settings, running_billing
from tests.support.calls import ts
from tests.support.databases import create_postgres_database, drop_postgres_database
from tests.support.notification import notification_settings, running_notification
from tests.support.quota import QuotaCalls, quota_settings, running_quota
from tests.support.servers import TEST_SECRET, Tokens

pytestmark = pytest.mark.asyncio(loop_scope="module")

START = "2024-01-01T00:00:00Z"
A, B = "acct-a", "acct-b"  # A: the caller's own account; B: the victim's
R, R2 = "ap-southeast-1", "ap-southeast-2"  # R: the region-limited tokens' region
API = "passport"
OFFER = "passport-1k-1y"

OWN, FOREIGN, FOREIGN_REGION = "own", "foreign", "foreign-region"
# target -> (the account owning the resource, its region)
TARGETS = {OWN: (A, R), FOREIGN: (B, R), FOREIGN_REGION: (A, R2)}

QUOTA = quota_service_pb2.DESCRIPTOR.services_by_name["QuotaService"]
BILLING = billing_service_pb2.DESCRIPTOR.services_by_name["BillingService"]
NOTIFICATION = notification_service_pb2.DESCRIPTOR.services_by_name["NotificationService"]
CLOCK = clock_service_pb2.DESCRIPTOR.services_by_name["ClockService"]

# Heartbeats, not data: a consumer's lease row is extended every few seconds by itself.
NOT_DATA = frozenset({"consumer_leases"})
REFUSED = (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED)
BROKEN = (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)
# How long an allowed stream is watched for a refusal before it counts as passed.
STREAM_WAIT = 0.5


def field_at(message: Message, dotted: str):
    for part in dotted.split("."):
        message = getattr(message, part)
    return message


def path(service, method: str) -> str:
    return f"/{service.full_name}/{method}"


def Q(method: str) -> str:  # noqa: N802 - short names for the tables below
    return path(QUOTA, method)


def BL(method: str) -> str:  # noqa: N802
    return path(BILLING, method)


def N(method: str) -> str:  # noqa: N802
    return path(NOTIFICATION, method)


# --- the callers ---------------------------------------------------------------------------

TOKENS = Tokens()
CALLERS: dict[str, str] = {
    "admin": TOKENS.admin(),
    "admin@R": TOKENS.admin([R]),
    "gateway": TOKENS.gateway(),
    "gateway@R": TOKENS.gateway([R]),
    "internal:quota": TOKENS.internal("quota"),
    "internal:billing": TOKENS.internal("billing"),
    "internal:notification": TOKENS.internal("notification"),
    "account_full": TOKENS.account(A),
    "account_read": TOKENS.account(A, read_only=True),
    "account_full@R": TOKENS.account(A, regions=[R]),
    "account_read@R": TOKENS.account(A, read_only=True, regions=[R]),
}
# What the services make of each token (the real verifier).
PRINCIPALS: dict[str, Principal] = {
    name: TokenVerifier(TEST_SECRET).verify(f"Bearer {token}") for name, token in CALLERS.items()
}
ADMIN_MD = Tokens.md(CALLERS["admin"])

# --- the independent expectation of the most sensitive cells ------------------------------
# Written by hand from docs/security.md, not from the tables: caller -> targets allowed.
# Every caller not named is refused everywhere.
EVERYWHERE = frozenset(TARGETS)
HOME_REGION = frozenset({OWN, FOREIGN})
BY_HAND: dict[str, dict[str, frozenset[str]]] = {
    BL("CreateAccount"): {"admin": EVERYWHERE, "admin@R": EVERYWHERE},
    BL("TopUp"): {"admin": EVERYWHERE, "admin@R": EVERYWHERE},
    Q("GrantPackage"): {
        "admin": EVERYWHERE,
        "admin@R": HOME_REGION,
        "internal:billing": EVERYWHERE,
    },
    Q("RevokePackage"): {
        "admin": EVERYWHERE,
        "admin@R": HOME_REGION,
        "internal:billing": EVERYWHERE,
    },
    Q("EnableApi"): {"admin": EVERYWHERE, "admin@R": HOME_REGION, "internal:billing": EVERYWHERE},
    Q("SetRateLimit"): {"admin": EVERYWHERE, "admin@R": HOME_REGION},
    Q("WatchEvents"): {
        "admin": EVERYWHERE,
        "admin@R": EVERYWHERE,
        "internal:billing": EVERYWHERE,
        "internal:notification": EVERYWHERE,
    },
    BL("WatchEvents"): {
        "admin": EVERYWHERE,
        "admin@R": EVERYWHERE,
        "internal:quota": EVERYWHERE,
        "internal:notification": EVERYWHERE,
    },
}


# --- the servers and what they hold -------------------------------------------------------


@dataclass
class Suite:
    quota: quota_service_pb2_grpc.QuotaServiceStub
    billing: billing_service_pb2_grpc.BillingServiceStub
    notification: notification_service_pb2_grpc.NotificationServiceStub
    clocks: dict[str, clock_service_pb2_grpc.ClockServiceStub]
    engines: dict[str, AsyncEngine]
    # target -> id of a resource seeded for that target's owner and region
    packages: dict[str, str] = field(default_factory=dict)
    events: dict[str, str] = field(default_factory=dict)
    alerts: dict[str, str] = field(default_factory=dict)
    orders: dict[str, str] = field(default_factory=dict)
    sold: dict[str, str] = field(default_factory=dict)  # packages sold by billing
    contacts: dict[str, str] = field(default_factory=dict)
    notifications: dict[str, str] = field(default_factory=dict)
    counter: itertools.count = field(default_factory=lambda: itertools.count(1))

    def unique(self, prefix: str) -> str:
        return f"{prefix}-{next(self.counter)}"

    # Fresh resources, for cells whose call may remove what it names.
    async def grant(self, target: str) -> str:
        account, region = TARGETS[target]
        package = await self.quota.GrantPackage(
            quota_service_pb2.GrantPackageRequest(
                request_id=self.unique("grant"),
                package=QuotaCalls.package(account, 1000, region=region, api=API),
            ),
            metadata=ADMIN_MD,
        )
        return package.package_id

    async def alert(self, target: str) -> str:
        account, region = TARGETS[target]
        alert = await self.quota.CreateUsageAlert(
            quota_service_pb2.CreateUsageAlertRequest(
                request_id=self.unique("alert"),
                usage_alert=quota_pb2.UsageAlert(
                    account_id=account, region=region, api=API, remaining_quantity=5
                ),
            ),
            metadata=ADMIN_MD,
        )
        return alert.alert_id

    async def contact(self, target: str) -> str:
        account, _ = TARGETS[target]
        contact = await self.notification.CreateContact(
            notification_service_pb2.CreateContactRequest(
                request_id=self.unique("contact"),
                contact=notification_pb2.Contact(
                    account_id=account,
                    channel=notification_pb2.CHANNEL_EMAIL,
                    address=f"{self.unique('someone')}@example.com",
                    message_types=[notification_pb2.MESSAGE_TYPE_USAGE_ALERT],
                ),
            ),
            metadata=ADMIN_MD,
        )
        return contact.contact_id

    async def seed(self) -> None:
        for account in (A, B):
            await self.billing.CreateAccount(
                billing_service_pb2.CreateAccountRequest(
                    request_id=f"create-{account}", account=billing_pb2.Account(account_id=account)
                ),
                metadata=ADMIN_MD,
            )
            await self.billing.TopUp(
                billing_service_pb2.TopUpRequest(
                    request_id=f"fund-{account}",
                    account_id=account,
                    amount=money_pb2.Money(currency_code="USD", units=100_000),
                ),
                metadata=ADMIN_MD,
            )
        gateway = Tokens.md(CALLERS["gateway"])
        for target, (account, region) in TARGETS.items():
            self.packages[target] = await self.grant(target)
            self.alerts[target] = await self.alert(target)
            event_id = f"seed-{target}"
            await self.quota.ReportUsage(
                QuotaCalls.usage(event_id, account, region=region, api=API, occur=START),
                metadata=gateway,
            )
            self.events[target] = event_id
            await self.quota.EnableApi(
                quota_service_pb2.EnableApiRequest(
                    request_id=self.unique("enable"), account_id=account, region=region, api=API
                ),
                metadata=ADMIN_MD,
            )
            order = await self.billing.PurchasePackage(
                billing_service_pb2.PurchasePackageRequest(
                    request_id=self.unique("buy"), account_id=account, offer_id=OFFER, region=region
                ),
                metadata=ADMIN_MD,
            )
            assert order.package_id, order
            self.orders[target], self.sold[target] = order.order_id, order.package_id
            self.contacts[target] = await self.contact(target)
            sent = await self.notification.SendTestNotification(
                notification_service_pb2.SendTestNotificationRequest(
                    contact_id=self.contacts[target]
                ),
                metadata=ADMIN_MD,
            )
            self.notifications[target] = sent.notification_id

    # --- every row of every database -----------------------------------------------------

    async def digest(self) -> dict[str, str]:
        """table -> digest of its rows, for every table of every service's database."""
        out: dict[str, str] = {}
        for service, engine in self.engines.items():
            async with engine.connect() as conn:
                names = await conn.run_sync(lambda c: inspect(c).get_table_names())
                for name in sorted(set(names) - NOT_DATA):
                    rows = (await conn.execute(text(f'SELECT * FROM "{name}"'))).all()
                    blob = "\n".join(sorted(repr(tuple(row)) for row in rows))
                    out[f"{service}.{name}"] = hashlib.sha256(blob.encode()).hexdigest()
        return out

    async def settled(self) -> dict[str, str]:
        """The digest once background work (consumers, deliveries) has stopped moving rows."""
        last = await self.digest()
        for _ in range(100):  # bounded: ~15 s
            await asyncio.sleep(0.15)
            now = await self.digest()
            if now == last:
                return now
            last = now
        raise AssertionError("the databases kept changing without calls")


async def _database(kind: str, tmp_path, name: str) -> str:
    if kind == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / f'{name}.db'}"
    return await create_postgres_database()


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=["sqlite", "postgresql"])
async def suite(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"matrix-{request.param}")
    urls = {name: await _database(request.param, tmp, name) for name in ("q", "b", "n")}
    for name in ("quota", "billing", "notification"):
        (tmp / name).mkdir()
    settings_q = quota_settings(urls["q"], tmp / "quota", clock="manual", clock_start=START)
    engines = {
        service: create_async_engine(urls[service[0]])
        for service in ("quota", "billing", "notification")
    }
    try:
        async with running_quota(settings_q) as quota:
            billing_cfg = billing_settings(urls["b"], tmp / "billing", quota.addr, START)
            async with running_billing(billing_cfg) as billing:
                notification_cfg = notification_settings(
                    urls["n"], tmp / "notification", quota.addr
                )
                async with running_notification(notification_cfg) as notification:
                    world = Suite(
                        quota=quota.stub,
                        billing=billing.calls.stub,
                        notification=notification.calls.stub,
                        clocks={
                            "quota": quota.clock,
                            "billing": billing.calls.clock,
                            "notification": notification.calls.clock,
                        },
                        engines=engines,
                    )
                    await world.seed()
                    yield world
    finally:
        for engine in engines.values():
            await engine.dispose()
        if request.param == "postgresql":
            for url in urls.values():
                await drop_postgres_database(url)


# --- one valid request per RPC and target -------------------------------------------------

Factory = Callable[[Suite, str], Awaitable[Message]]


@dataclass(frozen=True)
class Spec:
    """How to build a request for a target, and what of the target it names: `scoped` (the
    request or the resource it names belongs to the target's account) and `regional` (to
    its region). A request that names neither is the same for every target."""

    build: Factory
    scoped: bool = True
    regional: bool = True


FACTORIES: dict[str, Spec] = {}


def factory(rpc: str, *, scoped: bool = True, regional: bool = True):
    def register(build: Factory) -> Factory:
        FACTORIES[rpc] = Spec(build, scoped, regional)
        return build

    return register


def _alert_message(s: Suite, target: str, alert_id: str = "") -> quota_pb2.UsageAlert:
    account, region = TARGETS[target]
    return quota_pb2.UsageAlert(
        alert_id=alert_id, account_id=account, region=region, api=API, remaining_quantity=3
    )


# quota

for _name, _kind in (
    ("ListPackages", quota_service_pb2.ListPackagesRequest),
    ("ListApiSubscriptions", quota_service_pb2.ListApiSubscriptionsRequest),
    ("GetQuotaSummary", quota_service_pb2.GetQuotaSummaryRequest),
    ("ListUsageAlerts", quota_service_pb2.ListUsageAlertsRequest),
    ("GetQuotaForecast", quota_service_pb2.GetQuotaForecastRequest),
):

    def _listing(kind):
        async def build(s: Suite, target: str) -> Message:
            account, region = TARGETS[target]
            return kind(account_id=account, region=region)

        return build

    factory(Q(_name))(_listing(_kind))


@factory(Q("GetUsageStats"))
async def _stats(s, target):
    account, region = TARGETS[target]
    return quota_service_pb2.GetUsageStatsRequest(
        account_id=account,
        region=region,
        start_time=ts(START),
        end_time=ts("2024-01-02T00:00:00Z"),
        granularity=quota_pb2.STATS_GRANULARITY_DAY,
    )


@factory(Q("ReportUsage"))
async def _report(s, target):
    account, region = TARGETS[target]
    return QuotaCalls.usage(s.unique("use"), account, region=region, api=API, occur=START)


@factory(Q("BatchReportUsage"))
async def _batch(s, target):
    return quota_service_pb2.BatchReportUsageRequest(requests=[await _report(s, target)])


@factory(Q("CheckQuota"))
async def _check(s, target):
    account, region = TARGETS[target]
    return quota_service_pb2.CheckQuotaRequest(
        account_id=account, region=region, api=API, quantity=1
    )


@factory(Q("GrantPackage"))
async def _grant(s, target):
    account, region = TARGETS[target]
    return quota_service_pb2.GrantPackageRequest(
        request_id=s.unique("grant"), package=QuotaCalls.package(account, 5, region=region)
    )


@factory(Q("GetPackage"))
async def _get_package(s, target):
    return quota_service_pb2.GetPackageRequest(package_id=s.packages[target])


@factory(Q("RenewPackage"))
async def _renew_package(s, target):
    return quota_service_pb2.RenewPackageRequest(
        request_id=s.unique("renew"), package_id=s.packages[target], add_quantity=1
    )


@factory(Q("RevokePackage"))
async def _revoke(s, target):
    return quota_service_pb2.RevokePackageRequest(
        request_id=s.unique("revoke"), package_id=await s.grant(target), reason="matrix"
    )


@factory(Q("EnableApi"))
async def _enable(s, target):
    account, region = TARGETS[target]
    return quota_service_pb2.EnableApiRequest(
        request_id=s.unique("enable"), account_id=account, region=region, api=API
    )


@factory(Q("DisableApi"))
async def _disable(s, target):
    account, region = TARGETS[target]
    return quota_service_pb2.DisableApiRequest(
        request_id=s.unique("disable"), account_id=account, region=region, api="id-card"
    )


@factory(Q("ExplainUsage"))
async def _explain(s, target):
    return quota_service_pb2.ExplainUsageRequest(event_id=s.events[target])


@factory(Q("CreateUsageAlert"))
async def _create_alert(s, target):
    return quota_service_pb2.CreateUsageAlertRequest(
        request_id=s.unique("alert"), usage_alert=_alert_message(s, target)
    )


@factory(Q("GetUsageAlert"))
async def _get_alert(s, target):
    return quota_service_pb2.GetUsageAlertRequest(alert_id=s.alerts[target])


@factory(Q("UpdateUsageAlert"))
async def _update_alert(s, target):
    return quota_service_pb2.UpdateUsageAlertRequest(
        request_id=s.unique("update-alert"),
        usage_alert=_alert_message(s, target, s.alerts[target]),
        update_mask=field_mask_pb2.FieldMask(paths=["remaining_quantity"]),
    )


@factory(Q("DeleteUsageAlert"))
async def _delete_alert(s, target):
    return quota_service_pb2.DeleteUsageAlertRequest(alert_id=await s.alert(target))


@factory(Q("SetRateLimit"))
async def _set_rate_limit(s, target):
    account, region = TARGETS[target]
    # Another API than the cells of CheckQuota use, and a limit no cell reaches.
    return quota_service_pb2.SetRateLimitRequest(
        request_id=s.unique("rate"),
        account_id=account,
        region=region,
        api="id-card",
        per_second=1_000_000,
    )


@factory(Q("GetRateLimit"))
async def _get_rate_limit(s, target):
    account, region = TARGETS[target]
    return quota_service_pb2.GetRateLimitRequest(account_id=account, region=region, api=API)


@factory(Q("SimulateUsage"))
async def _simulate(s, target):
    account, region = TARGETS[target]
    return quota_service_pb2.SimulateUsageRequest(
        account_id=account,
        region=region,
        api=API,
        start_time=ts(START),
        end_time=ts("2024-01-02T00:00:00Z"),
    )


@factory(Q("WatchEvents"), scoped=False, regional=False)
async def _watch_quota(s, target):
    return quota_service_pb2.WatchEventsRequest(after_sequence=0)


# billing


@factory(BL("CreateAccount"), scoped=False, regional=False)
async def _create_account(s, target):
    return billing_service_pb2.CreateAccountRequest(
        request_id=s.unique("create"),
        account=billing_pb2.Account(account_id=s.unique("acct-new")),
    )


@factory(BL("GetAccount"), regional=False)
async def _get_account(s, target):
    return billing_service_pb2.GetAccountRequest(account_id=TARGETS[target][0])


@factory(BL("ListAccounts"), scoped=False, regional=False)
async def _list_accounts(s, target):
    return billing_service_pb2.ListAccountsRequest(page_size=10)


@factory(BL("TopUp"), regional=False)
async def _top_up(s, target):
    return billing_service_pb2.TopUpRequest(
        request_id=s.unique("top-up"),
        account_id=TARGETS[target][0],
        amount=money_pb2.Money(currency_code="USD", units=1),
    )


@factory(BL("SetBalanceAlert"), regional=False)
async def _balance_alert(s, target):
    return billing_service_pb2.SetBalanceAlertRequest(
        request_id=s.unique("balance-alert"),
        account_id=TARGETS[target][0],
        threshold=money_pb2.Money(currency_code="USD", units=1),
    )


@factory(BL("SetSpendingCap"), regional=False)
async def _spending_cap(s, target):
    return billing_service_pb2.SetSpendingCapRequest(
        request_id=s.unique("spending-cap"),
        account_id=TARGETS[target][0],
        monthly_amount=money_pb2.Money(currency_code="USD", units=5),
    )


@factory(BL("UpdateAccount"), regional=False)
async def _update_account(s, target):
    return billing_service_pb2.UpdateAccountRequest(
        request_id=s.unique("update-account"),
        account=billing_pb2.Account(account_id=TARGETS[target][0], display_name=s.unique("name")),
        update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
    )


@factory(BL("ListOffers"), scoped=False, regional=False)
async def _offers(s, target):
    return billing_service_pb2.ListOffersRequest(api=API, region=TARGETS[target][1])


@factory(BL("ListPriceTiers"), scoped=False, regional=False)
async def _tiers(s, target):
    return billing_service_pb2.ListPriceTiersRequest(api=API, region=TARGETS[target][1])


@factory(BL("PurchasePackage"))
async def _purchase(s, target):
    account, region = TARGETS[target]
    return billing_service_pb2.PurchasePackageRequest(
        request_id=s.unique("buy"), account_id=account, offer_id=OFFER, region=region
    )


@factory(BL("RenewPackage"))
async def _renew_order(s, target):
    return billing_service_pb2.RenewPackageRequest(
        request_id=s.unique("renew"),
        account_id=TARGETS[target][0],
        package_id=s.sold[target],
        periods=1,
    )


@factory(BL("RenewPackages"))
async def _renew_orders(s, target):
    # Two days past the package's expiry now (renewals move it on), whatever the time zone.
    package = await s.quota.GetPackage(
        quota_service_pb2.GetPackageRequest(package_id=s.sold[target]), metadata=ADMIN_MD
    )
    day = (package.expire_time.ToDatetime() + timedelta(days=2)).date()
    return billing_service_pb2.RenewPackagesRequest(
        request_id=s.unique("renew-many"),
        account_id=TARGETS[target][0],
        package_ids=[s.sold[target]],
        expire_date=date_pb2.Date(year=day.year, month=day.month, day=day.day),
    )


@factory(BL("SetAutoRenew"))
async def _set_auto_renew(s, target):
    return billing_service_pb2.SetAutoRenewRequest(
        request_id=s.unique("auto-renew"), package_id=s.sold[target], enabled=True, lead_days=7
    )


@factory(BL("GetAutoRenew"))
async def _get_auto_renew(s, target):
    return billing_service_pb2.GetAutoRenewRequest(package_id=s.sold[target])


@factory(BL("SetAutoReplenish"))
async def _set_auto_replenish(s, target):
    account, region = TARGETS[target]
    return billing_service_pb2.SetAutoReplenishRequest(
        request_id=s.unique("replenish"),
        account_id=account,
        region=region,
        api=API,
        offer_id=OFFER,
        below_quantity=10,
        max_per_month=1,
        enabled=True,
    )


@factory(BL("GetAutoReplenish"))
async def _get_auto_replenish(s, target):
    account, region = TARGETS[target]
    return billing_service_pb2.GetAutoReplenishRequest(account_id=account, region=region, api=API)


@factory(BL("CancelOrder"))
async def _cancel(s, target):
    return billing_service_pb2.CancelOrderRequest(
        request_id=s.unique("cancel"), order_id=s.orders[target]
    )


@factory(BL("GetOrder"))
async def _get_order(s, target):
    return billing_service_pb2.GetOrderRequest(order_id=s.orders[target])


# Lists and bills of an account name no region: a region-limited token is not refused, it sees
# only its regions (tested below, test_region_limited_reads_hide_other_regions).
@factory(BL("ListOrders"), regional=False)
async def _list_orders(s, target):
    return billing_service_pb2.ListOrdersRequest(account_id=TARGETS[target][0])


@factory(BL("SubscribeApi"))
async def _subscribe(s, target):
    account, region = TARGETS[target]
    return billing_service_pb2.SubscribeApiRequest(
        request_id=s.unique("subscribe"), account_id=account, region=region, api=API
    )


@factory(BL("UnsubscribeApi"))
async def _unsubscribe(s, target):
    account, region = TARGETS[target]
    return billing_service_pb2.UnsubscribeApiRequest(
        request_id=s.unique("unsubscribe"), account_id=account, region=region, api="id-card"
    )


@factory(BL("GetBill"), regional=False)
async def _bill(s, target):
    return billing_service_pb2.GetBillRequest(account_id=TARGETS[target][0], month="2024-01")


@factory(BL("ExportBill"), regional=False)
async def _export(s, target):
    return billing_service_pb2.ExportBillRequest(account_id=TARGETS[target][0], month="2024-01")


# The overview names no region: a region-limited token sees only its regions in it.
@factory(BL("GetAccountOverview"), regional=False)
async def _overview(s, target):
    return billing_service_pb2.GetAccountOverviewRequest(account_id=TARGETS[target][0])


@factory(BL("RecommendPackages"))
async def _recommend(s, target):
    account, region = TARGETS[target]
    return billing_service_pb2.RecommendPackagesRequest(
        account_id=account, region=region, api=API, months=1
    )


@factory(BL("ListAccountPackages"))
async def _account_packages(s, target):
    account, region = TARGETS[target]
    return billing_service_pb2.ListAccountPackagesRequest(account_id=account, region=region)


@factory(BL("ExplainBillLine"))
async def _explain_bill_line(s, target):
    account, region = TARGETS[target]
    return billing_service_pb2.ExplainBillLineRequest(
        account_id=account,
        month="2024-01",
        cycle_start_time=ts(START),
        region=region,
        api=API,
    )


@factory(BL("WatchEvents"), scoped=False, regional=False)
async def _watch_billing(s, target):
    return billing_service_pb2.WatchEventsRequest(after_sequence=0)


# notification: contacts and notifications belong to an account and to no region


# Who hears an account's messages: for billing (and admins) only, never an account's token.
@factory(N("CheckAudience"), regional=False)
async def _check_audience(s, target):
    return notification_service_pb2.CheckAudienceRequest(account_id=TARGETS[target][0])


@factory(N("CreateContact"), regional=False)
async def _create_contact(s, target):
    return notification_service_pb2.CreateContactRequest(
        request_id=s.unique("contact"),
        contact=notification_pb2.Contact(
            account_id=TARGETS[target][0],
            channel=notification_pb2.CHANNEL_EMAIL,
            address=f"{s.unique('new')}@example.com",
            message_types=[notification_pb2.MESSAGE_TYPE_USAGE_ALERT],
        ),
    )


@factory(N("GetContact"), regional=False)
async def _get_contact(s, target):
    return notification_service_pb2.GetContactRequest(contact_id=s.contacts[target])


@factory(N("ListContacts"), regional=False)
async def _list_contacts(s, target):
    return notification_service_pb2.ListContactsRequest(account_id=TARGETS[target][0])


@factory(N("UpdateContact"), regional=False)
async def _update_contact(s, target):
    return notification_service_pb2.UpdateContactRequest(
        request_id=s.unique("update-contact"),
        contact=notification_pb2.Contact(
            contact_id=s.contacts[target],
            account_id=TARGETS[target][0],
            message_types=[
                notification_pb2.MESSAGE_TYPE_USAGE_ALERT,
                notification_pb2.MESSAGE_TYPE_ARREARS,
            ],
        ),
        update_mask=field_mask_pb2.FieldMask(paths=["message_types"]),
    )


@factory(N("DeleteContact"), regional=False)
async def _delete_contact(s, target):
    return notification_service_pb2.DeleteContactRequest(contact_id=await s.contact(target))


@factory(N("ListNotifications"), regional=False)
async def _list_notifications(s, target):
    return notification_service_pb2.ListNotificationsRequest(account_id=TARGETS[target][0])


@factory(N("WatchNotifications"), regional=False)
async def _watch_notifications(s, target):
    return notification_service_pb2.WatchNotificationsRequest(account_id=TARGETS[target][0])


@factory(N("RetryDelivery"), regional=False)
async def _retry(s, target):
    return notification_service_pb2.RetryDeliveryRequest(
        notification_id=s.notifications[target], contact_id=s.contacts[target]
    )


@factory(N("SendTestNotification"), regional=False)
async def _send_test(s, target):
    return notification_service_pb2.SendTestNotificationRequest(contact_id=s.contacts[target])


# the manual clock (every service serves one in these tests): the same for every target


@factory(path(CLOCK, "GetTime"), scoped=False, regional=False)
async def _get_time(s, target):
    return clock_service_pb2.GetTimeRequest()


@factory(path(CLOCK, "SetTime"), scoped=False, regional=False)
async def _set_time(s, target):
    return clock_service_pb2.SetTimeRequest(time=ts(START))


@factory(path(CLOCK, "AdvanceTime"), scoped=False, regional=False)
async def _advance(s, target):
    return clock_service_pb2.AdvanceTimeRequest(duration=duration_pb2.Duration(seconds=0))


# --- expectations and outcomes --------------------------------------------------------------


def expected(rule: Policy | None, spec: Spec, caller: str, target: str) -> bool:
    """Whether the table lets `caller` make this call for `target`: the row allows the
    caller's roles, and the account and region the request names are the caller's."""
    principal = PRINCIPALS[caller]
    if rule is None or not rule.allows(principal):
        return False
    account, region = TARGETS[target]
    if spec.scoped and not principal.may_act_for(account):
        return False
    return not (spec.regional and not principal.sees_region(region))


async def outcome(stub_method, request: Message, caller: str, streaming: bool) -> str:
    """'refused' (by authorization), 'passed', or 'broken: ...' (UNKNOWN/INTERNAL, or an
    UNAUTHENTICATED that is not about the token's region: every token here is valid)."""
    metadata = Tokens.md(CALLERS[caller])
    try:
        if streaming:
            call = stub_method(request, metadata=metadata, timeout=30)
            try:
                await asyncio.wait_for(call.read(), STREAM_WAIT)
            except TimeoutError:
                pass
            finally:
                call.cancel()
        else:
            await stub_method(request, metadata=metadata, timeout=30)
    except grpc.aio.AioRpcError as error:
        if error.code() in BROKEN:
            return f"broken: {error.code().name} {error.details()}"
        if error.code() == grpc.StatusCode.UNAUTHENTICATED:
            info = error_info(error)
            if info is None or info.reason != "TOKEN_REGION_MISMATCH":
                return f"broken: UNAUTHENTICATED {error.details()}"
        if error.code() in REFUSED:
            return "refused"
    return "passed"


SERVICES = {
    "quota": (QUOTA, QUOTA_POLICIES, quota_service_pb2_grpc.QuotaServiceStub),
    "billing": (BILLING, BILLING_POLICIES, billing_service_pb2_grpc.BillingServiceStub),
    "notification": (
        NOTIFICATION,
        NOTIFICATION_POLICIES,
        notification_service_pb2_grpc.NotificationServiceStub,
    ),
}


def _stub(s: Suite, service_name: str, descriptor):
    if descriptor is CLOCK:
        return s.clocks[service_name]
    return getattr(s, service_name)


@pytest.mark.parametrize("service_name", list(SERVICES))
async def test_every_rpc_allows_and_refuses_as_the_policy_table_says(
    suite: Suite, service_name, subtests
):
    descriptor, policies, _ = SERVICES[service_name]
    table = {**policies, **CLOCK_POLICIES}
    rpcs = [(descriptor, m) for m in descriptor.methods] + [(CLOCK, m) for m in CLOCK.methods]
    for service, method in rpcs:
        rpc = path(service, method.name)
        with subtests.test(rpc=rpc):
            assert rpc in table, f"{rpc} has no row in the policy table"
            assert rpc in FACTORIES, f"{rpc} has no request factory in the isolation matrix"
            await _check_rpc(suite, service_name, service, method, table[rpc])


async def _check_rpc(suite: Suite, service_name: str, service, method, rule: Policy) -> None:
    rpc = path(service, method.name)
    spec = FACTORIES[rpc]
    stub_method = getattr(_stub(suite, service_name, service), method.name)
    cells = [(caller, target) for caller in CALLERS for target in TARGETS]
    requests = {cell: await spec.build(suite, cell[1]) for cell in cells}
    want = {cell: expected(rule, spec, *cell) for cell in cells}
    problems: list[str] = []

    # The factory names what it says it names (the row's account field is the target's).
    if rule.account_field and spec.scoped:
        for (caller, target), request in requests.items():
            assert field_at(request, rule.account_field) == TARGETS[target][0], (caller, target)

    # The table agrees with the hand-written expectation of the sensitive RPCs.
    if rpc in BY_HAND:
        for caller, target in cells:
            by_hand = target in BY_HAND[rpc].get(caller, frozenset())
            if want[caller, target] != by_hand:
                problems.append(f"table says {want[caller, target]}, by hand {by_hand}: {caller}")

    streaming = method.server_streaming
    got: dict[tuple[str, str], str] = {}

    # Refusals first, between two snapshots of every database: they must change nothing.
    refused = [cell for cell in cells if not want[cell]]
    before = await suite.settled()
    for cell in refused:
        got[cell] = await outcome(stub_method, requests[cell], cell[0], streaming)
    after = await suite.digest()
    changed = sorted(t for t in set(before) | set(after) if before.get(t) != after.get(t))
    if changed:
        problems.append(f"refused calls changed rows of {changed}")

    allowed = [cell for cell in cells if want[cell]]
    if streaming:  # each allowed stream is watched for a while: all at once
        results = await asyncio.gather(
            *(outcome(stub_method, requests[c], c[0], streaming) for c in allowed)
        )
        got.update(zip(allowed, results, strict=True))
    else:
        for cell in allowed:
            got[cell] = await outcome(stub_method, requests[cell], cell[0], streaming)

    for cell in cells:
        wanted = "passed" if want[cell] else "refused"
        if got[cell] != wanted:
            problems.append(f"{cell[0]} on {cell[1]}: expected {wanted}, got {got[cell]}")
        if rpc in BY_HAND:
            by_hand = cell[1] in BY_HAND[rpc].get(cell[0], frozenset())
            if (got[cell] == "passed") != by_hand:
                problems.append(f"{cell[0]} on {cell[1]}: by hand {by_hand}, got {got[cell]}")
    assert not problems, "\n".join(problems)


# --- replays of another account's request_id ----------------------------------------------

ACCOUNT_MD = {OWN: Tokens.md(TOKENS.account(A)), FOREIGN: Tokens.md(TOKENS.account(B))}
# Mutating RPCs an account_full token may call with a request_id, each succeeding for its own
# account when built by its factory.
REPLAYED = [
    Q("CreateUsageAlert"),
    Q("UpdateUsageAlert"),
    BL("SetBalanceAlert"),
    BL("SetSpendingCap"),
    BL("UpdateAccount"),
    BL("PurchasePackage"),
    BL("RenewPackage"),
    BL("RenewPackages"),
    BL("SetAutoRenew"),
    BL("SetAutoReplenish"),
    BL("SubscribeApi"),
    N("CreateContact"),
    N("UpdateContact"),
]


def _stub_method(s: Suite, rpc: str):
    service, method = rpc.strip("/").split("/")
    name = {
        QUOTA.full_name: "quota",
        BILLING.full_name: "billing",
        NOTIFICATION.full_name: "notification",
    }[service]
    return getattr(getattr(s, name), method)


async def _with_request_id(s: Suite, rpc: str, target: str, request_id: str) -> Message:
    request = await FACTORIES[rpc].build(s, target)
    request.request_id = request_id
    return request


@pytest.mark.parametrize("rpc", REPLAYED)
async def test_a_replay_of_another_accounts_request_is_refused(suite: Suite, rpc):
    call = _stub_method(suite, rpc)
    theirs = await _with_request_id(suite, rpc, FOREIGN, suite.unique("theirs"))
    stored = await call(theirs, metadata=ACCOUNT_MD[FOREIGN])

    before = await suite.settled()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        answer = await call(theirs, metadata=ACCOUNT_MD[OWN])
        assert answer != stored, "account A was given account B's stored reply"
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED, caught.value.details()
    assert await suite.digest() == before


@pytest.mark.parametrize("rpc", REPLAYED)
async def test_an_account_cannot_reserve_another_accounts_request_id(suite: Suite, rpc):
    call = _stub_method(suite, rpc)
    request_id = suite.unique("reserved")
    await call(await _with_request_id(suite, rpc, OWN, request_id), metadata=ACCOUNT_MD[OWN])

    theirs = await call(
        await _with_request_id(suite, rpc, FOREIGN, request_id), metadata=ACCOUNT_MD[FOREIGN]
    )
    assert B in str(theirs), theirs


# --- region scope on reads -----------------------------------------------------------------


def regions_in(message: Message) -> set[str]:
    """Every non-empty `region` field anywhere in a message."""
    found: set[str] = set()
    for descriptor, value in message.ListFields():
        if descriptor.name == "region" and isinstance(value, str):
            found.add(value)
        elif descriptor.message_type is not None:
            items = [value] if isinstance(value, Message) else list(value)
            for item in items:
                if isinstance(item, Message):
                    found |= regions_in(item)
    return found


async def _read_stream(call, within: float = 1.0) -> list[Message]:
    out: list[Message] = []
    try:
        for _ in range(10_000):  # bounded: the seeded events are far fewer
            try:
                item = await asyncio.wait_for(call.read(), within)
            except TimeoutError:
                break
            if item is grpc.aio.EOF:
                break
            out.append(item)
    finally:
        call.cancel()
    return out


async def _list_orders(s: Suite, md) -> list[Message]:
    return [
        await s.billing.ListOrders(billing_service_pb2.ListOrdersRequest(account_id=A), metadata=md)
    ]


async def _quota_events(s: Suite, md) -> list[Message]:
    # Usage of an API without a package in the other region: a pay-per-use event there.
    await s.quota.ReportUsage(
        QuotaCalls.usage(s.unique("paygo"), A, region=R2, api="id-card", occur=START),
        metadata=Tokens.md(CALLERS["gateway"]),
    )
    return await _read_stream(
        s.quota.WatchEvents(quota_service_pb2.WatchEventsRequest(), metadata=md, timeout=30)
    )


async def _billing_events(s: Suite, md) -> list[Message]:
    return await _read_stream(
        s.billing.WatchEvents(billing_service_pb2.WatchEventsRequest(), metadata=md, timeout=30)
    )


@pytest.mark.parametrize(
    ("read", "caller"),
    [
        pytest.param(_list_orders, "account_read@R", id="ListOrders"),
        pytest.param(_quota_events, "admin@R", id="quota-WatchEvents"),
        pytest.param(_billing_events, "admin@R", id="billing-WatchEvents"),
    ],
)
async def test_region_limited_reads_hide_other_regions(suite: Suite, read, caller):
    everything = set().union(*map(regions_in, await read(suite, ADMIN_MD)))
    assert R2 in everything, "nothing of the other region to hide: the test proves nothing"

    seen = set().union(*map(regions_in, await read(suite, Tokens.md(CALLERS[caller]))))
    assert seen <= {R}, seen
