"""order packages: the packages of each order (several of one offer, or a batch renewal)

Revision ID: 0005_orders_multi
Revises: 0004_outbox_filters
Create Date: 2026-12-07 06:00:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0005_orders_multi"
down_revision = "0004_outbox_filters"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "order_packages",
        sa.Column("order_id", sa.String(length=40), nullable=False),
        sa.Column("position", sa.SmallInteger(), nullable=False),
        sa.Column("package_id", sa.String(length=40), server_default="", nullable=False),
        sa.Column("effective_time_us", sa.BigInteger(), nullable=False),
        sa.Column("expire_time_us", sa.BigInteger(), nullable=False),
        sa.Column("amount_micros", sa.BigInteger(), nullable=False),
        sa.Column("quantity", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("order_id", "position"),
    )
    op.create_index(
        "ix_order_packages_package",
        "order_packages",
        ["package_id", "expire_time_us"],
        unique=False,
    )
    # Every order placed before this revision has one package: its row says so.
    op.execute(
        "INSERT INTO order_packages (order_id, position, package_id, effective_time_us,"
        " expire_time_us, amount_micros, quantity)"
        " SELECT order_id, 0, package_id, effective_time_us, expire_time_us, amount_micros,"
        " quantity FROM orders"
    )


def downgrade() -> None:
    op.drop_index("ix_order_packages_package", table_name="order_packages")
    op.drop_table("order_packages")
