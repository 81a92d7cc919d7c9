"""Bearer tokens (docs/security.md): verifying them into a `Principal` (HS256 with a local
secret, or EdDSA / ES256 against a JWKS of public keys), minting them (`allot token`, local
runs, tests), and the `internal` tokens one suite service presents to another on a local run.

A token's claims cannot change, so each distinct token is verified once and its principal kept
until the token's `exp` (a bounded LRU); the JWKS file is read again when it changes, and a
reload forgets every token verified before it (docs/security.md, "Tokens and keys").
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from shared.auth import (
    ACCOUNT_FULL,
    ACCOUNT_READ,
    INTERNAL,
    OPERATOR_ROLES,
    ROLES,
    SUITE_SERVICES,
    Principal,
)
from shared.errors import Unauthenticated

log = logging.getLogger("allot.auth")

HS256 = "HS256"
ASYMMETRIC_ALGORITHMS = ("EdDSA", "ES256")
MIN_SECRET_BYTES = 32
DEFAULT_MAX_TTL = 30 * 86400
# A token header or payload this large is not a token (metadata is bounded anyway).
MAX_TOKEN_CHARS = 8192
# How long an `internal` token a service mints for one call lives.
SERVICE_TOKEN_TTL = 600
# Distinct tokens whose principal is kept (a gateway presents one token for many calls).
VERIFIED_CACHE_SIZE = 10_000
# How often at most the JWKS file is looked at for a change (one stat).
JWKS_CHECK_SECONDS = 5.0


# --- keys ----------------------------------------------------------------------------------


def check_secret(secret: str) -> str:
    if len(secret.encode()) < MIN_SECRET_BYTES:
        raise ValueError(
            f"the HS256 token secret must be at least {MIN_SECRET_BYTES} bytes "
            f"(got {len(secret.encode())})"
        )
    return secret


@dataclass(frozen=True)
class VerificationKeys:
    """What tokens are verified with: an HS256 secret (local runs, tests) and/or the public
    keys of a JWKS, by `kid` (production)."""

    secret: str | None = None
    public_keys: dict[str, jwt.PyJWK] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.secret is not None:
            check_secret(self.secret)
        if self.secret is None and not self.public_keys:
            raise ValueError("no token verification key: set a secret or a JWKS")

    @staticmethod
    def from_jwks(document: dict | str, secret: str | None = None) -> VerificationKeys:
        data = json.loads(document) if isinstance(document, str) else document
        keys: dict[str, jwt.PyJWK] = {}
        for entry in data.get("keys", []) if isinstance(data, dict) else []:
            kid = entry.get("kid")
            if not kid:
                raise ValueError("every JWKS key needs a `kid`")
            key = jwt.PyJWK(entry)
            if key.algorithm_name not in ASYMMETRIC_ALGORITHMS:
                raise ValueError(
                    f"JWKS key {kid!r}: algorithm {key.algorithm_name} (not EdDSA/ES256)"
                )
            keys[kid] = key
        if not keys:
            raise ValueError("the JWKS has no keys")
        return VerificationKeys(secret=secret, public_keys=keys)


class TokenVerifier:
    """Checks bearer tokens: signature (by `alg` and `kid`), `exp` (present, not past, not
    further out than `max_ttl` seconds), `aud` when an audience is configured, and claims."""

    def __init__(
        self,
        keys: VerificationKeys | str,
        *,
        audience: str | None = None,
        max_ttl: int = DEFAULT_MAX_TTL,
        cache_size: int = VERIFIED_CACHE_SIZE,
        jwks_file: str | pathlib.Path | None = None,
    ) -> None:
        self.keys = VerificationKeys(secret=keys) if isinstance(keys, str) else keys
        self.audience = audience or None
        self.max_ttl = max_ttl
        # raw token -> (its principal, its `exp`): only tokens that passed every check.
        self._verified: OrderedDict[str, tuple[Principal, int]] = OrderedDict()
        self._cache_size = cache_size
        self._jwks_file = pathlib.Path(jwks_file) if jwks_file else None
        self._jwks_stamp = _stamp(self._jwks_file) if self._jwks_file else None
        self._jwks_checked = time.monotonic()

    def reload(self, keys: VerificationKeys) -> None:
        """Verify with `keys` from now on; tokens verified with the old keys are verified again
        (a key removed from the JWKS stops its tokens at once, cached or not)."""
        self.keys = keys
        self._verified.clear()

    def _check_jwks_file(self) -> None:
        """Reload the JWKS when its file changed (checked at most every JWKS_CHECK_SECONDS); a
        file that does not parse keeps the keys in force and is logged."""
        if self._jwks_file is None:
            return
        now = time.monotonic()
        if now - self._jwks_checked < JWKS_CHECK_SECONDS:
            return
        self._jwks_checked = now
        stamp = _stamp(self._jwks_file)
        if stamp == self._jwks_stamp:
            return
        self._jwks_stamp = stamp
        path = self._jwks_file
        try:
            keys = VerificationKeys.from_jwks(path.read_text(), secret=self.keys.secret)
        except (OSError, ValueError, jwt.PyJWTError) as exc:
            log.warning("ALLOT_AUTH_JWKS_FILE %s: not reloaded, keys kept: %s", path, exc)
            return
        log.info("ALLOT_AUTH_JWKS_FILE %s reloaded (%d keys)", path, len(keys.public_keys))
        self.reload(keys)

    def _key_for(self, token: str):
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise Unauthenticated(f"invalid token: {exc}") from exc
        algorithm = header.get("alg")
        if algorithm == HS256 and self.keys.secret is not None:
            return self.keys.secret, HS256
        if algorithm in ASYMMETRIC_ALGORITHMS and self.keys.public_keys:
            kid = header.get("kid")
            key = self.keys.public_keys.get(kid) if isinstance(kid, str) else None
            if key is None:
                raise Unauthenticated(
                    "the token's `kid` names no key this service trusts", reason="UNKNOWN_KEY"
                )
            if key.algorithm_name != algorithm:
                raise Unauthenticated("the token's `alg` does not match its key's")
            return key.key, algorithm
        raise Unauthenticated(f"tokens signed with {algorithm!r} are not accepted here")

    def verify(self, authorization: str | None) -> Principal:
        if not authorization:
            raise Unauthenticated(
                "missing bearer token in `authorization` metadata", reason="MISSING_TOKEN"
            )
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("`authorization` must be `Bearer <token>`")
        if len(token) > MAX_TOKEN_CHARS:
            raise Unauthenticated("the token is too long")
        self._check_jwks_file()
        cached = self._verified.get(token)
        if cached is not None:
            principal, exp = cached
            # PyJWT's rule: a token is expired from the second its `exp` names.
            if time.time() < exp:
                self._verified.move_to_end(token)
                return principal
            del self._verified[token]
            raise Unauthenticated("the token has expired", reason="TOKEN_EXPIRED")
        principal, exp = self._verify(token)
        self._verified[token] = (principal, exp)
        if len(self._verified) > self._cache_size:
            self._verified.popitem(last=False)
        return principal

    def _verify(self, token: str) -> tuple[Principal, int]:
        key, algorithm = self._key_for(token)
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=self.audience,
                options={
                    "require": ["exp", "sub"] + (["aud"] if self.audience else []),
                    "verify_aud": self.audience is not None,
                },
            )
        except jwt.ExpiredSignatureError as exc:
            raise Unauthenticated("the token has expired", reason="TOKEN_EXPIRED") from exc
        except (jwt.InvalidAudienceError, jwt.MissingRequiredClaimError) as exc:
            # PyJWT says "Audience doesn't match" or names the missing claim.
            if isinstance(exc, jwt.InvalidAudienceError) or exc.claim == "aud":
                raise Unauthenticated(
                    "the token is not meant for this service (`aud`)", reason="WRONG_AUDIENCE"
                ) from exc
            raise Unauthenticated(f"invalid token: {exc}") from exc
        except (jwt.PyJWTError, OverflowError, ValueError) as exc:
            raise Unauthenticated(f"invalid token: {exc}") from exc
        return self._principal(claims), claims["exp"]

    def _principal(self, claims: dict) -> Principal:
        exp = claims["exp"]
        if not isinstance(exp, int) or isinstance(exp, bool):
            raise Unauthenticated("the token's `exp` must be a whole number of seconds")
        if exp - time.time() > self.max_ttl:
            raise Unauthenticated(
                f"the token lives longer than {self.max_ttl} seconds (ALLOT_AUTH_MAX_TTL)",
                reason="TOKEN_TTL_TOO_LONG",
            )
        roles = claims.get("roles")
        if (
            not isinstance(roles, list)
            or not roles
            or not all(isinstance(r, str) for r in roles)
            or not set(roles) <= ROLES
        ):
            raise Unauthenticated("the token's `roles` claim is missing or unknown")
        subject = claims["sub"]
        if not isinstance(subject, str) or not subject or len(subject) > 200:
            raise Unauthenticated("the token's `sub` must be a non-empty string")
        if INTERNAL in roles and subject not in SUITE_SERVICES:
            raise Unauthenticated("an `internal` token's `sub` must name a suite service")
        account = claims.get("account")
        if account is not None and (not isinstance(account, str) or len(account) > 64):
            raise Unauthenticated("the token's `account` claim must be an account id")
        if set(roles) & {ACCOUNT_FULL, ACCOUNT_READ}:
            if not account:
                raise Unauthenticated("an account role needs the `account` claim")
            if set(roles) & OPERATOR_ROLES:
                raise Unauthenticated("a token is either an account's or an operator's")
        elif account:
            raise Unauthenticated("only account roles carry the `account` claim")
        regions = claims.get("regions")
        if regions is not None and not (
            isinstance(regions, list) and all(isinstance(r, str) for r in regions)
        ):
            raise Unauthenticated("the token's `regions` claim must be a list of strings")
        return Principal(
            subject=subject,
            account=account or None,
            roles=frozenset(roles),
            regions=frozenset(regions) if regions is not None else None,
        )


class TokenSigner:
    """Mints tokens: with the HS256 secret (local runs, tests) or a private key file (EdDSA or
    ES256, PEM; its `kid` is the file's stem unless given). Services in production hold none."""

    def __init__(
        self,
        secret: str | None = None,
        *,
        private_key_pem: bytes | None = None,
        kid: str | None = None,
        audience: str | None = None,
    ) -> None:
        self.audience = audience or None
        self.headers: dict[str, str] = {}
        if private_key_pem is not None:
            key = serialization.load_pem_private_key(private_key_pem, password=None)
            if isinstance(key, ed25519.Ed25519PrivateKey):
                self.algorithm = "EdDSA"
            elif isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1":
                self.algorithm = "ES256"
            else:
                raise ValueError("the private key must be Ed25519 or EC P-256")
            self.key = key
            if kid:
                self.headers["kid"] = kid
        elif secret is not None:
            self.key = check_secret(secret)
            self.algorithm = HS256
        else:
            raise ValueError("no signing key: a secret or a private key is needed")

    @staticmethod
    def from_key_file(path: str | pathlib.Path, audience: str | None = None) -> TokenSigner:
        path = pathlib.Path(path)
        return TokenSigner(private_key_pem=path.read_bytes(), kid=path.stem, audience=audience)

    def mint(
        self,
        role: str,
        account: str | None = None,
        user: str | None = None,
        regions: list[str] | None = None,
        ttl_seconds: int = 86400,
    ) -> str:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; one of {sorted(ROLES)}")
        if role in (ACCOUNT_FULL, ACCOUNT_READ) and not account:
            raise ValueError(f"role {role} needs --account")
        if role not in (ACCOUNT_FULL, ACCOUNT_READ) and account:
            raise ValueError(f"role {role} acts for every account: no --account")
        if role == INTERNAL and user not in SUITE_SERVICES:
            raise ValueError(
                f"an internal token's --user is a suite service: {sorted(SUITE_SERVICES)}"
            )
        now = int(time.time())
        claims: dict = {
            "sub": user or (f"{account}-user" if account else role),
            "roles": [role],
            "iat": now,
            "exp": now + ttl_seconds,
        }
        if account:
            claims["account"] = account
        if regions:
            claims["regions"] = regions
        if self.audience:
            claims["aud"] = self.audience
        return jwt.encode(claims, self.key, algorithm=self.algorithm, headers=self.headers or None)

    def mint_internal(self, service: str, ttl_seconds: int = SERVICE_TOKEN_TTL) -> str:
        """The `internal` token suite service `service` presents on a plaintext (local) run."""
        return self.mint(INTERNAL, user=service, ttl_seconds=ttl_seconds)


def internal_metadata(signer: TokenSigner | None, caller: str):
    """Call metadata for one suite service calling another: an `internal` token minted per
    call when the service holds a signing secret (local runs), else none (mTLS proves who
    calls; docs/security.md)."""

    def metadata() -> tuple[tuple[str, str], ...]:
        if signer is None:
            return ()
        return (("authorization", f"Bearer {signer.mint_internal(caller)}"),)

    return metadata


def verifier_for(settings) -> TokenVerifier:
    """The token verifier a service runs with, from its settings (docs/security.md)."""
    secret = settings.optional_signing_secret()
    if settings.auth_jwks_file:
        try:
            document = pathlib.Path(settings.auth_jwks_file).read_text()
            keys = VerificationKeys.from_jwks(document, secret=secret)
        except (OSError, ValueError, jwt.PyJWTError) as exc:
            raise ValueError(f"ALLOT_AUTH_JWKS_FILE {settings.auth_jwks_file}: {exc}") from exc
    else:
        try:
            keys = VerificationKeys(secret=secret)
        except ValueError as exc:
            raise ValueError(f"ALLOT_AUTH_SECRET: {exc}") from exc
    return TokenVerifier(
        keys,
        audience=settings.auth_audience,
        max_ttl=settings.auth_max_ttl,
        jwks_file=settings.auth_jwks_file or None,
    )


def _stamp(path: pathlib.Path) -> tuple[int, int, int] | None:
    """What tells a changed file: its inode (a replaced file), modification time and size."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def signer_for(settings) -> TokenSigner | None:
    """The signer a service mints `internal` tokens with: only where a local HS256 secret is
    configured. With a JWKS and no secret (production) there is none: mTLS identifies the
    suite's services to each other."""
    secret = settings.optional_signing_secret()
    if secret is None:
        return None
    return TokenSigner(secret, audience=settings.auth_audience)
