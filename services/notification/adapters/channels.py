"""Senders that put one notification on the wire: SMTP, an HTTP SMS gateway, signed webhooks,
and a local outbox folder for `make run` when no SMTP server or gateway is configured.

Every sender has the same shape: `await sender.send(message)` returns when the other side
accepted the message and raises `DeliveryError` otherwise, saying whether trying again later
can help (`retryable`). The delivery loop owns retries and backoff; a sender makes exactly
one attempt and never waits longer than its timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.message
import email.utils
import functools
import ipaddress
import json
import logging
import os
import pathlib
import re
import socket
import ssl
import tempfile
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Protocol

import aiosmtplib
import httpx

from services.notification.domain.addresses import (
    address_class,
    is_loopback_host,
    sign_webhook,
    validate_address,
)
from services.notification.domain.messages import Channel
from shared.errors import InvalidArgument
from shared.settings import Settings, SettingsError

log = logging.getLogger("allot.notification.channels")

USER_AGENT = "allot-notification"
SMTP_TIMEOUT_SECONDS = 15.0
HTTP_TIMEOUT_SECONDS = 10.0
FQDN_TIMEOUT_SECONDS = 2.0
# At most four concatenated SMS segments (153 GSM-7 characters each): subject and numbers.
SMS_MAX_CHARS = 480
# `last_error` is stored (and shown to the account) — keep it a readable line, not a page.
MAX_ERROR_CHARS = 500
RESPONSE_EXCERPT_BYTES = 200


class DeliveryError(Exception):
    """One attempt failed. `retryable`: a later attempt may succeed (the receiver was down,
    busy or slow); otherwise it will fail the same way until someone changes something.
    `retry_after` is the receiver's Retry-After in seconds, when it sent one."""

    def __init__(self, message: str, retryable: bool, retry_after: float | None = None) -> None:
        if len(message) > MAX_ERROR_CHARS:
            message = message[: MAX_ERROR_CHARS - 3] + "..."
        super().__init__(message)
        self.message = message
        self.retryable = retryable
        self.retry_after = retry_after


@dataclass(frozen=True)
class OutgoingMessage:
    """One notification addressed to one contact."""

    notification_id: str
    account_id: str
    channel: int
    address: str
    subject: str
    body: str
    message_type: str
    payload: dict[str, Any]  # the structured fields (JSON-able); webhooks send them as `data`
    create_time: datetime
    secret: str = field(default="", repr=False)  # the webhook contact's signing secret


class Sender(Protocol):
    async def send(self, message: OutgoingMessage) -> None: ...

    async def close(self) -> None: ...


# --- email -------------------------------------------------------------------------------


def _utc(value: datetime) -> datetime:
    # Instants in this code base are aware UTC; a naive one is taken to be UTC, not local time.
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _one_line(text: str) -> str:
    # A newline in a header would end it (and could start a forged one).
    return " ".join(text.split())


def _safe_id(notification_id: str) -> str:
    # Ids are ours (ULID-like), but they end up in file names and Message-IDs: keep them inert.
    return re.sub(r"[^A-Za-z0-9._-]", "_", notification_id) or "_"


def message_id(notification_id: str, sender_address: str) -> str:
    """The same Message-ID for every attempt at a notification, so a mail client that got it
    twice (a retry after a lost reply) shows it once and a reader can match it to its id."""
    domain = email.utils.parseaddr(sender_address)[1].rpartition("@")[2] or "localhost"
    return f"<{_safe_id(notification_id)}@{domain}>"


def build_email(message: OutgoingMessage, sender_address: str) -> email.message.EmailMessage:
    """The email of a notification, as sent over SMTP and written to the outbox folder."""
    mail = email.message.EmailMessage()
    mail["From"] = sender_address
    mail["To"] = message.address
    mail["Subject"] = _one_line(message.subject)
    # The notification's own time: every attempt produces the same message.
    mail["Date"] = email.utils.format_datetime(_utc(message.create_time))
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


# --- outbox folder -----------------------------------------------------------------------


async def _ehlo_name() -> str:
    """This host's name for EHLO: its FQDN as aiosmtplib would look it up (per connection,
    and without a bound), looked up once and given up on if DNS is slow."""
    try:
        return await asyncio.wait_for(asyncio.to_thread(socket.getfqdn), FQDN_TIMEOUT_SECONDS)
    except (TimeoutError, OSError):
        return socket.gethostname() or "localhost"


def sms_text(subject: str, body: str, limit: int = SMS_MAX_CHARS) -> str:
    """The text of an SMS: subject and body on their own lines, cut to `limit` characters."""
    text = f"{subject.strip()}\n{body.strip()}" if subject.strip() else body.strip()
    if len(text) > limit:
        text = text[: limit - 3].rstrip() + "..."
    return text


class FolderSender:
    """Writes each email (`.eml`) or SMS (`.txt`) to a folder so a developer running the suite
    without SMTP or an SMS gateway can read what would have been sent.

    File names are `<create time>-<notification id>` (sorting by name is sorting by time); a
    retry rewrites the same file, and a reader never sees a half-written one."""

    def __init__(self, directory: str | os.PathLike[str], sender_address: str = "allot@localhost"):
        self.directory = pathlib.Path(directory)
        self.sender_address = sender_address

    def path_for(self, message: OutgoingMessage) -> pathlib.Path:
        extension = {Channel.EMAIL: ".eml", Channel.SMS: ".txt"}.get(message.channel)
        if extension is None:
            raise DeliveryError(
                f"the outbox folder takes email and SMS, not channel {message.channel}",
                retryable=False,
            )
        stamp = _utc(message.create_time).strftime("%Y%m%dT%H%M%SZ")
        return self.directory / f"{stamp}-{_safe_id(message.notification_id)}{extension}"

    def render(self, message: OutgoingMessage) -> bytes:
        if message.channel == Channel.EMAIL:
            return build_email(message, self.sender_address).as_bytes()
        lines = [
            f"To: {message.address}",
            f"Reference: {message.notification_id}",
            f"Date: {_rfc3339(message.create_time)}",
            "",
            sms_text(message.subject, message.body),
            "",
        ]
        return "\n".join(lines).encode()

    async def send(self, message: OutgoingMessage) -> None:
        path = self.path_for(message)
        try:
            content = self.render(message)
        except (ValueError, TypeError) as exc:
            raise DeliveryError(f"cannot build the message: {exc}", retryable=False) from exc
        try:
            await asyncio.to_thread(_write_atomically, path, content)
        except OSError as exc:
            # A full disk or a permission fixed later: worth another attempt. The path and
            # the system's words are the operator's business (log), not the account's.
            log.warning("cannot write %s: %s", path, exc)
            raise DeliveryError("cannot write to the outbox folder", retryable=True) from exc

    async def close(self) -> None:
        pass


def _write_atomically(path: pathlib.Path, content: bytes) -> None:
    # Private (docs/security.md): what customers are sent is theirs, not every local user's.
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates 0600: the owner (the developer running the suite) reads it.
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


# --- HTTP: webhooks and the SMS gateway --------------------------------------------------


def _rfc3339(value: datetime) -> str:
    return _utc(value).isoformat().replace("+00:00", "Z")


def _json_default(value: object) -> object:
    if isinstance(value, datetime):
        return _rfc3339(value)
    if isinstance(value, Decimal):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _json_bytes(document: Mapping[str, object]) -> bytes:
    return json.dumps(
        document, ensure_ascii=False, separators=(",", ":"), default=_json_default
    ).encode()


def webhook_body(message: OutgoingMessage) -> bytes:
    """The exact bytes a webhook receives (and the signature covers)."""
    return _json_bytes(
        {
            "notification_id": message.notification_id,
            "account_id": message.account_id,
            "message_type": message.message_type,
            "subject": message.subject,
            "body": message.body,
            "create_time": _rfc3339(message.create_time),
            "data": message.payload,
        }
    )


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "").strip()
    return float(value) if value.isascii() and value.isdigit() else None


async def _excerpt(response: httpx.Response) -> str:
    # Read at most a little of the reply: enough to explain a failure, never a whole page.
    data = b""
    with contextlib.suppress(httpx.HTTPError):  # the status says enough if the body breaks
        async for chunk in response.aiter_bytes():
            data += chunk
            if len(data) >= RESPONSE_EXCERPT_BYTES:
                break
    return " ".join(data[:RESPONSE_EXCERPT_BYTES].decode(errors="replace").split())


def _causes(exc: BaseException):
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def transport_reason(exc: httpx.TransportError) -> str:
    """A short classified reason for a failed connection or exchange: what `last_error` shows
    the account. Never the receiver's own words (docs/security.md: a customer must not read
    other hosts' replies, or scan ports, through `last_error`)."""
    causes = list(_causes(exc))
    if any(isinstance(c, ssl.SSLCertVerificationError) for c in causes):
        return "TLS certificate not trusted"
    if any(isinstance(c, ssl.SSLError) for c in causes):
        return "TLS handshake failed"
    if isinstance(exc, httpx.ConnectError):
        if any(isinstance(c, ConnectionRefusedError) for c in causes):
            return "connection refused"
        return "connection failed"
    if isinstance(exc, httpx.RemoteProtocolError):
        return "the reply is not valid HTTP"
    return "the connection broke before an answer"


async def _post(
    client: httpx.AsyncClient,
    what: str,
    url: str,
    body: bytes,
    headers: dict[str, str],
    seconds: float,
    auth: httpx.BasicAuth | None = None,
    addresses: Callable[[], Awaitable[Sequence[str]]] | None = None,
) -> None:
    """POST once; success is any 2xx. 408, 425, 429, 5xx, timeouts and connection failures are
    worth retrying; any other answer (a 4xx, or a redirect, which is not followed) is final.
    With `addresses`, the connection goes to one of the addresses it returns (looked up within
    the same `seconds`), never to a second lookup of the URL's host.

    A failure says what happened in a few classified words (`HTTP 503 from the receiver`,
    `connection refused`, `timed out`); the receiver's reply goes to the debug log only."""
    detail = ""
    try:
        # httpx's timeout bounds each phase; this bounds the whole exchange.
        async with asyncio.timeout(seconds):
            if addresses is None:
                request = client.build_request("POST", url, content=body, headers=headers)
                response = await client.send(request, auth=auth, stream=True)
            else:
                targets = await addresses()
                response = await _send_to_one_of(client, url, targets, body, headers, auth)
            try:
                status = response.status_code
                if 200 <= status < 300:
                    return
                if log.isEnabledFor(logging.DEBUG):
                    detail = await _excerpt(response)
            finally:
                await response.aclose()
    except (TimeoutError, httpx.TimeoutException) as exc:
        raise DeliveryError(
            f"{what}: timed out (no answer within {seconds:g} s)", retryable=True
        ) from exc
    except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
        log.debug("%s: %s", what, exc)
        raise DeliveryError(f"{what}: the URL cannot be called", retryable=False) from exc
    except httpx.TransportError as exc:
        log.debug("%s: %s", what, exc)
        raise DeliveryError(f"{what}: {transport_reason(exc)}", retryable=True) from exc
    if 300 <= status < 400:
        log.debug("%s: HTTP %d to %r", what, status, response.headers.get("location", ""))
        raise DeliveryError(
            f"{what}: HTTP {status} redirect from the receiver (redirects are not followed; "
            "update the URL)",
            retryable=False,
        )
    log.debug("%s: HTTP %d: %s", what, status, detail)
    retryable = status in (408, 425, 429) or status >= 500
    raise DeliveryError(
        f"{what}: HTTP {status} from the receiver",
        retryable=retryable,
        retry_after=_retry_after(response),
    )


async def _send_to_one_of(
    client: httpx.AsyncClient,
    url: str,
    addresses: Sequence[str],
    body: bytes,
    headers: dict[str, str],
    auth: httpx.BasicAuth | None,
) -> httpx.Response:
    """POST `url` over a connection to the first of `addresses` that accepts one. The request
    still names the URL's host (Host header), and TLS still sends it as the server name (SNI)
    and verifies the certificate against it: only the TCP connection skips the DNS lookup."""
    target = httpx.URL(url)
    headers = {**headers, "Host": target.netloc.decode("ascii")}
    extensions = {"sni_hostname": target.raw_host.decode("ascii")}

    def request_to(address: str) -> httpx.Request:
        pinned = target.copy_with(host=address)
        return client.build_request(
            "POST", pinned, content=body, headers=headers, extensions=extensions
        )

    *others, last = addresses
    for address in others:
        try:
            return await client.send(request_to(address), auth=auth, stream=True)
        except httpx.ConnectError:
            continue  # refused or unreachable, nothing sent: the next address may answer
    return await client.send(request_to(last), auth=auth, stream=True)


def _client(timeout: float, transport: httpx.AsyncBaseTransport | None = None) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        timeout=httpx.Timeout(timeout),
        follow_redirects=False,
        headers={"User-Agent": USER_AGENT},
        transport=transport,
    )


# Every address a host resolves to for a TCP connection to a port.
Resolver = Callable[[str, int], Awaitable[Sequence[str]]]


async def resolve_host(host: str, port: int) -> list[str]:
    """The system resolver, as a connection would use it (getaddrinfo): every address of
    `host`, in the order the system prefers, without repeats."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class WebhookSender:
    """HTTPS POST of the notification as JSON, signed for the contact (`Allot-Signature`).

    The URL is a customer's, so where it leads is checked at every send: its host is resolved
    once, refused for good if any of its addresses is loopback, private, link-local or
    otherwise not a public one (`address_class`) unless `allow_private`
    (ALLOT_WEBHOOK_ALLOW_PRIVATE), and the connection goes to an address that was checked, so
    a DNS answer that changes between the check and the connection (rebinding) cannot move
    the request into the operator's network."""

    def __init__(
        self,
        timeout: float = HTTP_TIMEOUT_SECONDS,
        *,
        now: Callable[[], float] = time.time,
        allow_private: bool = False,
        resolver: Resolver = resolve_host,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        self._timeout = timeout
        # Wall time, not the service clock: the receiver checks the signature's age against
        # its own real clock, also while the suite runs on a manual clock in tests.
        self._now = now
        self._allow_private = allow_private
        self._resolve = resolver
        # Connections are pooled by the address they go to; without idle ones kept, one made
        # for (and verified as) one customer's host never carries a request for another host
        # on the same address. An explicit transport also ignores HTTP(S)_PROXY: a proxy would
        # tunnel to the checked address and verify TLS against it instead of the host.
        # `tls_context`: None is the system's trusted CAs; tests trust their own certificate.
        transport = httpx.AsyncHTTPTransport(
            verify=tls_context if tls_context is not None else True,
            limits=httpx.Limits(max_connections=100, max_keepalive_connections=0),
        )
        self._client = _client(timeout, transport)

    async def send(self, message: OutgoingMessage) -> None:
        try:
            # Checked at creation too; again here so a URL stored under older rules (or
            # written to the database by hand) is never called over plain http.
            url = validate_address(Channel.WEBHOOK, message.address, any_port=self._allow_private)
        except InvalidArgument as exc:
            raise DeliveryError(exc.message, retryable=False) from exc
        if not message.secret:
            raise DeliveryError("the webhook contact has no signing secret", retryable=False)
        try:
            body = webhook_body(message)
        except (TypeError, ValueError) as exc:
            raise DeliveryError(f"cannot encode the notification: {exc}", retryable=False) from exc
        headers = {
            "Content-Type": "application/json",
            "Allot-Signature": sign_webhook(message.secret, int(self._now()), body),
            "Allot-Notification-Id": message.notification_id,
        }
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""  # validate_address made sure there is one
        port = parts.port or (443 if parts.scheme == "https" else 80)
        await _post(
            self._client,
            f"webhook {parts.netloc}",
            url,
            body,
            headers,
            self._timeout,
            addresses=functools.partial(self._addresses, host, port),
        )

    async def _addresses(self, host: str, port: int) -> Sequence[str]:
        """Where the webhook may connect: the host itself when it is an IP address, else every
        address it resolves to, each one checked (which of them a connection would get is not
        ours to choose)."""
        try:
            literal = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        if literal is not None:
            return self._checked(host, [str(literal)], named=False)
        try:
            addresses = await self._resolve(host, port)
        except OSError as exc:
            # Not (yet, or any more) in DNS: the customer may fix it; the next attempt will see.
            reason = exc.strerror or str(exc) or type(exc).__name__
            message = f"webhook host {host} does not resolve: {reason}"
            raise DeliveryError(message, retryable=True) from exc
        if not addresses:
            raise DeliveryError(f"webhook host {host} has no address", retryable=True)
        return self._checked(host, addresses, named=True)

    def _checked(self, host: str, addresses: Sequence[str], named: bool) -> Sequence[str]:
        if self._allow_private:
            return addresses
        for address in addresses:
            why = address_class(address)
            if why is None:
                continue
            # Final: the same name or address gets the same answer until someone changes it.
            if named:
                # Not which address: a customer must not map the operator's DNS through it.
                log.debug("webhook host %s resolves to %s (%s)", host, address, why)
                raise DeliveryError(
                    f"webhook host {host}: address not allowed ({why})", retryable=False
                )
            raise DeliveryError(f"webhook address {host} is {why}: not allowed", retryable=False)
        return addresses

    async def close(self) -> None:
        await self._client.aclose()


class SmsGatewaySender:
    """SMS through an HTTP gateway: POST `{"to", "text", "reference"}` as JSON. Credentials in
    the URL's userinfo (`https://user:key@sms.example/send`) go as HTTP basic auth, never in
    the request line. A provider with another request shape gets its own adapter class.

    The gateway URL is the operator's setting, not a customer's input, so unlike webhooks it
    is not checked against internal addresses: a gateway inside the operator's network is
    fine. Only the phone number (validated E.164) and the text come from customers."""

    def __init__(self, url: str, timeout: float = HTTP_TIMEOUT_SECONDS) -> None:
        try:
            parts = urllib.parse.urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise SettingsError(f"ALLOT_SMS_GATEWAY_URL is not a valid URL: {exc}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise SettingsError("ALLOT_SMS_GATEWAY_URL must be an absolute http(s) URL")
        self._auth = None
        if parts.username is not None:
            self._auth = httpx.BasicAuth(
                urllib.parse.unquote(parts.username), urllib.parse.unquote(parts.password or "")
            )
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        netloc = f"{host}:{port}" if port is not None else host
        self.url = urllib.parse.urlunsplit(
            (parts.scheme, netloc, parts.path, parts.query, parts.fragment)
        )
        self._where = f"SMS gateway {netloc}"
        self._timeout = timeout
        self._client = _client(timeout)

    async def send(self, message: OutgoingMessage) -> None:
        body = _json_bytes(
            {
                "to": message.address,
                "text": sms_text(message.subject, message.body),
                "reference": message.notification_id,
            }
        )
        headers = {"Content-Type": "application/json"}
        await _post(
            self._client, self._where, self.url, body, headers, self._timeout, auth=self._auth
        )

    async def close(self) -> None:
        await self._client.aclose()


# --- wiring ------------------------------------------------------------------------------


def build_senders(settings: Settings) -> dict[int, Sender]:
    """One sender per channel, from ALLOT_SMTP_URL / ALLOT_SMTP_FROM / ALLOT_SMS_GATEWAY_URL
    and ALLOT_WEBHOOK_ALLOW_PRIVATE; without SMTP or a gateway, email and SMS go to
    `<data dir>/outbox/{email,sms}/`."""
    outbox = settings.data_path / "outbox"
    email_sender: Sender
    if settings.smtp_url:
        email_sender = SmtpSender(settings.smtp_url, settings.smtp_from)
    else:
        email_sender = FolderSender(outbox / "email", settings.smtp_from)
    sms_sender: Sender
    if settings.sms_gateway_url:
        sms_sender = SmsGatewaySender(settings.sms_gateway_url)
    else:
        sms_sender = FolderSender(outbox / "sms", settings.smtp_from)
    return {
        Channel.EMAIL: email_sender,
        Channel.SMS: sms_sender,
        Channel.WEBHOOK: WebhookSender(allow_private=settings.webhook_allow_private),
    }


async def close_senders(senders: Mapping[int, Sender]) -> None:
    """Close every sender once; one failing to close does not keep the others open."""
    seen: set[int] = set()
    for sender in senders.values():
        if id(sender) in seen:
            continue
        seen.add(id(sender))
        try:
            await sender.close()
        except Exception:
            log.exception("closing %s failed", type(sender).__name__)
