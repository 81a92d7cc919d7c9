"""Billing accounts, top-ups, balance alerts and the catalog through a real server, on SQLite
and PostgreSQL."""

from __future__ import annotations

import contextlib

import grpc
import pytest
from allot.billing.v1 import billing_pb2, billing_service_pb2, billing_service_pb2_grpc
from google.type import money_pb2

from services.billing.service import BillingService
from shared.server import Server, build_runtime
from shared.settings import Settings
from tests.support.calls import expect_error
from tests.support.servers import TEST_SECRET, Tokens

REQ = billing_service_pb2


@contextlib.asynccontextmanager
async def running_billing(database_url, tmp_path):
    settings = Settings.from_env(
        environ={},
        data_dir=str(tmp_path),
        billing_database_url=database_url,
        billing_addr="127.0.0.1:0",
        auth_secret=TEST_SECRET,
        shutdown_grace="2",
        clock="manual",
        clock_start="2024-05-01T00:00:00Z",
    )
    runtime = build_runtime(settings, "billing")
    server = Server(runtime, BillingService(runtime), settings.billing_addr)
    await server.start()
    channel = grpc.aio.insecure_channel(server.bound_addr)
    try:
        yield billing_service_pb2_grpc.BillingServiceStub(channel)
    finally:
        await channel.close()
        await server.stop()


@pytest.fixture
async def billing(database_url, tmp_path):
    async with running_billing(database_url, tmp_path) as stub:
        yield stub


TOKENS = Tokens()
ADMIN = Tokens.md(TOKENS.admin())


def usd(units: int, nanos: int = 0) -> money_pb2.Money:
    return money_pb2.Money(currency_code="USD", units=units, nanos=nanos)


async def create(stub, account_id: str, **fields) -> billing_pb2.Account:
    return await stub.CreateAccount(
        REQ.CreateAccountRequest(
            request_id=f"create-{account_id}",
            account=billing_pb2.Account(account_id=account_id, **fields),
        ),
        metadata=ADMIN,
    )


async def test_create_and_read_an_account(billing):
    account = await create(billing, "acme", display_name="Acme")
    assert account.kind == billing_pb2.ACCOUNT_KIND_STANDALONE
    assert account.standing == billing_pb2.ACCOUNT_STANDING_GOOD
    assert account.currency_code == "USD"
    assert (account.balance.units, account.balance.nanos) == (0, 0)
    assert account.grace_period.seconds == 15 * 86400
    assert account.retention_period.seconds == 15 * 86400
    again = await billing.GetAccount(REQ.GetAccountRequest(account_id="acme"), metadata=ADMIN)
    assert again == account
    # The same request again returns the first answer; another create of the id is refused.
    assert await create(billing, "acme", display_name="Acme") == account
    await expect_error(
        billing.CreateAccount(
            REQ.CreateAccountRequest(account=billing_pb2.Account(account_id="acme")),
            metadata=ADMIN,
        ),
        grpc.StatusCode.ALREADY_EXISTS,
        "ACCOUNT_ALREADY_EXISTS",
    )


async def test_top_up_is_exact_and_idempotent(billing):
    await create(billing, "acme")
    request = REQ.TopUpRequest(request_id="pay-1", account_id="acme", amount=usd(10, 250_000_000))
    first = await billing.TopUp(request, metadata=ADMIN)
    second = await billing.TopUp(request, metadata=ADMIN)
    assert first == second
    assert (first.balance.units, first.balance.nanos) == (10, 250_000_000)
    await expect_error(
        billing.TopUp(
            REQ.TopUpRequest(request_id="pay-2", account_id="acme", amount=usd(-1)),
            metadata=ADMIN,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        field="amount",
    )
    await expect_error(
        billing.TopUp(
            REQ.TopUpRequest(
                request_id="pay-3",
                account_id="acme",
                amount=money_pb2.Money(currency_code="EUR", units=1),
            ),
            metadata=ADMIN,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "CURRENCY_MISMATCH",
    )
    await expect_error(
        billing.TopUp(
            REQ.TopUpRequest(request_id="pay-4", account_id="acme", amount=usd(0, 1)),
            metadata=ADMIN,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        field="amount",
    )
    account = await billing.GetAccount(REQ.GetAccountRequest(account_id="acme"), metadata=ADMIN)
    assert (account.balance.units, account.balance.nanos) == (10, 250_000_000)


async def test_enterprise_member_is_paid_by_its_master(billing):
    await create(billing, "corp", kind=billing_pb2.ACCOUNT_KIND_ENTERPRISE_MASTER)
    member = await create(
        billing,
        "corp-dev",
        kind=billing_pb2.ACCOUNT_KIND_ENTERPRISE_MEMBER,
        master_account_id="corp",
    )
    assert member.master_account_id == "corp"
    await billing.TopUp(
        REQ.TopUpRequest(request_id="p", account_id="corp", amount=usd(50)), metadata=ADMIN
    )
    member = await billing.GetAccount(REQ.GetAccountRequest(account_id="corp-dev"), metadata=ADMIN)
    assert member.balance.units == 50  # the master's balance pays
    await expect_error(
        billing.TopUp(
            REQ.TopUpRequest(request_id="q", account_id="corp-dev", amount=usd(1)),
            metadata=ADMIN,
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "ACCOUNT_PAID_BY_MASTER",
    )
    await expect_error(
        create(billing, "stray", kind=billing_pb2.ACCOUNT_KIND_ENTERPRISE_MEMBER),
        grpc.StatusCode.INVALID_ARGUMENT,
        field="account.master_account_id",
    )
    await expect_error(
        create(
            billing,
            "stray2",
            kind=billing_pb2.ACCOUNT_KIND_ENTERPRISE_MEMBER,
            master_account_id="corp-dev",
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "INVALID_MASTER_ACCOUNT",
    )
    listing = await billing.ListAccounts(
        REQ.ListAccountsRequest(master_account_id="corp"), metadata=ADMIN
    )
    assert [a.account_id for a in listing.accounts] == ["corp-dev"]


async def test_account_tokens_see_only_their_account(billing):
    await create(billing, "acme")
    await create(billing, "other")
    mine = Tokens.md(TOKENS.account("acme"))
    assert (
        await billing.GetAccount(REQ.GetAccountRequest(account_id="acme"), metadata=mine)
    ).account_id == "acme"
    for account_id in ("other", "missing"):
        await expect_error(
            billing.GetAccount(REQ.GetAccountRequest(account_id=account_id), metadata=mine),
            grpc.StatusCode.PERMISSION_DENIED,
        )
    listing = await billing.ListAccounts(REQ.ListAccountsRequest(), metadata=mine)
    assert [a.account_id for a in listing.accounts] == ["acme"]
    await expect_error(
        billing.TopUp(
            REQ.TopUpRequest(request_id="x", account_id="acme", amount=usd(1)), metadata=mine
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    await expect_error(
        billing.GetAccount(REQ.GetAccountRequest(account_id="missing"), metadata=ADMIN),
        grpc.StatusCode.NOT_FOUND,
        "ACCOUNT_NOT_FOUND",
    )


async def test_catalog_offers_and_tiers(billing):
    offers = await billing.ListOffers(
        REQ.ListOffersRequest(api="passport", region="ap-southeast-1", page_size=100),
        metadata=ADMIN,
    )
    by_id = {o.offer_id: o for o in offers.offers}
    assert len(by_id) == 7
    offer = by_id["passport-100k-1y"]
    assert (offer.quantity, offer.validity_months) == (100_000, 12)
    assert (offer.price.currency_code, offer.price.units, offer.price.nanos) == ("USD", 180, 0)
    pages, token = [], ""
    for _ in range(10):  # bounded walk over pages of 3
        page = await billing.ListOffers(
            REQ.ListOffersRequest(api="passport", page_size=3, page_token=token), metadata=ADMIN
        )
        pages.extend(o.offer_id for o in page.offers)
        token = page.next_page_token
        if not token:
            break
    assert sorted(pages) == sorted(by_id)
    tiers = await billing.ListPriceTiers(REQ.ListPriceTiersRequest(api="passport"), metadata=ADMIN)
    assert tiers.tiers[-1].up_to_quantity == 0
    assert all(t.unit_price.currency_code == "USD" for t in tiers.tiers)
    await expect_error(
        billing.ListPriceTiers(REQ.ListPriceTiersRequest(api="nope"), metadata=ADMIN),
        grpc.StatusCode.INVALID_ARGUMENT,
        "UNKNOWN_API",
    )
