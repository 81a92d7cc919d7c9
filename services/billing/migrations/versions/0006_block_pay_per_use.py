"""account settings: block pay-per-use in grace (UpdateAccount)

Revision ID: 0006_block_pay_per_use
Revises: 0005_orders_multi
Create Date: 2026-12-01 09:00:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0006_block_pay_per_use"
down_revision = "0005_orders_multi"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("accounts", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "block_pay_per_use_in_grace",
                sa.Boolean(),
                server_default=sa.false(),
                nullable=False,
            )
        )


def downgrade() -> None:
    with op.batch_alter_table("accounts", schema=None) as batch_op:
        batch_op.drop_column("block_pay_per_use_in_grace")
