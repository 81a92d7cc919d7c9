"""Email through an SMTP server: the message a notification becomes, and the sender."""

from __future__ import annotations

import asyncio
import email.message
import email.utils
import socket
import ssl
import urllib.parse
from dataclasses import dataclass, field

import aiosmtplib

from services.notification.adapters.outgoing import safe_id, utc
from services.notification.domain.addresses import is_loopback_host
from services.notification.domain.delivery import DeliveryError, OutgoingMessage
from shared.settings import SettingsError

SMTP_TIMEOUT_SECONDS = 15.0
FQDN_TIMEOUT_SECONDS = 2.0


def _one_line(text: str) -> str:
    # A newline in a header would end it (and could start a forged one).
    return " ".join(text.split())


def message_id(notification_id: str, sender_address: str) -> str:
    """The same Message-ID for every attempt at a notification, so a mail client that got it
    twice (a retry after a lost reply) shows it once and a reader can match it to its id."""
    domain = email.utils.parseaddr(sender_address)[1].rpartition("@")[2] or "localhost"
    return f"<{safe_id(notification_id)}@{domain}>"


def build_email(message: OutgoingMessage, sender_address: str) -> email.message.EmailMessage:
    """The email of a notification, as sent over SMTP and written to the outbox folder."""
    mail = email.message.EmailMessage()
    mail["From"] = sender_address
    mail["To"] = message.address
    mail["Subject"] = _one_line(message.subject)
    # The notification's own time: every attempt produces the same message.
    mail["Date"] = email.utils.format_datetime(utc(message.create_time))
    mail["Message-ID"] = message_id(message.notification_id, sender_address)
    # RFC 3834: tells auto-responders (vacation replies) not to answer.
    mail["Auto-Submitted"] = "auto-generated"
    mail["X-Allot-Notification-Id"] = message.notification_id
    mail["X-Allot-Message-Type"] = _one_line(message.message_type)
    mail.set_content(message.body)
    return mail


@dataclass(frozen=True)
class SmtpTransport:
    """ALLOT_SMTP_URL parsed: `smtp://host:25` (plain), `smtps://user:pass@host:465`
    (TLS from the first byte), `smtp+starttls://user:pass@host:587` (upgraded before login)."""

    host: str
    port: int
    use_tls: bool
    start_tls: bool
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    @classmethod
    def parse(cls, url: str) -> SmtpTransport:
        try:
            parts = urllib.parse.urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise SettingsError(f"ALLOT_SMTP_URL is not a valid URL: {exc}") from None
        defaults = {"smtp": (25, False, False), "smtps": (465, True, False)}
        defaults["smtp+starttls"] = (587, False, True)
        if parts.scheme not in defaults:
            raise SettingsError(
                "ALLOT_SMTP_URL must start with smtp://, smtps:// or smtp+starttls://, "
                f"got {parts.scheme or 'no'} scheme"
            )
        if not parts.hostname:
            raise SettingsError("ALLOT_SMTP_URL has no host")
        default_port, use_tls, start_tls = defaults[parts.scheme]
        username = urllib.parse.unquote(parts.username) if parts.username else None
        password = urllib.parse.unquote(parts.password) if parts.password is not None else None
        if username and not (use_tls or start_tls) and not is_loopback_host(parts.hostname):
            # aiosmtplib would send the password in the clear; refuse rather than leak it.
            raise SettingsError(
                "ALLOT_SMTP_URL: credentials need smtps:// or smtp+starttls:// "
                "(plain smtp:// with a password is allowed only on loopback)"
            )
        return cls(parts.hostname, port or default_port, use_tls, start_tls, username, password)


class SmtpSender:
    """Email through an SMTP server, one connection per message (notifications are few; a
    pooled connection would add reconnect logic for no measurable gain)."""

    def __init__(
        self,
        url: str,
        sender_address: str,
        *,
        timeout: float = SMTP_TIMEOUT_SECONDS,
        tls_context: ssl.SSLContext | None = None,
        local_hostname: str | None = None,
    ) -> None:
        self.transport = SmtpTransport.parse(url)
        envelope_from = email.utils.parseaddr(sender_address)[1]
        if "@" not in envelope_from:
            raise SettingsError(f"ALLOT_SMTP_FROM is not an email address: {sender_address!r}")
        self.sender_address = sender_address
        self._envelope_from = envelope_from
        self._timeout = timeout
        # None: the system's trusted CAs. Tests pass a context trusting their own certificate.
        self._tls_context = tls_context
        self._local_hostname = local_hostname

    async def send(self, message: OutgoingMessage) -> None:
        try:
            mail = build_email(message, self.sender_address)
        except (ValueError, TypeError) as exc:
            raise DeliveryError(f"cannot build the email: {exc}", retryable=False) from exc
        t = self.transport
        where = f"SMTP {t.host}:{t.port}"
        if self._local_hostname is None:
            self._local_hostname = await _ehlo_name()
        try:
            # aiosmtplib's timeout bounds each step; this bounds the whole conversation.
            async with asyncio.timeout(self._timeout):
                await aiosmtplib.send(
                    mail,
                    sender=self._envelope_from,
                    recipients=[message.address],
                    hostname=t.host,
                    port=t.port,
                    username=t.username,
                    password=t.password,
                    use_tls=t.use_tls,
                    # False, not None: plain smtp:// must not upgrade opportunistically.
                    start_tls=t.start_tls,
                    tls_context=self._tls_context,
                    local_hostname=self._local_hostname,
                    timeout=self._timeout,
                )
        except aiosmtplib.SMTPRecipientsRefused as exc:
            codes = [r.code for r in exc.recipients]
            detail = "; ".join(f"{r.code} {r.message}" for r in exc.recipients)
            raise DeliveryError(
                f"{where} refused the recipient: {detail}",
                retryable=any(code < 500 for code in codes),
            ) from exc
        except (aiosmtplib.SMTPRecipientRefused, aiosmtplib.SMTPDataError) as exc:
            # The recipient or this message: a 5xx is final, a 4xx (mailbox busy, greylisting)
            # asks us to come back later.
            what = "the recipient" if isinstance(exc, aiosmtplib.SMTPRecipientRefused) else "it"
            raise DeliveryError(
                f"{where} refused {what}: {exc.code} {exc.message}", retryable=exc.code < 500
            ) from exc
        except aiosmtplib.SMTPResponseException as exc:
            # Greeting, HELO, AUTH or MAIL FROM refused: our configuration or the server's
            # state, not the recipient's; once fixed, pending deliveries should go out.
            raise DeliveryError(f"{where}: {exc.code} {exc.message}", retryable=True) from exc
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            # Unreachable, TLS failure, dropped connection, timeout.
            reason = str(exc) or type(exc).__name__
            if isinstance(exc, TimeoutError) and not str(exc):
                reason = f"no answer within {self._timeout:g} s"
            raise DeliveryError(f"{where}: {reason}", retryable=True) from exc

    async def close(self) -> None:
        pass


async def _ehlo_name() -> str:
    """This host's name for EHLO: its FQDN as aiosmtplib would look it up (per connection,
    and without a bound), looked up once and given up on if DNS is slow."""
    try:
        return await asyncio.wait_for(asyncio.to_thread(socket.getfqdn), FQDN_TIMEOUT_SECONDS)
    except (TimeoutError, OSError):
        return socket.gethostname() or "localhost"
