"""simulation history: the order usage was recorded in, and every grant, renewal and revocation

Revision ID: 0010_simulation_history
Revises: 0009_forecast_alerts
Create Date: 2026-12-07 14:00:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0010_simulation_history"
down_revision = "0009_forecast_alerts"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("CREATE SEQUENCE IF NOT EXISTS quota_history_seq")
    op.add_column("usage_events", sa.Column("record_seq", sa.BigInteger(), nullable=True))
    op.create_index(
        "ix_usage_events_scope_seq", "usage_events", ["account_id", "region", "api", "record_seq"]
    )
    op.create_table(
        "package_changes",
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("package_id", sa.String(length=40), nullable=False),
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("region", sa.String(length=64), nullable=False),
        sa.Column("api", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.SmallInteger(), nullable=False),
        sa.Column("change_time_us", sa.BigInteger(), nullable=False),
        sa.Column("total_quantity", sa.BigInteger(), nullable=False),
        sa.Column("expire_time_us", sa.BigInteger(), nullable=False),
        sa.Column("forfeit", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("seq"),
    )
    op.create_index(
        "ix_package_changes_scope", "package_changes", ["account_id", "region", "api", "seq"]
    )
    op.create_table(
        "history_counter",
        sa.Column("id", sa.SmallInteger(), autoincrement=False, nullable=False),
        sa.Column("last_seq", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    # Events recorded before this revision are numbered by record time (then event id: the
    # order within a batch was not kept), and the counter continues after them.
    op.execute(
        "UPDATE usage_events SET record_seq = numbered.n FROM ("
        " SELECT event_id, row_number() OVER (ORDER BY record_time_us, event_id) AS n"
        " FROM usage_events) AS numbered WHERE usage_events.event_id = numbered.event_id"
    )
    op.execute(
        "INSERT INTO history_counter (id, last_seq)"
        " SELECT 1, coalesce(max(record_seq), 0) FROM usage_events"
    )
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "SELECT setval('quota_history_seq', coalesce(max(record_seq), 0) + 1, false)"
            " FROM usage_events"
        )


def downgrade() -> None:
    op.drop_table("history_counter")
    op.drop_index("ix_package_changes_scope", table_name="package_changes")
    op.drop_table("package_changes")
    op.drop_index("ix_usage_events_scope_seq", table_name="usage_events")
    op.drop_column("usage_events", "record_seq")
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP SEQUENCE IF EXISTS quota_history_seq")
