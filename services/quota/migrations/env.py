"""Alembic environment of the quota service (the shared runner does the work)."""

from services.quota.adapters.tables import metadata
from shared.migrations import run_env

run_env(metadata)
