"""Bearer tokens (HS256 JWT) and the per-RPC policy that says who may call what.

Claims: `sub` (user), `account` (absent for admin and service), `roles`, optional `regions`,
`exp`. Permission is decided before anything is read, so nobody learns whether another
account's resources exist.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import TypeVar

import jwt

from shared.errors import NotFound, PermissionDenied, Unauthenticated

T = TypeVar("T")

ADMIN, SERVICE, ACCOUNT_FULL, ACCOUNT_READ = "admin", "service", "account_full", "account_read"
ROLES = frozenset({ADMIN, SERVICE, ACCOUNT_FULL, ACCOUNT_READ})
ALGORITHM = "HS256"


@dataclass(frozen=True)
class Principal:
    subject: str
    account: str | None
    roles: frozenset[str]
    regions: frozenset[str] | None = None

    @property
    def is_operator(self) -> bool:
        """Admins and services act for any account."""
        return bool(self.roles & {ADMIN, SERVICE})

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

    def visible_regions(self, regions: tuple[str, ...]) -> tuple[str, ...]:
        """The regions of `regions` this token is valid in."""
        if self.regions is None:
            return regions
        return tuple(r for r in regions if r in self.regions)

    def check_region(self, region: str) -> None:
        if self.regions is not None and region and region not in self.regions:
            raise Unauthenticated(
                f"the token is not valid in region {region!r}",
                reason="TOKEN_REGION_MISMATCH",
                region=region,
            )


@dataclass(frozen=True)
class Policy:
    """Who may call an RPC, and which request fields carry the account and region."""

    roles: frozenset[str]
    account_field: str | None = None
    region_fields: tuple[str, ...] = field(default=())


def policy(*roles: str, account: str | None = None, regions: tuple[str, ...] = ()) -> Policy:
    unknown = set(roles) - ROLES
    if unknown:
        raise ValueError(f"unknown roles {unknown}")
    return Policy(frozenset(roles), account, regions)


# Shorthands for the common shapes of the policy tables.
OPERATORS = (ADMIN, SERVICE)
READERS = (ADMIN, SERVICE, ACCOUNT_FULL, ACCOUNT_READ)
OWNERS = (ADMIN, SERVICE, ACCOUNT_FULL)

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


class TokenVerifier:
    def __init__(self, secret: str) -> None:
        if not secret:
            raise ValueError("empty signing secret")
        self._secret = secret

    def verify(self, authorization: str | None) -> Principal:
        if not authorization:
            raise Unauthenticated(
                "missing bearer token in `authorization` metadata", reason="MISSING_TOKEN"
            )
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("`authorization` must be `Bearer <token>`")
        try:
            claims = jwt.decode(
                token.strip(),
                self._secret,
                algorithms=[ALGORITHM],
                options={"require": ["exp", "sub"]},
            )
        except jwt.ExpiredSignatureError as exc:
            raise Unauthenticated("the token has expired", reason="TOKEN_EXPIRED") from exc
        except jwt.PyJWTError as exc:
            raise Unauthenticated(f"invalid token: {exc}") from exc
        roles = claims.get("roles")
        if not isinstance(roles, list) or not roles or not set(roles) <= ROLES:
            raise Unauthenticated("the token's `roles` claim is missing or unknown")
        account = claims.get("account")
        if (
            (ACCOUNT_FULL in roles or ACCOUNT_READ in roles)
            and not account
            and not (set(roles) & {ADMIN, SERVICE})
        ):
            raise Unauthenticated("an account role needs the `account` claim")
        regions = claims.get("regions")
        if regions is not None and not (
            isinstance(regions, list) and all(isinstance(r, str) for r in regions)
        ):
            raise Unauthenticated("the token's `regions` claim must be a list of strings")
        return Principal(
            subject=str(claims["sub"]),
            account=str(account) if account else None,
            roles=frozenset(roles),
            regions=frozenset(regions) if regions is not None else None,
        )

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
        return jwt.encode(claims, self._secret, algorithm=ALGORITHM)


NOT_YOURS = "the token may not read this resource"


async def hiding_absence(call: Awaitable[T]) -> T:
    """Await a call that loads a resource by id. Account principals get the same
    PERMISSION_DENIED for ids that do not exist as for other accounts' resources, so existence
    never leaks (DESIGN §7); operators get NOT_FOUND."""
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
    if not principal.roles & rule.roles:
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
