"""Notification's tables (SQLAlchemy Core); instants are integer microseconds (UTC)."""

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    String,
    Table,
    Text,
    false,
)

from shared.idempotency import idempotency_table
from shared.outbox import outbox_tables
from shared.streams.lease import consumer_tables

metadata = MetaData()

contacts = Table(
    "contacts",
    metadata,
    Column("contact_id", String(40), primary_key=True),
    Column("account_id", String(64), nullable=False),
    Column("channel", SmallInteger, nullable=False),
    Column("address", String(2048), nullable=False),
    # Comma-separated MessageType numbers, e.g. "1,2,3".
    Column("message_types", String(64), nullable=False),
    Column("webhook_secret", String(128), nullable=False, server_default=""),
    Column("create_time_us", BigInteger, nullable=False),
    Column("update_time_us", BigInteger, nullable=False),
    Index("ix_contacts_account", "account_id"),
)

notifications = Table(
    "notifications",
    metadata,
    Column("notification_id", String(40), primary_key=True),
    Column("account_id", String(64), nullable=False),
    Column("message_type", SmallInteger, nullable=False),
    # The event it was made from: a replayed event finds its notification (exactly one).
    Column("source_event_id", String(64), nullable=True, unique=True),
    Column("subject", String(500), nullable=False),
    Column("body", Text, nullable=False),
    # JSON: the structured fields webhooks carry.
    Column("data", Text, nullable=False),
    Column("create_time_us", BigInteger, nullable=False),
    # The region it is about; "" for account-wide ones (arrears, balance). A region-limited
    # token lists only its regions' and the account-wide ones (docs/security.md).
    Column("region", String(64), nullable=False, server_default=""),
    # No contact of the account was subscribed to the type when it was made: it has no
    # deliveries, nobody was told (docs/design/notification.md, "Unheard notifications").
    Column("unheard", Boolean, nullable=False, server_default=false()),
    Index("ix_notifications_account", "account_id", "notification_id"),
    # An account's notifications of a type in a window (test notifications per hour).
    Index("ix_notifications_account_type_time", "account_id", "message_type", "create_time_us"),
)

deliveries = Table(
    "deliveries",
    metadata,
    Column("notification_id", String(40), primary_key=True),
    Column("contact_id", String(40), primary_key=True),
    Column("channel", SmallInteger, nullable=False),
    Column("state", SmallInteger, nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("last_error", String(1000), nullable=False, server_default=""),
    # PENDING: when the next attempt is due (service clock). SENT: when sent.
    Column("due_time_us", BigInteger, nullable=False),
    Column("deliver_time_us", BigInteger, nullable=True),
    # While a replica sends it: claimed until this wall-clock instant (crash recovery is about
    # real time, whatever the service clock does); NULL when nobody sends it.
    Column("claim_until_us", BigInteger, nullable=True),
    Index("ix_deliveries_due", "state", "due_time_us"),
)

idempotency_keys = idempotency_table(metadata)
outbox_events, outbox_counter = outbox_tables(metadata)
consumer_cursors, consumer_leases = consumer_tables(metadata)
