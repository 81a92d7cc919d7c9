"""Who may call what (docs/security.md): tokens are checked on every call except health and
reflection, permission is decided before existence, and region-scoped tokens stay home."""

from __future__ import annotations

import time

import grpc
import jwt
import pytest
from allot.quota.v1 import quota_service_pb2
from allot.testing.v1 import clock_service_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from shared.auth import ACCOUNT_FULL, ADMIN, GATEWAY
from shared.status import error_info
from tests.support.calls import expect_error
from tests.support.quota import ACCOUNT, OTHER_ACCOUNT, OTHER_REGION, REGION, QuotaCalls
from tests.support.servers import TEST_SECRET

UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
DENIED = grpc.StatusCode.PERMISSION_DENIED
QUOTA_SERVICE = "allot.quota.v1.QuotaService"


@pytest.fixture
def q(quota) -> QuotaCalls:
    return QuotaCalls(quota)


def signed(claims: dict, secret: str = TEST_SECRET, algorithm: str = "HS256") -> str:
    base = {"sub": "someone", "roles": [ADMIN], "exp": int(time.time()) + 3600}
    return jwt.encode({**base, **claims}, secret, algorithm=algorithm)


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def test_missing_token_is_unauthenticated(q):
    request = quota_service_pb2.GetQuotaSummaryRequest(account_id=ACCOUNT)
    await expect_error(q.stub.GetQuotaSummary(request), UNAUTHENTICATED, "MISSING_TOKEN")


async def test_invalid_tokens_are_unauthenticated(q, subtests):
    no_exp = jwt.encode({"sub": "x", "roles": [ADMIN]}, TEST_SECRET, algorithm="HS256")
    cases = {  # name: (authorization metadata, ErrorInfo reason)
        "expired": ("Bearer " + signed({"exp": int(time.time()) - 60}), "TOKEN_EXPIRED"),
        "other secret": ("Bearer " + signed({}, secret="other-" + "y" * 40), "INVALID_TOKEN"),
        "garbage": ("Bearer not.a.jwt", "INVALID_TOKEN"),
        "no exp": ("Bearer " + no_exp, "INVALID_TOKEN"),
        "unknown role": ("Bearer " + signed({"roles": ["root"]}), "INVALID_TOKEN"),
        "no account": ("Bearer " + signed({"roles": [ACCOUNT_FULL]}), "INVALID_TOKEN"),
        "alg none": ("Bearer " + signed({}, secret="", algorithm="none"), "INVALID_TOKEN"),
        "not bearer": ("Basic dXNlcjpwdw==", "INVALID_TOKEN"),
    }
    for name, (authorization, reason) in cases.items():
        with subtests.test(name):
            metadata = (("authorization", authorization),)
            await expect_error(q.summary(metadata=metadata), UNAUTHENTICATED, reason)

    # The same construction with a valid claim set is accepted.
    summary = await q.summary(metadata=bearer(signed({"roles": [ADMIN], "sub": "op-7"})))
    assert summary.account_id == ACCOUNT
    check = await q.check(metadata=bearer(signed({"roles": [GATEWAY], "sub": "gw-7"})))
    assert check.allowed is not None


async def test_account_cannot_read_another_accounts_package_nor_probe_ids(q):
    theirs = await q.grant(OTHER_ACCOUNT)
    mine = q.account(ACCOUNT)
    read_only = q.account(ACCOUNT, read_only=True)

    for metadata in (mine, read_only):
        await expect_error(q.get(theirs.package_id, metadata=metadata), DENIED, "PERMISSION_DENIED")
        await expect_error(
            q.get("pkg-does-not-exist", metadata=metadata), DENIED, "PERMISSION_DENIED"
        )

    assert (await q.get(theirs.package_id, metadata=q.account(OTHER_ACCOUNT))).total_quantity == 10


async def test_refusals_for_foreign_and_missing_packages_are_indistinguishable(q):
    theirs = await q.grant(OTHER_ACCOUNT)
    mine = q.account(ACCOUNT)

    foreign = await expect_error(
        q.get(theirs.package_id, metadata=mine), DENIED, "PERMISSION_DENIED"
    )
    missing = await expect_error(q.get("pkg-nope", metadata=mine), DENIED, "PERMISSION_DENIED")

    assert foreign.details() == missing.details()
    assert error_info(foreign).metadata == error_info(missing).metadata


async def test_account_cannot_list_or_summarise_another_account(q):
    await q.grant(OTHER_ACCOUNT)
    mine = q.account(ACCOUNT, read_only=True)

    await expect_error(q.list_packages(OTHER_ACCOUNT, metadata=mine), DENIED, "PERMISSION_DENIED")
    await expect_error(q.summary(OTHER_ACCOUNT, metadata=mine), DENIED, "PERMISSION_DENIED")
    await expect_error(q.subscriptions(OTHER_ACCOUNT, metadata=mine), DENIED, "PERMISSION_DENIED")
    await expect_error(q.check(OTHER_ACCOUNT, metadata=mine), DENIED, "PERMISSION_DENIED")


async def test_account_cannot_explain_another_accounts_event(q):
    await q.report("theirs", OTHER_ACCOUNT)
    mine = q.account(ACCOUNT)

    await expect_error(q.explain("theirs", metadata=mine), DENIED, "PERMISSION_DENIED")
    await expect_error(q.explain("no-such-event", metadata=mine), DENIED, "PERMISSION_DENIED")
    await expect_error(
        q.explain("no-such-event"), grpc.StatusCode.NOT_FOUND, "USAGE_EVENT_NOT_FOUND"
    )
    assert (await q.explain("theirs", metadata=q.account(OTHER_ACCOUNT))).event_id == "theirs"


async def test_account_principals_cannot_change_anything(q, subtests):
    package = await q.grant(ACCOUNT)
    for name, metadata in {
        "account_read": q.account(ACCOUNT, read_only=True),
        "account_full": q.account(ACCOUNT),
    }.items():
        with subtests.test(name):
            calls = [
                q.grant(ACCOUNT, metadata=metadata),
                q.renew(package.package_id, add=5, metadata=metadata),
                q.revoke(package.package_id, metadata=metadata),
                q.enable(ACCOUNT, metadata=metadata),
                q.report("e1", ACCOUNT, metadata=metadata),
            ]
            for call in calls:
                await expect_error(call, DENIED, "PERMISSION_DENIED")

    after = await q.get(package.package_id)
    assert (after.total_quantity, after.state) == (10, package.state)
    assert await q.package_ids() == [package.package_id]


async def test_account_principal_may_read_its_own_account(q):
    package = await q.grant(ACCOUNT)
    await q.grant(OTHER_ACCOUNT)
    await q.enable(ACCOUNT)
    reader = q.account(ACCOUNT, read_only=True)

    assert (await q.get(package.package_id, metadata=reader)).package_id == package.package_id
    # Without an account_id, a listing is about the caller's own account.
    assert await q.package_ids("", metadata=reader) == [package.package_id]
    assert (await q.summary(ACCOUNT, metadata=reader)).items[0].remaining_quantity == 10
    assert (await q.check(ACCOUNT, metadata=reader)).allowed


async def test_region_scoped_gateway_token_is_refused_in_other_regions(q):
    bangkok_gateway = q.tokens.md(q.tokens.gateway(regions=[OTHER_REGION]))

    await expect_error(
        q.report("e1", region=REGION, metadata=bangkok_gateway),
        UNAUTHENTICATED,
        "TOKEN_REGION_MISMATCH",
    )
    await expect_error(
        q.check(region=REGION, metadata=bangkok_gateway), UNAUTHENTICATED, "TOKEN_REGION_MISMATCH"
    )
    mixed = [q.usage("e2", region=OTHER_REGION), q.usage("e3", region=REGION)]
    await expect_error(
        q.batch(mixed, metadata=bangkok_gateway), UNAUTHENTICATED, "TOKEN_REGION_MISMATCH"
    )

    # At home it works, and the refused calls recorded nothing.
    assert not (await q.report("e4", region=OTHER_REGION, metadata=bangkok_gateway)).duplicate
    for event_id in ("e1", "e2", "e3"):
        await expect_error(q.explain(event_id), grpc.StatusCode.NOT_FOUND, "USAGE_EVENT_NOT_FOUND")


async def test_region_scoped_token_cannot_revoke_a_package_of_another_region(q):
    package = await q.grant(region=REGION)
    bangkok_operator = q.tokens.md(q.tokens.admin(regions=[OTHER_REGION]))

    await expect_error(
        q.revoke(package.package_id, metadata=bangkok_operator),
        UNAUTHENTICATED,
        "TOKEN_REGION_MISMATCH",
    )


async def test_clock_service_needs_an_admin(q):
    request = clock_service_pb2.GetTimeRequest()
    await expect_error(
        q.handle.clock.GetTime(request, metadata=q.gateway),
        DENIED,
        "PERMISSION_DENIED",
    )
    await expect_error(q.handle.clock.GetTime(request), UNAUTHENTICATED, "MISSING_TOKEN")


async def test_health_and_reflection_need_no_token(quota):
    health = health_pb2_grpc.HealthStub(quota.channel)
    for service in (QUOTA_SERVICE, ""):
        response = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert response.status == health_pb2.HealthCheckResponse.SERVING

    reflection = reflection_pb2_grpc.ServerReflectionStub(quota.channel)
    call = reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    names = [s.name async for response in call for s in response.list_services_response.service]

    assert {QUOTA_SERVICE, "grpc.health.v1.Health"} <= set(names)
    assert clock_service_pb2.DESCRIPTOR.services_by_name["ClockService"].full_name in names
