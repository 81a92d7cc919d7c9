"""Accounts: who pays, and the standing and balance callers see.

A standalone account and an enterprise master pay from their own balance; an enterprise member
has none of its own (its balance stays 0): its charges are taken from its master's balance,
and it is in arrears when its master is.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime, timedelta

from services.billing.domain.arrears import ArrearsState, Standing
from shared.errors import NotFound

DEFAULT_PERIOD = timedelta(days=15)
MAX_PERIOD = timedelta(days=366)


class AccountKind(enum.IntEnum):
    STANDALONE = 1
    ENTERPRISE_MASTER = 2
    ENTERPRISE_MEMBER = 3


@dataclass(frozen=True)
class Account:
    account_id: str
    display_name: str
    kind: AccountKind
    master_account_id: str
    currency_code: str
    balance_micros: int  # the balance that pays: the master's for a member
    standing: Standing
    standing_change_time: datetime | None
    grace_end_time: datetime | None
    retention_end_time: datetime | None
    grace_period: timedelta
    retention_period: timedelta
    balance_alert_micros: int | None
    create_time: datetime
    update_time: datetime
    # The account's own setting (UpdateAccount); for a member, its master's setting applies
    # as well (`blocks_pay_per_use_in_grace`).
    block_pay_per_use_in_grace: bool = False
    # The account's own monthly pay-per-use cap in micros, 0 = none (SetSpendingCap;
    # docs/design/spending-cap.md). A member's cap is its own, never its master's.
    monthly_spending_cap_micros: int = 0

    @property
    def payer_id(self) -> str:
        """The account whose balance pays for this one: its master's for a member."""
        return self.master_account_id or self.account_id

    @property
    def arrears(self) -> ArrearsState:
        """The arrears state of the paying account (a member shows its master's)."""
        return ArrearsState(
            self.standing, self.standing_change_time, self.grace_end_time, self.retention_end_time
        )


def blocks_pay_per_use_in_grace(account: Account, payer: Account | None) -> bool:
    """Whether quota refuses `account`'s pay-per-use calls while in GRACE: its own setting, or
    that of the master that pays for it (`payer`; None for an account that pays for itself)."""
    return account.block_pay_per_use_in_grace or (
        payer is not None and payer.block_pay_per_use_in_grace
    )


def account_not_found(account_id: str) -> NotFound:
    return NotFound("ACCOUNT_NOT_FOUND", f"no account {account_id!r}", account_id=account_id)
