"""auto-replenish: settings and the crossings they acted on

Revision ID: 0009_auto_replenish
Revises: 0008_spending_cap
Create Date: 2026-12-07 14:00:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0009_auto_replenish"
down_revision = "0008_spending_cap"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "auto_replenish",
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("region", sa.String(length=64), nullable=False),
        sa.Column("api", sa.String(length=64), nullable=False),
        sa.Column("offer_id", sa.String(length=64), nullable=False),
        sa.Column("below_quantity", sa.BigInteger(), nullable=False),
        sa.Column("max_per_month", sa.SmallInteger(), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("alert_id", sa.String(length=64), nullable=False),
        sa.Column("last_failure_reason", sa.String(length=500), nullable=False, server_default=""),
        sa.Column("rearm_time_us", sa.BigInteger(), nullable=True),
        sa.Column("rearm_request_id", sa.String(length=64), nullable=False, server_default=""),
        sa.Column("create_time_us", sa.BigInteger(), nullable=False),
        sa.Column("update_time_us", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("account_id", "region", "api"),
    )
    op.create_index("ix_auto_replenish_rearm", "auto_replenish", ["rearm_time_us"])
    op.create_table(
        "auto_replenish_crossings",
        sa.Column("event_id", sa.String(length=200), nullable=False),
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("region", sa.String(length=64), nullable=False),
        sa.Column("api", sa.String(length=64), nullable=False),
        sa.Column("month", sa.String(length=7), nullable=False),
        sa.Column("order_id", sa.String(length=40), nullable=False, server_default=""),
        sa.Column("failure_reason", sa.String(length=500), nullable=False, server_default=""),
        sa.Column("create_time_us", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("event_id"),
    )
    op.create_index(
        "ix_auto_replenish_crossings_month",
        "auto_replenish_crossings",
        ["account_id", "region", "api", "month"],
    )


def downgrade() -> None:
    op.drop_index("ix_auto_replenish_crossings_month", table_name="auto_replenish_crossings")
    op.drop_table("auto_replenish_crossings")
    op.drop_index("ix_auto_replenish_rearm", table_name="auto_replenish")
    op.drop_table("auto_replenish")
