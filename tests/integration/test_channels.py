"""The channel senders against real receivers on loopback: an aiosmtpd SMTP server (plain,
AUTH, STARTTLS and implicit TLS), an HTTP(S) server for webhooks and the SMS gateway, and the
outbox folder. Each failure is checked for what the delivery loop needs: is it retryable?

Webhook host names are resolved by a resolver the test passes in (a name such as
`hooks.allot.test` answered with 127.0.0.1): that is the only stand-in; every connection goes
to a real server."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email
import email.policy
import json
import os
import socket
import time
from datetime import UTC, datetime

import pytest

from services.notification.adapters.folder import FolderSender
from services.notification.adapters.senders import build_senders, close_senders
from services.notification.adapters.sms import SMS_MAX_CHARS, SmsGatewaySender
from services.notification.adapters.smtp import SmtpSender, SmtpTransport
from services.notification.adapters.webhooks import Resolver, WebhookSender
from services.notification.domain.addresses import new_webhook_secret, verify_webhook
from services.notification.domain.delivery import DeliveryError, OutgoingMessage
from services.notification.domain.messages import Channel
from shared.settings import Settings, SettingsError
from tests.support.receivers import (
    closed_port,
    http_receiver,
    self_signed_certificate,
    smtp_receiver,
)

CREATED = datetime(2024, 1, 1, 8, 30, 5, tzinfo=UTC)
SENDER = "Allot <allot@example.com>"
PAYLOAD = {"region": "ap-southeast-1", "api": "passport", "remaining_quantity": 2000}


def outgoing(channel: Channel, address: str, **changes) -> OutgoingMessage:
    values = dict(
        notification_id="ntf_01HXYZ",
        account_id="acct-1",
        channel=channel,
        address=address,
        subject="Usage alert: 2,000 calls of passport left",
        body="Account acct-1: the packages of passport have 2,000 calls left of 10,000.\n"
        "Calls beyond your packages are charged pay-per-use.",
        message_type="MESSAGE_TYPE_USAGE_ALERT",
        payload=PAYLOAD,
        create_time=CREATED,
    )
    values.update(changes)
    return OutgoingMessage(**values)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    return self_signed_certificate(tmp_path_factory.mktemp("tls"))


def smtp_sender(url: str, **kwargs) -> SmtpSender:
    # A fixed EHLO name: no DNS lookup of this host in tests.
    return SmtpSender(url, SENDER, timeout=5, local_hostname="allot.test", **kwargs)


# --- SMTP --------------------------------------------------------------------------------


async def test_smtp_delivers_the_email():
    with smtp_receiver() as inbox:
        await smtp_sender(inbox.url()).send(outgoing(Channel.EMAIL, "ops@example.com"))
        [mail] = await inbox.wait_for(1)
    assert mail.mail_from == "allot@example.com"
    assert mail.rcpt_tos == ["ops@example.com"]
    assert mail.login is None
    message = mail.message
    assert message["From"] == SENDER
    assert message["To"] == "ops@example.com"
    assert message["Subject"] == "Usage alert: 2,000 calls of passport left"
    assert message["Message-ID"] == "<ntf_01HXYZ@example.com>"
    assert message["Date"].datetime == CREATED
    assert message["X-Allot-Notification-Id"] == "ntf_01HXYZ"
    assert message["X-Allot-Message-Type"] == "MESSAGE_TYPE_USAGE_ALERT"
    assert message["Auto-Submitted"] == "auto-generated"
    assert message.get_content_type() == "text/plain"
    assert message.get_content().rstrip("\n") == outgoing(Channel.EMAIL, "x@y.z").body


async def test_smtp_default_ehlo_name():
    # Without local_hostname the sender looks up this host's name once, with a bound.
    with smtp_receiver() as inbox:
        sender = SmtpSender(inbox.url(), SENDER, timeout=5)
        await sender.send(outgoing(Channel.EMAIL, "ops@example.com"))
        await sender.send(outgoing(Channel.EMAIL, "ops@example.com"))
        await inbox.wait_for(2)


async def test_smtp_resend_carries_the_same_message_id():
    with smtp_receiver() as inbox:
        sender = smtp_sender(inbox.url())
        message = outgoing(Channel.EMAIL, "ops@example.com")
        await sender.send(message)
        await sender.send(message)
        first, second = await inbox.wait_for(2)
    assert first.message["Message-ID"] == second.message["Message-ID"]
    assert first.data == second.data


async def test_smtp_subject_with_newlines_stays_one_header():
    with smtp_receiver() as inbox:
        subject = "Alert\r\nBcc: attacker@example.net"
        await smtp_sender(inbox.url()).send(
            outgoing(Channel.EMAIL, "ops@example.com", subject=subject)
        )
        [mail] = await inbox.wait_for(1)
    assert mail.rcpt_tos == ["ops@example.com"]
    assert mail.message["Bcc"] is None
    assert mail.message["Subject"] == "Alert Bcc: attacker@example.net"


async def test_smtp_utf8_body_and_subject():
    with smtp_receiver() as inbox:
        message = outgoing(
            Channel.EMAIL, "ops@example.com", subject="用量提醒", body="剩余 2,000 次"
        )
        await smtp_sender(inbox.url()).send(message)
        [mail] = await inbox.wait_for(1)
    assert mail.message["Subject"] == "用量提醒"
    assert mail.message.get_content().strip() == "剩余 2,000 次"


@pytest.mark.parametrize(
    ("reply", "retryable"),
    [
        ("550 5.1.1 No such user here", False),
        ("553 5.1.3 Bad recipient address syntax", False),
        ("451 4.7.1 Greylisted, try again later", True),
        ("452 4.2.2 Mailbox full", True),
    ],
)
async def test_smtp_refused_recipient(reply, retryable):
    with smtp_receiver() as inbox:
        inbox.refuse["gone@example.com"] = reply
        with pytest.raises(DeliveryError) as caught:
            await smtp_sender(inbox.url()).send(outgoing(Channel.EMAIL, "gone@example.com"))
        assert inbox.messages == []
    assert caught.value.retryable is retryable
    assert reply.split()[0] in caught.value.message
    assert "refused the recipient" in caught.value.message


async def test_smtp_unreachable_server_is_retryable():
    port = closed_port()
    started = time.monotonic()
    with pytest.raises(DeliveryError) as caught:
        await smtp_sender(f"smtp://127.0.0.1:{port}").send(outgoing(Channel.EMAIL, "a@b.co"))
    assert caught.value.retryable
    assert f"127.0.0.1:{port}" in caught.value.message
    assert time.monotonic() - started < 5


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
async def test_smtp_login_on_loopback():
    with smtp_receiver(credentials=("mailer", "p@ss:word")) as inbox:
        url = inbox.url(credentials="mailer:p%40ss%3Aword")
        await smtp_sender(url).send(outgoing(Channel.EMAIL, "ops@example.com"))
        [mail] = await inbox.wait_for(1)
    assert mail.login == "mailer"


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
async def test_smtp_wrong_password_is_retryable_and_sends_nothing():
    # Our configuration, not the recipient: once the password is fixed, deliveries go out.
    with smtp_receiver(credentials=("mailer", "right")) as inbox:
        sender = smtp_sender(inbox.url(credentials="mailer:wrong"))
        with pytest.raises(DeliveryError) as caught:
            await sender.send(outgoing(Channel.EMAIL, "ops@example.com"))
        assert inbox.messages == []
    assert caught.value.retryable
    assert "535" in caught.value.message
    assert "wrong" not in caught.value.message


async def test_smtp_starttls_with_login(certificate):
    with smtp_receiver(
        credentials=("mailer", "s3cret"), starttls=certificate.server_context()
    ) as inbox:
        url = inbox.url("smtp+starttls", "mailer:s3cret")
        sender = smtp_sender(url, tls_context=certificate.client_context())
        await sender.send(outgoing(Channel.EMAIL, "ops@example.com"))
        [mail] = await inbox.wait_for(1)
    assert mail.login == "mailer"


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
async def test_smtp_implicit_tls_with_login(certificate):
    with smtp_receiver(
        credentials=("mailer", "s3cret"), implicit_tls=certificate.server_context()
    ) as inbox:
        url = inbox.url("smtps", "mailer:s3cret")
        sender = smtp_sender(url, tls_context=certificate.client_context())
        await sender.send(outgoing(Channel.EMAIL, "ops@example.com"))
        [mail] = await inbox.wait_for(1)
    assert mail.login == "mailer"


async def test_smtp_untrusted_certificate_is_refused(certificate):
    # The system's CAs do not trust the test certificate: no password goes to that server.
    with smtp_receiver(
        credentials=("mailer", "s3cret"), starttls=certificate.server_context()
    ) as inbox:
        sender = smtp_sender(inbox.url("smtp+starttls", "mailer:s3cret"))
        with pytest.raises(DeliveryError) as caught:
            await sender.send(outgoing(Channel.EMAIL, "ops@example.com"))
        assert inbox.messages == []
    assert caught.value.retryable
    assert "s3cret" not in caught.value.message


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("smtp://mail.example.com", ("mail.example.com", 25, False, False, None, None)),
        ("smtp://127.0.0.1:2525", ("127.0.0.1", 2525, False, False, None, None)),
        ("smtps://u:p@mail.example.com", ("mail.example.com", 465, True, False, "u", "p")),
        ("smtps://u:p@mail.example.com:1465", ("mail.example.com", 1465, True, False, "u", "p")),
        (
            "smtp+starttls://me%40corp:p%2Fw@smtp.example.com:587",
            ("smtp.example.com", 587, False, True, "me@corp", "p/w"),
        ),
        ("smtp+starttls://smtp.example.com", ("smtp.example.com", 587, False, True, None, None)),
        ("smtp://u:p@localhost:25", ("localhost", 25, False, False, "u", "p")),
    ],
)
def test_smtp_url_parsing(url, expected):
    t = SmtpTransport.parse(url)
    assert (t.host, t.port, t.use_tls, t.start_tls, t.username, t.password) == expected
    assert "p/w" not in repr(t) and ":p)" not in repr(t)


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://mail.example.com", "must start with smtp://"),
        ("mail.example.com:25", "must start with smtp://"),
        ("smtp://", "no host"),
        ("smtp://mail.example.com:abc", "not a valid URL"),
        ("smtp://u:p@mail.example.com", "credentials need smtps://"),
    ],
)
def test_smtp_url_errors_name_the_setting(url, problem):
    with pytest.raises(SettingsError, match="ALLOT_SMTP_URL") as caught:
        SmtpTransport.parse(url)
    assert problem in str(caught.value)


def test_smtp_from_must_be_an_address():
    with pytest.raises(SettingsError, match="ALLOT_SMTP_FROM"):
        SmtpSender("smtp://localhost", "Allot")


# --- outbox folder -----------------------------------------------------------------------


async def test_folder_writes_a_readable_email(tmp_path):
    folder = tmp_path / "outbox" / "email"
    sender = FolderSender(folder, SENDER)
    await sender.send(outgoing(Channel.EMAIL, "ops@example.com"))
    [path] = list(folder.iterdir())
    assert path.name == "20240101T083005Z-ntf_01HXYZ.eml"
    assert oct(path.stat().st_mode & 0o777) == oct(0o600)
    assert oct(path.parent.stat().st_mode & 0o777) == oct(0o700)
    message = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
    assert message["From"] == SENDER
    assert message["To"] == "ops@example.com"
    assert message["Message-ID"] == "<ntf_01HXYZ@example.com>"
    assert "2,000 calls left" in message.get_content()


async def test_folder_writes_the_same_email_smtp_sends(tmp_path):
    message = outgoing(Channel.EMAIL, "ops@example.com")
    sender = FolderSender(tmp_path, SENDER)
    await sender.send(message)
    with smtp_receiver() as inbox:
        await smtp_sender(inbox.url()).send(message)
        [mail] = await inbox.wait_for(1)
    written = email.message_from_bytes(
        sender.path_for(message).read_bytes(), policy=email.policy.default
    )
    for header in ("From", "To", "Subject", "Date", "Message-ID", "X-Allot-Notification-Id"):
        assert written[header] == mail.message[header]
    assert written.get_content() == mail.message.get_content()


async def test_folder_resend_overwrites_one_file(tmp_path):
    sender = FolderSender(tmp_path)
    await sender.send(outgoing(Channel.SMS, "+14155550100", body="first"))
    await sender.send(outgoing(Channel.SMS, "+14155550100", body="second"))
    assert os.listdir(tmp_path) == ["20240101T083005Z-ntf_01HXYZ.txt"]  # no temp files left
    text = (tmp_path / "20240101T083005Z-ntf_01HXYZ.txt").read_text()
    assert "second" in text and "first" not in text


async def test_folder_writes_a_readable_sms(tmp_path):
    await FolderSender(tmp_path).send(outgoing(Channel.SMS, "+14155550100"))
    text = (tmp_path / "20240101T083005Z-ntf_01HXYZ.txt").read_text()
    head, _, sms = text.partition("\n\n")
    assert head.splitlines() == [
        "To: +14155550100",
        "Reference: ntf_01HXYZ",
        "Date: 2024-01-01T08:30:05Z",
    ]
    assert sms.startswith("Usage alert: 2,000 calls of passport left\nAccount acct-1:")


async def test_folder_keeps_ids_out_of_paths(tmp_path):
    sender = FolderSender(tmp_path / "sms")
    await sender.send(outgoing(Channel.SMS, "+14155550100", notification_id="../../evil"))
    assert [p.name for p in (tmp_path / "sms").iterdir()] == ["20240101T083005Z-.._.._evil.txt"]


async def test_folder_refuses_webhooks(tmp_path):
    with pytest.raises(DeliveryError) as caught:
        await FolderSender(tmp_path).send(outgoing(Channel.WEBHOOK, "https://example.com"))
    assert not caught.value.retryable


async def test_folder_write_failure_is_retryable(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    with pytest.raises(DeliveryError) as caught:
        await FolderSender(blocker / "email").send(outgoing(Channel.EMAIL, "ops@example.com"))
    assert caught.value.retryable


# --- webhooks ----------------------------------------------------------------------------


def webhook_sender(**kwargs) -> WebhookSender:
    """A webhook sender allowing loopback receivers (as ALLOT_WEBHOOK_ALLOW_PRIVATE=true):
    these tests are about the exchange; the address guard has its own tests below."""
    kwargs.setdefault("allow_private", True)
    return WebhookSender(**kwargs)


async def test_webhook_request_is_signed_json():
    secret = new_webhook_secret()
    sender = webhook_sender(timeout=5, now=lambda: 1_700_000_000.7)
    try:
        with http_receiver([200]) as receiver:
            message = outgoing(Channel.WEBHOOK, receiver.url("/allot?x=1"), secret=secret)
            await sender.send(message)
            [request] = await receiver.wait_for(1)
    finally:
        await sender.close()
    assert request.method == "POST"
    assert request.path == "/allot?x=1"
    assert request.headers["content-type"] == "application/json"
    assert request.headers["user-agent"] == "allot-notification"
    assert request.headers["allot-notification-id"] == "ntf_01HXYZ"
    signature = request.headers["allot-signature"]
    assert signature.startswith("t=1700000000,v1=")
    # Verified over the exact bytes received, with the contact's secret and no other.
    assert verify_webhook(secret, signature, request.body, now=1_700_000_000)
    assert not verify_webhook(new_webhook_secret(), signature, request.body, now=1_700_000_000)
    assert request.json() == {
        "notification_id": "ntf_01HXYZ",
        "account_id": "acct-1",
        "message_type": "MESSAGE_TYPE_USAGE_ALERT",
        "subject": message.subject,
        "body": message.body,
        "create_time": "2024-01-01T08:30:05Z",
        "data": PAYLOAD,
    }


async def test_webhook_receiver_that_verifies_accepts_it():
    secret = new_webhook_secret()
    sender = webhook_sender(timeout=5)
    try:
        with http_receiver([200], secret=secret) as receiver:
            await sender.send(
                outgoing(Channel.WEBHOOK, receiver.url(), secret=secret, payload={"n": "数"})
            )
            [request] = await receiver.wait_for(1)
    finally:
        await sender.close()
    assert request.signature_valid is True
    assert request.status == 200
    assert request.json()["data"] == {"n": "数"}


async def test_webhook_with_the_wrong_secret_is_rejected_by_the_receiver():
    sender = webhook_sender(timeout=5)
    try:
        with http_receiver([200], secret=new_webhook_secret()) as receiver:
            with pytest.raises(DeliveryError) as caught:
                await sender.send(
                    outgoing(Channel.WEBHOOK, receiver.url(), secret=new_webhook_secret())
                )
            [request] = await receiver.wait_for(1)
    finally:
        await sender.close()
    assert request.signature_valid is False
    assert not caught.value.retryable
    assert "HTTP 401" in caught.value.message


async def test_webhook_500_500_200():
    secret = new_webhook_secret()
    sender = webhook_sender(timeout=5)
    try:
        with http_receiver([500, 500, 200], secret=secret) as receiver:
            message = outgoing(Channel.WEBHOOK, receiver.url(), secret=secret)
            for _ in range(2):
                with pytest.raises(DeliveryError) as caught:
                    await sender.send(message)
                assert caught.value.retryable
                assert caught.value.message.endswith(": HTTP 500 from the receiver")
                assert "status 500" not in caught.value.message  # the reply is not echoed
            await sender.send(message)
            requests = await receiver.wait_for(3)
    finally:
        await sender.close()
    assert [r.status for r in requests] == [500, 500, 200]
    assert {r.headers["allot-notification-id"] for r in requests} == {"ntf_01HXYZ"}


@pytest.mark.parametrize(
    ("status", "retryable"),
    [(400, False), (401, False), (404, False), (410, False), (408, True), (429, True),
     (502, True), (503, True)],
)  # fmt: skip
async def test_webhook_status_classification(status, retryable):
    sender = webhook_sender(timeout=5)
    try:
        with http_receiver([status]) as receiver:
            with pytest.raises(DeliveryError) as caught:
                await sender.send(outgoing(Channel.WEBHOOK, receiver.url(), secret="whsec_x"))
    finally:
        await sender.close()
    assert caught.value.retryable is retryable
    assert f"HTTP {status}" in caught.value.message


async def test_webhook_redirect_is_not_followed():
    sender = webhook_sender(timeout=5)
    try:
        with http_receiver([302]) as receiver:
            with pytest.raises(DeliveryError) as caught:
                await sender.send(outgoing(Channel.WEBHOOK, receiver.url(), secret="whsec_x"))
            assert len(receiver.requests) == 1
    finally:
        await sender.close()
    assert not caught.value.retryable
    assert "302" in caught.value.message


async def test_webhook_timeout_is_retryable():
    sender = webhook_sender(timeout=0.3)
    try:
        with http_receiver([200], delay=3) as receiver:
            started = time.monotonic()
            with pytest.raises(DeliveryError) as caught:
                await sender.send(outgoing(Channel.WEBHOOK, receiver.url(), secret="whsec_x"))
            elapsed = time.monotonic() - started
    finally:
        await sender.close()
    assert caught.value.retryable
    assert caught.value.message.endswith(": timed out (no answer within 0.3 s)")
    assert elapsed < 2


async def test_webhook_unreachable_is_retryable():
    sender = webhook_sender(timeout=2)
    try:
        url = f"http://127.0.0.1:{closed_port()}/hook"
        with pytest.raises(DeliveryError) as caught:
            await sender.send(outgoing(Channel.WEBHOOK, url, secret="whsec_x"))
    finally:
        await sender.close()
    assert caught.value.retryable
    assert caught.value.message.endswith(": connection refused")


@contextlib.asynccontextmanager
async def raw_server(reply: bytes):
    """A TCP server on loopback that answers every connection with `reply` and hangs up."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            await asyncio.wait_for(reader.read(65536), 2)
            writer.write(reply)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize(
    ("scheme", "reply", "reason"),
    [
        (
            "http",
            b"SECRET-BANNER redis 7.2 -ERR unknown command\r\n\r\n",
            "the reply is not valid HTTP",
        ),
        ("https", b"HTTP/1.1 200 OK\r\n\r\n", "TLS handshake failed"),
        (
            "http",
            b"HTTP/1.1 503 Busy\r\nContent-Length: 20\r\n\r\nSECRET-BANNER inside",
            "HTTP 503 from the receiver",
        ),
    ],
)
async def test_webhook_failures_are_classified_never_echoed(scheme, reply, reason):
    """`last_error` is shown to the account: a short reason, never the other side's words
    (a customer must not read what a host answers through it)."""
    sender = webhook_sender(timeout=3)
    try:
        async with raw_server(reply) as port:
            url = (
                f"{scheme}://127.0.0.1:{port}/hook"
                if scheme == "http"
                else (f"https://localhost:{port}/hook")
            )
            with pytest.raises(DeliveryError) as caught:
                await sender.send(outgoing(Channel.WEBHOOK, url, secret="whsec_x"))
    finally:
        await sender.close()
    assert caught.value.message.endswith(f": {reason}")
    assert "SECRET" not in caught.value.message and "redis" not in caught.value.message


@pytest.mark.parametrize(
    ("address", "secret", "problem"),
    [
        ("http://hooks.example.com/x", "whsec_x", "https"),
        ("https://user:pw@hooks.example.com/x", "whsec_x", "credentials"),
        ("https://hooks.example.com/x", "", "no signing secret"),
    ],
)
async def test_webhook_refuses_before_connecting(address, secret, problem):
    sender = webhook_sender(timeout=2)
    try:
        with pytest.raises(DeliveryError) as caught:
            await sender.send(outgoing(Channel.WEBHOOK, address, secret=secret))
    finally:
        await sender.close()
    assert not caught.value.retryable
    assert problem in caught.value.message


async def test_webhook_payload_that_is_not_json_is_final():
    sender = webhook_sender(timeout=2)
    try:
        with http_receiver([200]) as receiver:
            message = outgoing(Channel.WEBHOOK, receiver.url(), secret="s", payload={"x": {1, 2}})
            with pytest.raises(DeliveryError) as caught:
                await sender.send(message)
            assert receiver.requests == []
    finally:
        await sender.close()
    assert not caught.value.retryable


# --- webhook addresses -------------------------------------------------------------------

HOOK_HOST = "hooks.allot.test"  # .test is never in DNS: only the tests' resolver knows it


def resolving_to(*addresses: str, calls: list[tuple[str, int]] | None = None) -> Resolver:
    """A resolver answering every name with `addresses`, recording what it was asked."""

    async def resolve(host: str, port: int) -> list[str]:
        if calls is not None:
            calls.append((host, port))
        return list(addresses)

    return resolve


@pytest.fixture(scope="module")
def hook_certificate(tmp_path_factory):
    return self_signed_certificate(tmp_path_factory.mktemp("hook-tls"), names=(HOOK_HOST,))


async def test_webhook_name_resolving_to_loopback_is_refused_before_connecting(
    hook_certificate,
):
    calls: list[tuple[str, int]] = []
    sender = WebhookSender(
        timeout=5,
        resolver=resolving_to("127.0.0.1", calls=calls),
        tls_context=hook_certificate.client_context(),
    )
    try:
        with (
            http_receiver() as plain,
            http_receiver(tls=hook_certificate.server_context()) as tls,
        ):
            # http:// is valid only for localhost; https:// for any name. On 8443 (a webhook
            # port): the name's address is what is refused, not the port.
            for receiver, host in ((plain, "localhost"), (tls, HOOK_HOST)):
                url = receiver.url(host=host).replace(f":{receiver.port}/", ":8443/")
                message = outgoing(Channel.WEBHOOK, url, secret="whsec_x")
                with pytest.raises(DeliveryError) as caught:
                    await sender.send(message)
                assert not caught.value.retryable
                assert caught.value.message == (
                    f"webhook host {host}: address not allowed (loopback)"
                )
            assert calls == [("localhost", 8443), (HOOK_HOST, 8443)]
            assert plain.requests == [] and tls.requests == []
    finally:
        await sender.close()


async def test_webhook_to_a_loopback_address_is_refused_without_resolving():
    calls: list[tuple[str, int]] = []
    sender = WebhookSender(timeout=5, resolver=resolving_to("127.0.0.1", calls=calls))
    try:
        with http_receiver() as receiver:
            for url in ("http://127.0.0.1:8443/hook", "http://[::1]:8443/hook"):
                with pytest.raises(DeliveryError) as caught:
                    await sender.send(outgoing(Channel.WEBHOOK, url, secret="whsec_x"))
                assert not caught.value.retryable
                assert caught.value.message.endswith(" is loopback: not allowed")
            assert receiver.requests == []
    finally:
        await sender.close()
    assert calls == []
    assert caught.value.message == "webhook address ::1 is loopback: not allowed"


@pytest.mark.parametrize(
    ("addresses", "refused", "why"),
    [
        (["169.254.169.254"], "169.254.169.254", "link-local"),
        (["93.184.216.34", "10.1.2.3"], "10.1.2.3", "private"),
        (["2606:4700::1111", "fd00:ec2::254"], "fd00:ec2::254", "private"),
        (["100.64.0.1"], "100.64.0.1", "CGNAT"),
        (["::ffff:127.0.0.1"], "::ffff:127.0.0.1", "loopback"),
        (["64:ff9b::a9fe:a9fe"], "64:ff9b::a9fe:a9fe", "link-local"),
        (["0.0.0.0"], "0.0.0.0", "unspecified"),
        (["224.0.0.1"], "224.0.0.1", "multicast"),
        (["240.0.0.1"], "240.0.0.1", "reserved"),
    ],
)
async def test_webhook_host_with_any_internal_address_is_refused(addresses, refused, why):
    # Refused before any connection: nothing here may reach the network.
    sender = WebhookSender(timeout=2, resolver=resolving_to(*addresses))
    try:
        with pytest.raises(DeliveryError) as caught:
            message = outgoing(Channel.WEBHOOK, "https://metadata.internal/x", secret="whsec_x")
            await sender.send(message)
    finally:
        await sender.close()
    assert not caught.value.retryable
    assert caught.value.message == f"webhook host metadata.internal: address not allowed ({why})"
    assert refused not in caught.value.message  # the operator's DNS is not shown


async def test_webhook_goes_to_the_checked_address_with_the_hosts_name(hook_certificate):
    calls: list[tuple[str, int]] = []
    sender = WebhookSender(
        timeout=5,
        allow_private=True,
        resolver=resolving_to("127.0.0.1", calls=calls),
        tls_context=hook_certificate.client_context(),
    )
    secret = new_webhook_secret()
    try:
        with http_receiver(tls=hook_certificate.server_context(), secret=secret) as receiver:
            url = receiver.url("/allot?x=1", host=HOOK_HOST)
            await sender.send(outgoing(Channel.WEBHOOK, url, secret=secret))
            [request] = await receiver.wait_for(1)
    finally:
        await sender.close()
    # The name was looked up once, by the check; the system resolver has never heard of it, so
    # the connection can only have gone to the address the check returned.
    assert calls == [(HOOK_HOST, receiver.port)]
    assert request.headers["host"] == f"{HOOK_HOST}:{receiver.port}"
    assert request.server_name == HOOK_HOST  # SNI
    assert request.path == "/allot?x=1"
    assert request.signature_valid is True


async def test_webhook_certificate_is_checked_against_the_host_not_the_address(tmp_path):
    # Valid for 127.0.0.1 (the address connected to) but not for the URL's host.
    other = self_signed_certificate(tmp_path, names=("other.allot.test",))
    sender = WebhookSender(
        timeout=5,
        allow_private=True,
        resolver=resolving_to("127.0.0.1"),
        tls_context=other.client_context(),
    )
    try:
        with http_receiver(tls=other.server_context()) as receiver:
            url = receiver.url(host=HOOK_HOST)
            with pytest.raises(DeliveryError) as caught:
                await sender.send(outgoing(Channel.WEBHOOK, url, secret="whsec_x"))
            assert receiver.requests == []
    finally:
        await sender.close()
    assert "certificate" in caught.value.message.lower()


async def test_webhook_tries_the_next_checked_address_when_one_refuses(hook_certificate):
    # Nothing listens on 127.0.0.2 at the receiver's port (it is bound to 127.0.0.1 only).
    calls: list[tuple[str, int]] = []
    sender = WebhookSender(
        timeout=5,
        allow_private=True,
        resolver=resolving_to("127.0.0.2", "127.0.0.1", calls=calls),
        tls_context=hook_certificate.client_context(),
    )
    try:
        with http_receiver(tls=hook_certificate.server_context()) as receiver:
            url = receiver.url(host=HOOK_HOST)
            await sender.send(outgoing(Channel.WEBHOOK, url, secret="whsec_x"))
            [request] = await receiver.wait_for(1)
    finally:
        await sender.close()
    assert calls == [(HOOK_HOST, receiver.port)]
    assert request.headers["host"] == f"{HOOK_HOST}:{receiver.port}"


async def test_webhook_host_that_does_not_resolve_is_retryable():
    async def no_such_name(host: str, port: int) -> list[str]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    sender = WebhookSender(timeout=2, resolver=no_such_name)
    try:
        with pytest.raises(DeliveryError) as caught:
            await sender.send(outgoing(Channel.WEBHOOK, f"https://{HOOK_HOST}/x", secret="s"))
    finally:
        await sender.close()
    assert caught.value.retryable
    assert caught.value.message == (
        f"webhook host {HOOK_HOST} does not resolve: Name or service not known"
    )


# --- SMS gateway -------------------------------------------------------------------------


async def test_sms_gateway_posts_json_with_basic_auth():
    with http_receiver([202]) as gateway:
        url = f"http://acct%40corp:k%3Aey@127.0.0.1:{gateway.port}/v1/sms?route=fast"
        sender = SmsGatewaySender(url, timeout=5)
        try:
            assert "acct" not in sender.url and "k%3Aey" not in sender.url
            await sender.send(outgoing(Channel.SMS, "+14155550100"))
            [request] = await gateway.wait_for(1)
        finally:
            await sender.close()
    assert request.path == "/v1/sms?route=fast"
    assert request.headers["content-type"] == "application/json"
    expected = base64.b64encode(b"acct@corp:k:ey").decode()
    assert request.headers["authorization"] == f"Basic {expected}"
    body = json.loads(request.body)
    assert body == {
        "to": "+14155550100",
        "text": "Usage alert: 2,000 calls of passport left\n" + outgoing(Channel.SMS, "+1").body,
        "reference": "ntf_01HXYZ",
    }


async def test_sms_gateway_without_credentials_sends_no_authorization():
    with http_receiver([200]) as gateway:
        sender = SmsGatewaySender(gateway.url("/sms"), timeout=5)
        try:
            await sender.send(outgoing(Channel.SMS, "+14155550100"))
            [request] = await gateway.wait_for(1)
        finally:
            await sender.close()
    assert "authorization" not in request.headers


async def test_sms_text_is_cut_to_a_few_segments():
    with http_receiver([200]) as gateway:
        sender = SmsGatewaySender(gateway.url("/sms"), timeout=5)
        try:
            await sender.send(outgoing(Channel.SMS, "+14155550100", body="x" * 2000))
            [request] = await gateway.wait_for(1)
        finally:
            await sender.close()
    text = json.loads(request.body)["text"]
    assert len(text) == SMS_MAX_CHARS
    assert text.endswith("...")


@pytest.mark.parametrize(("status", "retryable"), [(503, True), (429, True), (400, False)])
async def test_sms_gateway_failures(status, retryable):
    with http_receiver([status]) as gateway:
        sender = SmsGatewaySender(gateway.url("/sms"), timeout=5)
        try:
            with pytest.raises(DeliveryError) as caught:
                await sender.send(outgoing(Channel.SMS, "+14155550100"))
        finally:
            await sender.close()
    assert caught.value.retryable is retryable
    assert f"HTTP {status}" in caught.value.message
    assert "SMS gateway 127.0.0.1" in caught.value.message


@pytest.mark.parametrize("url", ["ftp://sms.example.com", "sms.example.com/send", "https://"])
def test_sms_gateway_url_errors_name_the_setting(url):
    with pytest.raises(SettingsError, match="ALLOT_SMS_GATEWAY_URL"):
        SmsGatewaySender(url)


# --- wiring ------------------------------------------------------------------------------


async def test_build_senders_defaults_to_the_outbox(tmp_path):
    settings = Settings.from_env(environ={}, data_dir=str(tmp_path))
    senders = build_senders(settings)
    try:
        assert set(senders) == {Channel.EMAIL, Channel.SMS, Channel.WEBHOOK}
        assert senders[1].directory == tmp_path / "outbox" / "email"
        assert senders[2].directory == tmp_path / "outbox" / "sms"
        assert isinstance(senders[3], WebhookSender)
        await senders[Channel.EMAIL].send(outgoing(Channel.EMAIL, "ops@example.com"))
        [path] = (tmp_path / "outbox" / "email").iterdir()
        assert "From: allot@localhost" in path.read_text()
    finally:
        await close_senders(senders)


@pytest.mark.parametrize(("value", "delivered"), [(None, False), ("false", False), ("true", True)])
async def test_build_senders_guards_webhooks_unless_private_ones_are_allowed(
    tmp_path, value, delivered
):
    environ = {} if value is None else {"ALLOT_WEBHOOK_ALLOW_PRIVATE": value}
    senders = build_senders(Settings.from_env(environ=environ, data_dir=str(tmp_path)))
    try:
        with http_receiver() as receiver:
            message = outgoing(Channel.WEBHOOK, receiver.url(), secret="whsec_x")
            if delivered:
                await senders[Channel.WEBHOOK].send(message)
                await receiver.wait_for(1)
            else:
                # The receiver's random port is refused first (443 and 8443 only).
                with pytest.raises(DeliveryError, match="port 443 or 8443 only"):
                    await senders[Channel.WEBHOOK].send(message)
                assert receiver.requests == []
    finally:
        await close_senders(senders)


@pytest.mark.parametrize("value", ["maybe", "2"])
def test_webhook_allow_private_must_be_true_or_false(value):
    with pytest.raises(SettingsError, match="ALLOT_WEBHOOK_ALLOW_PRIVATE"):
        Settings.from_env(environ={"ALLOT_WEBHOOK_ALLOW_PRIVATE": value})


async def test_build_senders_with_smtp_and_gateway(tmp_path):
    settings = Settings.from_env(
        environ={
            "ALLOT_SMTP_URL": "smtps://u:p@mail.example.com",
            "ALLOT_SMTP_FROM": "billing@example.com",
            "ALLOT_SMS_GATEWAY_URL": "https://k:s@sms.example.com/send",
        },
        data_dir=str(tmp_path),
    )
    senders = build_senders(settings)
    await close_senders(senders)
    assert isinstance(senders[Channel.EMAIL], SmtpSender)
    assert senders[Channel.EMAIL].transport.use_tls
    assert senders[Channel.EMAIL].sender_address == "billing@example.com"
    assert isinstance(senders[Channel.SMS], SmsGatewaySender)
    assert senders[Channel.SMS].url == "https://sms.example.com/send"
    assert senders[Channel.SMS]._client.is_closed
    assert senders[Channel.WEBHOOK]._client.is_closed
