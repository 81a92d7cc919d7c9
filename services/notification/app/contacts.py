"""Use cases of contacts: where an account's notifications go."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, insert, select, update

from services.notification.adapters import tables as t
from services.notification.app.context import NotificationContext
from services.notification.domain.addresses import new_webhook_secret, validate_address
from services.notification.domain.delivery import PENDING
from services.notification.domain.messages import Channel, MessageType
from shared.db import UnitOfWork
from shared.errors import InvalidArgument, NotFound
from shared.ids import new_id
from shared.timeutil import from_epoch_us, to_epoch_us
from shared.validation import check_account_id

SUBSCRIBABLE = frozenset(MessageType) - {MessageType.TEST}


@dataclass(frozen=True)
class Contact:
    contact_id: str
    account_id: str
    channel: Channel
    address: str
    message_types: tuple[MessageType, ...]
    webhook_secret: str
    create_time: datetime
    update_time: datetime


@dataclass(frozen=True)
class ContactInput:
    account_id: str
    channel: int
    address: str
    message_types: tuple[int, ...]


def to_contact(row) -> Contact:
    return Contact(
        contact_id=row.contact_id,
        account_id=row.account_id,
        channel=Channel(row.channel),
        address=row.address,
        message_types=tuple(MessageType(int(m)) for m in row.message_types.split(",") if m),
        webhook_secret=row.webhook_secret,
        create_time=from_epoch_us(row.create_time_us),
        update_time=from_epoch_us(row.update_time_us),
    )


def contact_not_found(contact_id: str) -> NotFound:
    return NotFound("CONTACT_NOT_FOUND", f"no contact {contact_id!r}", contact_id=contact_id)


def _channel(value: int) -> Channel:
    try:
        return Channel(value)
    except ValueError:
        raise InvalidArgument("contact.channel", "channel must be EMAIL, SMS or WEBHOOK") from None


def _message_types(values: tuple[int, ...]) -> tuple[MessageType, ...]:
    if not values:
        raise InvalidArgument("contact.message_types", "at least one message type is required")
    out = []
    for value in values:
        try:
            kind = MessageType(value)
        except ValueError:
            kind = None
        if kind not in SUBSCRIBABLE:
            raise InvalidArgument(
                "contact.message_types", f"unknown message type {value}", message_type=value
            )
        if kind not in out:
            out.append(kind)
    return tuple(sorted(out))


def _values(contact: Contact) -> dict:
    return {
        "contact_id": contact.contact_id,
        "account_id": contact.account_id,
        "channel": int(contact.channel),
        "address": contact.address,
        "message_types": ",".join(str(int(m)) for m in contact.message_types),
        "webhook_secret": contact.webhook_secret,
        "create_time_us": to_epoch_us(contact.create_time),
        "update_time_us": to_epoch_us(contact.update_time),
    }


async def create_contact(ctx: NotificationContext, uow: UnitOfWork, spec: ContactInput) -> Contact:
    check_account_id(spec.account_id, "contact.account_id")
    channel = _channel(spec.channel)
    now = ctx.now()
    contact = Contact(
        contact_id=new_id("cnt"),
        account_id=spec.account_id,
        channel=channel,
        address=validate_address(channel, spec.address, any_port=ctx.private_webhooks),
        message_types=_message_types(spec.message_types),
        webhook_secret=new_webhook_secret() if channel == Channel.WEBHOOK else "",
        create_time=now,
        update_time=now,
    )
    await uow.session.execute(insert(t.contacts).values(**_values(contact)))
    return contact


async def load_contact(uow: UnitOfWork, contact_id: str, for_update: bool = False) -> Contact:
    if not contact_id:
        raise InvalidArgument("contact_id", "contact_id is required")
    query = select(t.contacts).where(t.contacts.c.contact_id == contact_id)
    if for_update:
        query = query.with_for_update()
    row = (await uow.session.execute(query)).first()
    if row is None:
        raise contact_not_found(contact_id)
    return to_contact(row)


async def get_contact(ctx: NotificationContext, contact_id: str) -> Contact:
    return await ctx.db.read(lambda uow: load_contact(uow, contact_id))


async def list_contacts(
    ctx: NotificationContext, account_id: str, after_id: str | None, limit: int
) -> list[Contact]:
    c = t.contacts.c
    query = select(t.contacts).where(c.account_id == account_id).order_by(c.contact_id).limit(limit)
    if after_id:
        query = query.where(c.contact_id > after_id)

    async def work(uow: UnitOfWork) -> list[Contact]:
        return [to_contact(r) for r in (await uow.session.execute(query)).all()]

    return await ctx.db.read(work)


UPDATABLE = {"address", "message_types"}


async def update_contact(
    ctx: NotificationContext,
    uow: UnitOfWork,
    contact_id: str,
    spec: ContactInput,
    paths: list[str],
    guard,
) -> Contact:
    unknown = sorted(set(paths) - UPDATABLE)
    if unknown:
        raise InvalidArgument(
            "update_mask", f"cannot update {unknown}; updatable: {sorted(UPDATABLE)}"
        )
    contact = await load_contact(uow, contact_id, for_update=True)
    guard(contact)
    paths = list(paths) or sorted(UPDATABLE)
    changes: dict = {"update_time": ctx.now()}
    if "address" in paths:
        changes["address"] = validate_address(
            contact.channel, spec.address, any_port=ctx.private_webhooks
        )
    if "message_types" in paths:
        changes["message_types"] = _message_types(spec.message_types)
    updated = dataclasses.replace(contact, **changes)
    values = _values(updated)
    values.pop("contact_id")
    await uow.session.execute(
        update(t.contacts).where(t.contacts.c.contact_id == contact_id).values(**values)
    )
    return updated


async def delete_contact(ctx: NotificationContext, uow: UnitOfWork, contact_id: str, guard) -> None:
    """Delete a contact; its pending deliveries are dropped, its delivery history stays."""
    contact = await load_contact(uow, contact_id, for_update=True)
    guard(contact)
    d = t.deliveries.c
    await uow.session.execute(
        delete(t.deliveries).where(d.contact_id == contact_id, d.state == PENDING)
    )
    await uow.session.execute(delete(t.contacts).where(t.contacts.c.contact_id == contact_id))
