"""UpdateAccount (the pay-per-use block in grace and the display name), what billing tells quota
about it, and what an enterprise master's tokens may read of its members (docs/security.md,
"Masters and members"), through a real billing server on SQLite and PostgreSQL."""

from __future__ import annotations

import grpc
import pytest
from allot.billing.v1 import billing_pb2, billing_service_pb2
from google.protobuf import field_mask_pb2

from tests.support.billing import billing_settings, running_billing
from tests.support.calls import expect_error
from tests.support.servers import Tokens, free_port

REQ = billing_service_pb2
MASTER = billing_pb2.ACCOUNT_KIND_ENTERPRISE_MASTER
MEMBER = billing_pb2.ACCOUNT_KIND_ENTERPRISE_MEMBER
TOKENS = Tokens()


@pytest.fixture
async def billing(database_url, tmp_path):
    # No quota runs: a closed port, so its consumer only waits.
    quota_addr = f"127.0.0.1:{free_port()}"
    settings = billing_settings(database_url, tmp_path, quota_addr, "2024-05-01T00:00:00Z")
    async with running_billing(settings) as handle:
        yield handle.calls


def update(account_id: str, paths: list[str], request_id: str = "", **fields):
    return REQ.UpdateAccountRequest(
        request_id=request_id,
        account=billing_pb2.Account(account_id=account_id, **fields),
        update_mask=field_mask_pb2.FieldMask(paths=paths),
    )


async def standing_events(b) -> dict[str, list]:
    """account_standing_changed payloads by account, in order."""
    found: dict[str, list] = {}
    for event in await b.events(types=("account_standing_changed",)):
        payload = event.account_standing_changed
        found.setdefault(payload.account_id, []).append(payload)
    return found


async def enterprise(b) -> None:
    await b.create_account("corp", MASTER)
    for member in ("corp-a", "corp-b"):
        await b.create_account(member, MEMBER, master_account_id="corp")
    await b.create_account("other-corp", MASTER)
    await b.create_account("other-a", MEMBER, master_account_id="other-corp")


async def test_update_account_sets_the_block_and_tells_quota(billing):
    b = billing
    await b.create_account("acme")
    own = Tokens.md(TOKENS.account("acme"))
    changed = await b.stub.UpdateAccount(
        update(
            "acme",
            ["block_pay_per_use_in_grace", "display_name"],
            "block-1",
            block_pay_per_use_in_grace=True,
            display_name="Acme Ltd",
        ),
        metadata=own,
    )
    assert (changed.block_pay_per_use_in_grace, changed.display_name) == (True, "Acme Ltd")
    assert await b.get_account("acme") == changed
    # A replay answers the first result and announces nothing more.
    again = await b.stub.UpdateAccount(
        update(
            "acme",
            ["block_pay_per_use_in_grace", "display_name"],
            "block-1",
            block_pay_per_use_in_grace=True,
            display_name="Acme Ltd",
        ),
        metadata=own,
    )
    assert again == changed
    # Only the display name: nothing for quota.
    await b.stub.UpdateAccount(update("acme", ["display_name"], display_name="A"), metadata=own)
    events = (await standing_events(b))["acme"]
    assert [(e.previous_standing, e.standing, e.block_pay_per_use_in_grace) for e in events] == [
        (billing_pb2.ACCOUNT_STANDING_GOOD, billing_pb2.ACCOUNT_STANDING_GOOD, True)
    ]
    # Fields not in the mask stay as they are.
    kept = await b.stub.UpdateAccount(
        update("acme", ["display_name"], display_name="B", block_pay_per_use_in_grace=False),
        metadata=own,
    )
    assert kept.block_pay_per_use_in_grace


async def test_update_account_refuses_what_it_cannot_change(billing):
    b = billing
    await b.create_account("acme")
    for paths in ([], ["kind"], ["balance"], ["display_name", "master_account_id"], ["nope"]):
        await expect_error(
            b.stub.UpdateAccount(update("acme", paths), metadata=b.admin),
            grpc.StatusCode.INVALID_ARGUMENT,
            field="update_mask",
        )
    await expect_error(
        b.stub.UpdateAccount(
            update("acme", ["display_name"], display_name="x" * 201), metadata=b.admin
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        field="account.display_name",
    )
    await expect_error(
        b.stub.UpdateAccount(update("missing", ["display_name"]), metadata=b.admin),
        grpc.StatusCode.NOT_FOUND,
        "ACCOUNT_NOT_FOUND",
    )
    # Another account's token, a read-only token, a missing account: refused alike.
    for metadata, account_id in (
        (Tokens.md(TOKENS.account("other")), "acme"),
        (Tokens.md(TOKENS.account("acme", read_only=True)), "acme"),
        (Tokens.md(TOKENS.account("other")), "missing"),
    ):
        await expect_error(
            b.stub.UpdateAccount(update(account_id, ["display_name"]), metadata=metadata),
            grpc.StatusCode.PERMISSION_DENIED,
        )
    assert (await b.get_account("acme")).display_name == ""


async def test_a_masters_block_covers_its_members_and_quota_learns_the_master(billing):
    b = billing
    await enterprise(b)
    # A new member is announced with its master (the standing unchanged).
    created = await standing_events(b)
    for member in ("corp-a", "corp-b"):
        (event,) = created[member]
        assert (event.master_account_id, event.block_pay_per_use_in_grace) == ("corp", False)
        assert event.previous_standing == event.standing == billing_pb2.ACCOUNT_STANDING_GOOD
    assert "corp" not in created
    after = (await b.events())[-1].sequence

    await b.stub.UpdateAccount(
        update("corp", ["block_pay_per_use_in_grace"], block_pay_per_use_in_grace=True),
        metadata=b.admin,
    )
    announced = [
        e.account_standing_changed for e in await b.events(after, ("account_standing_changed",))
    ]
    assert [
        (e.account_id, e.master_account_id, e.block_pay_per_use_in_grace) for e in announced
    ] == [("corp", "", True), ("corp-a", "corp", True), ("corp-b", "corp", True)]
    # The member's own setting stays its own; the master's shows on the master.
    assert not (await b.get_account("corp-a")).block_pay_per_use_in_grace


async def test_a_master_reads_its_members_and_changes_nothing_of_theirs(billing):
    b = billing
    await enterprise(b)
    master = Tokens.md(TOKENS.account("corp", read_only=True))
    master_full = Tokens.md(TOKENS.account("corp"))
    member = Tokens.md(TOKENS.account("corp-a"))

    listing = await b.stub.ListAccounts(
        REQ.ListAccountsRequest(master_account_id="corp"), metadata=master
    )
    assert [a.account_id for a in listing.accounts] == ["corp-a", "corp-b"]
    by_admin = await b.stub.ListAccounts(
        REQ.ListAccountsRequest(master_account_id="other-corp"), metadata=b.admin
    )
    assert [a.account_id for a in by_admin.accounts] == ["other-a"]
    # Without the filter an account's tokens list their own account only.
    own = await b.stub.ListAccounts(REQ.ListAccountsRequest(), metadata=master)
    assert [a.account_id for a in own.accounts] == ["corp"]

    for account_id in ("corp-a", "corp-b"):
        read = await b.stub.GetAccount(
            REQ.GetAccountRequest(account_id=account_id), metadata=master
        )
        assert read.master_account_id == "corp"
        bill = await b.get_bill(account_id, "2024-05", metadata=master)
        assert bill.account_id == account_id
        await b.stub.ListOrders(REQ.ListOrdersRequest(account_id=account_id), metadata=master)

    # Another enterprise's member, an unknown account: refused alike.
    for account_id in ("other-a", "other-corp", "missing"):
        await expect_error(
            b.stub.GetAccount(REQ.GetAccountRequest(account_id=account_id), metadata=master),
            grpc.StatusCode.PERMISSION_DENIED,
        )
    await expect_error(
        b.stub.ListAccounts(
            REQ.ListAccountsRequest(master_account_id="other-corp"), metadata=master
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    # Reads only: the master's full token changes nothing of a member's.
    await expect_error(
        b.stub.UpdateAccount(
            update("corp-a", ["block_pay_per_use_in_grace"], block_pay_per_use_in_grace=True),
            metadata=master_full,
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    await expect_error(
        b.stub.SetBalanceAlert(
            REQ.SetBalanceAlertRequest(account_id="corp-a"), metadata=master_full
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )

    # A member sees neither its master nor a sibling, nor lists the enterprise.
    for account_id in ("corp", "corp-b"):
        await expect_error(
            b.stub.GetAccount(REQ.GetAccountRequest(account_id=account_id), metadata=member),
            grpc.StatusCode.PERMISSION_DENIED,
        )
        await expect_error(
            b.get_bill(account_id, "2024-05", metadata=member),
            grpc.StatusCode.PERMISSION_DENIED,
        )
    await expect_error(
        b.stub.ListAccounts(REQ.ListAccountsRequest(master_account_id="corp"), metadata=member),
        grpc.StatusCode.PERMISSION_DENIED,
    )
