"""The quota server answers through real stubs on both databases."""

from allot.quota.v1 import quota_pb2, quota_service_pb2


async def test_grant_and_report(quota, tokens):
    admin = tokens.md(tokens.admin())
    package = await quota.stub.GrantPackage(
        quota_service_pb2.GrantPackageRequest(
            request_id="r1",
            package=quota_pb2.Package(
                account_id="a1",
                region="ap-southeast-1",
                api="passport",
                source=quota_pb2.PACKAGE_SOURCE_SUBSCRIPTION,
                total_quantity=10,
                expire_time={"seconds": 1735689599},
            ),
        ),
        metadata=admin,
    )
    assert package.state == quota_pb2.PACKAGE_STATE_ACTIVE
    result = await quota.stub.ReportUsage(
        quota_service_pb2.ReportUsageRequest(
            event_id="e1",
            account_id="a1",
            region="ap-southeast-1",
            api="passport",
            quantity=12,
            http_status=200,
        ),
        metadata=tokens.md(tokens.gateway()),
    )
    assert result.pay_per_use_quantity == 2
    assert [(d.package_id, d.quantity) for d in result.deductions] == [(package.package_id, 10)]
    assert result.remaining_quantity == 0
