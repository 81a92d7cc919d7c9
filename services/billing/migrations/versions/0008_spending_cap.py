"""account settings: monthly pay-per-use spending cap (SetSpendingCap)

Revision ID: 0008_spending_cap
Revises: 0007_near_misses
Create Date: 2026-12-07 14:00:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0008_spending_cap"
down_revision = "0007_near_misses"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("accounts", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "monthly_spending_cap_micros",
                sa.BigInteger(),
                server_default="0",
                nullable=False,
            )
        )


def downgrade() -> None:
    with op.batch_alter_table("accounts", schema=None) as batch_op:
        batch_op.drop_column("monthly_spending_cap_micros")
