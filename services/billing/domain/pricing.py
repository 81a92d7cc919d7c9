"""Graduated pay-per-use pricing: the rule lives in `shared/pricing.py`, shared with quota,
which prices a month's pay-per-use the same way for spending caps
(docs/design/spending-cap.md). Billing's modules keep importing it from here."""

from __future__ import annotations

from shared.pricing import Priced, TierCharge, merge_priced, price_usage, validate_tiers

__all__ = ["Priced", "TierCharge", "merge_priced", "price_usage", "validate_tiers"]
