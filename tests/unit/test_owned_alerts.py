"""Owned usage alert rules, the pure parts (docs/design/usage-alerts.md, "Owned rules"): what
an owner may be, and that billing's overview never counts an owned rule among the alerts
nobody hears."""

from __future__ import annotations

import pytest

from services.billing.domain.overview import AlertSeen, unheard_alerts
from services.billing.domain.replenish import RULE_OWNER
from services.quota.domain.alerts import OWNER_AUTO_REPLENISH, owner_is_valid


@pytest.mark.parametrize("owner", ["auto_replenish", "a", "x1_y2", "a" * 40])
def test_owner_names_that_are_accepted(owner):
    assert owner_is_valid(owner)


@pytest.mark.parametrize(
    "owner", ["", "Auto_replenish", "auto-replenish", "1st", "_x", "a" * 41, "é", "a b"]
)
def test_owner_names_that_are_refused(owner):
    assert not owner_is_valid(owner)


def test_billing_and_quota_name_the_same_owner():
    assert RULE_OWNER == OWNER_AUTO_REPLENISH
    assert owner_is_valid(RULE_OWNER)


def test_owned_rules_are_never_unheard():
    mine = AlertSeen("alr-1", "r", "passport", enabled=True)
    off = AlertSeen("alr-2", "r", "passport", enabled=False)
    owned = AlertSeen("alr-3", "r", "passport", enabled=True, owner=RULE_OWNER)
    assert unheard_alerts([mine, off, owned], 0) == (mine,)
    assert unheard_alerts([owned], 0) == ()
    assert unheard_alerts([mine, owned], 1) == ()
    assert unheard_alerts([mine, owned], None) == ()
