"""Contacts and the notification RPCs that need no quota (docs/design/notification.md):
CRUD with update masks and pages, addresses validated per channel (INVALID_ARGUMENT naming the
field), the webhook secret shown once, who may call what, SendTestNotification to one contact,
and the notification list.

An in-process notification server per test on SQLite and PostgreSQL (manual clock), sending
email to a real SMTP server on loopback; its quota consumer points at a closed port (no
quota needed here) and just keeps retrying in the background.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta

import grpc
import pytest

from services.notification.app.notifications import take
from services.notification.domain.messages import (
    PackageExhausted,
    PackageExpiring,
    StandingChanged,
    UsageAlertFired,
    compose,
)
from tests.support.calls import expect_error
from tests.support.notification import (
    ARREARS,
    EMAIL,
    FAILED,
    PACKAGE_EXPIRING,
    PENDING,
    SENT,
    SMS,
    TEST,
    USAGE_ALERT,
    WEBHOOK,
    NotificationCalls,
    contact,
    deliveries,
    notification_settings,
    running_notification,
)
from tests.support.receivers import closed_port, http_receiver, smtp_receiver

ACCOUNT = "acct-1"
OTHER = "acct-2"
INVALID = grpc.StatusCode.INVALID_ARGUMENT
DENIED = grpc.StatusCode.PERMISSION_DENIED
NOT_FOUND = grpc.StatusCode.NOT_FOUND
EXPIRY = datetime(2024, 3, 1, tzinfo=UTC)


@pytest.fixture
def smtp():
    with smtp_receiver() as inbox:
        yield inbox


@pytest.fixture
async def n(database_url, tmp_path, smtp) -> NotificationCalls:
    settings = notification_settings(
        database_url,
        tmp_path,
        f"127.0.0.1:{closed_port()}",
        smtp_url=smtp.url(),
        delivery_backoff="10",
        delivery_max_attempts="3",
    )
    async with running_notification(settings) as handle:
        yield handle.calls


# --- CRUD --------------------------------------------------------------------------------


async def test_contacts_are_created_read_updated_and_deleted(n):
    own = n.account(ACCOUNT)
    created = await n.create(
        ACCOUNT, EMAIL, "  Ops.Team@Example.COM ", [ARREARS, USAGE_ALERT, USAGE_ALERT], own
    )
    assert created.contact_id
    assert (created.account_id, created.channel) == (ACCOUNT, EMAIL)
    assert created.address == "Ops.Team@example.com"  # trimmed, domain lower-cased
    assert list(created.message_types) == [USAGE_ALERT, ARREARS]  # de-duplicated, sorted
    assert created.webhook_secret == ""
    assert created.HasField("create_time") and created.HasField("update_time")
    assert await n.get_contact(created.contact_id, own) == created

    sms = await n.create(ACCOUNT, SMS, "+1 (415) 555-0100", [PACKAGE_EXPIRING], own)
    assert sms.address == "+14155550100"

    # update_mask names what changes; the rest stays.
    moved = await n.update_contact(
        contact(ACCOUNT, EMAIL, "alerts@example.org", [TEST], created.contact_id),
        ["address"],
        metadata=own,
    )
    assert moved.address == "alerts@example.org"
    assert list(moved.message_types) == [USAGE_ALERT, ARREARS]
    assert moved.channel == EMAIL and moved.create_time == created.create_time
    retyped = await n.update_contact(
        contact(ACCOUNT, EMAIL, "", [ARREARS], created.contact_id), ["message_types"], metadata=own
    )
    assert (retyped.address, list(retyped.message_types)) == ("alerts@example.org", [ARREARS])
    # An empty mask replaces both.
    both = await n.update_contact(
        contact(ACCOUNT, EMAIL, "x@example.net", [USAGE_ALERT], created.contact_id), metadata=own
    )
    assert (both.address, list(both.message_types)) == ("x@example.net", [USAGE_ALERT])
    assert await n.get_contact(created.contact_id, own) == both

    listed = await n.list_contacts(metadata=own)  # account tokens default to their account
    assert sorted(c.contact_id for c in listed.contacts) == sorted(
        [created.contact_id, sms.contact_id]
    )
    assert listed.next_page_token == ""

    await n.delete_contact(created.contact_id, own)
    await expect_error(n.get_contact(created.contact_id, own), DENIED, "PERMISSION_DENIED")
    await expect_error(n.get_contact(created.contact_id), NOT_FOUND, "CONTACT_NOT_FOUND")
    await expect_error(n.delete_contact(created.contact_id), NOT_FOUND, "CONTACT_NOT_FOUND")
    assert [c.contact_id for c in (await n.list_contacts(ACCOUNT)).contacts] == [sms.contact_id]


async def test_the_webhook_secret_is_returned_by_create_contact_only(n):
    with http_receiver() as hook:
        created = await n.create(ACCOUNT, WEBHOOK, hook.url(), [USAGE_ALERT])
        assert created.webhook_secret.startswith("whsec_")
        assert len(created.webhook_secret) > 30
        other = await n.create(ACCOUNT, WEBHOOK, hook.url("/other"), [USAGE_ALERT])
        assert other.webhook_secret not in ("", created.webhook_secret)

        assert (await n.get_contact(created.contact_id)).webhook_secret == ""
        listed = await n.list_contacts(ACCOUNT)
        assert [c.webhook_secret for c in listed.contacts] == ["", ""]
        updated = await n.update_contact(
            contact(ACCOUNT, WEBHOOK, "https://hooks.example.com/allot", [], created.contact_id),
            ["address"],
        )
        assert updated.address == "https://hooks.example.com/allot"
        assert updated.webhook_secret == ""


async def test_update_mask_names_only_address_and_message_types(n):
    created = await n.create(ACCOUNT, EMAIL, "ops@example.com")
    for paths in (["channel"], ["account_id"], ["webhook_secret"], ["address", "nope"]):
        await expect_error(
            n.update_contact(
                contact(OTHER, WEBHOOK, "ops@example.com", [USAGE_ALERT], created.contact_id),
                paths,
            ),
            INVALID,
            "INVALID_FIELD",
            "update_mask",
        )
    await expect_error(
        n.update_contact(
            contact(ACCOUNT, EMAIL, "not an address", [], created.contact_id), ["address"]
        ),
        INVALID,
        "INVALID_FIELD",
        "contact.address",
    )
    await expect_error(
        n.update_contact(contact(ACCOUNT, EMAIL, "", [], created.contact_id), ["message_types"]),
        INVALID,
        "INVALID_FIELD",
        "contact.message_types",
    )
    assert await n.get_contact(created.contact_id) == created


async def test_contacts_are_listed_in_pages(n):
    mine = {(await n.create(ACCOUNT, EMAIL, f"p{i}@example.com")).contact_id for i in range(7)}
    theirs = (await n.create(OTHER, EMAIL, "them@example.com")).contact_id

    seen: list[str] = []
    token = ""
    sizes = []
    for _ in range(10):
        page = await n.list_contacts(ACCOUNT, page_size=3, page_token=token)
        sizes.append(len(page.contacts))
        seen.extend(c.contact_id for c in page.contacts)
        assert all(c.account_id == ACCOUNT for c in page.contacts)
        token = page.next_page_token
        if not token:
            break
    assert sizes == [3, 3, 1]
    assert len(seen) == len(set(seen)) and set(seen) == mine
    assert theirs not in seen

    first = await n.list_contacts(ACCOUNT, page_size=3)
    await expect_error(
        n.list_contacts(OTHER, page_size=3, page_token=first.next_page_token),
        INVALID,
        "INVALID_FIELD",
        "page_token",
    )
    await expect_error(
        n.list_contacts(ACCOUNT, page_size=-1), INVALID, "INVALID_FIELD", "page_size"
    )


async def test_create_contact_is_idempotent_by_request_id(n):
    spec = contact(ACCOUNT, EMAIL, "ops@example.com")
    first = await n.create_contact(spec, request_id="req-1")
    again = await n.create_contact(spec, request_id="req-1")
    assert again == first
    assert len((await n.list_contacts(ACCOUNT)).contacts) == 1
    await expect_error(
        n.create_contact(contact(ACCOUNT, EMAIL, "other@example.com"), request_id="req-1"),
        INVALID,
        "REQUEST_ID_REUSED",
    )


async def test_a_replayed_create_contact_answers_without_the_webhook_secret(n):
    """Regression: the stored reply held the secret, so "shown once" did not hold."""
    own = n.account(ACCOUNT)
    with http_receiver() as hook:
        spec = contact(ACCOUNT, WEBHOOK, hook.url(), [USAGE_ALERT])
        first = await n.create_contact(spec, request_id="hook-1", metadata=own)
        assert first.webhook_secret.startswith("whsec_")
        replay = await n.create_contact(spec, request_id="hook-1", metadata=own)
        assert replay.webhook_secret == ""
        assert replay.contact_id == first.contact_id
        expected = type(first)()
        expected.CopyFrom(first)
        expected.webhook_secret = ""
        assert replay == expected
        assert len((await n.list_contacts(ACCOUNT)).contacts) == 1


async def test_request_ids_of_contacts_belong_to_the_calling_account(n):
    """Regression: another account sending the owner's exact UpdateContact (same request_id)
    got the contact back, and could reserve the owner's request ids."""
    own, stranger = n.account(ACCOUNT), n.account(OTHER)
    mine = await n.create(ACCOUNT, EMAIL, "ops@example.com", metadata=own)
    # The stranger reserves "c-1" with a contact of its own...
    await n.create_contact(
        contact(OTHER, EMAIL, "them@example.com"), request_id="c-1", metadata=stranger
    )
    # ...which the owner's request with that id never meets.
    created = await n.create_contact(
        contact(ACCOUNT, EMAIL, "second@example.com"), request_id="c-1", metadata=own
    )
    assert created.account_id == ACCOUNT

    # The contact is named by id only: nothing in the request for the policy to check.
    change = contact("", EMAIL, "moved@example.com", [], mine.contact_id)
    moved = await n.update_contact(change, ["address"], request_id="u-1", metadata=own)
    assert moved.address == "moved@example.com"
    await expect_error(
        n.update_contact(change, ["address"], request_id="u-1", metadata=stranger),
        DENIED,
        "PERMISSION_DENIED",
    )
    assert await n.get_contact(mine.contact_id) == moved
    assert await n.update_contact(change, ["address"], request_id="u-1", metadata=own) == moved


# --- bad input ---------------------------------------------------------------------------

BAD_CONTACTS = [
    # (channel, address, message types, the field named)
    (EMAIL, "ops.example.com", [USAGE_ALERT], "contact.address"),
    (EMAIL, "ops@example.com\r\nBcc: x@evil.example", [USAGE_ALERT], "contact.address"),
    (EMAIL, "", [USAGE_ALERT], "contact.address"),
    (SMS, "0415 555 0100", [USAGE_ALERT], "contact.address"),
    (WEBHOOK, "http://hooks.example.com/allot", [USAGE_ALERT], "contact.address"),
    (WEBHOOK, "http://10.0.0.1/hook", [USAGE_ALERT], "contact.address"),
    (WEBHOOK, "ftp://127.0.0.1/hook", [USAGE_ALERT], "contact.address"),
    (WEBHOOK, "hooks.example.com/allot", [USAGE_ALERT], "contact.address"),
    (WEBHOOK, "https://user:pw@hooks.example.com/", [USAGE_ALERT], "contact.address"),
    (EMAIL, "ops@example.com", [], "contact.message_types"),
    (EMAIL, "ops@example.com", [99], "contact.message_types"),
    (EMAIL, "ops@example.com", [USAGE_ALERT, 0], "contact.message_types"),
    (EMAIL, "ops@example.com", [TEST], "contact.message_types"),
    (0, "ops@example.com", [USAGE_ALERT], "contact.channel"),
    (7, "ops@example.com", [USAGE_ALERT], "contact.channel"),
]


async def test_bad_contacts_are_invalid_argument_naming_the_field(n):
    for channel, address, types, field in BAD_CONTACTS:
        await expect_error(
            n.create_contact(contact(ACCOUNT, channel, address, types)),
            INVALID,
            "INVALID_FIELD",
            field,
        )
        # The same from an account token: validation, not permission, answers.
        await expect_error(
            n.create_contact(
                contact(ACCOUNT, channel, address, types), metadata=n.account(ACCOUNT)
            ),
            INVALID,
            "INVALID_FIELD",
            field,
        )
    await expect_error(
        n.create_contact(contact("", EMAIL, "ops@example.com")),
        INVALID,
        "INVALID_FIELD",
        "contact.account_id",
    )
    # Loopback http and https anywhere are fine.
    for address in ("http://127.0.0.1:9/hook", "http://localhost/x", "https://hooks.example.com"):
        assert (await n.create(ACCOUNT, WEBHOOK, address)).address == address
    assert len((await n.list_contacts(ACCOUNT)).contacts) == 3


# --- who may call what -------------------------------------------------------------------


async def test_account_tokens_reach_only_their_own_contacts(n):
    theirs = await n.create(OTHER, EMAIL, "them@example.com")
    sent = await n.send_test(theirs.contact_id)
    me = n.account(ACCOUNT)
    missing = "cnt-doesnotexist"

    await expect_error(
        n.create_contact(contact(OTHER, EMAIL, "me@example.com"), metadata=me),
        DENIED,
        "PERMISSION_DENIED",
    )
    for contact_id in (theirs.contact_id, missing):  # other's and absent look the same
        await expect_error(n.get_contact(contact_id, me), DENIED, "PERMISSION_DENIED")
        await expect_error(n.delete_contact(contact_id, me), DENIED, "PERMISSION_DENIED")
        await expect_error(n.send_test(contact_id, me), DENIED, "PERMISSION_DENIED")
        for owner in (ACCOUNT, OTHER):
            await expect_error(
                n.update_contact(
                    contact(owner, EMAIL, "me@example.com", [USAGE_ALERT], contact_id),
                    metadata=me,
                ),
                DENIED,
                "PERMISSION_DENIED",
            )
    await expect_error(n.list_contacts(OTHER, metadata=me), DENIED, "PERMISSION_DENIED")
    await expect_error(n.list_notifications(OTHER, metadata=me), DENIED, "PERMISSION_DENIED")
    await expect_error(
        n.retry(sent.notification_id, theirs.contact_id, me), DENIED, "PERMISSION_DENIED"
    )
    await expect_error(n.retry("ntf-missing", theirs.contact_id, me), DENIED, "PERMISSION_DENIED")
    stream = n.watch(OTHER, me)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await asyncio.wait_for(stream.read(), 10)
    assert caught.value.code() == DENIED

    # Nothing changed, and operators get NOT_FOUND for what does not exist.
    assert await n.get_contact(theirs.contact_id) == theirs
    assert [c.contact_id for c in (await n.list_contacts(OTHER)).contacts] == [theirs.contact_id]
    assert (await n.list_contacts(metadata=me)).contacts == []
    await expect_error(n.get_contact(missing), NOT_FOUND, "CONTACT_NOT_FOUND")
    await expect_error(n.send_test(missing), NOT_FOUND, "CONTACT_NOT_FOUND")
    await expect_error(
        n.retry("ntf-missing", theirs.contact_id), NOT_FOUND, "NOTIFICATION_NOT_FOUND"
    )


async def test_account_read_tokens_read_but_do_not_write(n):
    own = await n.create(ACCOUNT, EMAIL, "ops@example.com")
    sent = await n.send_test(own.contact_id)
    reader = n.account(ACCOUNT, read_only=True)

    assert await n.get_contact(own.contact_id, reader) == own
    assert [c.contact_id for c in (await n.list_contacts(ACCOUNT, metadata=reader)).contacts] == [
        own.contact_id
    ]
    listed = await n.list_notifications(ACCOUNT, metadata=reader)
    assert [x.notification_id for x in listed.notifications] == [sent.notification_id]

    for call in (
        n.create_contact(contact(ACCOUNT, EMAIL, "new@example.com"), metadata=reader),
        n.update_contact(
            contact(ACCOUNT, EMAIL, "new@example.com", [USAGE_ALERT], own.contact_id),
            metadata=reader,
        ),
        n.delete_contact(own.contact_id, reader),
        n.send_test(own.contact_id, reader),
        n.retry(sent.notification_id, own.contact_id, reader),
    ):
        await expect_error(call, DENIED, "PERMISSION_DENIED")
    assert await n.get_contact(own.contact_id) == own
    assert len((await n.list_notifications(ACCOUNT)).notifications) == 1


# --- test notifications and the notification list ----------------------------------------


async def test_send_test_notification_reaches_that_contact_only(n, smtp, tmp_path):
    with http_receiver() as first, http_receiver() as second:
        hook = await n.create(ACCOUNT, WEBHOOK, first.url(), [USAGE_ALERT])
        first.secret = hook.webhook_secret
        other_hook = await n.create(ACCOUNT, WEBHOOK, second.url(), [USAGE_ALERT])
        mail = await n.create(ACCOUNT, EMAIL, "ops@example.com", [ARREARS])
        sms = await n.create(ACCOUNT, SMS, "+14155550100", [USAGE_ALERT])

        returned = await n.send_test(hook.contact_id, n.account(ACCOUNT))
        assert returned.message_type == TEST
        assert returned.account_id == ACCOUNT
        assert returned.source_event_id == ""
        assert [d.contact_id for d in returned.deliveries] == [hook.contact_id]
        [request] = await first.wait_for(1)
        [listed] = await n.settled(ACCOUNT, 1)
        assert deliveries(listed) == {hook.contact_id: (WEBHOOK, SENT, 1)}
        barrier = await n.barrier(smtp)
        assert second.requests == []
        assert [m.rcpt_tos for m in smtp.messages] == [[barrier]]
        assert request.signature_valid is True
        assert request.headers["allot-notification-id"] == returned.notification_id
        document = request.json()
        assert document["notification_id"] == returned.notification_id
        assert document["subject"] == returned.subject
        assert document["data"] == {"contact_id": hook.contact_id}

        # A contact gets a test whatever it is subscribed to.
        by_mail = await n.send_test(mail.contact_id)
        [_, received] = await smtp.wait_for(2)  # after the barrier's
        assert received.rcpt_tos == ["ops@example.com"]
        assert received.message["X-Allot-Notification-Id"] == by_mail.notification_id
        assert received.message["Subject"] == by_mail.subject
        assert mail.contact_id in received.message.get_content()

        # Without an SMS gateway, SMS go to the outbox folder of the data dir.
        by_sms = await n.send_test(sms.contact_id)
        found = await n.settled(ACCOUNT, 3)
        assert {x.notification_id: deliveries(x) for x in found} == {
            returned.notification_id: {hook.contact_id: (WEBHOOK, SENT, 1)},
            by_mail.notification_id: {mail.contact_id: (EMAIL, SENT, 1)},
            by_sms.notification_id: {sms.contact_id: (SMS, SENT, 1)},
        }
        [written] = list((tmp_path / "outbox" / "sms").glob("*.txt"))
        text = written.read_text()
        assert "To: +14155550100" in text and by_sms.notification_id in text
        await n.barrier(smtp)
        assert len(first.requests) == 1 and second.requests == []
        assert other_hook.contact_id not in {d.contact_id for x in found for d in x.deliveries}


async def test_webhooks_name_the_message_type_as_the_api_does(n):
    with http_receiver() as hook:
        created = await n.create(ACCOUNT, WEBHOOK, hook.url(), [USAGE_ALERT])
        await n.send_test(created.contact_id)
        [request] = await hook.wait_for(1)
    assert json.loads(request.body)["message_type"] == "MESSAGE_TYPE_TEST"


async def test_webhooks_to_internal_addresses_fail_at_once_by_default(database_url, tmp_path):
    # As in production: ALLOT_WEBHOOK_ALLOW_PRIVATE unset (these tests' `n` allows loopback).
    settings = notification_settings(
        database_url,
        tmp_path,
        f"127.0.0.1:{closed_port()}",
        webhook_allow_private="false",
        delivery_max_attempts="3",
    )
    with http_receiver() as hook:
        async with running_notification(settings) as handle:
            n = handle.calls
            # Only ports 443 and 8443 unless private webhooks are allowed.
            await expect_error(
                n.create(ACCOUNT, WEBHOOK, hook.url()), INVALID, "INVALID_FIELD", "contact.address"
            )
            on_8443 = hook.url().replace(f":{hook.port}/", ":8443/")
            by_address = await n.create(ACCOUNT, WEBHOOK, on_8443)
            # Resolved by the system: localhost is loopback wherever the suite runs.
            by_name = await n.create(ACCOUNT, WEBHOOK, on_8443.replace("127.0.0.1", "localhost"))
            await n.send_test(by_address.contact_id)
            await n.send_test(by_name.contact_id)
            found = await n.settled(ACCOUNT, 2)
            # Not retried: anything due within two days has been tried when this returns.
            await n.advance(timedelta(days=2))
        assert hook.requests == []
    states = {d.contact_id: (d.channel, d.state, d.attempts) for x in found for d in x.deliveries}
    # FAILED on the first of three attempts: a refused address is not retried.
    assert states == {
        by_address.contact_id: (WEBHOOK, FAILED, 1),
        by_name.contact_id: (WEBHOOK, FAILED, 1),
    }
    errors = {d.contact_id: d.last_error for x in found for d in x.deliveries}
    assert errors[by_address.contact_id] == "webhook address 127.0.0.1 is loopback: not allowed"
    # Not which address it resolved to: the operator's DNS is not shown to customers.
    assert errors[by_name.contact_id] == "webhook host localhost: address not allowed (loopback)"


async def test_notifications_are_listed_newest_first_in_pages_and_by_type(n):
    own = await n.create(ACCOUNT, EMAIL, "ops@example.com")
    also_own = await n.create(ACCOUNT, EMAIL, "dev@example.com")  # 3 tests per contact an hour
    theirs = await n.create(OTHER, EMAIL, "them@example.com")
    sent = []
    for i in range(5):
        contact_id = (own, also_own)[i % 2].contact_id
        sent.append((await n.send_test(contact_id)).notification_id)
        await asyncio.sleep(0.005)  # ids order by the millisecond
    await n.send_test(theirs.contact_id)

    seen: list[str] = []
    token = ""
    for _ in range(10):
        page = await n.list_notifications(
            metadata=n.account(ACCOUNT), page_size=2, page_token=token
        )
        seen.extend(x.notification_id for x in page.notifications)
        token = page.next_page_token
        if not token:
            break
    assert seen == list(reversed(sent))
    assert [x.notification_id for x in await n.notifications(ACCOUNT, [TEST])] == seen
    assert await n.notifications(ACCOUNT, [USAGE_ALERT, ARREARS]) == []
    assert len(await n.notifications(OTHER)) == 1


async def test_region_limited_tokens_list_only_their_regions_notifications(
    database_url, tmp_path, smtp
):
    """Regression: a token limited to ap-southeast-1 listed notifications about other regions.
    Account-wide ones (arrears) have no region and stay visible; pages stay full."""
    settings = notification_settings(
        database_url, tmp_path, f"127.0.0.1:{closed_port()}", smtp_url=smtp.url()
    )
    async with running_notification(settings) as handle:
        n, ctx = handle.calls, handle.server.service.context
        sources = [
            UsageAlertFired("al-1", ACCOUNT, "ap-southeast-1", "passport", 5, 100, "5 calls"),
            PackageExpiring("pkg-2", ACCOUNT, "ap-southeast-2", "passport", 5, 100, EXPIRY, 3),
            StandingChanged(ACCOUNT, "GOOD", "GRACE", "-1.00 USD", EXPIRY, EXPIRY),
            PackageExhausted("pkg-1", ACCOUNT, "ap-southeast-1", "passport", 100, EXPIRY),
            UsageAlertFired("al-2", ACCOUNT, "ap-southeast-2", "id-card", 5, 100, "5 calls"),
        ]
        made = []
        for i, source in enumerate(sources):  # the intake the stream consumers call
            made.append(
                await ctx.db.transaction(
                    lambda uow, source=source, i=i: take(ctx, uow, compose(source), f"src-{i}")
                )
            )
            await asyncio.sleep(0.005)  # ids order by the millisecond
        everything = [x.notification_id for x in await n.notifications(ACCOUNT)]
        assert everything == list(reversed(made))

        hk = n.tokens.md(n.tokens.account(ACCOUNT, read_only=True, regions=["ap-southeast-1"]))
        seen, sizes, token = [], [], ""
        for _ in range(10):
            page = await n.list_notifications(metadata=hk, page_size=1, page_token=token)
            sizes.append(len(page.notifications))
            seen.extend(x.notification_id for x in page.notifications)
            token = page.next_page_token
            if not token:
                break
        assert seen == [made[3], made[2], made[0]]
        assert sizes == [1, 1, 1]
        whole = await n.list_notifications(metadata=hk)
        assert [x.notification_id for x in whole.notifications] == seen
        regional_admin = n.tokens.md(n.tokens.admin(regions=["ap-southeast-2"]))
        listed = await n.list_notifications(ACCOUNT, metadata=regional_admin)
        assert [x.notification_id for x in listed.notifications] == [made[4], made[2], made[1]]


async def test_deleting_a_contact_drops_its_pending_deliveries_and_keeps_history(n):
    with http_receiver(statuses=(500,)) as failing, http_receiver() as working:
        broken = await n.create(ACCOUNT, WEBHOOK, failing.url(), [USAGE_ALERT])
        fine = await n.create(ACCOUNT, WEBHOOK, working.url(), [USAGE_ALERT])
        pending = await n.send_test(broken.contact_id)
        delivered = await n.send_test(fine.contact_id)
        await n.settled(
            ACCOUNT, 2, done=lambda d: d.state == SENT or (d.state == PENDING and d.attempts == 1)
        )

        await n.delete_contact(broken.contact_id)
        await n.delete_contact(fine.contact_id)
        found = {x.notification_id: deliveries(x) for x in await n.notifications(ACCOUNT)}
        assert found == {
            pending.notification_id: {},
            delivered.notification_id: {fine.contact_id: (WEBHOOK, SENT, 1)},
        }
        await expect_error(
            n.retry(pending.notification_id, broken.contact_id), NOT_FOUND, "DELIVERY_NOT_FOUND"
        )
        assert len(failing.requests) == 1


async def test_retry_delivery_without_a_contact_id_is_invalid_argument(n):
    own = await n.create(ACCOUNT, EMAIL, "ops@example.com")
    sent = await n.send_test(own.contact_id)
    await expect_error(n.retry(sent.notification_id, ""), INVALID, "INVALID_FIELD", "contact_id")


async def test_retry_delivery_without_a_notification_id_is_invalid_argument(n):
    own = await n.create(ACCOUNT, EMAIL, "ops@example.com")
    await expect_error(n.retry("", own.contact_id), INVALID, "INVALID_FIELD", "notification_id")
