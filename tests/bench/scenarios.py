"""The quota scenarios the bench drives, each with its consistency check: per account, the
packages' used quantity grew by exactly the events acknowledged, and the database holds exactly
that many usage events for it (no event twice, none lost); no fresh event id is answered as a
duplicate."""

from __future__ import annotations

import itertools
import time
import uuid
from dataclasses import dataclass, field

from allot.quota.v1 import quota_pb2, quota_service_pb2, quota_service_pb2_grpc
from google.protobuf import timestamp_pb2

from tests.bench.database import PACKAGE_COLUMNS, BenchDatabase, dead_packages
from tests.bench.measure import CallFailed, Measurement, abba, drive
from tests.support.servers import Tokens

BATCH_SIZE = 100
ALERT_RULES = 5  # the issue asks for ReportUsage with five alert rules beside none
GROWTH_PACKAGES = 1000  # the account of growth_packages: one live package, 999 that cannot pay
RATIO_CONCURRENCY = 64  # contention and growth compare two figures at this concurrency
REGION = "ap-southeast-1"
API = "passport"
PACKAGE_QUANTITY = 10**9
RUN_TAG = uuid.uuid4().hex[:8]  # event ids stay distinct across runs against the same database


def usage_request(event_id: str, account_id: str) -> quota_service_pb2.ReportUsageRequest:
    """What a gateway reports for one call: ids, where, what, how it answered, when."""
    occur = timestamp_pb2.Timestamp()
    occur.GetCurrentTime()
    return quota_service_pb2.ReportUsageRequest(
        event_id=event_id,
        account_id=account_id,
        user_id="bench-user-0001",
        region=REGION,
        api=API,
        enterprise_project_id="0",
        quantity=1,
        http_status=200,
        occur_time=occur,
    )


def check_deducted(response: quota_service_pb2.ReportUsageResponse) -> None:
    if response.HasField("error"):
        raise CallFailed(f"error slot: {response.error.message}")
    if response.duplicate:
        raise CallFailed(f"fresh event {response.event_id} answered as a duplicate")
    if not response.deductions or response.pay_per_use_quantity:
        raise CallFailed(f"event {response.event_id} was not deducted from the package")


def check_pay_per_use(response: quota_service_pb2.ReportUsageResponse) -> None:
    if response.HasField("error"):
        raise CallFailed(f"error slot: {response.error.message}")
    if response.duplicate:
        raise CallFailed(f"fresh event {response.event_id} answered as a duplicate")
    if response.deductions or response.pay_per_use_quantity != 1:
        raise CallFailed(f"event {response.event_id} was not recorded as pay-per-use")


@dataclass
class QuotaBench:
    stub: quota_service_pb2_grpc.QuotaServiceStub
    tokens: Tokens
    label: str  # "sqlite" / "postgresql" (+ a suffix for a second process), part of account ids
    database: BenchDatabase
    ids: itertools.count = field(default_factory=itertools.count)
    acknowledged: dict[str, int] = field(default_factory=dict)  # account -> events answered
    used_before: dict[str, int] = field(default_factory=dict)  # account -> used when created

    def event_id(self) -> str:
        return f"ev-{RUN_TAG}-{self.label}-{next(self.ids)}"

    @property
    def gateway(self):
        return Tokens.md(self.tokens.gateway())

    @property
    def admin(self):
        return Tokens.md(self.tokens.admin())

    async def new_account(
        self,
        scenario: str,
        concurrency: int,
        alert_rules: int = 0,
        package: bool = True,
        dead: int = 0,
        enable_api: bool = False,
    ) -> str:
        """A fresh account: one package of PACKAGE_QUANTITY (unless `package` is false: every
        call is pay-per-use), `dead` packages seeded directly that cannot pay, `alert_rules`
        rules it never reaches, the API enabled when `enable_api`."""
        account_id = f"bench-{RUN_TAG}-{self.label}-{scenario}-c{concurrency}"
        if dead:
            rows = dead_packages(account_id, dead, REGION, API)
            await self.database.insert("packages", PACKAGE_COLUMNS, rows)
        if enable_api:
            await self.stub.EnableApi(
                quota_service_pb2.EnableApiRequest(
                    request_id=f"enable-{account_id}", account_id=account_id, region=REGION, api=API
                ),
                metadata=self.admin,
            )
        if not package:
            return account_id  # every call is pay-per-use (checked apart from the packages)
        expire = timestamp_pb2.Timestamp(seconds=int(time.time()) + 366 * 86400)
        await self.stub.GrantPackage(
            quota_service_pb2.GrantPackageRequest(
                request_id=f"grant-{account_id}",
                package=quota_pb2.Package(
                    account_id=account_id,
                    region=REGION,
                    api=API,
                    source=quota_pb2.PACKAGE_SOURCE_SUBSCRIPTION,
                    total_quantity=PACKAGE_QUANTITY,
                    expire_time=expire,
                ),
            ),
            metadata=self.admin,
        )
        for i in range(alert_rules):
            # Thresholds the bench never reaches (the package is huge): every event still pays
            # for evaluating the rules, which is what this measures.
            alert = quota_pb2.UsageAlert(account_id=account_id, region=REGION, enabled=True)
            if i % 2:
                alert.remaining_percent = float(i)
                alert.api = API
            else:
                alert.remaining_quantity = 10**i
            await self.stub.CreateUsageAlert(
                quota_service_pb2.CreateUsageAlertRequest(
                    request_id=f"alert-{account_id}-{i}", usage_alert=alert
                ),
                metadata=self.admin,
            )
        self.acknowledged[account_id] = 0
        self.used_before[account_id] = await self.used(account_id)
        return account_id

    async def used(self, account_id: str) -> int:
        listing = await self.stub.ListPackages(
            quota_service_pb2.ListPackagesRequest(account_id=account_id, page_size=1000),
            metadata=self.admin,
        )
        return sum(p.used_quantity for p in listing.packages)

    async def report(self, account_id: str, check=check_deducted) -> None:
        response = await self.stub.ReportUsage(
            usage_request(self.event_id(), account_id), metadata=self.gateway
        )
        check(response)
        if account_id in self.acknowledged:
            self.acknowledged[account_id] += 1

    async def unary(
        self,
        name: str,
        scenario: str,
        concurrency: int,
        accounts: list[str],
        seconds: float | None = None,
    ) -> Measurement:
        """ReportUsage, one event per call; worker i reports for accounts[i % len(accounts)]."""

        async def call(worker: int) -> None:
            await self.report(accounts[worker % len(accounts)])

        result = await drive(name, call, concurrency, seconds=seconds)
        result.scenario, result.accounts = scenario, list(accounts)
        return result

    # --- the scenarios (names as BENCH_ONLY takes them) ----------------------------------------

    async def report_usage(self, concurrency: int, rules: int = 0) -> Measurement:
        scenario = "report_usage_alerts" if rules else "report_usage"
        account_id = await self.new_account(f"unary{rules}", concurrency, rules)
        name = f"ReportUsage +{rules} alerts" if rules else "ReportUsage"
        return await self.unary(name, scenario, concurrency, [account_id])

    async def batch(self, concurrency: int) -> Measurement:
        account_id = await self.new_account("batch", concurrency)

        async def call(_worker: int) -> None:
            request = quota_service_pb2.BatchReportUsageRequest(
                requests=[usage_request(self.event_id(), account_id) for _ in range(BATCH_SIZE)]
            )
            response = await self.stub.BatchReportUsage(request, metadata=self.gateway)
            for item in response.responses:
                check_deducted(item)
            self.acknowledged[account_id] += len(response.responses)

        result = await drive(f"BatchReportUsage x{BATCH_SIZE}", call, concurrency, BATCH_SIZE)
        result.scenario, result.accounts = "batch", [account_id]
        return result

    async def check_quota(self, concurrency: int) -> Measurement:
        """CheckQuota on an account with the API enabled and 10 events reported before: every
        answer must allow the call and say exactly what is left."""
        account_id = await self.new_account("check", concurrency, enable_api=True)
        for _ in range(10):
            await self.report(account_id)
        expected = PACKAGE_QUANTITY - 10
        request = quota_service_pb2.CheckQuotaRequest(
            account_id=account_id, region=REGION, api=API, quantity=1
        )

        async def call(_worker: int) -> None:
            response = await self.stub.CheckQuota(request, metadata=self.gateway)
            if not response.allowed or response.remaining_quantity != expected:
                raise CallFailed(
                    f"allowed={response.allowed} remaining={response.remaining_quantity}, "
                    f"expected {expected}"
                )

        result = await drive("CheckQuota", call, concurrency)
        result.scenario, result.accounts = "check_quota", [account_id]
        return result

    async def contention(self) -> list[Measurement]:
        """RATIO_CONCURRENCY callers on one account's one package, and the same callers each
        on an account of its own, measured in turns (`abba`)."""
        c = RATIO_CONCURRENCY
        one = await self.new_account("contention-one", c)
        spread = [await self.new_account(f"contention-{i:02d}", c) for i in range(c)]
        together, apart = await abba(
            lambda t: self.unary("ReportUsage one account", "contention", c, [one], t),
            lambda t: self.unary("ReportUsage 64 accounts", "contention", c, spread, t),
        )
        together.note, apart.note = "all callers on one package", "each caller its own account"
        return [together, apart]

    async def growth_packages(self) -> list[Measurement]:
        """An account holding GROWTH_PACKAGES packages (all but one expired or used up, seeded
        directly) beside an account with its one package, measured in turns (`abba`)."""
        c = RATIO_CONCURRENCY
        single = await self.new_account("growth-1", c)
        many = await self.new_account("growth-1000", c, dead=GROWTH_PACKAGES - 1)
        name = f"ReportUsage {GROWTH_PACKAGES:,} packages"
        base, grown = await abba(
            lambda t: self.unary("ReportUsage 1 package", "growth_packages", c, [single], t),
            lambda t: self.unary(name, "growth_packages", c, [many], t),
        )
        base.note, grown.note = "an account with one package", "999 expired or used up"
        return [base, grown]

    async def consistency(self, accounts: list[str]) -> str:
        """ "ok" when every account is consistent, else what is wrong ("-": none to check)."""
        if not accounts:
            return "-"
        recorded = await self.database.recorded_events(accounts)
        wrong = []
        for account_id in accounts:
            acked = self.acknowledged[account_id]
            used = await self.used(account_id) - self.used_before[account_id]
            events, quantity = recorded[account_id]
            if not used == events == quantity == acked:
                wrong.append(
                    f"{account_id}: used {used}, events recorded {events} (quantity "
                    f"{quantity}), acknowledged {acked}"
                )
        return "MISMATCH " + "; ".join(wrong) if wrong else "ok"
