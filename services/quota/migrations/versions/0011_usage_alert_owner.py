"""usage alert owner: rules the system keeps on an account's behalf (UsageAlert.owner)

Revision ID: 0011_usage_alert_owner
Revises: 0010_simulation_history
Create Date: 2026-12-07 15:00:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0011_usage_alert_owner"
down_revision = "0010_simulation_history"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Every existing rule is the customer's own (''): rules billing made for auto-replenish
    # settings before this revision stay unowned (docs/design/auto-replenish.md).
    with op.batch_alter_table("usage_alerts") as batch:
        batch.add_column(
            sa.Column("owner", sa.String(length=40), nullable=False, server_default="")
        )


def downgrade() -> None:
    with op.batch_alter_table("usage_alerts") as batch:
        batch.drop_column("owner")
