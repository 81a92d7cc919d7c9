"""`grpcurl describe` through server reflection shows the protos' comments (shared/reflection.py).

The real `grpcurl` binary against a quota process: no .proto file is given to grpcurl, so every
comment it prints came from the server's reflection service.
"""

from __future__ import annotations

import pytest

from shared.reflection import DESCRIPTOR_SET, SourcePool, load_sources
from tests.e2e.test_grpcurl import QUOTA, Grpcurl
from tests.support.quota import quota_env, quota_process


@pytest.fixture(scope="module")
def grpcurl(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("describe")
    env = quota_env(f"sqlite+aiosqlite:///{data_dir / 'quota.db'}", data_dir)
    with quota_process(env, data_dir / "quota.log") as process:
        yield Grpcurl(process.addr)
        assert process.terminate(timeout=30) == 0


def describe(grpcurl: Grpcurl, symbol: str) -> str:
    result = grpcurl.run("describe", symbol)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_an_rpc_shows_its_comment_with_its_errors(grpcurl):
    out = describe(grpcurl, f"{QUOTA}.ReportUsage")
    assert "Records one usage event and deducts it from the account's packages" in out
    assert "EVENT_ID_REUSED" in out


def test_the_service_shows_its_comment(grpcurl):
    out = describe(grpcurl, QUOTA)
    assert "The regional quota service" in out


def test_a_message_shows_field_comments_and_field_behavior(grpcurl):
    out = describe(grpcurl, "allot.quota.v1.Package")
    assert "This package's grant" in out
    assert "google.api.field_behavior" in out


def test_a_message_of_another_file_shows_its_comments(grpcurl):
    # ReportUsageRequest lives in quota_service.proto, Package in quota.proto.
    out = describe(grpcurl, "allot.quota.v1.ReportUsageRequest")
    assert "The gateway's unique id of the event" in out


def test_the_descriptor_set_matches_every_loaded_proto():
    """A stale descriptor set would be served without comments (and logged); the committed
    one holds every proto of the contract, each the very file the stubs were made from."""
    import allot.billing.v1.billing_service_pb2  # noqa: F401
    import allot.notification.v1.notification_service_pb2  # noqa: F401
    import allot.quota.v1.quota_service_pb2  # noqa: F401
    import allot.testing.v1.clock_service_pb2  # noqa: F401

    sources = load_sources(DESCRIPTOR_SET)
    assert sorted(sources) == sorted(SourcePool(sources).commented_files)
    assert {
        "allot/quota/v1/quota.proto",
        "allot/quota/v1/quota_service.proto",
        "allot/billing/v1/billing.proto",
        "allot/billing/v1/billing_service.proto",
        "allot/notification/v1/notification.proto",
        "allot/notification/v1/notification_service.proto",
        "allot/testing/v1/clock_service.proto",
    } <= set(sources)
    assert all(file.source_code_info.location for file in sources.values())
