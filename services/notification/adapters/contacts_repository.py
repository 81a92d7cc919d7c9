"""Contacts in the database: rows <-> `Contact`, in the unit of work's transaction."""

from __future__ import annotations

from sqlalchemy import delete, insert, select, update

from services.notification.adapters import tables as t
from services.notification.domain.contacts import Contact
from services.notification.domain.delivery import PENDING
from services.notification.domain.messages import Channel, MessageType
from shared.db import UnitOfWork
from shared.timeutil import from_epoch_us, to_epoch_us


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


async def insert_contact(uow: UnitOfWork, contact: Contact) -> None:
    await uow.session.execute(insert(t.contacts).values(**_values(contact)))


async def save_contact(uow: UnitOfWork, contact: Contact) -> None:
    values = _values(contact)
    values.pop("contact_id")
    await uow.session.execute(
        update(t.contacts).where(t.contacts.c.contact_id == contact.contact_id).values(**values)
    )


async def get_contact(uow: UnitOfWork, contact_id: str, for_update: bool = False) -> Contact | None:
    query = select(t.contacts).where(t.contacts.c.contact_id == contact_id)
    if for_update:
        query = query.with_for_update()
    row = (await uow.session.execute(query)).first()
    return to_contact(row) if row is not None else None


async def list_contacts(
    uow: UnitOfWork, account_id: str, after_id: str | None, limit: int | None = None
) -> list[Contact]:
    """The account's contacts in id order, after `after_id`, at most `limit` of them."""
    c = t.contacts.c
    query = select(t.contacts).where(c.account_id == account_id).order_by(c.contact_id)
    if limit is not None:
        query = query.limit(limit)
    if after_id:
        query = query.where(c.contact_id > after_id)
    return [to_contact(r) for r in await uow.rows(query)]


async def delete_contact(uow: UnitOfWork, contact_id: str) -> None:
    """Delete a contact and its pending deliveries; its delivery history stays."""
    d = t.deliveries.c
    await uow.session.execute(
        delete(t.deliveries).where(d.contact_id == contact_id, d.state == PENDING)
    )
    await uow.session.execute(delete(t.contacts).where(t.contacts.c.contact_id == contact_id))
