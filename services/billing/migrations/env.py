"""Alembic environment of the billing service (the shared runner does the work)."""

from services.billing.adapters.tables import metadata
from shared.migrations import run_env

run_env(metadata)
