"""Tokens (docs/security.md): EdDSA and ES256 tokens verified against a JWKS chosen by `kid`
(so keys rotate), HS256 only with a secret of at least 32 bytes, `aud` and a bounded `exp`,
and claims that make sense. A verified token is kept until its `exp`, and forgotten when the
JWKS is reloaded. Then `allot keys new` / `allot token --key` against a real quota
server that holds a JWKS and no secret."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

import grpc
import jwt
import pytest
from allot.quota.v1 import quota_service_pb2

from shared import cli
from shared import tokens as tokens_module
from shared.auth import ACCOUNT_FULL, ADMIN, INTERNAL
from shared.errors import Unauthenticated
from shared.keys import JWKS_NAME, new_key_pair
from shared.server import build_runtime
from shared.settings import SettingsError
from shared.tokens import (
    SERVICE_TOKEN_TTL,
    TokenSigner,
    TokenVerifier,
    VerificationKeys,
    internal_metadata,
)
from tests.support.quota import quota_settings, running_quota
from tests.support.servers import TEST_SECRET, Tokens

AUDIENCE = "allot-test"


def bearer(token: str) -> str:
    return f"Bearer {token}"


def reason_of(verifier: TokenVerifier, token: str) -> str:
    with pytest.raises(Unauthenticated) as caught:
        verifier.verify(bearer(token))
    return caught.value.reason


def raw(claims: dict, key, algorithm: str, headers: dict | None = None) -> str:
    base = {"sub": "op", "roles": [ADMIN], "exp": int(time.time()) + 3600}
    return jwt.encode({**base, **claims}, key, algorithm=algorithm, headers=headers)


def hs256_with(key: bytes, headers: dict) -> str:
    """An HS256 token keyed with any bytes (PyJWT refuses public keys as HMAC secrets)."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header = b64(json.dumps({"alg": "HS256", "typ": "JWT", **headers}).encode())
    claims = {"sub": "op", "roles": [ADMIN], "exp": int(time.time()) + 3600}
    body = b64(json.dumps(claims).encode())
    signature = hmac.new(key, f"{header}.{body}".encode(), hashlib.sha256).digest()
    return f"{header}.{body}.{b64(signature)}"


@pytest.fixture
def key_dir(tmp_path):
    """Two keys in one JWKS: an old EdDSA key and a new ES256 key."""
    old, jwks = new_key_pair(tmp_path, "EdDSA", kid="old")
    new, _ = new_key_pair(tmp_path, "ES256", kid="new")
    return tmp_path, old, new, jwks


def verifier_of(jwks_path, **kwargs) -> TokenVerifier:
    return TokenVerifier(VerificationKeys.from_jwks(jwks_path.read_text()), **kwargs)


def test_tokens_of_both_keys_verify_and_the_removed_key_fails(key_dir):
    _, old, new, jwks = key_dir
    verifier = verifier_of(jwks)
    old_token = TokenSigner.from_key_file(old).mint(ADMIN)
    new_token = TokenSigner.from_key_file(new).mint(ACCOUNT_FULL, account="acct-1")

    assert verifier.verify(bearer(old_token)).roles == {ADMIN}
    assert verifier.verify(bearer(new_token)).account == "acct-1"
    assert jwt.get_unverified_header(old_token)["alg"] == "EdDSA"
    assert jwt.get_unverified_header(new_token)["alg"] == "ES256"

    document = json.loads(jwks.read_text())
    document["keys"] = [k for k in document["keys"] if k["kid"] != "old"]
    rotated = TokenVerifier(VerificationKeys.from_jwks(document))
    assert reason_of(rotated, old_token) == "UNKNOWN_KEY"
    assert rotated.verify(bearer(new_token)).account == "acct-1"


def test_a_cached_token_is_refused_once_it_has_expired():
    verifier = TokenVerifier(TEST_SECRET)
    token = TokenSigner(TEST_SECRET).mint(ADMIN, ttl_seconds=1)
    exp = jwt.decode(token, options={"verify_signature": False})["exp"]

    first = verifier.verify(bearer(token))
    assert verifier.verify(bearer(token)) is first  # the second call is answered from the cache
    time.sleep(max(0.0, exp - time.time()) + 0.01)
    assert reason_of(verifier, token) == "TOKEN_EXPIRED"
    assert reason_of(verifier, token) == "TOKEN_EXPIRED"


def test_the_cache_is_bounded_and_keeps_only_tokens_that_passed():
    verifier = TokenVerifier(TEST_SECRET, cache_size=3)
    signer = TokenSigner(TEST_SECRET)
    minted = [signer.mint(ACCOUNT_FULL, account=f"acct-{i}") for i in range(5)]
    for token in minted:
        verifier.verify(bearer(token))
    assert len(verifier._verified) == 3
    assert reason_of(verifier, raw({"exp": int(time.time()) - 60}, TEST_SECRET, "HS256")) == (
        "TOKEN_EXPIRED"
    )
    forged = minted[0][:-4] + ("AAAA" if not minted[0].endswith("AAAA") else "BBBB")
    assert reason_of(verifier, forged) == "INVALID_TOKEN"
    assert len(verifier._verified) == 3
    # Evicted tokens are simply verified again.
    assert verifier.verify(bearer(minted[0])).account == "acct-0"


def test_a_token_of_a_rotated_away_key_is_refused_after_the_jwks_reload(key_dir, monkeypatch):
    _, old, new, jwks = key_dir
    verifier = TokenVerifier(VerificationKeys.from_jwks(jwks.read_text()), jwks_file=jwks)
    old_token = TokenSigner.from_key_file(old).mint(ADMIN)
    new_token = TokenSigner.from_key_file(new).mint(ACCOUNT_FULL, account="acct-1")
    assert verifier.verify(bearer(old_token)).roles == {ADMIN}
    assert verifier.verify(bearer(new_token)).account == "acct-1"

    document = json.loads(jwks.read_text())
    document["keys"] = [k for k in document["keys"] if k["kid"] != "old"]
    jwks.write_text(json.dumps(document) + "\n")  # another size: a change whatever the mtime
    # Within the check interval the file is not looked at; after it, it is.
    assert verifier.verify(bearer(old_token)).roles == {ADMIN}
    monkeypatch.setattr(tokens_module, "JWKS_CHECK_SECONDS", 0.0)
    assert reason_of(verifier, old_token) == "UNKNOWN_KEY"
    assert verifier.verify(bearer(new_token)).account == "acct-1"

    # A JWKS that does not parse keeps the keys in force.
    jwks.write_text("{ not json")
    assert verifier.verify(bearer(new_token)).account == "acct-1"
    assert reason_of(verifier, old_token) == "UNKNOWN_KEY"


def test_reload_forgets_tokens_verified_with_the_old_keys(key_dir):
    _, old, _, jwks = key_dir
    verifier = verifier_of(jwks)
    old_token = TokenSigner.from_key_file(old).mint(ADMIN)
    assert verifier.verify(bearer(old_token)).roles == {ADMIN}
    document = json.loads(jwks.read_text())
    document["keys"] = [k for k in document["keys"] if k["kid"] != "old"]
    verifier.reload(VerificationKeys.from_jwks(document))
    assert reason_of(verifier, old_token) == "UNKNOWN_KEY"


def test_kid_and_alg_must_name_a_trusted_key_of_that_algorithm(key_dir):
    _, old, new, jwks = key_dir
    verifier = verifier_of(jwks)
    old_pem = TokenSigner.from_key_file(old).key
    new_pem = TokenSigner.from_key_file(new).key

    # Signed by the old key, claiming to be the new one: the signature does not verify.
    assert reason_of(verifier, raw({}, old_pem, "EdDSA", {"kid": "new"})) == "INVALID_TOKEN"
    assert reason_of(verifier, raw({}, old_pem, "EdDSA", {"kid": "gone"})) == "UNKNOWN_KEY"
    assert reason_of(verifier, raw({}, old_pem, "EdDSA")) == "UNKNOWN_KEY"  # no kid
    # An ES256 header on the EdDSA key's kid.
    assert reason_of(verifier, raw({}, new_pem, "ES256", {"kid": "old"})) == "INVALID_TOKEN"


def test_symmetric_and_unsigned_tokens_are_refused_where_only_a_jwks_is_trusted(key_dir):
    _, _, _, jwks = key_dir
    verifier = verifier_of(jwks)
    document = jwks.read_text()
    # Algorithm confusion: HS256 keyed with the public JWKS text, or any secret.
    assert reason_of(verifier, hs256_with(document.encode(), {"kid": "old"})) == "INVALID_TOKEN"
    assert reason_of(verifier, raw({}, TEST_SECRET, "HS256")) == "INVALID_TOKEN"
    unsigned = jwt.encode({"sub": "op", "roles": [ADMIN], "exp": 2**31}, None, algorithm="none")
    assert reason_of(verifier, unsigned) == "INVALID_TOKEN"
    assert reason_of(TokenVerifier(TEST_SECRET), unsigned) == "INVALID_TOKEN"


def test_audience_is_required_and_checked_when_configured(key_dir):
    _, old, _, jwks = key_dir
    verifier = verifier_of(jwks, audience=AUDIENCE)
    pem = TokenSigner.from_key_file(old).key
    headers = {"kid": "old"}

    assert verifier.verify(bearer(raw({"aud": AUDIENCE}, pem, "EdDSA", headers))).subject == "op"
    assert TokenSigner.from_key_file(old, audience=AUDIENCE).mint(ADMIN)  # signs with aud
    assert reason_of(verifier, raw({"aud": "other"}, pem, "EdDSA", headers)) == "WRONG_AUDIENCE"
    assert reason_of(verifier, raw({}, pem, "EdDSA", headers)) == "WRONG_AUDIENCE"


def test_expiry_must_be_a_whole_number_within_the_max_ttl():
    verifier = TokenVerifier(TEST_SECRET, max_ttl=3600)
    now = int(time.time())

    assert verifier.verify(bearer(raw({"exp": now + 3000}, TEST_SECRET, "HS256")))
    assert reason_of(verifier, raw({"exp": now + 7200}, TEST_SECRET, "HS256")) == (
        "TOKEN_TTL_TOO_LONG"
    )
    assert reason_of(verifier, raw({"exp": 2**70}, TEST_SECRET, "HS256")) == "TOKEN_TTL_TOO_LONG"
    assert reason_of(verifier, raw({"exp": now + 60.5}, TEST_SECRET, "HS256")) == "INVALID_TOKEN"
    assert reason_of(verifier, raw({"exp": str(now + 60)}, TEST_SECRET, "HS256")) == (
        "INVALID_TOKEN"
    )
    assert reason_of(verifier, raw({"exp": now - 60}, TEST_SECRET, "HS256")) == "TOKEN_EXPIRED"


def test_one_minting_of_service_tokens_serves_calls_and_tests():
    """`internal_metadata` (every call between the services) and the tests' `Tokens.internal`
    mint through `TokenSigner.mint_internal`: an `internal` principal naming the service, short
    lived; no signer (mTLS), no token."""
    signer = TokenSigner(TEST_SECRET, audience=AUDIENCE)
    verifier = TokenVerifier(TEST_SECRET, audience=AUDIENCE)
    ((key, value),) = internal_metadata(signer, "billing")()
    assert key == "authorization"
    principal = verifier.verify(value)
    assert principal.roles == {INTERNAL} and principal.service == "billing"
    claims = jwt.decode(value.split()[1], options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == SERVICE_TOKEN_TTL
    tests_token = Tokens(signer=signer).internal("notification")
    assert verifier.verify(bearer(tests_token)).service == "notification"
    assert internal_metadata(None, "billing")() == ()
    with pytest.raises(ValueError):
        signer.mint_internal("gateway")


def test_claims_must_make_sense():
    verifier = TokenVerifier(TEST_SECRET)
    cases = {
        "internal, not a suite service": {"roles": [INTERNAL], "sub": "mallory"},
        "account and operator roles": {"roles": [ACCOUNT_FULL, ADMIN], "account": "acct-1"},
        "operator with an account": {"roles": [ADMIN], "account": "acct-1"},
        "regions not a list": {"regions": "ap-southeast-1"},
    }
    for name, claims in cases.items():
        assert reason_of(verifier, raw(claims, TEST_SECRET, "HS256")) == "INVALID_TOKEN", name
    assert verifier.verify(
        bearer(raw({"roles": [INTERNAL], "sub": "billing"}, TEST_SECRET, "HS256"))
    )


def test_a_short_secret_is_refused_everywhere(tmp_path, monkeypatch, capsys):
    short = "s" * 31
    with pytest.raises(ValueError, match="32 bytes"):
        TokenVerifier(short)
    with pytest.raises(ValueError, match="32 bytes"):
        TokenSigner(short)

    settings = quota_settings(f"sqlite+aiosqlite:///{tmp_path / 'q.db'}", tmp_path)
    settings = type(settings).from_env(environ={}, **{**_values(settings), "auth_secret": short})
    with pytest.raises(SettingsError, match="ALLOT_AUTH_SECRET"):
        build_runtime(settings, "quota")

    monkeypatch.setenv("ALLOT_AUTH_SECRET", short)
    monkeypatch.setenv("ALLOT_DATA_DIR", str(tmp_path))
    assert cli.main(["token", "--role", "admin"]) == 2
    assert "32 bytes" in capsys.readouterr().err


def _values(settings) -> dict[str, str]:
    return {
        "data_dir": settings.data_dir,
        "quota_database_url": settings.quota_database_url,
        "quota_addr": settings.quota_addr,
        "billing_addr": "",
    }


def test_allot_keys_new_twice_writes_two_keys_into_one_jwks(tmp_path, capsys):
    assert cli.main(["keys", "new", str(tmp_path), "--kid", "k1"]) == 0
    assert cli.main(["keys", "new", str(tmp_path), "--kid", "k2", "--alg", "ES256"]) == 0
    document = json.loads((tmp_path / JWKS_NAME).read_text())
    assert [(k["kid"], k["alg"]) for k in document["keys"]] == [("k1", "EdDSA"), ("k2", "ES256")]
    assert all("d" not in k for k in document["keys"])  # public halves only
    assert (tmp_path / "k1.pem").stat().st_mode & 0o077 == 0


async def test_a_quota_server_with_a_jwks_and_no_secret_accepts_allot_token_key(
    tmp_path, monkeypatch, capsys
):
    keys = tmp_path / "keys"
    assert cli.main(["keys", "new", str(keys), "--kid", "k1"]) == 0
    monkeypatch.delenv("ALLOT_AUTH_SECRET", raising=False)
    monkeypatch.setenv("ALLOT_DATA_DIR", str(tmp_path))
    capsys.readouterr()
    assert cli.main(["token", "--role", "admin", "--key", str(keys / "k1.pem")]) == 0
    token = capsys.readouterr().out.strip()

    settings = quota_settings(
        f"sqlite+aiosqlite:///{tmp_path / 'quota.db'}",
        tmp_path,
        auth_secret="",
        auth_jwks_file=str(keys / JWKS_NAME),
    )
    assert settings.optional_signing_secret() is None
    async with running_quota(settings) as quota:
        assert quota.server.runtime.signer is None
        request = quota_service_pb2.GetQuotaSummaryRequest(account_id="acct-1")
        summary = await quota.stub.GetQuotaSummary(
            request, metadata=(("authorization", bearer(token)),)
        )
        assert summary.account_id == "acct-1"

        hs256 = TokenSigner(TEST_SECRET).mint(ADMIN)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await quota.stub.GetQuotaSummary(request, metadata=(("authorization", bearer(hs256)),))
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
