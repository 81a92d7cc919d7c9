"""forecast alerts: usage alert rules on the depletion and forfeiture forecasts

Revision ID: 0009_forecast_alerts
Revises: 0008_spending_cap
Create Date: 2026-12-07 14:10:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0009_forecast_alerts"
down_revision = "0008_spending_cap"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("usage_alerts") as batch:
        batch.add_column(sa.Column("threshold_depletion_days", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("threshold_forfeiture_quantity", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("forecast_check_time_us", sa.BigInteger(), nullable=True))
        batch.create_index("ix_usage_alerts_forecast_check", ["forecast_check_time_us"])


def downgrade() -> None:
    with op.batch_alter_table("usage_alerts") as batch:
        batch.drop_index("ix_usage_alerts_forecast_check")
        batch.drop_column("forecast_check_time_us")
        batch.drop_column("threshold_forfeiture_quantity")
        batch.drop_column("threshold_depletion_days")
