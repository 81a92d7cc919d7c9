"""Quota's tables (SQLAlchemy Core). Instants are integer microseconds since the epoch (UTC),
quantities are BIGINT: exact on both dialects, no time-zone conversions in the database."""

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    Index,
    Integer,
    MetaData,
    Sequence,
    SmallInteger,
    String,
    Table,
    Text,
)
from sqlalchemy import false as sa_false

from shared.api_subscriptions import api_subscriptions_table
from shared.idempotency import idempotency_table
from shared.outbox import outbox_tables
from shared.streams.lease import consumer_tables

metadata = MetaData()

packages = Table(
    "packages",
    metadata,
    Column("package_id", String(40), primary_key=True),
    Column("account_id", String(64), nullable=False),
    Column("region", String(64), nullable=False),
    Column("api", String(64), nullable=False),
    # '' = every enterprise project of the account.
    Column("enterprise_project_id", String(64), nullable=False),
    Column("source", SmallInteger, nullable=False),
    Column("total_quantity", BigInteger, nullable=False),
    Column("used_quantity", BigInteger, nullable=False),
    Column("effective_time_us", BigInteger, nullable=False),
    Column("expire_time_us", BigInteger, nullable=False),
    Column("create_time_us", BigInteger, nullable=False),
    Column("revoke_time_us", BigInteger, nullable=True),
    Column("revoke_reason", String(500), nullable=False, server_default=""),
    Column("order_id", String(64), nullable=False, server_default=""),
    # The state the outbox last announced (package_state_changed); the clock-driven work looks
    # for packages whose real state has moved on from it (activation, expiry).
    Column("announced_state", SmallInteger, nullable=False, server_default="1"),
    # package_expiring was sent for the current expire_time (a renewal clears it).
    Column("expiring_announced", Boolean, nullable=False, server_default=sa_false()),
    CheckConstraint("used_quantity >= 0 AND used_quantity <= total_quantity", name="ck_used"),
    Index("ix_packages_scope_expire", "account_id", "region", "api", "expire_time_us"),
    Index("ix_packages_announced_effective", "announced_state", "effective_time_us"),
    Index("ix_packages_announced_expire", "announced_state", "expire_time_us"),
)

api_subscriptions = api_subscriptions_table(metadata)

usage_events = Table(
    "usage_events",
    metadata,
    Column("event_id", String(128), primary_key=True),
    # Digest of the event as reported: the same id with other content is EVENT_ID_REUSED.
    Column("fingerprint", String(64), nullable=False),
    Column("account_id", String(64), nullable=False),
    Column("user_id", String(128), nullable=False),
    Column("region", String(64), nullable=False),
    Column("api", String(64), nullable=False),
    Column("enterprise_project_id", String(64), nullable=False),
    Column("quantity", BigInteger, nullable=False),
    Column("http_status", Integer, nullable=False),
    Column("billable", Boolean, nullable=False),
    Column("occur_time_us", BigInteger, nullable=False),
    Column("record_time_us", BigInteger, nullable=False),
    Column("package_quantity", BigInteger, nullable=False),
    Column("pay_per_use_quantity", BigInteger, nullable=False),
    Column("remaining_quantity", BigInteger, nullable=False),
    # JSON: [[package_id, quantity], ...] in deduction order.
    Column("deductions", Text, nullable=False),
    # JSON: the candidates and the decisive rule, for ExplainUsage.
    Column("explanation", Text, nullable=False),
    # The event's place in the order the scope's usage and package changes were recorded in
    # (`adapters/history_repository.py`); NULL for events recorded before it existed.
    Column("record_seq", BigInteger, nullable=True),
    Index("ix_usage_events_scope_time", "account_id", "region", "api", "occur_time_us"),
    Index("ix_usage_events_scope_seq", "account_id", "region", "api", "record_seq"),
)

# Quota's projection of each account's standing (billing's events keep it; absent = GOOD).
# `app/standings.py` writes it from billing's account_standing_changed events, and only from
# an event newer (by billing's sequence) than the one it holds, so a replay or an older change
# never overwrites a newer one.
account_standings = Table(
    "account_standings",
    metadata,
    Column("account_id", String(64), primary_key=True),
    Column("standing", SmallInteger, nullable=False),
    # When quota wrote the row (quota's clock).
    Column("update_time_us", BigInteger, nullable=False),
    # When billing says the standing changed (AccountStandingChanged.change_time, else the
    # event's create_time).
    Column("change_time_us", BigInteger, nullable=False, server_default="0"),
    # Billing's event sequence and id of the change the row holds.
    Column("billing_sequence", BigInteger, nullable=False, server_default="0"),
    Column("billing_event_id", String(64), nullable=False, server_default=""),
    # Pay-per-use is refused while in GRACE (billing's per-account setting, or its master's).
    Column("block_pay_per_use_in_grace", Boolean, nullable=False, server_default=sa_false()),
    # The enterprise master of a member account ('' otherwise): a master's tokens may read
    # its members' packages and usage (docs/security.md).
    Column("master_account_id", String(64), nullable=False, server_default=""),
    # The account's own monthly pay-per-use cap in micros (billing's SetSpendingCap); 0 = none.
    Column("monthly_spending_cap_micros", BigInteger, nullable=False, server_default="0"),
    # With a cap: billing's settled pay-per-use of the account by region for one month, JSON
    # {"month": "YYYY-MM", "regions": {region: micros}}; '' without.
    Column("settled_pay_per_use", Text, nullable=False, server_default=""),
    Index("ix_account_standings_master", "master_account_id"),
)

usage_alerts = Table(
    "usage_alerts",
    metadata,
    Column("alert_id", String(40), primary_key=True),
    Column("account_id", String(64), nullable=False),
    Column("region", String(64), nullable=False),
    # '' = every API of the region, each evaluated on its own.
    Column("api", String(64), nullable=False),
    Column("threshold_quantity", BigInteger, nullable=True),
    # A decimal string (exact), e.g. "20" or "12.5"; set when threshold_quantity is not.
    Column("threshold_percent", String(32), nullable=True),
    Column("enabled", Boolean, nullable=False),
    Column("create_time_us", BigInteger, nullable=False),
    Column("update_time_us", BigInteger, nullable=False),
    # Forecast conditions (docs/design/forecasts.md); at most one threshold column is set.
    Column("threshold_depletion_days", Integer, nullable=True),
    Column("threshold_forfeiture_quantity", BigInteger, nullable=True),
    # When the due work last evaluated a forecast rule's forecast; NULL for the other rules,
    # so the due work's range scan of this index finds forecast rules only.
    Column("forecast_check_time_us", BigInteger, nullable=True),
    # '' = the customer's own rule; else the suite feature that keeps it (UsageAlert.owner).
    Column("owner", String(40), nullable=False, server_default=""),
    Index("ix_usage_alerts_scope", "account_id", "region"),
    Index("ix_usage_alerts_forecast_check", "forecast_check_time_us"),
)

# One row per rule and API it has been evaluated for (ARMED or FIRED).
usage_alert_states = Table(
    "usage_alert_states",
    metadata,
    Column("alert_id", String(40), primary_key=True),
    Column("api", String(64), primary_key=True),
    Column("state", SmallInteger, nullable=False),
    Column("update_time_us", BigInteger, nullable=False),
)

# An account's rate limit for an API in a region, set by an admin (SetRateLimit); it beats the
# catalog's rate_limit_per_second. Rare: each process keeps a copy (app/rate_limits.py).
rate_limit_overrides = Table(
    "rate_limit_overrides",
    metadata,
    Column("account_id", String(64), primary_key=True),
    Column("region", String(64), primary_key=True),
    Column("api", String(64), primary_key=True),
    Column("per_second", BigInteger, nullable=False),
    Column("burst", BigInteger, nullable=False),
    Column("update_time_us", BigInteger, nullable=False),
)

# The token bucket of one account, region and API that has a limit: micro-tokens left after
# the last call and when it was refilled (quota's clock). Written by one atomic upsert per
# limited CheckQuota (adapters/rate_limits_repository.py); `admitted` is that call's answer.
rate_limit_buckets = Table(
    "rate_limit_buckets",
    metadata,
    Column("account_id", String(64), primary_key=True),
    Column("region", String(64), primary_key=True),
    Column("api", String(64), primary_key=True),
    Column("tokens", BigInteger, nullable=False),
    Column("refill_time_us", BigInteger, nullable=False),
    Column("admitted", Boolean, nullable=False),
)

# Pay-per-use recorded here per account, month of the billing time zone (by occur_time),
# region and API: the calls and what they cost by the catalog's tiers (micros, unrounded),
# written in the usage transaction. The spending cap reads the month's sum
# (docs/design/spending-cap.md).
pay_per_use_months = Table(
    "pay_per_use_months",
    metadata,
    Column("account_id", String(64), primary_key=True),
    Column("month", String(7), primary_key=True),
    Column("region", String(64), primary_key=True),
    Column("api", String(64), primary_key=True),
    Column("quantity", BigInteger, nullable=False),
    Column("amount_micros", BigInteger, nullable=False),
)

# What admission let through under a spending cap this month (micros): one atomic upsert per
# capped pay-per-use CheckQuota, shared by every replica of the database.
spending_cap_admissions = Table(
    "spending_cap_admissions",
    metadata,
    Column("account_id", String(64), primary_key=True),
    Column("month", String(7), primary_key=True),
    Column("admitted_micros", BigInteger, nullable=False),
    # The answer to the last call that wrote the row.
    Column("admitted", Boolean, nullable=False),
)
# Every grant, renewal and revocation of a package, with the state it left: what a what-if
# replay of the real packages needs to see each package as each usage event saw it
# (docs/design/what-if.md). `seq` comes from the same counter as `usage_events.record_seq`.
package_changes = Table(
    "package_changes",
    metadata,
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("package_id", String(40), nullable=False),
    Column("account_id", String(64), nullable=False),
    Column("region", String(64), nullable=False),
    Column("api", String(64), nullable=False),
    # 1 grant, 2 renewal, 3 revocation (`domain/simulation.py`, ChangeKind).
    Column("kind", SmallInteger, nullable=False),
    Column("change_time_us", BigInteger, nullable=False),
    # The package's total quantity and last covered second after the change.
    Column("total_quantity", BigInteger, nullable=False),
    Column("expire_time_us", BigInteger, nullable=False),
    # A renewal of an expired package: its old remainder was forfeited (used = total).
    Column("forfeit", Boolean, nullable=False),
    Index("ix_package_changes_scope", "account_id", "region", "api", "seq"),
)

# The history counter on SQLite (one row, id 1; writers are serialized there). PostgreSQL
# takes the numbers from the sequence `quota_history_seq` instead, which no writer waits on.
history_counter = Table(
    "history_counter",
    metadata,
    Column("id", SmallInteger, primary_key=True, autoincrement=False),
    Column("last_seq", BigInteger, nullable=False),
)
HISTORY_SEQUENCE = "quota_history_seq"
history_sequence = Sequence(HISTORY_SEQUENCE, metadata=metadata)

idempotency_keys = idempotency_table(metadata)
outbox_events, outbox_counter = outbox_tables(metadata)
# The cursor and lease of quota's consumer of billing's stream (account standings).
consumer_cursors, consumer_leases = consumer_tables(metadata)
