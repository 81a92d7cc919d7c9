"""Signed webhooks: the body a receiver gets, and the sender that decides where it may go."""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import socket
import ssl
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence

import httpx

from services.notification.adapters.http_post import HTTP_TIMEOUT_SECONDS, client, post
from services.notification.adapters.outgoing import json_bytes, rfc3339
from services.notification.domain.addresses import address_class, sign_webhook, validate_address
from services.notification.domain.delivery import DeliveryError, OutgoingMessage
from services.notification.domain.messages import Channel
from shared.errors import InvalidArgument

log = logging.getLogger("allot.notification.channels")


def webhook_body(message: OutgoingMessage) -> bytes:
    """The exact bytes a webhook receives (and the signature covers)."""
    return json_bytes(
        {
            "notification_id": message.notification_id,
            "account_id": message.account_id,
            "message_type": message.message_type,
            "subject": message.subject,
            "body": message.body,
            "create_time": rfc3339(message.create_time),
            "data": message.payload,
        }
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
        self._client = client(timeout, transport)

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
        await post(
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
