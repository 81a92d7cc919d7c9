"""Who is calling, and the per-RPC policy that says who may call what (docs/security.md).

A caller is a `Principal`: from a bearer token (JWT: HS256 with a local secret, or EdDSA /
ES256 verified against a JWKS of public keys), or, over mTLS, from a client certificate that
names one of the suite's services (role `internal`). Permission is decided before anything is
read, so nobody learns whether another account's resources exist.
"""

from __future__ import annotations

import contextvars
import json
import pathlib
import time
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from shared.errors import NotFound, PermissionDenied, Unauthenticated

T = TypeVar("T")

ADMIN, GATEWAY, INTERNAL = "admin", "gateway", "internal"
ACCOUNT_FULL, ACCOUNT_READ = "account_full", "account_read"
ROLES = frozenset({ADMIN, GATEWAY, INTERNAL, ACCOUNT_FULL, ACCOUNT_READ})
# Roles that act for every account (within their policy); the others act for one account.
OPERATOR_ROLES = frozenset({ADMIN, GATEWAY, INTERNAL})
# The suite's own services: the only subjects an `internal` principal can have.
SUITE_SERVICES = frozenset({"quota", "billing", "notification"})

HS256 = "HS256"
ASYMMETRIC_ALGORITHMS = ("EdDSA", "ES256")
MIN_SECRET_BYTES = 32
DEFAULT_MAX_TTL = 30 * 86400
# A token header or payload this large is not a token (metadata is bounded anyway).
MAX_TOKEN_CHARS = 8192


@dataclass(frozen=True)
class Principal:
    subject: str
    account: str | None
    roles: frozenset[str]
    regions: frozenset[str] | None = None

    @property
    def is_operator(self) -> bool:
        """Admins, gateways and the suite's services act for any account (what they may do is
        limited by the policy table, not by account)."""
        return bool(self.roles & OPERATOR_ROLES)

    @property
    def service(self) -> str | None:
        """The suite service this principal is, for `internal` principals."""
        return self.subject if INTERNAL in self.roles else None

    @property
    def idempotency_owner(self) -> str:
        """Whose `request_id`s these are (docs/security.md, "Idempotency belongs to its
        caller"): an account's principals share their account's ids; operators (admins and the
        suite's services) share one operator scope, the one billing's commands to quota use."""
        if self.is_operator:
            return ""
        return f"account:{self.account}"

    def may_act_for(self, account_id: str) -> bool:
        return self.is_operator or (self.account is not None and self.account == account_id)

    def check_account(self, account_id: str) -> None:
        if not self.may_act_for(account_id):
            raise PermissionDenied("the token may not act for this account")

    def scoped_account(self, account_id: str) -> str:
        """The account a listing is about: account principals default to their own."""
        if not account_id and not self.is_operator:
            return self.account or ""
        self.check_account(account_id)
        return account_id

    def visible_regions(self, regions: Iterable[str]) -> tuple[str, ...]:
        """The regions of `regions` this token is valid in."""
        if self.regions is None:
            return tuple(regions)
        return tuple(r for r in regions if r in self.regions)

    def sees_region(self, region: str) -> bool:
        """Whether a resource of `region` is visible to this token ('' = not regional)."""
        return self.regions is None or not region or region in self.regions

    def check_region(self, region: str) -> None:
        if not self.sees_region(region):
            raise Unauthenticated(
                f"the token is not valid in region {region!r}",
                reason="TOKEN_REGION_MISMATCH",
                region=region,
            )


def internal_principal(service: str) -> Principal:
    """One of the suite's services, proven by its mTLS certificate."""
    return Principal(subject=service, account=None, roles=frozenset({INTERNAL}))


@dataclass(frozen=True)
class Policy:
    """Who may call an RPC, and which request fields carry the account and region.

    `roles` are the roles allowed; `internal_callers` the suite services allowed as `internal`
    (empty: no internal caller)."""

    roles: frozenset[str]
    internal_callers: frozenset[str] = frozenset()
    account_field: str | None = None
    region_fields: tuple[str, ...] = field(default=())

    def allows(self, principal: Principal) -> bool:
        if principal.roles & (self.roles - {INTERNAL}):
            return True
        return INTERNAL in principal.roles and principal.subject in self.internal_callers


def policy(
    *roles: str,
    internal: tuple[str, ...] = (),
    account: str | None = None,
    regions: tuple[str, ...] = (),
) -> Policy:
    """A policy row: `policy(ADMIN, GATEWAY, internal=("billing",), account=..., regions=...)`.
    `internal` names the suite services that may call as `internal`."""
    unknown = set(roles) - ROLES
    if unknown:
        raise ValueError(f"unknown roles {unknown}")
    if INTERNAL in roles:
        raise ValueError("name internal callers with internal=(...), not as a role")
    strangers = set(internal) - SUITE_SERVICES
    if strangers:
        raise ValueError(f"unknown internal callers {strangers}")
    all_roles = frozenset(roles) | ({INTERNAL} if internal else frozenset())
    return Policy(all_roles, frozenset(internal), account, regions)


# Shorthands for the common shapes of the policy tables.
READERS = (ADMIN, ACCOUNT_FULL, ACCOUNT_READ)
OWNERS = (ADMIN, ACCOUNT_FULL)

_principal: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "allot_principal", default=None
)


def current_principal() -> Principal:
    principal = _principal.get()
    if principal is None:
        raise Unauthenticated("no principal in this context")
    return principal


def set_principal(principal: Principal | None) -> contextvars.Token:
    return _principal.set(principal)


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
    ) -> None:
        self.keys = VerificationKeys(secret=keys) if isinstance(keys, str) else keys
        self.audience = audience or None
        self.max_ttl = max_ttl

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
        return self._principal(claims)

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


def internal_metadata(signer: TokenSigner | None, caller: str):
    """Call metadata for one suite service calling another: an `internal` token minted per
    call when the service holds a signing secret (local runs), else none (mTLS proves who
    calls; docs/security.md)."""

    def metadata() -> tuple[tuple[str, str], ...]:
        if signer is None:
            return ()
        token = signer.mint(INTERNAL, user=caller, ttl_seconds=600)
        return (("authorization", f"Bearer {token}"),)

    return metadata


NOT_YOURS = "the token may not read this resource"


async def hiding_absence(call: Awaitable[T]) -> T:
    """Await a call that loads a resource by id. Account principals get the same
    PERMISSION_DENIED for ids that do not exist as for other accounts' resources, so existence
    never leaks (docs/security.md); operators get NOT_FOUND."""
    try:
        return await call
    except NotFound:
        if current_principal().is_operator:
            raise
        raise PermissionDenied(NOT_YOURS) from None


def check_scope(account_id: str, region: str = "") -> None:
    """The caller may touch a resource of this account (and region, for regional tokens)."""
    principal = current_principal()
    if not principal.may_act_for(account_id):
        raise PermissionDenied(NOT_YOURS)
    principal.check_region(region)


def authorize(principal: Principal, rule: Policy, request) -> None:
    """Apply an RPC's policy to a request before the handler reads anything."""
    if not rule.allows(principal):
        raise PermissionDenied("the token's roles may not call this method")
    if rule.account_field:
        account_id = _field(request, rule.account_field)
        if account_id:
            principal.check_account(account_id)
    for path in rule.region_fields:
        for region in _values(request, path):
            principal.check_region(region)


def _field(message, path: str) -> str:
    for part in path.split("."):
        message = getattr(message, part)
    return message


def _values(message, path: str) -> list[str]:
    """Values at a dotted path; a `[]` suffix on a part walks a repeated field."""
    items = [message]
    for part in path.split("."):
        if part.endswith("[]"):
            items = [x for item in items for x in getattr(item, part[:-2])]
        else:
            items = [getattr(item, part) for item in items]
    return [v for v in items if v]


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
    return TokenVerifier(keys, audience=settings.auth_audience, max_ttl=settings.auth_max_ttl)


def signer_for(settings) -> TokenSigner | None:
    """The signer a service mints `internal` tokens with: only where a local HS256 secret is
    configured. With a JWKS and no secret (production) there is none: mTLS identifies the
    suite's services to each other."""
    secret = settings.optional_signing_secret()
    if secret is None:
        return None
    return TokenSigner(secret, audience=settings.auth_audience)
