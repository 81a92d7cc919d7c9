"""`python -m services.quota`: run the quota service with settings from the environment."""

from services.quota.service import QuotaService
from shared.server import run_service

if __name__ == "__main__":
    run_service("quota", QuotaService)
