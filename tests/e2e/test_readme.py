"""The README's "Try it", "Try billing" and "What if" blocks, run verbatim with bash against
`allot run` (the suite as `make run` starts it), on its own data dir and port."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

from shared.settings import REPO_ROOT
from tests.support.processes import file_modes
from tests.support.servers import free_port


def readme_block(heading: str) -> str:
    """The first ```sh block after `heading` in the README."""
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split(f"{heading}\n", 1)[1]
    return re.search(r"```sh\n(.*?)```", section, re.S)[1]


def json_documents(text: str) -> list[dict]:
    decoder, docs, i = json.JSONDecoder(), [], 0
    while (start := text.find("{", i)) != -1:
        doc, i = decoder.raw_decode(text, start)
        docs.append(doc)
    return docs


def run_block(block: str, env: dict[str, str]) -> str:
    run = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    return run.stdout


def check_try_billing(outputs: list[str], frozen_clock: bool = False) -> None:
    """The block's answers, run twice; under a frozen (manual) clock every line is booked at one
    instant, so lines of one time are in the bill's tie-break order (by kind) instead."""
    first, second = json_documents(outputs[0]), json_documents(outputs[1])
    account, topped, order, renewal, schedule, package, bill = first
    assert account["account_id"] == "demo-account"
    assert topped["balance"] == {"currency_code": "USD", "units": "10"}
    assert (order["state"], order["kind"]) == ("ORDER_STATE_FULFILLED", "ORDER_KIND_PURCHASE")
    assert (renewal["kind"], renewal["periods"]) == ("ORDER_KIND_RENEWAL", 2)
    assert renewal["state"] == "ORDER_STATE_FULFILLED"
    assert renewal["package_id"] == order["package_id"] == package["package_id"]
    assert package["total_quantity"] == "3000"
    assert package["expire_time"] == renewal["expire_time"]
    assert (schedule["enabled"], schedule["lead_days"]) == (True, 10)
    assert "next_attempt_time" in schedule
    kinds = [line["kind"] for line in bill["lines"]]
    booked = [
        "BILL_LINE_KIND_TOP_UP",
        "BILL_LINE_KIND_PACKAGE_PURCHASE",
        "BILL_LINE_KIND_PACKAGE_RENEWAL",
    ]
    if frozen_clock:
        kinds, booked = sorted(kinds), sorted(booked)
    assert kinds == booked
    assert bill["closing_balance"] == {"currency_code": "USD", "units": "2", "nanos": 800000000}
    # Again: the same account, order, renewal and bill.
    assert second[2]["order_id"] == order["order_id"]
    assert second[3]["order_id"] == renewal["order_id"]
    assert second[6]["lines"] == bill["lines"]


def check_what_if(output: str, package_id: str) -> None:
    """The "What if" block's answers after "Try it" and "Try billing" (docs/design/what-if.md)."""
    real, alone, hypothetical, recommendation = json_documents(output)
    # As recorded: the 3 calls of "Try it" were paid by the 100,000-call package.
    assert real["package_paid_quantity"] == "3"
    assert real["per_package"] == [{"package_id": package_id, "used_quantity": "3"}]
    assert alone["pay_per_use_quantity"] == "3"
    assert "package_paid_quantity" not in alone
    assert hypothetical["per_package"] == [{"package_id": "hypothetical-1-1", "used_quantity": "3"}]
    cheapest = recommendation["candidates"][0]
    assert "offers" not in cheapest  # pay-per-use alone: 3 x 0.0025
    assert cheapest["expected_cost"] == {"currency_code": "USD", "nanos": 7500000}
    assert recommendation["candidates"][1]["offers"] == [
        {"offer_id": "passport-1k-1y", "count": 1, "purchases": 1}
    ]
    # What "Try billing" paid for passport packages: 2.40 + 4.80.
    assert recommendation["actual_cost"] == {
        "currency_code": "USD",
        "units": "7",
        "nanos": 200000000,
    }


@contextlib.contextmanager
def running_suite(tmp_path, **settings: str) -> Iterator[dict[str, str]]:
    """`allot run` on its own data dir and ports (plus `settings`), until its banner; yields
    the environment the README's blocks run with. Stopped with Ctrl-C, which must exit 0."""
    env = dict(
        os.environ,
        ALLOT_DATA_DIR=str(tmp_path / "var"),
        ALLOT_QUOTA_ADDR=f"127.0.0.1:{free_port()}",
        ALLOT_NOTIFICATION_ADDR=f"127.0.0.1:{free_port()}",
        ALLOT_BILLING_ADDR=f"127.0.0.1:{free_port()}",
        ALLOT_QUOTA_METRICS_ADDR=f"127.0.0.1:{free_port()}",
        ALLOT_BILLING_METRICS_ADDR=f"127.0.0.1:{free_port()}",
        ALLOT_NOTIFICATION_METRICS_ADDR=f"127.0.0.1:{free_port()}",
        **settings,
    )
    for key in ("ALLOT_AUTH_SECRET", "ALLOT_AUTH_SECRET_FILE"):
        env.pop(key, None)
    suite = subprocess.Popen(
        [sys.executable, "-m", "shared.cli", "run"],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        banner = []
        while time.monotonic() < deadline:
            line = suite.stdout.readline()
            banner.append(line)
            if "Stop with Ctrl-C" in line or (not line and suite.poll() is not None):
                break
        assert "Stop with Ctrl-C" in "".join(banner), "".join(banner)
        assert "ADMIN_TOKEN=" in "".join(banner)
        yield env
    finally:
        suite.send_signal(signal.SIGINT)
        try:
            suite.wait(30)
        finally:
            if suite.poll() is None:
                suite.kill()
    assert suite.returncode == 0


def test_try_it_runs_verbatim(tmp_path):
    with running_suite(tmp_path) as env:
        assert (tmp_path / "var" / "auth-secret").exists()

        # The second run shows the commands are idempotent.
        outputs = [run_block(readme_block("## Try it"), env) for _ in range(2)]
        assert "allot.quota.v1.QuotaService" in outputs[0]
        first, second = json_documents(outputs[0]), json_documents(outputs[1])
        enable, grant, contact, alert, report, summary, explain, check, listing = first
        assert enable["state"] == "API_SUBSCRIPTION_STATE_ACTIVE"
        assert grant["state"] == "PACKAGE_STATE_ACTIVE"
        assert report["remaining_quantity"] == "99997"
        assert report["deductions"] == [{"package_id": grant["package_id"], "quantity": "3"}]
        assert summary["items"][0]["remaining_quantity"] == "99997"
        assert explain["decisive_rule"] == "DECISIVE_RULE_ONLY_CANDIDATE"
        assert check["allowed"] is True
        assert contact["channel"] == "CHANNEL_EMAIL"
        assert alert["state"] == "USAGE_ALERT_STATE_ARMED"
        (notification,) = listing["notifications"]
        assert notification["message_type"] == "MESSAGE_TYPE_USAGE_ALERT"
        assert notification["deliveries"][0]["state"] == "DELIVERY_STATE_SENT"
        assert f"{notification['notification_id']}.eml" in outputs[0]
        assert second[1]["package_id"] == grant["package_id"]
        assert second[2]["contact_id"] == contact["contact_id"]
        assert second[3]["alert_id"] == alert["alert_id"]
        assert second[4]["duplicate"] is True
        assert second[5]["items"][0]["remaining_quantity"] == "99997"
        assert len(second[8]["notifications"]) == 1

        # What `make run` wrote (the secret, tokens.env with a 30-day admin token, the
        # databases, the outbox) is private to its user (docs/security.md).
        found = file_modes(tmp_path / "var")
        assert {"var/auth-secret", "var/tokens.env", "var/quota.db", "var/outbox/email"} <= set(
            found
        )
        loose = {path: oct(mode) for path, mode in found.items() if mode & 0o077}
        assert loose == {}, loose
        check_try_billing([run_block(readme_block("### Try billing"), env) for _ in range(2)])
        check_what_if(run_block(readme_block("### What if"), env), grant["package_id"])


def test_try_billing_half_an_hour_into_a_month_in_the_billing_time_zone(tmp_path):
    # 2024-05-31 16:30 UTC is 2024-06-01 00:30 in Asia/Shanghai: the bill the block shows is
    # June's, the month billing booked the lines in, whatever the caller's clock or time zone.
    with running_suite(
        tmp_path, ALLOT_CLOCK="manual", ALLOT_CLOCK_START="2024-05-31T16:30:00Z", TZ="UTC"
    ) as env:
        outputs = [run_block(readme_block("### Try billing"), env) for _ in range(2)]
    check_try_billing(outputs, frozen_clock=True)
    bill = json_documents(outputs[0])[6]
    assert bill["month"] == "2024-06", bill
