"""account standings: the pay-per-use block in grace and the enterprise master

Revision ID: 0006_standing_settings
Revises: 0005_packages_scope_expiry
Create Date: 2026-12-01 09:00:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0006_standing_settings"
down_revision = "0005_packages_scope_expiry"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("account_standings", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "block_pay_per_use_in_grace",
                sa.Boolean(),
                server_default=sa.false(),
                nullable=False,
            )
        )
        batch_op.add_column(
            sa.Column("master_account_id", sa.String(length=64), server_default="", nullable=False)
        )
        batch_op.create_index("ix_account_standings_master", ["master_account_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("account_standings", schema=None) as batch_op:
        batch_op.drop_index("ix_account_standings_master")
        batch_op.drop_column("master_account_id")
        batch_op.drop_column("block_pay_per_use_in_grace")
