"""One HTTP POST of a notification, as webhooks and the SMS gateway make it: bounded in time,
never redirected, its failure classified in a few words worth showing the account."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable, Sequence

import httpx

from services.notification.adapters.outgoing import USER_AGENT
from services.notification.domain.delivery import DeliveryError

log = logging.getLogger("allot.notification.channels")

HTTP_TIMEOUT_SECONDS = 10.0
RESPONSE_EXCERPT_BYTES = 200


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


async def post(
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


def client(timeout: float, transport: httpx.AsyncBaseTransport | None = None) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        timeout=httpx.Timeout(timeout),
        follow_redirects=False,
        headers={"User-Agent": USER_AGENT},
        transport=transport,
    )
