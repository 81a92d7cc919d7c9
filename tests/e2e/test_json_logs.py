"""A quota process with ALLOT_LOG_FORMAT=json and ALLOT_LOG_LEVEL=DEBUG (docs/faults.md, "Logs"):
every line of its log is one JSON object, every call has its access line, and the database
drivers say nothing below WARNING, on SQLite and PostgreSQL."""

from __future__ import annotations

import json

import grpc
from allot.quota.v1 import quota_service_pb2

from tests.support.calls import expect_error
from tests.support.quota import ACCOUNT, quota_calls, quota_env, quota_process

CALL_TIMEOUT = 10.0
EXIT_WITHIN = 20.0
FAR = "2099-12-31T00:00:00Z"  # the process runs on the system clock
DRIVERS = ("sqlalchemy", "asyncpg", "aiosqlite")
ACCESS_FIELDS = {"method", "code", "duration_ms", "subject", "role", "account", "request_id"}


async def test_json_lines_at_debug_hold_every_call_and_no_driver(service_url, tmp_path):
    env = quota_env(service_url, tmp_path, ALLOT_LOG_FORMAT="json", ALLOT_LOG_LEVEL="DEBUG")
    log_path = tmp_path / "quota.log"
    with quota_process(env, log_path) as process:
        async with grpc.aio.insecure_channel(process.addr) as channel:
            calls = quota_calls(channel)
            await calls.grant(
                metadata=(*calls.admin, ("x-request-id", "req-json-1")), expire=FAR, effective=None
            )
            for n in range(3):
                await calls.report(f"e-{n}")
            await expect_error(
                calls.stub.ListPackages(
                    quota_service_pb2.ListPackagesRequest(account_id=ACCOUNT),
                    timeout=CALL_TIMEOUT,
                ),
                grpc.StatusCode.UNAUTHENTICATED,
            )
        process.send_signal()
        assert process.wait(EXIT_WITHIN) == 0

    text = log_path.read_text()
    lines = [json.loads(line) for line in text.splitlines()]  # each line parses on its own
    assert lines, text
    for line in lines:
        assert {"time", "level", "service", "logger", "request_id", "message"} <= set(line)
        assert line["service"] == "quota"
        assert not line["logger"].startswith(DRIVERS), line
    access = [line for line in lines if line["logger"] == "allot.access"]
    assert all(ACCESS_FIELDS <= set(line) for line in access)
    calls = [(line["method"].rsplit("/", 1)[1], line["code"], line["role"]) for line in access]
    assert calls == [
        ("GrantPackage", "OK", "admin"),
        *[("ReportUsage", "OK", "gateway")] * 3,
        ("ListPackages", "UNAUTHENTICATED", "-"),
    ]
    assert access[0]["request_id"] == "req-json-1"
    assert any(line["logger"].startswith("alembic") for line in lines)  # migrations still shown
