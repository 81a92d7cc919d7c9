"""Billing's one question to the notification service: who would hear a message type
(``CheckAudience``), asked for the account overview's usage alerts nobody hears.

The answer is an aid, not a must: every failure (notification down, slow, refusing billing's
credentials, not configured) is ``None``, "unknown", and the overview says so
(docs/design/billing.md, "Account overview").
"""

from __future__ import annotations

import logging

import grpc
from allot.notification.v1 import notification_pb2, notification_service_pb2
from allot.notification.v1 import notification_service_pb2_grpc as notification_grpc

from shared.tls import Channels
from shared.tokens import TokenSigner, internal_metadata

log = logging.getLogger("allot.billing.notification")

# Notification not answering within this is "unknown": the overview does not wait for it.
CALL_TIMEOUT = 3.0
USAGE_ALERT = notification_pb2.MESSAGE_TYPE_USAGE_ALERT


class NotificationClient:
    def __init__(self, addr: str, channels: Channels, signer: TokenSigner | None) -> None:
        self.addr = addr  # empty: billing runs without notification
        self._channels = channels
        self._metadata = internal_metadata(signer, "billing")

    async def usage_alert_audience(
        self, account_id: str, within: float = CALL_TIMEOUT
    ) -> int | None:
        """How many contacts of the account hear usage alerts; None when nobody could tell."""
        if not self.addr:
            return None
        stub = notification_grpc.NotificationServiceStub(self._channels.get(self.addr))
        try:
            response = await stub.CheckAudience(
                notification_service_pb2.CheckAudienceRequest(
                    account_id=account_id, message_types=[USAGE_ALERT]
                ),
                metadata=self._metadata(),
                timeout=within,
            )
        except grpc.aio.AioRpcError as error:
            log.warning(
                "notification at %s did not tell the audience of %s (%s: %s)",
                self.addr,
                account_id,
                error.code().name,
                error.details(),
            )
            return None
        return sum(a.contact_count for a in response.audiences if a.message_type == USAGE_ALERT)
