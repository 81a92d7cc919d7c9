"""notifications.unheard: a notification no contact was subscribed to

Revision ID: 0005_overview
Revises: 0004
Create Date: 2026-12-07 06:00:00.000000

A crossing (or any other event) of an account without a contact for its message type used to
leave a notification with no deliveries and nothing to tell it apart; it is now marked, so
ListNotifications shows what nobody heard (docs/design/notification.md, "Unheard
notifications"). Existing notifications without deliveries (test notifications aside, they
always have their one contact) are marked too.
"""

import sqlalchemy as sa
from alembic import op

revision = "0005_overview"
down_revision = "0004"
branch_labels = None
depends_on = None

# MessageType.TEST: always sent to the one contact it names.
TEST = 8


def upgrade() -> None:
    with op.batch_alter_table("notifications", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("unheard", sa.Boolean(), server_default=sa.false(), nullable=False)
        )
    notifications = sa.table(
        "notifications",
        sa.column("notification_id", sa.String),
        sa.column("message_type", sa.SmallInteger),
        sa.column("unheard", sa.Boolean),
    )
    deliveries = sa.table("deliveries", sa.column("notification_id", sa.String))
    op.execute(
        notifications.update()
        .where(
            notifications.c.message_type != TEST,
            ~sa.exists().where(deliveries.c.notification_id == notifications.c.notification_id),
        )
        .values(unheard=True)
    )


def downgrade() -> None:
    with op.batch_alter_table("notifications", schema=None) as batch_op:
        batch_op.drop_column("unheard")
