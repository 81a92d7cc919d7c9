"""One sender per channel, as the settings choose them: SMTP or the outbox folder for email,
an HTTP gateway or the outbox folder for SMS, signed webhooks."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from services.notification.adapters.folder import FolderSender
from services.notification.adapters.outgoing import Sender
from services.notification.adapters.sms import SmsGatewaySender
from services.notification.adapters.smtp import SmtpSender
from services.notification.adapters.webhooks import WebhookSender
from services.notification.domain.messages import Channel
from shared.settings import Settings

log = logging.getLogger("allot.notification.channels")


def build_senders(settings: Settings) -> dict[int, Sender]:
    """One sender per channel, from ALLOT_SMTP_URL / ALLOT_SMTP_FROM / ALLOT_SMS_GATEWAY_URL
    and ALLOT_WEBHOOK_ALLOW_PRIVATE; without SMTP or a gateway, email and SMS go to
    `<data dir>/outbox/{email,sms}/`."""
    outbox = settings.data_path / "outbox"
    email_sender: Sender
    if settings.smtp_url:
        email_sender = SmtpSender(settings.smtp_url, settings.smtp_from)
    else:
        email_sender = FolderSender(outbox / "email", settings.smtp_from)
    sms_sender: Sender
    if settings.sms_gateway_url:
        sms_sender = SmsGatewaySender(settings.sms_gateway_url)
    else:
        sms_sender = FolderSender(outbox / "sms", settings.smtp_from)
    return {
        Channel.EMAIL: email_sender,
        Channel.SMS: sms_sender,
        Channel.WEBHOOK: WebhookSender(allow_private=settings.webhook_allow_private),
    }


async def close_senders(senders: Mapping[int, Sender]) -> None:
    """Close every sender once; one failing to close does not keep the others open."""
    seen: set[int] = set()
    for sender in senders.values():
        if id(sender) in seen:
            continue
        seen.add(id(sender))
        try:
            await sender.close()
        except Exception:
            log.exception("closing %s failed", type(sender).__name__)
