"""examples/node: a grpc-js client built from protos/ alone, run with the machine's Node
against a real quota server: health, ReportUsage, GetQuotaSummary, and the ErrorInfo of a
refused call, which must read the same as the Python client helper (allot_client) reads it.

`make node-example` installs its packages (`npm ci`, the committed package-lock.json)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess

import allot_client
import grpc
import pytest
from allot.quota.v1 import quota_service_pb2

from shared.settings import REPO_ROOT
from tests.support.quota import ACCOUNT, API, REGION, quota_server

EXAMPLE = REPO_ROOT / "examples" / "node"
NODE_TIMEOUT = 60  # seconds for one run of the client


@pytest.fixture(scope="module")
def node() -> str:
    node = shutil.which("node")
    if node is None or shutil.which("npm") is None:
        if os.environ.get("CI"):
            pytest.fail("Node and npm are required in CI (Debian packages nodejs, npm)")
        pytest.skip("missing tool: node (and npm)")
    done = subprocess.run(
        ["make", "-s", "node-example"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return node


async def test_node_client_reports_reads_and_decodes_a_refusal(node, tmp_path):
    async with quota_server(f"sqlite+aiosqlite:///{tmp_path / 'quota.db'}", tmp_path) as q:
        package = await q.grant(quantity=10)
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "ALLOT_QUOTA_ADDR": q.handle.addr,
            "ALLOT_TOKEN": q.tokens.gateway(),
            "ALLOT_ACCOUNT_TOKEN": q.tokens.account(ACCOUNT),
            "ALLOT_ACCOUNT": ACCOUNT,
            "ALLOT_REGION": REGION,
            "ALLOT_API": API,
        }
        proc = await asyncio.create_subprocess_exec(
            node, "client.js", cwd=EXAMPLE, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            out, err = await asyncio.wait_for(proc.communicate(), NODE_TIMEOUT)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
        assert proc.returncode == 0, err.decode()
        seen = json.loads(out)

        # The same refusal through the Python client helper.
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await q.stub.ReportUsage(
                quota_service_pb2.ReportUsageRequest(
                    account_id=ACCOUNT, region=REGION, api=API, http_status=200
                ),
                metadata=allot_client.bearer(q.tokens.gateway()),
                timeout=5,
            )
        python_info = allot_client.error_info(caught.value)

    assert seen["health"] == "SERVING"
    assert seen["report"]["duplicate"] is False
    assert seen["report"]["deductions"] == [{"packageId": package.package_id, "quantity": "1"}]
    assert seen["summary"]["accountId"] == ACCOUNT
    item = next(i for i in seen["summary"]["items"] if (i["region"], i["api"]) == (REGION, API))
    assert (item["totalQuantity"], item["usedQuantity"]) == ("10", "1")
    refused = seen["refused"]
    assert refused["code"] == "INVALID_ARGUMENT"
    assert python_info is not None and python_info.domain == "allot"
    assert refused["errorInfo"] == {
        "reason": python_info.reason,
        "domain": "allot",
        "metadata": dict(python_info.metadata),
    }
    assert allot_client.bad_request_fields(caught.value) == ["event_id"]
