"""Use cases of contacts: where an account's notifications go."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from services.notification.adapters import contacts_repository as repo
from services.notification.app.context import NotificationContext
from services.notification.domain.addresses import new_webhook_secret, validate_address
from services.notification.domain.contacts import (
    Contact,
    audience,
    check_audience_types,
    check_channel,
    check_contact_id,
    check_message_types,
    check_update_paths,
    contact_not_found,
)
from services.notification.domain.messages import Channel, MessageType
from shared.db import UnitOfWork
from shared.ids import new_id
from shared.validation import check_account_id


@dataclass(frozen=True)
class ContactInput:
    account_id: str
    channel: int
    address: str
    message_types: tuple[int, ...]


async def create_contact(ctx: NotificationContext, uow: UnitOfWork, spec: ContactInput) -> Contact:
    check_account_id(spec.account_id, "contact.account_id")
    channel = check_channel(spec.channel)
    now = ctx.now()
    contact = Contact(
        contact_id=new_id("cnt"),
        account_id=spec.account_id,
        channel=channel,
        address=validate_address(channel, spec.address, any_port=ctx.private_webhooks),
        message_types=check_message_types(spec.message_types),
        webhook_secret=new_webhook_secret() if channel == Channel.WEBHOOK else "",
        create_time=now,
        update_time=now,
    )
    await repo.insert_contact(uow, contact)
    return contact


async def load_contact(uow: UnitOfWork, contact_id: str, for_update: bool = False) -> Contact:
    contact = await repo.get_contact(uow, check_contact_id(contact_id), for_update=for_update)
    if contact is None:
        raise contact_not_found(contact_id)
    return contact


async def get_contact(ctx: NotificationContext, contact_id: str) -> Contact:
    return await ctx.db.read(lambda uow: load_contact(uow, contact_id))


async def list_contacts(
    ctx: NotificationContext, account_id: str, after_id: str | None, limit: int
) -> list[Contact]:
    return await ctx.db.read(lambda uow: repo.list_contacts(uow, account_id, after_id, limit))


async def update_contact(
    ctx: NotificationContext,
    uow: UnitOfWork,
    contact_id: str,
    spec: ContactInput,
    paths: list[str],
    guard,
) -> Contact:
    fields = check_update_paths(paths)
    contact = await load_contact(uow, contact_id, for_update=True)
    guard(contact)
    changes: dict = {"update_time": ctx.now()}
    if "address" in fields:
        changes["address"] = validate_address(
            contact.channel, spec.address, any_port=ctx.private_webhooks
        )
    if "message_types" in fields:
        changes["message_types"] = check_message_types(spec.message_types)
    updated = dataclasses.replace(contact, **changes)
    await repo.save_contact(uow, updated)
    return updated


async def delete_contact(ctx: NotificationContext, uow: UnitOfWork, contact_id: str, guard) -> None:
    """Delete a contact; its pending deliveries are dropped, its delivery history stays."""
    contact = await load_contact(uow, contact_id, for_update=True)
    guard(contact)
    await repo.delete_contact(uow, contact_id)


async def count_audience(
    ctx: NotificationContext, account_id: str, message_types: tuple[int, ...]
) -> list[tuple[MessageType, int]]:
    """CheckAudience: per message type, how many of the account's contacts would hear it."""
    check_account_id(account_id)
    kinds = check_audience_types(message_types)
    every = await ctx.db.read(lambda uow: repo.list_contacts(uow, account_id, None))
    return audience(every, kinds)
