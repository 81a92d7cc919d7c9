"""packages: the scope index ends with the expiry, so the hot path's read of the packages that
can still pay skips an account's expired ones (docs/design/scale.md)

Revision ID: 0005_packages_scope_expiry
Revises: 0004_outbox_filters
Create Date: 2026-12-07 06:00:00.000000
"""

from alembic import op

revision = "0005_packages_scope_expiry"
down_revision = "0004_outbox_filters"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("packages", schema=None) as batch_op:
        batch_op.drop_index("ix_packages_scope")
        batch_op.create_index(
            "ix_packages_scope_expire", ["account_id", "region", "api", "expire_time_us"]
        )


def downgrade() -> None:
    with op.batch_alter_table("packages", schema=None) as batch_op:
        batch_op.drop_index("ix_packages_scope_expire")
        batch_op.create_index("ix_packages_scope", ["account_id", "region", "api"])
