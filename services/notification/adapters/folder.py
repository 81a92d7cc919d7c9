"""A local outbox folder for `make run` when no SMTP server or SMS gateway is configured."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pathlib
import tempfile

from services.notification.adapters.outgoing import rfc3339, safe_id, utc
from services.notification.adapters.sms import sms_text
from services.notification.adapters.smtp import build_email
from services.notification.domain.delivery import DeliveryError, OutgoingMessage
from services.notification.domain.messages import Channel

log = logging.getLogger("allot.notification.channels")


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
        stamp = utc(message.create_time).strftime("%Y%m%dT%H%M%SZ")
        return self.directory / f"{stamp}-{safe_id(message.notification_id)}{extension}"

    def render(self, message: OutgoingMessage) -> bytes:
        if message.channel == Channel.EMAIL:
            return build_email(message, self.sender_address).as_bytes()
        lines = [
            f"To: {message.address}",
            f"Reference: {message.notification_id}",
            f"Date: {rfc3339(message.create_time)}",
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
