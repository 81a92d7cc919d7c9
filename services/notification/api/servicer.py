"""allot.notification.v1.NotificationService: requests in, use cases called, responses out."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TypeVar

from allot.notification.v1 import (
    notification_pb2,
    notification_service_pb2,
    notification_service_pb2_grpc,
)
from google.protobuf import empty_pb2

from services.notification.api import convert
from services.notification.app import contacts, notifications
from services.notification.app.context import NotificationContext
from shared.auth import current_principal
from shared.errors import NotFound, PermissionDenied
from shared.idempotency import IdempotencyStore
from shared.pagination import decode_page_token, encode_page_token, page_size
from shared.validation import check_account_id

T = TypeVar("T")
NOT_YOURS = "the token may not read this resource"


def _check_account(account_id: str) -> None:
    if not current_principal().may_act_for(account_id):
        raise PermissionDenied(NOT_YOURS)


def _check_contact(contact: contacts.Contact) -> None:
    _check_account(contact.account_id)


async def _hiding_absence(call: Awaitable[T]) -> T:
    """Account principals get the same PERMISSION_DENIED for ids that do not exist as for other
    accounts' resources; operators get NOT_FOUND."""
    try:
        return await call
    except NotFound:
        if current_principal().is_operator:
            raise
        raise PermissionDenied(NOT_YOURS) from None


class NotificationServicer(notification_service_pb2_grpc.NotificationServiceServicer):
    def __init__(self, ctx: NotificationContext, idempotency: IdempotencyStore, kick) -> None:
        self.ctx = ctx
        self.idempotency = idempotency
        self.kick = kick  # wakes the delivery worker

    async def _idempotent(self, scope, request, response_type, work):
        return await self.idempotency.run(
            self.ctx.db, scope, request, response_type, work, self.ctx.now
        )

    # --- contacts -------------------------------------------------------------------------

    async def CreateContact(self, request, context):
        spec = convert.from_proto_contact(request.contact)

        async def work(uow):
            contact = await contacts.create_contact(self.ctx, uow, spec)
            return convert.to_proto_contact(contact, with_secret=True)

        return await self._idempotent("CreateContact", request, notification_pb2.Contact, work)

    async def GetContact(self, request, context):
        contact = await _hiding_absence(contacts.get_contact(self.ctx, request.contact_id))
        _check_contact(contact)
        return convert.to_proto_contact(contact)

    async def ListContacts(self, request, context):
        account_id = check_account_id(current_principal().scoped_account(request.account_id))
        after = decode_page_token(request)
        limit = page_size(request.page_size)
        found = await contacts.list_contacts(
            self.ctx, account_id, after[0] if after else None, limit + 1
        )
        response = notification_service_pb2.ListContactsResponse(
            contacts=[convert.to_proto_contact(c) for c in found[:limit]]
        )
        if len(found) > limit:
            response.next_page_token = encode_page_token([found[limit - 1].contact_id], request)
        return response

    async def UpdateContact(self, request, context):
        spec = convert.from_proto_contact(request.contact)
        paths = list(request.update_mask.paths)

        async def work(uow):
            contact = await contacts.update_contact(
                self.ctx, uow, request.contact.contact_id, spec, paths, _check_contact
            )
            return convert.to_proto_contact(contact)

        return await _hiding_absence(
            self._idempotent("UpdateContact", request, notification_pb2.Contact, work)
        )

    async def DeleteContact(self, request, context):
        async def work(uow):
            await contacts.delete_contact(self.ctx, uow, request.contact_id, _check_contact)
            return empty_pb2.Empty()

        return await _hiding_absence(self.ctx.db.transaction(work))

    # --- notifications --------------------------------------------------------------------

    async def ListNotifications(self, request, context):
        account_id = check_account_id(current_principal().scoped_account(request.account_id))
        before = decode_page_token(request)
        limit = page_size(request.page_size)
        views = await notifications.list_notifications(
            self.ctx,
            account_id,
            list(request.message_types),
            before[0] if before else None,
            limit + 1,
        )
        response = notification_service_pb2.ListNotificationsResponse(
            notifications=[convert.to_proto_notification(v) for v in views[:limit]]
        )
        if len(views) > limit:
            response.next_page_token = encode_page_token(
                [views[limit - 1].notification_id], request
            )
        return response

    async def WatchNotifications(self, request, context):
        account_id = check_account_id(current_principal().scoped_account(request.account_id))
        after = await self.ctx.outbox.last_sequence()
        async for event in self.ctx.outbox.watch(
            after, ["notification_created"], stopped=context.done
        ):
            notification = event.notification_created.notification
            if notification.account_id == account_id:
                yield notification

    async def RetryDelivery(self, request, context):
        async def work(uow):
            view = await notifications.load_view(uow, request.notification_id)
            _check_account(view.account_id)
            await notifications.retry_delivery(
                self.ctx, uow, request.notification_id, request.contact_id
            )
            return convert.to_proto_notification(
                await notifications.load_view(uow, request.notification_id)
            )

        response = await _hiding_absence(self.ctx.db.transaction(work))
        self.kick()
        return response

    async def SendTestNotification(self, request, context):
        async def work(uow):
            contact = await contacts.load_contact(uow, request.contact_id)
            _check_contact(contact)
            notification_id = await notifications.send_test(self.ctx, uow, contact)
            return convert.to_proto_notification(
                await notifications.load_view(uow, notification_id)
            )

        response = await _hiding_absence(self.ctx.db.transaction(work))
        self.kick()
        return response
