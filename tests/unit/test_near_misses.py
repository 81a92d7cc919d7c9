"""The near-miss rules (docs/design/deduction-order.md, "Explaining a deduction";
docs/design/billing.md, "Explaining a pay-per-use line"), pure."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from services.billing.domain.line_explanations import (
    OTHER_REGION,
    Explained,
    NearMissSeen,
    SoldInForce,
    line_event,
)
from services.billing.domain.usage import RecordedUsage
from services.quota.domain.deduction import IneligibleReason
from services.quota.domain.near_misses import ExplainedEvent, NearMissReason, near_misses
from services.quota.domain.packages import Package, PackageSource

T = datetime(2024, 1, 10, tzinfo=UTC)
DAY = timedelta(days=1)


def _package(package_id, region="r1", api="a1", **fields) -> Package:
    values = {
        "account_id": "acct",
        "enterprise_project_id": "",
        "source": PackageSource.SUBSCRIPTION,
        "total_quantity": 10,
        "used_quantity": 0,
        "effective_time": T - 30 * DAY,
        "expire_time": T + 30 * DAY,
        "create_time": T - 30 * DAY,
        **fields,
    }
    return Package(package_id=package_id, region=region, api=api, **values)


def test_near_misses_are_ordered_most_likely_cause_first():
    event = ExplainedEvent("r1", "a1", T, T, pay_per_use_quantity=1)
    scope = [
        _package("p-rev", revoke_time=T - DAY),
        _package("p-old", expire_time=T - 9 * DAY),
        _package("p-new", expire_time=T - DAY),
        _package("p-proj", enterprise_project_id="other"),
    ]
    ineligible = {
        "p-rev": IneligibleReason.REVOKED,
        "p-old": IneligibleReason.EXPIRED,
        "p-new": IneligibleReason.EXPIRED,
        "p-proj": IneligibleReason.OTHER_PROJECT,
    }
    others = [
        _package("o-region", region="r2"),
        _package("o-api", api="a2"),
        _package("o-far", region="r2", api="a2"),  # neither: not listed
        _package("o-later", api="a2", create_time=T + DAY),  # unknown when recorded
        _package("o-revoked", api="a2", revoke_time=T - DAY),
    ]
    listed = [(m.package_id, m.reason) for m in near_misses(event, ineligible, scope, others)]
    assert listed == [
        ("p-proj", NearMissReason.OTHER_PROJECT),
        ("p-new", NearMissReason.EXPIRED),
        ("p-old", NearMissReason.EXPIRED),
        ("p-rev", NearMissReason.REVOKED),
        ("o-api", NearMissReason.OTHER_API),
        ("o-region", NearMissReason.OTHER_REGION),
    ]
    paid = ExplainedEvent("r1", "a1", T, T, pay_per_use_quantity=0)
    assert near_misses(paid, ineligible, scope, others) == ()


def test_billing_adds_sold_packages_of_other_regions_after_quotas_list():
    usage = RecordedUsage("", "acct", "r1", "a1", "0", 2, T, "u1")
    quota_says = (
        NearMissSeen("q-api", "r1", "a2", "", 2),
        NearMissSeen("q-reg", "r3", "a1", "", OTHER_REGION),
    )

    def sold(package_id, region="r2", api="a1", start=T - DAY, end=T + DAY):
        return SoldInForce(package_id, region, api, "", start, end)

    record = [
        sold("s-b"),
        sold("s-a"),
        sold("q-reg", region="r3"),  # quota listed it already
        sold("s-own", region="r1"),  # the event's region: quota's to judge
        sold("s-api", api="a2"),
        sold("s-late", start=T + timedelta(seconds=1)),
        sold("s-gone", end=T - timedelta(seconds=1)),
    ]
    event = line_event(usage, Explained("wire", quota_says), record)
    assert [(m.package_id, m.reason) for m in event.near_misses] == [
        ("q-api", 2),
        ("q-reg", OTHER_REGION),
        ("s-a", OTHER_REGION),
        ("s-b", OTHER_REGION),
    ]
    assert not event.unavailable and event.explanation == "wire"
    down = line_event(usage, None, record)
    assert down.unavailable and down.explanation is None
    assert [m.package_id for m in down.near_misses] == ["q-reg", "s-a", "s-b"]  # by id
