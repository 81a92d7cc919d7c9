"""deliveries.claim_until_us: a delivery being sent is claimed until this wall-clock instant

Revision ID: 0004
Revises: 0003_outbox_filters
Create Date: 2026-12-06 06:00:00.000000

Claims used to push `due_time_us` (service clock) ahead: with the manual clock a send cut short
by a crash stayed claimed until someone moved the clock, and a claimed delivery could not be
told from one waiting for its retry. Claims now have their own column on the wall clock
(docs/faults.md, "Deliveries").
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003_outbox_filters"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.add_column(sa.Column("claim_until_us", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.drop_column("claim_until_us")
