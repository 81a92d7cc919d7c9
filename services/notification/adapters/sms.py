"""SMS: the text of a notification as a phone shows it, and the HTTP gateway that sends it."""

from __future__ import annotations

import urllib.parse

import httpx

from services.notification.adapters.http_post import HTTP_TIMEOUT_SECONDS, client, post
from services.notification.adapters.outgoing import json_bytes
from services.notification.domain.delivery import OutgoingMessage
from shared.settings import SettingsError

# At most four concatenated SMS segments (153 GSM-7 characters each): subject and numbers.
SMS_MAX_CHARS = 480


def sms_text(subject: str, body: str, limit: int = SMS_MAX_CHARS) -> str:
    """The text of an SMS: subject and body on their own lines, cut to `limit` characters."""
    text = f"{subject.strip()}\n{body.strip()}" if subject.strip() else body.strip()
    if len(text) > limit:
        text = text[: limit - 3].rstrip() + "..."
    return text


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
        self._client = client(timeout)

    async def send(self, message: OutgoingMessage) -> None:
        body = json_bytes(
            {
                "to": message.address,
                "text": sms_text(message.subject, message.body),
                "reference": message.notification_id,
            }
        )
        headers = {"Content-Type": "application/json"}
        await post(
            self._client, self._where, self.url, body, headers, self._timeout, auth=self._auth
        )

    async def close(self) -> None:
        await self._client.aclose()
