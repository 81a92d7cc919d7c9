"""Secrets at rest and in logs (docs/security.md): a notification process creates its data dir
private (SQLite files 0600, folders 0700, the outbox's messages 0600), and its log at DEBUG
holds no token, no part of a token's signature, no HS256 secret and no webhook secret, after
calls with valid, refused and invalid tokens.

One real process on SQLite (file modes are the point), its quota at a closed port."""

from __future__ import annotations

import asyncio
import base64
import json
import time

import grpc
import jwt
import pytest

from shared.auth import ADMIN
from shared.tokens import TokenSigner
from tests.support.notification import (
    ARREARS,
    EMAIL,
    WEBHOOK,
    NotificationCalls,
    notification_env,
    notification_process,
)
from tests.support.processes import file_modes
from tests.support.receivers import closed_port
from tests.support.servers import TEST_SECRET, Tokens

ACCOUNT = "acct-1"
OTHER = "acct-2"
WAIT = 30.0


def forged_tokens(tokens: Tokens) -> dict[str, str]:
    """Tokens the service must refuse, each for another reason."""
    now = int(time.time())
    other = TokenSigner("another-secret-" + "y" * 40)
    unsigned = base64.urlsafe_b64encode(json.dumps({"alg": "none"}).encode()).rstrip(b"=")
    body = base64.urlsafe_b64encode(
        json.dumps({"sub": "x", "roles": [ADMIN], "exp": now + 60}).encode()
    ).rstrip(b"=")
    return {
        "wrong secret": other.mint(ADMIN, user="op"),
        "expired": jwt.encode(
            {"sub": "op", "roles": [ADMIN], "exp": now - 10}, TEST_SECRET, algorithm="HS256"
        ),
        "too long": tokens.signer.mint(ADMIN, user="op", ttl_seconds=400 * 86400),
        "alg none": f"{unsigned.decode()}.{body.decode()}.",
        "garbage": "eyJnYXJiYWdlIjoidG9rZW4ifQ.not-a-payload-at-all.c2lnbmF0dXJlLXRleHQ",
        "unknown role": jwt.encode(
            {"sub": "op", "roles": ["root"], "exp": now + 60}, TEST_SECRET, algorithm="HS256"
        ),
    }


def secret_parts(token: str) -> list[str]:
    """What of a token must never be logged: all of it, its claims and its signature (the
    header alone is the same for every token and says nothing)."""
    parts = [token]
    pieces = token.split(".")
    parts += [p for p in pieces[1:] if len(p) >= 16]
    return parts


async def test_data_dir_is_private_and_the_log_holds_no_secret(tmp_path):
    data_dir = tmp_path / "data"  # created by the process, not by the test
    database = f"sqlite+aiosqlite:///{data_dir / 'db' / 'notification.db'}"
    env = notification_env(
        database, data_dir, f"127.0.0.1:{closed_port()}", ALLOT_LOG_LEVEL="DEBUG"
    )
    tokens = Tokens()
    valid = {
        "admin": tokens.admin(),
        "account": tokens.account(ACCOUNT),
        "other account": tokens.account(OTHER),
        "region admin": tokens.admin(regions=["ap-southeast-1"]),
    }
    forged = forged_tokens(tokens)
    webhook_secrets: list[str] = []
    log_path = tmp_path / "notification.log"
    with notification_process(env, log_path) as process:
        async with grpc.aio.insecure_channel(process.addr) as channel:
            n = NotificationCalls(channel)
            own = tokens.md(valid["account"])
            mail = await n.create(ACCOUNT, EMAIL, "ops@example.com", [ARREARS], own)
            hook = await n.create(ACCOUNT, WEBHOOK, "https://hooks.example.com/x", [ARREARS], own)
            webhook_secrets.append(hook.webhook_secret)
            assert hook.webhook_secret.startswith("whsec_")
            sent = await n.send_test(mail.contact_id, tokens.md(valid["admin"]))
            await n.list_notifications(metadata=own)
            await n.list_contacts(ACCOUNT, metadata=tokens.md(valid["region admin"]))
            # A valid token refused: another account's contact.
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await n.get_contact(mail.contact_id, tokens.md(valid["other account"]))
            assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
            # A valid stream, opened and closed.
            stream = n.watch(ACCOUNT, own)
            await asyncio.sleep(0.3)
            stream.cancel()
            for why, token in forged.items():
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await n.list_contacts(ACCOUNT, metadata=tokens.md(token))
                assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED, why
            # The test mail lands in the outbox folder (no SMTP configured).
            folder = data_dir / "outbox" / "email"
            deadline = time.monotonic() + WAIT
            while not (folder.exists() and any(folder.glob("*.eml"))):
                assert time.monotonic() < deadline, "the test mail was not written"
                await asyncio.sleep(0.05)
            assert sent.notification_id
        process.send_signal()
        assert process.wait(WAIT) == 0
        log = process.log_text()

    # Nothing the process created is readable by anyone else.
    found = file_modes(data_dir)
    assert {"data/db/notification.db", "data/outbox/email"} <= set(found)
    loose = {path: oct(mode) for path, mode in found.items() if mode & 0o077}
    assert loose == {}, loose

    # The log, written at DEBUG, holds every call's access line, the refused ones too (the
    # suite's own debug lines; drivers stay at WARNING: docs/faults.md "Logs"), and no secret.
    assert " allot.access: " in log and " UNAUTHENTICATED " in log
    for name, token in {**valid, **forged}.items():
        for part in secret_parts(token):
            assert part not in log, f"the log holds the {name} token"
    assert TEST_SECRET not in log
    for secret in webhook_secrets:
        assert secret not in log
