"""The wire form of notifications: what the outbox carries and the API answers."""

from __future__ import annotations

from datetime import datetime

from allot.notification.v1 import notification_pb2

from services.notification.domain.delivery import SENT
from services.notification.domain.notifications import NotificationView
from shared.db import UnitOfWork
from shared.outbox import Outbox
from shared.timeutil import to_timestamp


def to_proto_notification(view: NotificationView) -> notification_pb2.Notification:
    return notification_pb2.Notification(
        notification_id=view.notification_id,
        account_id=view.account_id,
        message_type=int(view.message_type),
        source_event_id=view.source_event_id,
        subject=view.subject,
        body=view.body,
        create_time=to_timestamp(view.create_time),
        deliveries=[
            notification_pb2.Delivery(
                contact_id=d.contact_id,
                channel=d.channel,
                state=d.state,
                attempts=d.attempts,
                last_error=d.last_error,
                deliver_time=to_timestamp(
                    d.deliver_time if d.state == SENT and d.deliver_time else d.due_time
                ),
            )
            for d in view.deliveries
        ],
        unheard=view.unheard,
    )


class NotificationEvents:
    """Notification's events, staged in the outbox in the transaction that causes them."""

    def __init__(self, outbox: Outbox[notification_pb2.NotificationEvent]) -> None:
        self.outbox = outbox

    def notification_created(
        self, uow: UnitOfWork, view: NotificationView, region: str, now: datetime
    ) -> str:
        return self.outbox.add(
            uow,
            "notification_created",
            notification_pb2.NotificationCreated(notification=to_proto_notification(view)),
            now,
            account_id=view.account_id,
            # Regional messages (usage alerts, packages, orders) carry their region; account-level
            # ones (arrears, balance) have none and are visible to every region.
            region=region,
        )
