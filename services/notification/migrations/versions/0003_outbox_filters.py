"""outbox filters: the account and region each event is about, for the streams' SQL filters;
notifications by account, type and time (test notifications per contact and hour)

Revision ID: 0003_outbox_filters
Revises: 0002
Create Date: 2026-11-27 09:00:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0003_outbox_filters"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("outbox_events", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("account_id", sa.String(length=64), server_default="", nullable=False)
        )
        batch_op.add_column(
            sa.Column("region", sa.String(length=64), server_default="", nullable=False)
        )
        batch_op.create_index(
            "ix_outbox_events_account_sequence", ["account_id", "sequence"], unique=False
        )
    # Events written before this revision are about an unknown region ('?', no region's
    # name): a region-limited token's stream skips them (fail closed; docs/security.md).
    # Their account is unknown too (''), which only WatchNotifications filters on, and it
    # streams live events only.
    op.execute(sa.text("UPDATE outbox_events SET region = '?'"))
    with op.batch_alter_table("notifications", schema=None) as batch_op:
        batch_op.create_index(
            "ix_notifications_account_type_time",
            ["account_id", "message_type", "create_time_us"],
            unique=False,
        )


def downgrade() -> None:
    with op.batch_alter_table("notifications", schema=None) as batch_op:
        batch_op.drop_index("ix_notifications_account_type_time")
    with op.batch_alter_table("outbox_events", schema=None) as batch_op:
        batch_op.drop_index("ix_outbox_events_account_sequence")
        batch_op.drop_column("region")
        batch_op.drop_column("account_id")
