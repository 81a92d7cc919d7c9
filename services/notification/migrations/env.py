"""Alembic environment of the notification service (the shared runner does the work)."""

from services.notification.adapters.tables import metadata
from shared.migrations import run_env

run_env(metadata)
