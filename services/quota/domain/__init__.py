"""Pure rules of the quota service: packages, validity periods and the deduction order."""

from services.quota.domain.deduction import (
    Candidate,
    DecisiveRule,
    Deduction,
    DeductionPolicy,
    IneligibleReason,
    UsageEvent,
    UsageOutcome,
    apply_usage,
    deduction_key,
)
from services.quota.domain.packages import (
    ALL_PROJECTS,
    Package,
    PackageSource,
    PackageState,
    QuotaTotals,
    totals_in_force,
)
from shared.projects import normalize_project_id
from shared.validity import package_expire_time, renewal_expire_time

__all__ = [
    "ALL_PROJECTS",
    "Candidate",
    "DecisiveRule",
    "Deduction",
    "DeductionPolicy",
    "IneligibleReason",
    "Package",
    "PackageSource",
    "PackageState",
    "QuotaTotals",
    "UsageEvent",
    "UsageOutcome",
    "apply_usage",
    "deduction_key",
    "normalize_project_id",
    "package_expire_time",
    "renewal_expire_time",
    "totals_in_force",
]
