"""allot.notification.v1.NotificationService: requests in, use cases called, responses out."""

from __future__ import annotations

from allot.notification.v1 import (
    notification_pb2,
    notification_service_pb2,
    notification_service_pb2_grpc,
)
from google.protobuf import empty_pb2

from services.notification.adapters.events import to_proto_notification
from services.notification.api import convert
from services.notification.app import contacts, deliveries, notifications
from services.notification.app.context import NotificationContext
from services.notification.domain.contacts import Contact
from services.notification.domain.notifications import check_delivery_key
from shared.auth import check_scope, current_principal, hiding_absence
from shared.idempotency import IdempotencyStore
from shared.pagination import paged
from shared.validation import check_account_id


def _check_contact(contact: Contact) -> None:
    check_scope(contact.account_id)


def _without_secret(contact: notification_pb2.Contact) -> notification_pb2.Contact:
    """What a CreateContact replay answers: the contact, never its webhook secret."""
    kept = notification_pb2.Contact()
    kept.CopyFrom(contact)
    kept.ClearField("webhook_secret")
    return kept


class NotificationServicer(notification_service_pb2_grpc.NotificationServiceServicer):
    def __init__(self, ctx: NotificationContext, idempotency: IdempotencyStore, kick) -> None:
        self.ctx = ctx
        self._idempotent = idempotency.bound(ctx.db, ctx.now)
        self.kick = kick  # wakes the delivery worker

    # --- contacts -------------------------------------------------------------------------

    async def CreateContact(self, request, context):
        spec = convert.from_proto_contact(request.contact)

        async def work(uow):
            contact = await contacts.create_contact(self.ctx, uow, spec)
            return convert.to_proto_contact(contact, with_secret=True)

        # The webhook secret is shown once: a replay answers the contact without it
        # (docs/security.md).
        return await self._idempotent(
            "CreateContact", request, notification_pb2.Contact, work, stored=_without_secret
        )

    async def GetContact(self, request, context):
        contact = await hiding_absence(contacts.get_contact(self.ctx, request.contact_id))
        _check_contact(contact)
        return convert.to_proto_contact(contact)

    async def ListContacts(self, request, context):
        account_id = check_account_id(current_principal().scoped_account(request.account_id))
        page, token = await paged(
            request,
            lambda after, limit: contacts.list_contacts(
                self.ctx, account_id, after[0] if after else None, limit
            ),
            lambda c: [c.contact_id],
        )
        return notification_service_pb2.ListContactsResponse(
            contacts=[convert.to_proto_contact(c) for c in page], next_page_token=token
        )

    async def UpdateContact(self, request, context):
        spec = convert.from_proto_contact(request.contact)
        paths = list(request.update_mask.paths)

        async def work(uow):
            contact = await contacts.update_contact(
                self.ctx, uow, request.contact.contact_id, spec, paths, _check_contact
            )
            return convert.to_proto_contact(contact)

        return await hiding_absence(
            self._idempotent("UpdateContact", request, notification_pb2.Contact, work)
        )

    async def DeleteContact(self, request, context):
        async def work(uow):
            await contacts.delete_contact(self.ctx, uow, request.contact_id, _check_contact)
            return empty_pb2.Empty()

        return await hiding_absence(self.ctx.db.transaction(work))

    # --- notifications --------------------------------------------------------------------

    async def ListNotifications(self, request, context):
        principal = current_principal()
        account_id = check_account_id(principal.scoped_account(request.account_id))
        # Newest first: the token's key is the last (oldest) notification of the page.
        page, token = await paged(
            request,
            lambda before, limit: notifications.list_notifications(
                self.ctx,
                account_id,
                list(request.message_types),
                before[0] if before else None,
                limit,
                principal.regions,
            ),
            lambda v: [v.notification_id],
        )
        return notification_service_pb2.ListNotificationsResponse(
            notifications=[to_proto_notification(v) for v in page], next_page_token=token
        )

    async def WatchNotifications(self, request, context):
        principal = current_principal()
        account_id = check_account_id(principal.scoped_account(request.account_id))
        after = await self.ctx.outbox.last_sequence()
        # Filtered in SQL: the account's notifications, of the token's regions or of none
        # (arrears, balance): docs/security.md.
        async for event in self.ctx.outbox.watch(
            after,
            ["notification_created"],
            stopped=context.done,
            account_id=account_id,
            regions=principal.regions,
        ):
            yield event.notification_created.notification

    async def RetryDelivery(self, request, context):
        check_delivery_key(request.notification_id, request.contact_id)

        async def work(uow):
            view = await notifications.load_view(uow, request.notification_id)
            check_scope(view.account_id)
            await deliveries.retry_delivery(
                self.ctx, uow, request.notification_id, request.contact_id
            )
            return to_proto_notification(
                await notifications.load_view(uow, request.notification_id)
            )

        response = await hiding_absence(self.ctx.db.transaction(work))
        self.kick()
        return response

    async def SendTestNotification(self, request, context):
        async def work(uow):
            contact = await contacts.load_contact(uow, request.contact_id)
            _check_contact(contact)
            notification_id = await notifications.send_test(self.ctx, uow, contact)
            return to_proto_notification(await notifications.load_view(uow, notification_id))

        response = await hiding_absence(self.ctx.db.transaction(work))
        self.kick()
        return response

    async def CheckAudience(self, request, context):
        counted = await contacts.count_audience(
            self.ctx, request.account_id, tuple(request.message_types)
        )
        return notification_service_pb2.CheckAudienceResponse(
            audiences=[
                notification_service_pb2.Audience(message_type=int(kind), contact_count=count)
                for kind, count in counted
            ]
        )
