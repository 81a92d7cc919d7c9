"""Real receivers on loopback for notification tests: an SMTP server (aiosmtpd) and an HTTP
server for webhooks and the SMS gateway, each on port 0 of 127.0.0.1 in its own thread.

Both run in threads rather than on the test's event loop, so they keep answering while a test
blocks (an end-to-end test waiting on a process) and work the same from sync and async tests.
They record what arrived; `wait_for` waits, with a deadline, until enough has.
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.message
import email.policy
import http.server
import json
import pathlib
import socket
import ssl
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from services.notification.domain.addresses import verify_webhook
from shared import certs

HOST = "127.0.0.1"
WAIT_TIMEOUT = 10.0
# A handler never waits on a silent client longer than this.
SOCKET_TIMEOUT = 10.0


T = TypeVar("T")


class _Recorder(Generic[T]):
    """A thread-safe list that can be awaited until it holds `count` items."""

    def __init__(self) -> None:
        self._items: list[T] = []
        self._changed = threading.Condition()

    def append(self, item: T) -> None:
        with self._changed:
            self._items.append(item)
            self._changed.notify_all()

    def snapshot(self) -> list[T]:
        with self._changed:
            return list(self._items)

    def wait_sync(self, count: int, within: float) -> list[T]:
        with self._changed:
            if not self._changed.wait_for(lambda: len(self._items) >= count, within):
                raise TimeoutError(f"expected {count} within {within} s, got {len(self._items)}")
            return list(self._items)

    async def wait(self, count: int, within: float) -> list[T]:
        deadline = time.monotonic() + within
        while True:
            items = self.snapshot()
            if len(items) >= count:
                return items
            if time.monotonic() >= deadline:
                raise TimeoutError(f"expected {count} within {within} s, got {len(items)}")
            await asyncio.sleep(0.02)


# --- SMTP --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReceivedMail:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    login: str | None  # the user that authenticated, if any

    @property
    def message(self) -> email.message.EmailMessage:
        # CRLF is SMTP's line ending on the wire; a mailbox stores local line endings.
        data = self.data.replace(b"\r\n", b"\n")
        return email.message_from_bytes(data, policy=email.policy.default)


@dataclass
class SmtpInbox:
    host: str
    port: int = 0
    # recipient -> the reply to its RCPT TO, e.g. "550 5.1.1 No such user"
    refuse: dict[str, str] = field(default_factory=dict)
    _mail: _Recorder[ReceivedMail] = field(default_factory=_Recorder)

    @property
    def messages(self) -> list[ReceivedMail]:
        return self._mail.snapshot()

    def url(self, scheme: str = "smtp", credentials: str = "") -> str:
        userinfo = f"{credentials}@" if credentials else ""
        return f"{scheme}://{userinfo}{self.host}:{self.port}"

    async def wait_for(self, count: int = 1, within: float = WAIT_TIMEOUT) -> list[ReceivedMail]:
        return await self._mail.wait(count, within)

    def wait_for_sync(self, count: int = 1, within: float = WAIT_TIMEOUT) -> list[ReceivedMail]:
        return self._mail.wait_sync(count, within)


class _InboxHandler:
    def __init__(self, inbox: SmtpInbox) -> None:
        self.inbox = inbox

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):  # noqa: N802
        reply = self.inbox.refuse.get(address)
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):  # noqa: N802
        login = session.auth_data.login.decode() if session.authenticated else None
        self.inbox._mail.append(
            ReceivedMail(envelope.mail_from, list(envelope.rcpt_tos), envelope.content, login)
        )
        return "250 Message accepted for delivery"


class _PortZeroController(Controller):
    """aiosmtpd's Controller connects to `self.port` to check it started, so it cannot bind
    port 0 by itself; this one learns the port from the socket it bound."""

    def _create_server(self):
        create = super()._create_server()

        async def bind():
            server = await create
            self.port = server.sockets[0].getsockname()[1]
            return server

        return bind()


@contextlib.contextmanager
def smtp_receiver(
    *,
    credentials: tuple[str, str] | None = None,
    implicit_tls: ssl.SSLContext | None = None,
    starttls: ssl.SSLContext | None = None,
    port: int = 0,
) -> Iterator[SmtpInbox]:
    """An SMTP server on 127.0.0.1 (on `port`, or a free one). `credentials`: AUTH required
    with that user and password (allowed without TLS, as on loopback). `implicit_tls`: TLS
    from the first byte (smtps); `starttls`: STARTTLS offered and required before MAIL."""
    inbox = SmtpInbox(HOST)
    options: dict[str, object] = {}
    if credentials is not None:
        user, password = credentials

        def authenticate(server, session, envelope, mechanism, auth_data) -> AuthResult:
            ok = isinstance(auth_data, LoginPassword) and auth_data == (
                user.encode(),
                password.encode(),
            )
            # handled=False on failure: aiosmtpd then answers 535 itself.
            return AuthResult(success=ok, handled=ok, auth_data=auth_data if ok else None)

        options.update(
            authenticator=authenticate,
            auth_required=True,
            # aiosmtpd only counts STARTTLS as TLS; on an implicit-TLS port it must be told.
            auth_require_tls=starttls is not None,
        )
    if starttls is not None:
        options.update(tls_context=starttls, require_starttls=True)
    controller = _PortZeroController(
        _InboxHandler(inbox),
        hostname=HOST,
        port=port,
        ssl_context=implicit_tls,
        # Without it aiosmtpd looks up this host's FQDN, which can hang on a box without DNS.
        server_hostname="localhost",
        ready_timeout=WAIT_TIMEOUT,
        timeout=SOCKET_TIMEOUT,
        **options,
    )
    controller.start()
    try:
        inbox.port = controller.port
        yield inbox
    finally:
        controller.stop()


# --- TLS ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Certificate:
    """A certificate for 127.0.0.1 and its host names (localhost unless the test chose others),
    signed by a CA of its own, and contexts that use them."""

    cert: pathlib.Path
    key: pathlib.Path
    ca: pathlib.Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert, self.key)
        return context

    def client_context(self) -> ssl.SSLContext:
        """Verifies the server against this certificate's CA only (hostname checked too)."""
        return ssl.create_default_context(cafile=str(self.ca))


def self_signed_certificate(
    directory: pathlib.Path, names: Sequence[str] = ("localhost",)
) -> Certificate:
    """A fresh certificate for `names` and 127.0.0.1 under a fresh CA, made in-process with
    shared/certs.py (the `cryptography` package: no openssl command needed, nothing skips)."""
    ca = certs.new_ca(days=2, common_name="Allot test CA")
    leaf = certs.issue(
        ca.key, ca.certificate, names[0], dns_names=names, ip_addresses=["127.0.0.1"], days=2
    )
    cert, key = leaf.write(directory, "cert")
    ca_path = directory / "ca.pem"
    ca_path.write_bytes(ca.cert_pem)
    return Certificate(cert, key, ca_path)


# --- HTTP --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReceivedRequest:
    method: str
    path: str
    headers: dict[str, str]  # names lower-cased
    body: bytes
    status: int  # what the receiver answered
    signature_valid: bool | None  # None while the receiver has no secret to check with
    server_name: str | None = None  # over TLS: the name the client sent (SNI)

    def json(self) -> object:
        return json.loads(self.body)


class HttpReceiver:
    """Answers POSTs with a scripted sequence of status codes (the last one repeats), after
    an optional delay. With `secret` set (it may be set after start, once a contact created
    with `url()` has its secret), a request whose `Allot-Signature` does not verify is
    answered 401 and does not use up the script — what a careful receiver does. With `tls`
    (a server context), it speaks HTTPS and records the server name each client sent."""

    def __init__(
        self,
        statuses: Sequence[int],
        delay: float,
        secret: str | None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.statuses = list(statuses) or [200]
        self.delay = delay
        self.secret = secret
        self._next = 0
        self._lock = threading.Lock()
        self._requests: _Recorder[ReceivedRequest] = _Recorder()
        self._stopping = threading.Event()
        self._server = http.server.ThreadingHTTPServer((HOST, 0), self._handler_class())
        self._server.daemon_threads = True
        # A handler still sleeping out its delay at shutdown must not hold the test up.
        self._server.block_on_close = False
        self.port = self._server.server_address[1]
        self.scheme = "http"
        if tls is not None:
            self.scheme = "https"
            tls.sni_callback = _remember_server_name
            # The handshake happens on the handler thread's first read, not in accept().
            self._server.socket = tls.wrap_socket(
                self._server.socket, server_side=True, do_handshake_on_connect=False
            )
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def url(self, path: str = "/hook", host: str = HOST) -> str:
        """This receiver's URL; another `host` is a name the test resolves to 127.0.0.1."""
        return f"{self.scheme}://{host}:{self.port}{path}"

    @property
    def requests(self) -> list[ReceivedRequest]:
        return self._requests.snapshot()

    async def wait_for(self, count: int = 1, within: float = WAIT_TIMEOUT) -> list[ReceivedRequest]:
        return await self._requests.wait(count, within)

    def wait_for_sync(self, count: int = 1, within: float = WAIT_TIMEOUT) -> list[ReceivedRequest]:
        return self._requests.wait_sync(count, within)

    def _status_for(self, headers: dict[str, str], body: bytes) -> tuple[int, bool | None]:
        with self._lock:
            secret = self.secret
            valid = None
            if secret is not None:
                header = headers.get("allot-signature", "")
                valid = verify_webhook(secret, header, body, time.time())
                if not valid:
                    return 401, valid
            status = self.statuses[min(self._next, len(self.statuses) - 1)]
            self._next += 1
            return status, valid

    def _handler_class(self) -> type[http.server.BaseHTTPRequestHandler]:
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = SOCKET_TIMEOUT

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                headers = {name.lower(): value for name, value in self.headers.items()}
                status, valid = receiver._status_for(headers, body)
                if receiver.delay and receiver._stopping.wait(receiver.delay):
                    return  # shutting down; the client gave up long ago
                server_name = getattr(self.connection, "allot_server_name", None)
                receiver._requests.append(
                    ReceivedRequest("POST", self.path, headers, body, status, valid, server_name)
                )
                reply = f"status {status}\n".encode()
                # One request per connection: no idle keep-alive thread outlives a test.
                self.close_connection = True
                with contextlib.suppress(OSError):  # the client may have timed out and left
                    self.send_response(status)
                    self.send_header("Content-Type", "text/plain")
                    self.send_header("Content-Length", str(len(reply)))
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.wfile.write(reply)

            def log_message(self, format: str, *args: object) -> None:
                pass

        return Handler

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=WAIT_TIMEOUT)


def _remember_server_name(
    connection: ssl.SSLSocket, server_name: str | None, context: ssl.SSLContext
) -> None:
    connection.allot_server_name = server_name  # type: ignore[attr-defined]


@contextlib.contextmanager
def http_receiver(
    statuses: Sequence[int] = (200,),
    *,
    delay: float = 0.0,
    secret: str | None = None,
    tls: ssl.SSLContext | None = None,
) -> Iterator[HttpReceiver]:
    """An HTTP server on 127.0.0.1 answering POSTs with `statuses` in turn (see HttpReceiver);
    HTTPS with `tls`."""
    receiver = HttpReceiver(statuses, delay, secret, tls)
    receiver.start()
    try:
        yield receiver
    finally:
        receiver.stop()


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]
