"""notifications.region: the region a notification is about ("" = account-wide)

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27 09:00:00.000000

Lets ListNotifications leave out other regions for a region-limited token in the query
(docs/security.md, "Region scope on every read"). Existing rows take the region from their
webhook data.
"""

import json

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("notifications", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("region", sa.String(length=64), server_default="", nullable=False)
        )
    notifications = sa.table(
        "notifications",
        sa.column("notification_id", sa.String),
        sa.column("data", sa.Text),
        sa.column("region", sa.String),
    )
    bind = op.get_bind()
    rows = bind.execute(sa.select(notifications.c.notification_id, notifications.c.data)).all()
    for notification_id, data in rows:
        try:
            region = json.loads(data).get("region", "")
        except (ValueError, AttributeError):
            region = ""
        if isinstance(region, str) and region:
            bind.execute(
                sa.update(notifications)
                .where(notifications.c.notification_id == notification_id)
                .values(region=region[:64])
            )


def downgrade() -> None:
    with op.batch_alter_table("notifications", schema=None) as batch_op:
        batch_op.drop_column("region")
