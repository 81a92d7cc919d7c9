"""The access line of every call and the request id (docs/faults.md, "Logs"): real in-process
quota and billing servers on SQLite, their log captured with caplog."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc
import pytest
from allot.billing.v1 import billing_pb2, billing_service_pb2, billing_service_pb2_grpc
from allot.quota.v1 import quota_service_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared.status import error_info
from tests.support.billing import billing_settings, running_billing
from tests.support.calls import expect_error
from tests.support.quota import ACCOUNT, quota_server, quota_settings, running_quota
from tests.support.servers import Tokens

QUOTA = "/allot.quota.v1.QuotaService/"
BILLING = "/allot.billing.v1.BillingService/"
HEADER = "x-request-id"
START = "2024-01-01T00:00:00Z"
CALL_TIMEOUT = 10.0


def sqlite(tmp_path, name: str) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / name}"


def access_lines(caplog) -> list[dict]:
    """The fields of every access line logged so far, in order."""
    return [r.fields for r in caplog.records if r.name == "allot.access"]


def only_line(caplog, method: str) -> dict:
    lines = [f for f in access_lines(caplog) if f["method"] == method]
    assert len(lines) == 1, lines
    return lines[0]


def grant(quota, quantity: int = 10) -> quota_service_pb2.GrantPackageRequest:
    return quota_service_pb2.GrantPackageRequest(package=quota.package(quantity=quantity))


@pytest.fixture
def access(caplog):
    caplog.set_level(logging.INFO, logger="allot.access")
    return caplog


async def test_one_access_line_per_call_with_who_how_and_how_long(tmp_path, access):
    async with quota_server(sqlite(tmp_path, "quota.db"), tmp_path) as quota:
        stub = quota.handle.stub
        given = (*quota.admin, (HEADER, "req-grant-1"))
        call = stub.GrantPackage(grant(quota), metadata=given, timeout=CALL_TIMEOUT)
        await call
        assert (HEADER, "req-grant-1") in tuple(await call.trailing_metadata())
        line = only_line(access, QUOTA + "GrantPackage")
        assert line["code"] == "OK" and line["request_id"] == "req-grant-1"
        assert (line["subject"], line["role"], line["account"]) == ("op", "admin", "-")
        assert isinstance(line["duration_ms"], float) and line["duration_ms"] >= 0

        await stub.GetQuotaSummary(
            quota_service_pb2.GetQuotaSummaryRequest(account_id=ACCOUNT, region="ap-southeast-1"),
            metadata=quota.account(ACCOUNT),
            timeout=CALL_TIMEOUT,
        )
        line = only_line(access, QUOTA + "GetQuotaSummary")
        assert (line["code"], line["account"], line["role"]) == ("OK", ACCOUNT, "account_full")
        # Made up when the caller gives none: 16 hex digits.
        assert len(line["request_id"]) == 16

        # Health checks are not logged: kubelet asks every few seconds.
        health = health_pb2_grpc.HealthStub(quota.handle.channel)
        await health.Check(health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT)
        assert not [f for f in access_lines(access) if "Health" in f["method"]]


async def test_refused_and_failed_calls_are_logged_with_their_code(tmp_path, access):
    async with quota_server(sqlite(tmp_path, "quota.db"), tmp_path) as quota:
        stub = quota.handle.stub
        # No token: refused before anyone is known.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.GrantPackage(grant(quota), timeout=CALL_TIMEOUT)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        line = only_line(access, QUOTA + "GrantPackage")
        assert (line["code"], line["subject"], line["role"]) == ("UNAUTHENTICATED", "-", "-")
        echoed = dict(refused.value.trailing_metadata())[HEADER]
        assert echoed == line["request_id"]

        # A bad request keeps its error details next to the echoed request id.
        bad = grant(quota, quantity=0)
        error = await expect_error(
            stub.GrantPackage(
                bad, metadata=(*quota.admin, (HEADER, "req-bad")), timeout=CALL_TIMEOUT
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert error_info(error) is not None
        assert dict(error.trailing_metadata())[HEADER] == "req-bad"
        line = [f for f in access_lines(access) if f["request_id"] == "req-bad"]
        assert [(f["code"], f["subject"]) for f in line] == [("INVALID_ARGUMENT", "op")]


async def test_a_stream_is_logged_once_when_it_ends(tmp_path, access):
    async with quota_server(sqlite(tmp_path, "quota.db"), tmp_path) as quota:
        call = quota.handle.stub.WatchEvents(
            quota_service_pb2.WatchEventsRequest(),
            metadata=(*quota.admin, (HEADER, "req-watch")),
            timeout=CALL_TIMEOUT,
        )
        # The request id arrives as the stream opens, not only when it ends.
        assert (HEADER, "req-watch") in tuple(await call.initial_metadata())
        assert not [f for f in access_lines(access) if f["method"] == QUOTA + "WatchEvents"]
        call.cancel()
        for _ in range(100):  # bounded: the server notices the cancellation at once
            if [f for f in access_lines(access) if f["method"] == QUOTA + "WatchEvents"]:
                break
            await asyncio.sleep(0.05)
        line = only_line(access, QUOTA + "WatchEvents")
        assert (line["code"], line["request_id"]) == ("CANCELLED", "req-watch")


@contextlib.asynccontextmanager
async def quota_and_billing(tmp_path):
    settings = quota_settings(sqlite(tmp_path, "quota.db"), tmp_path, clock="manual")
    async with running_quota(settings) as quota:
        billing = billing_settings(sqlite(tmp_path, "billing.db"), tmp_path, quota.addr, START)
        async with running_billing(billing) as handle:
            yield handle


async def test_the_request_id_follows_a_purchase_from_billing_into_quota(tmp_path, access):
    admin = Tokens.md(Tokens().admin())
    async with quota_and_billing(tmp_path) as billing:
        calls = billing.calls
        await calls.create_account("acme")
        await calls.top_up("acme", "200")
        stub = billing_service_pb2_grpc.BillingServiceStub(billing.channel)
        order = await stub.PurchasePackage(
            billing_service_pb2.PurchasePackageRequest(
                request_id="buy-1",
                account_id="acme",
                offer_id="passport-100k-1y",
                region="ap-southeast-1",
            ),
            metadata=(*admin, (HEADER, "purchase-42")),
            timeout=CALL_TIMEOUT,
        )
        assert order.state == billing_pb2.ORDER_STATE_FULFILLED
    seen = [
        (f["method"], f["code"]) for f in access_lines(access) if f["request_id"] == "purchase-42"
    ]
    # Quota's line (billing's call, made while serving the purchase) ends first.
    assert seen == [(QUOTA + "GrantPackage", "OK"), (BILLING + "PurchasePackage", "OK")], seen
    granted = only_line(access, QUOTA + "GrantPackage")
    assert (granted["subject"], granted["role"]) == ("billing", "internal")
