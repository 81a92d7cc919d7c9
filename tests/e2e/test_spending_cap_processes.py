"""A monthly spending cap set in billing decides quota's admission, billing and quota as
processes (SQLite, manual clocks): docs/design/spending-cap.md.

The catalog prices passport at a flat 0.10 a call. Three calls recorded before the cap, then a
cap of 0.30: quota denies pay-per-use (DENY_REASON_SPENDING_CAP) once the cap reaches it, a
package still pays for calls, a higher cap admits exactly what it adds, and June (billing time
zone) starts afresh.

Every wait is bounded (`until`, process start and stop timeouts).
"""

from __future__ import annotations

import grpc
from allot.billing.v1 import billing_service_pb2
from allot.quota.v1 import quota_service_pb2

from tests.support.billing import BillingCalls, billing_process, local, paired_env, usd
from tests.support.notification import until
from tests.support.quota import API, REGION, QuotaCalls, quota_calls, quota_process
from tests.support.servers import Tokens

START = "2024-05-01T00:00:00Z"
FOLLOW_TIMEOUT = 45.0
SPENDING_CAP = quota_service_pb2.DENY_REASON_SPENDING_CAP
ACCOUNT = "acct-capped"
TOKENS = Tokens()

CATALOG = f"""\
currency: USD
regions:
  - {{id: {REGION}, name: CN-Hong Kong}}
apis:
  - id: {API}
    name: Passport OCR
    price_tiers:
      - {{unit_price: "0.10"}}
offers: []
"""


async def set_cap(b: BillingCalls, amount: str, request_id: str):
    return await b.stub.SetSpendingCap(
        billing_service_pb2.SetSpendingCapRequest(
            request_id=request_id, account_id=ACCOUNT, monthly_amount=usd(amount)
        ),
        metadata=Tokens.md(TOKENS.account(ACCOUNT)),
        timeout=30,
    )


async def wait_for(q: QuotaCalls, quantity: int, ok, what: str):
    return await until(lambda: q.check(ACCOUNT, quantity), ok, FOLLOW_TIMEOUT, what)


async def test_spending_cap_across_the_processes(tmp_path):
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(CATALOG)
    q_env, b_env = paired_env(tmp_path, START)
    q_env["ALLOT_CATALOG"] = b_env["ALLOT_CATALOG"] = str(catalog)
    with quota_process(q_env, tmp_path / "quota.log") as quota:
        b_env["ALLOT_QUOTA_ADDR"] = quota.addr
        with billing_process(b_env, tmp_path / "billing.log") as billing:
            async with (
                grpc.aio.insecure_channel(quota.addr) as qc,
                grpc.aio.insecure_channel(billing.addr) as bc,
            ):
                q, b = quota_calls(qc), BillingCalls(bc)
                await capped_month(q, b)
            assert billing.terminate(timeout=30) == 0
        assert quota.terminate(timeout=30) == 0


async def capped_month(q: QuotaCalls, b: BillingCalls) -> None:
    await b.create_account(ACCOUNT)
    await q.enable(ACCOUNT)
    for i in range(3):
        assert (await q.report(f"before-cap-{i}", ACCOUNT)).pay_per_use_quantity == 1
    assert (await q.check(ACCOUNT)).allowed

    await set_cap(b, "0.30", "cap-1")
    denied = await wait_for(q, 1, lambda r: r.deny_reason == SPENDING_CAP, "the cap reaching quota")
    assert (denied.allowed, denied.pay_per_use) == (False, True)

    # A package still pays; a call it covers is admitted.
    await q.grant(ACCOUNT, 2)
    covered = await q.check(ACCOUNT, 2)
    assert (covered.allowed, covered.pay_per_use) == (True, False)

    # 0.40 leaves room for one pay-per-use call: 2 package calls + 1 pay-per-use pass.
    await set_cap(b, "0.40", "cap-2")
    admitted = await wait_for(q, 3, lambda r: r.allowed, "the higher cap reaching quota")
    assert admitted.pay_per_use
    used = await q.report("with-higher-cap", ACCOUNT, 3)
    assert (used.pay_per_use_quantity, used.remaining_quantity) == (1, 0)
    assert (await q.check(ACCOUNT)).deny_reason == SPENDING_CAP

    # June in the billing time zone starts afresh.
    await q.set_time(local("2024-05-31 23:59:59"))
    assert (await q.check(ACCOUNT)).deny_reason == SPENDING_CAP
    await q.set_time(local("2024-06-01 00:00"))
    june = await q.check(ACCOUNT)
    assert (june.allowed, june.pay_per_use) == (True, True)
