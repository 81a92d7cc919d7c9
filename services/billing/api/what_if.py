"""Protobuf of RecommendPackages (docs/design/what-if.md, "Recommendations")."""

from __future__ import annotations

from allot.billing.v1 import billing_service_pb2

from services.billing.adapters.events import micros_to_money
from services.billing.app.recommendations import Recommendation
from shared.timeutil import to_timestamp


def to_proto_recommendation(
    found: Recommendation,
) -> billing_service_pb2.RecommendPackagesResponse:
    currency = found.currency

    def money(micros: int):
        return micros_to_money(micros, currency)

    return billing_service_pb2.RecommendPackagesResponse(
        candidates=[
            billing_service_pb2.PackageRecommendation(
                offers=[
                    billing_service_pb2.RecommendedOffer(
                        offer_id=part.offer.id, count=part.count, purchases=purchases
                    )
                    for part, purchases in zip(c.mix.parts, c.purchases, strict=True)
                ],
                expected_cost=money(c.expected_cost_micros),
                pay_per_use_quantity=c.outcome.pay_per_use_quantity,
                forfeited_quantity=c.outcome.forfeited_quantity,
                package_cost=money(c.package_cost_micros),
                pay_per_use_cost=money(c.pay_per_use_cost_micros),
                saving=money(found.actual_cost_micros - c.expected_cost_micros),
            )
            for c in found.candidates
        ],
        actual_cost=money(found.actual_cost_micros),
        start_time=to_timestamp(found.start),
        end_time=to_timestamp(found.end),
    )
