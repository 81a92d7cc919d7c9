"""Billing's account settings reach quota's admission and access rules, billing and quota as
processes (SQLite, manual clocks): docs/design/arrears.md ("Pay-per-use blocked in grace")
and docs/security.md ("Masters and members").

- An account in GRACE with `block_pay_per_use_in_grace` set (UpdateAccount) gets
  DENY_REASON_PAY_PER_USE_BLOCKED from CheckQuota for a call no package covers, is still
  admitted when its package covers the call, and ReportUsage still records what happened;
  with the setting off again, pay-per-use is admitted.
- An enterprise master's token reads two members' usage and packages in quota (quota learned
  the master from billing's events); a member's token sees neither its master's nor a
  sibling's, and the master's token changes nothing of its members'.

Every wait is bounded (`until`, process start and stop timeouts).
"""

from __future__ import annotations

from datetime import datetime, timedelta

import grpc
from allot.billing.v1 import billing_pb2, billing_service_pb2
from allot.quota.v1 import quota_pb2, quota_service_pb2
from google.protobuf import field_mask_pb2

from tests.support.billing import BillingCalls, billing_process, paired_env
from tests.support.calls import expect_error, ts
from tests.support.notification import until
from tests.support.quota import API, REGION, QuotaCalls, quota_calls, quota_process
from tests.support.servers import Tokens
from tests.support.standings import (
    DEBT_MICROS,
    GRACE,
    GRACE_START,
    billing_database,
    publish_standing,
)

START = "2024-05-01T00:00:00Z"
FOLLOW_TIMEOUT = 45.0
ALLOWED = quota_service_pb2.DENY_REASON_UNSPECIFIED
BLOCKED = quota_service_pb2.DENY_REASON_PAY_PER_USE_BLOCKED
TOKENS = Tokens()


async def set_block(b: BillingCalls, account_id: str, block: bool) -> billing_pb2.Account:
    return await b.stub.UpdateAccount(
        billing_service_pb2.UpdateAccountRequest(
            request_id=f"block-{account_id}-{block}",
            account=billing_pb2.Account(account_id=account_id, block_pay_per_use_in_grace=block),
            update_mask=field_mask_pb2.FieldMask(paths=["block_pay_per_use_in_grace"]),
        ),
        metadata=Tokens.md(TOKENS.account(account_id)),
        timeout=30,
    )


async def wait_for(q: QuotaCalls, account_id: str, quantity: int, reason: int, what: str):
    return await until(
        lambda: q.check(account_id, quantity),
        lambda r: r.deny_reason == reason,
        FOLLOW_TIMEOUT,
        what,
    )


def usage_stats(q: QuotaCalls, account_id: str, metadata):
    start = datetime.fromisoformat(START)
    return q.stub.GetUsageStats(
        quota_service_pb2.GetUsageStatsRequest(
            account_id=account_id,
            region=REGION,
            start_time=ts(start),
            end_time=ts(start + timedelta(days=1)),
            granularity=quota_pb2.STATS_GRANULARITY_DAY,
        ),
        metadata=metadata,
        timeout=30,
    )


async def test_block_in_grace_and_master_reads_across_the_processes(tmp_path):
    q_env, b_env = paired_env(tmp_path, START)
    with quota_process(q_env, tmp_path / "quota.log") as quota:
        b_env["ALLOT_QUOTA_ADDR"] = quota.addr
        with billing_process(b_env, tmp_path / "billing.log") as billing:
            async with (
                grpc.aio.insecure_channel(quota.addr) as qc,
                grpc.aio.insecure_channel(billing.addr) as bc,
            ):
                q, b = quota_calls(qc), BillingCalls(bc)
                await blocked_in_grace(q, b, billing_url(b_env))
                await master_reads_members(q, b)
            assert billing.terminate(timeout=30) == 0
        assert quota.terminate(timeout=30) == 0


def billing_url(b_env: dict[str, str]) -> str:
    return b_env["ALLOT_BILLING_DATABASE_URL"]


async def blocked_in_grace(q: QuotaCalls, b: BillingCalls, database_url: str) -> None:
    account = "acct-blocked"
    await b.create_account(account)
    await q.enable(account)
    await q.grant(account, 5)
    changed = await set_block(b, account, True)
    assert changed.block_pay_per_use_in_grace
    # GOOD with the block set: pay-per-use is admitted.
    assert (await q.check(account, 10)).allowed

    async with billing_database(database_url) as b_db:
        await publish_standing(b_db, account, GRACE, DEBT_MICROS, GRACE_START)
    denied = await wait_for(q, account, 10, BLOCKED, "pay-per-use blocked in grace")
    assert (denied.allowed, denied.remaining_quantity) == (False, 5)
    # A call its package covers still passes; usage that happened is recorded all the same.
    covered = await q.check(account, 5)
    assert (covered.allowed, covered.deny_reason) == (True, ALLOWED)
    used = await q.report("blocked-but-happened", account, 7)
    assert used.billable

    await set_block(b, account, False)
    allowed = await wait_for(q, account, 10, ALLOWED, "pay-per-use admitted once unblocked")
    assert allowed.allowed


async def master_reads_members(q: QuotaCalls, b: BillingCalls) -> None:
    master, members, sibling_corp = "corp", ("corp-a", "corp-b"), "other-corp"
    await b.create_account(master, billing_pb2.ACCOUNT_KIND_ENTERPRISE_MASTER)
    await b.create_account(sibling_corp, billing_pb2.ACCOUNT_KIND_ENTERPRISE_MASTER)
    for member in members:
        await b.create_account(
            member, billing_pb2.ACCOUNT_KIND_ENTERPRISE_MEMBER, master_account_id=master
        )
    for account_id in (master, *members):
        await q.enable(account_id)
        await q.grant(account_id, 10)
    for i, member in enumerate(members):
        await q.report(f"use-{member}", member, i + 2)

    as_master = Tokens.md(TOKENS.account(master, read_only=True))
    # Quota learns each member's master from billing's stream.
    for member in members:
        listed = await until(
            lambda m=member: _allowed(q.list_packages(m, metadata=as_master)),
            lambda r: r is not None,
            FOLLOW_TIMEOUT,
            f"the master's token reading {member}'s packages",
        )
        assert [p.account_id for p in listed.packages] == [member]
    for i, member in enumerate(members):
        stats = await usage_stats(q, member, as_master)
        assert sum(x.package_quantity for x in stats.buckets) == i + 2
        summary = await q.summary(member, metadata=as_master)
        assert summary.items[0].remaining_quantity == 10 - (i + 2)

    # A master of another enterprise, a member: no further than their own.
    for token, account_ids in (
        (Tokens.md(TOKENS.account("corp-a")), (master, "corp-b")),
        (Tokens.md(TOKENS.account(sibling_corp)), members),
    ):
        for account_id in account_ids:
            await expect_error(
                q.list_packages(account_id, metadata=token), grpc.StatusCode.PERMISSION_DENIED
            )
            await expect_error(usage_stats(q, account_id, token), grpc.StatusCode.PERMISSION_DENIED)
    # Reads only: the master's full token creates nothing for a member.
    await expect_error(
        q.stub.CreateUsageAlert(
            quota_service_pb2.CreateUsageAlertRequest(
                usage_alert=quota_pb2.UsageAlert(
                    account_id="corp-a", region=REGION, api=API, remaining_quantity=1
                )
            ),
            metadata=Tokens.md(TOKENS.account(master)),
            timeout=30,
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )


async def _allowed(call):
    """The call's answer, or None while it is refused with PERMISSION_DENIED."""
    try:
        return await call
    except grpc.aio.AioRpcError as error:
        if error.code() != grpc.StatusCode.PERMISSION_DENIED:
            raise
        return None
