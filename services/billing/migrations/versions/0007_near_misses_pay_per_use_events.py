"""pay-per-use events: the usage events behind each pay-per-use cycle (ExplainBillLine)

Revision ID: 0007_near_misses
Revises: 0006_block_pay_per_use
Create Date: 2026-12-08 09:00:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0007_near_misses"
down_revision = "0006_block_pay_per_use"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "pay_per_use_events",
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("region", sa.String(length=64), nullable=False),
        sa.Column("api", sa.String(length=64), nullable=False),
        sa.Column("cycle_start_us", sa.BigInteger(), nullable=False),
        sa.Column("usage_event_id", sa.String(length=200), nullable=False),
        sa.Column("enterprise_project_id", sa.String(length=64), nullable=False),
        sa.Column("quantity", sa.BigInteger(), nullable=False),
        sa.Column("occur_time_us", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("account_id", "region", "api", "cycle_start_us", "usage_event_id"),
    )


def downgrade() -> None:
    op.drop_table("pay_per_use_events")
