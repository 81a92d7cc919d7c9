"""The contract packaged for clients (docs/contract.md, "Clients"): protos/ builds on its own,
every Allot proto names its Go module path and Java package consistently with buf.gen.yaml,
and the Python client helper's retry config and token metadata are what gRPC expects."""

from __future__ import annotations

import json
import re
import subprocess

import allot_client
import pytest
import yaml

from shared.settings import REPO_ROOT

PROTOS = REPO_ROOT / "protos"
BUF = REPO_ROOT / ".venv" / "bin" / "buf"


def option(text: str, name: str) -> str | None:
    found = re.search(rf'^option {name} = "?([^"]*?)"?;$', text, re.MULTILINE)
    return found.group(1) if found else None


def go_module() -> str:
    template = yaml.safe_load((REPO_ROOT / "buf.gen.yaml").read_text())
    modules = {p["opt"] for p in template["plugins"] if p["out"] == "gen/go"}
    assert len(modules) == 1, modules
    return modules.pop().removeprefix("module=")


def test_buf_gen_makes_go_java_and_typescript():
    template = yaml.safe_load((REPO_ROOT / "buf.gen.yaml").read_text())
    assert {p["out"] for p in template["plugins"]} == {"gen/go", "gen/java", "gen/ts"}


def test_every_allot_proto_names_its_go_and_java_package():
    module = go_module()
    for path in sorted((PROTOS / "allot").rglob("*.proto")):
        text = path.read_text()
        service, version = path.relative_to(PROTOS).parts[1:3]
        where = path.relative_to(REPO_ROOT)
        expected_go = f"{module}/allot/{service}/{version};{service}{version}"
        assert option(text, "go_package") == expected_go, where
        assert option(text, "java_package") == f"com.allotbilling.allot.{service}.{version}", where
        assert option(text, "java_multiple_files") == "true", where
        assert option(text, "java_outer_classname"), where


def test_every_import_is_in_protos_or_well_known():
    for path in sorted((PROTOS / "allot").rglob("*.proto")):
        for imported in re.findall(r'^import "([^"]+)";', path.read_text(), re.MULTILINE):
            if imported.startswith("google/protobuf/"):
                continue  # well-known types: every protobuf runtime and buf carry them
            assert (PROTOS / imported).is_file(), (
                f"{path.name} imports {imported}: make vendor-protos"
            )


@pytest.mark.skipif(not BUF.exists(), reason="buf comes with `make venv`")
def test_protos_build_on_their_own():
    done = subprocess.run(
        [str(BUF), "build", "-o", "/dev/null"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr


def test_retry_config_retries_unavailable_for_every_service():
    config = json.loads(allot_client.service_config(max_attempts=3))
    [method] = config["methodConfig"]
    assert {n["service"] for n in method["name"]} >= {
        "allot.quota.v1.QuotaService",
        "allot.billing.v1.BillingService",
        "allot.notification.v1.NotificationService",
    }
    policy = method["retryPolicy"]
    assert policy["maxAttempts"] == 3
    assert policy["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert re.fullmatch(r"\d+(\.\d+)?s", policy["initialBackoff"])
    with pytest.raises(ValueError):
        allot_client.service_config(max_attempts=9)
    assert ("grpc.enable_retries", 0) in allot_client.channel_options(retries=False)


def test_bearer_metadata():
    assert allot_client.bearer("abc") == (("authorization", "Bearer abc"),)
    with pytest.raises(ValueError):
        allot_client.bearer("")
