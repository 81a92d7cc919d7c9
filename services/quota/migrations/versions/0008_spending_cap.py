"""spending caps: the cap in the standing projection, the month's pay-per-use, admissions

Revision ID: 0008_spending_cap
Revises: 0007_rate_limits
Create Date: 2026-12-07 14:00:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0008_spending_cap"
down_revision = "0007_rate_limits"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("account_standings", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "monthly_spending_cap_micros",
                sa.BigInteger(),
                server_default="0",
                nullable=False,
            )
        )
        batch_op.add_column(
            sa.Column("settled_pay_per_use", sa.Text(), server_default="", nullable=False)
        )
    op.create_table(
        "pay_per_use_months",
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("month", sa.String(length=7), nullable=False),
        sa.Column("region", sa.String(length=64), nullable=False),
        sa.Column("api", sa.String(length=64), nullable=False),
        sa.Column("quantity", sa.BigInteger(), nullable=False),
        sa.Column("amount_micros", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("account_id", "month", "region", "api"),
    )
    op.create_table(
        "spending_cap_admissions",
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("month", sa.String(length=7), nullable=False),
        sa.Column("admitted_micros", sa.BigInteger(), nullable=False),
        sa.Column("admitted", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("account_id", "month"),
    )


def downgrade() -> None:
    op.drop_table("spending_cap_admissions")
    op.drop_table("pay_per_use_months")
    with op.batch_alter_table("account_standings", schema=None) as batch_op:
        batch_op.drop_column("settled_pay_per_use")
        batch_op.drop_column("monthly_spending_cap_micros")
