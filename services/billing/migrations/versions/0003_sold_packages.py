"""sold packages: the purchase order of each auto_renewals row; orders by package

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26 07:40:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("auto_renewals", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("order_id", sa.String(length=40), server_default="", nullable=False)
        )
    with op.batch_alter_table("orders", schema=None) as batch_op:
        batch_op.create_index("ix_orders_package", ["package_id", "expire_time_us"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("orders", schema=None) as batch_op:
        batch_op.drop_index("ix_orders_package")
    with op.batch_alter_table("auto_renewals", schema=None) as batch_op:
        batch_op.drop_column("order_id")
