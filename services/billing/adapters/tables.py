"""Billing's tables (SQLAlchemy Core). Money is integer micro-units of the account's currency;
instants are integer microseconds (UTC)."""

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Index,
    MetaData,
    SmallInteger,
    String,
    Table,
    Text,
    false,
)

from shared.api_subscriptions import api_subscriptions_table
from shared.idempotency import idempotency_table
from shared.outbox import outbox_tables
from shared.streams.lease import consumer_tables

metadata = MetaData()

accounts = Table(
    "accounts",
    metadata,
    Column("account_id", String(64), primary_key=True),
    Column("display_name", String(200), nullable=False),
    Column("kind", SmallInteger, nullable=False),
    Column("master_account_id", String(64), nullable=False, server_default=""),
    Column("currency_code", String(3), nullable=False),
    # A member's own balance stays 0: its charges are taken from its master's.
    Column("balance_micros", BigInteger, nullable=False),
    Column("standing", SmallInteger, nullable=False),
    Column("standing_change_time_us", BigInteger, nullable=True),
    Column("grace_end_time_us", BigInteger, nullable=True),
    Column("retention_end_time_us", BigInteger, nullable=True),
    Column("grace_period_s", BigInteger, nullable=False),
    Column("retention_period_s", BigInteger, nullable=False),
    Column("balance_alert_micros", BigInteger, nullable=True),
    # The balance alert fired and waits for the balance to rise above the threshold again.
    Column("balance_alert_fired", Boolean, nullable=False, server_default=false()),
    # While in GRACE, quota refuses pay-per-use calls of this account (and of its members,
    # for a master): UpdateAccount sets it, account_standing_changed carries it to quota.
    Column("block_pay_per_use_in_grace", Boolean, nullable=False, server_default=false()),
    # The account's own monthly pay-per-use cap (SetSpendingCap); 0 = none. Carried to quota
    # in account_standing_changed (docs/design/spending-cap.md).
    Column("monthly_spending_cap_micros", BigInteger, nullable=False, server_default="0"),
    Column("create_time_us", BigInteger, nullable=False),
    Column("update_time_us", BigInteger, nullable=False),
    Index("ix_accounts_master", "master_account_id"),
)

# Every change of a balance, signed by its effect (top-ups +, charges -): bills are read from
# here, so the sum of a month's lines is the change of the balance.
ledger = Table(
    "ledger",
    metadata,
    Column("entry_id", String(40), primary_key=True),
    # Whose bill the line is on, and whose balance paid (a member's master).
    Column("account_id", String(64), nullable=False),
    Column("paying_account_id", String(64), nullable=False),
    Column("kind", SmallInteger, nullable=False),
    Column("amount_micros", BigInteger, nullable=False),
    Column("region", String(64), nullable=False, server_default=""),
    Column("api", String(64), nullable=False, server_default=""),
    Column("enterprise_project_id", String(64), nullable=False, server_default=""),
    Column("cycle_start_us", BigInteger, nullable=True),
    Column("cycle_end_us", BigInteger, nullable=True),
    Column("quantity", BigInteger, nullable=False, server_default="0"),
    # JSON: the tier breakdown of a pay-per-use line.
    Column("tiers", Text, nullable=False, server_default="[]"),
    Column("order_id", String(40), nullable=False, server_default=""),
    Column("description", String(500), nullable=False, server_default=""),
    Column("occur_time_us", BigInteger, nullable=False),
    Index("ix_ledger_account_time", "account_id", "occur_time_us"),
    Index("ix_ledger_payer_time", "paying_account_id", "occur_time_us"),
)

orders = Table(
    "orders",
    metadata,
    Column("order_id", String(40), primary_key=True),
    Column("account_id", String(64), nullable=False),
    # Whose balance paid: the account's own, or its master's for an enterprise member.
    Column("paying_account_id", String(64), nullable=False),
    Column("kind", SmallInteger, nullable=False),
    Column("state", SmallInteger, nullable=False),
    Column("offer_id", String(64), nullable=False),
    Column("region", String(64), nullable=False),
    Column("api", String(64), nullable=False),
    Column("enterprise_project_id", String(64), nullable=False, server_default=""),
    Column("quantity", BigInteger, nullable=False),
    Column("periods", SmallInteger, nullable=False, server_default="1"),
    Column("amount_micros", BigInteger, nullable=False),
    Column("package_id", String(40), nullable=False, server_default=""),
    Column("effective_time_us", BigInteger, nullable=False),
    Column("expire_time_us", BigInteger, nullable=False),
    Column("auto_renew", Boolean, nullable=False, server_default=false()),
    Column("failure_reason", String(500), nullable=False, server_default=""),
    Column("create_time_us", BigInteger, nullable=False),
    Column("update_time_us", BigInteger, nullable=False),
    Index("ix_orders_account", "account_id", "order_id"),
    Index("ix_orders_state", "state"),
    Index("ix_orders_package", "package_id", "expire_time_us"),
)

# The packages of each order (domain.orders.OrderPackage), one row each: a purchase's N
# packages (package_id set when granted) or the packages a renewal renews, with each one's
# share of the price and calls and the validity it is granted or renewed to.
order_packages = Table(
    "order_packages",
    metadata,
    Column("order_id", String(40), primary_key=True),
    Column("position", SmallInteger, primary_key=True),
    Column("package_id", String(40), nullable=False, server_default=""),
    Column("effective_time_us", BigInteger, nullable=False),
    Column("expire_time_us", BigInteger, nullable=False),
    Column("amount_micros", BigInteger, nullable=False),
    Column("quantity", BigInteger, nullable=False),
    Index("ix_order_packages_package", "package_id", "expire_time_us"),
)

# Billing's record of each package it sold (app/packages.py): written when the purchase is
# fulfilled, moved by every renewal, holding the auto-renewal setting and schedule.
auto_renewals = Table(
    "auto_renewals",
    metadata,
    Column("package_id", String(40), primary_key=True),
    Column("account_id", String(64), nullable=False),
    Column("offer_id", String(64), nullable=False),
    Column("region", String(64), nullable=False),
    # The purchase order that granted the package.
    Column("order_id", String(40), nullable=False, server_default=""),
    Column("enabled", Boolean, nullable=False),
    Column("lead_days", SmallInteger, nullable=False),
    # The package's expiry as billing knows it (moved by every renewal).
    Column("expire_time_us", BigInteger, nullable=False),
    Column("next_attempt_us", BigInteger, nullable=True),
    Column("last_attempt_us", BigInteger, nullable=True),
    Column("last_failure_reason", String(500), nullable=False, server_default=""),
    Column("update_time_us", BigInteger, nullable=False),
    Index("ix_auto_renewals_due", "enabled", "next_attempt_us"),
)

# Billing's record of the API subscriptions it asked quota for (released accounts lose them).
api_subscriptions = api_subscriptions_table(metadata)

# Pay-per-use quantity per hourly cycle (billing time zone), filled from quota's
# pay_per_use_recorded events and settled once the cycle has ended.
usage_cycles = Table(
    "usage_cycles",
    metadata,
    Column("account_id", String(64), primary_key=True),
    Column("region", String(64), primary_key=True),
    Column("api", String(64), primary_key=True),
    Column("enterprise_project_id", String(64), primary_key=True),
    Column("cycle_start_us", BigInteger, primary_key=True),
    Column("cycle_end_us", BigInteger, nullable=False),
    Column("quantity", BigInteger, nullable=False),
    Column("settled", Boolean, nullable=False, server_default=false()),
    Column("entry_id", String(40), nullable=False, server_default=""),
    Index("ix_usage_cycles_due", "settled", "cycle_end_us"),
)

# The usage events behind the pay-per-use of each cycle (quota's usage_event_id of every
# pay_per_use_recorded event), so a bill line can be explained event by event
# (ExplainBillLine, docs/design/billing.md "Explaining a pay-per-use line").
pay_per_use_events = Table(
    "pay_per_use_events",
    metadata,
    Column("account_id", String(64), primary_key=True),
    Column("region", String(64), primary_key=True),
    Column("api", String(64), primary_key=True),
    Column("cycle_start_us", BigInteger, primary_key=True),
    Column("usage_event_id", String(200), primary_key=True),
    Column("enterprise_project_id", String(64), nullable=False),
    Column("quantity", BigInteger, nullable=False),
    Column("occur_time_us", BigInteger, nullable=False),
)

# Auto-replenish settings, one per account, region and API (app/replenish.py,
# docs/design/auto-replenish.md), with the id of the usage alert rule billing keeps in quota.
auto_replenish = Table(
    "auto_replenish",
    metadata,
    Column("account_id", String(64), primary_key=True),
    Column("region", String(64), primary_key=True),
    Column("api", String(64), primary_key=True),
    Column("offer_id", String(64), nullable=False),
    Column("below_quantity", BigInteger, nullable=False),
    Column("max_per_month", SmallInteger, nullable=False),
    Column("enabled", Boolean, nullable=False),
    Column("alert_id", String(64), nullable=False),
    Column("last_failure_reason", String(500), nullable=False, server_default=""),
    # Set once the month's limit was reached: when the rule is re-armed (next month's start).
    Column("rearm_time_us", BigInteger, nullable=True),
    # The request id quota is asked with for that re-arm (a retry never re-arms twice).
    Column("rearm_request_id", String(64), nullable=False, server_default=""),
    Column("create_time_us", BigInteger, nullable=False),
    Column("update_time_us", BigInteger, nullable=False),
    Index("ix_auto_replenish_rearm", "rearm_time_us"),
)

# Every crossing an auto-replenish setting acted on, keyed by quota's threshold_crossed event
# id: the purchase's idempotency key (one order per crossing, whoever delivers the event and
# however often) and the count of the month's purchases (rows with an order_id).
auto_replenish_crossings = Table(
    "auto_replenish_crossings",
    metadata,
    Column("event_id", String(200), primary_key=True),
    Column("account_id", String(64), nullable=False),
    Column("region", String(64), nullable=False),
    Column("api", String(64), nullable=False),
    Column("month", String(7), nullable=False),
    Column("order_id", String(40), nullable=False, server_default=""),
    Column("failure_reason", String(500), nullable=False, server_default=""),
    Column("create_time_us", BigInteger, nullable=False),
    Index("ix_auto_replenish_crossings_month", "account_id", "region", "api", "month"),
)

idempotency_keys = idempotency_table(metadata)
outbox_events, outbox_counter = outbox_tables(metadata)
consumer_cursors, consumer_leases = consumer_tables(metadata)
