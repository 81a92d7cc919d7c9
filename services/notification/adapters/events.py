"""The wire form of notifications: what the outbox carries and the API answers."""

from __future__ import annotations

from typing import TYPE_CHECKING

from allot.notification.v1 import notification_pb2

from services.notification.domain.delivery import SENT
from shared.timeutil import to_timestamp

if TYPE_CHECKING:
    from services.notification.app.notifications import NotificationView


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
    )
