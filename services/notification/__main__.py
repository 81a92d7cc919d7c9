"""`python -m services.notification`: run the notification service."""

from services.notification.service import NotificationService
from shared.server import run_service

if __name__ == "__main__":
    run_service("notification", NotificationService)
