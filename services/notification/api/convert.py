"""Protobuf <-> notification use-case types."""

from __future__ import annotations

from allot.notification.v1 import notification_pb2

from services.notification.app.contacts import ContactInput
from services.notification.domain.contacts import Contact
from shared.timeutil import to_timestamp


def from_proto_contact(contact: notification_pb2.Contact) -> ContactInput:
    return ContactInput(
        account_id=contact.account_id,
        channel=contact.channel,
        address=contact.address,
        message_types=tuple(contact.message_types),
    )


def to_proto_contact(contact: Contact, with_secret: bool = False) -> notification_pb2.Contact:
    return notification_pb2.Contact(
        contact_id=contact.contact_id,
        account_id=contact.account_id,
        channel=int(contact.channel),
        address=contact.address,
        message_types=[int(m) for m in contact.message_types],
        # The secret is shown once, in the answer to CreateContact.
        webhook_secret=contact.webhook_secret if with_secret else "",
        create_time=to_timestamp(contact.create_time),
        update_time=to_timestamp(contact.update_time),
    )
