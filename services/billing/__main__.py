"""`python -m services.billing`: run the billing service."""

from services.billing.service import BillingService
from shared.server import run_service

if __name__ == "__main__":
    run_service("billing", BillingService)
