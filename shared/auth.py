"""Who is calling, and the per-RPC policy that says who may call what (docs/security.md).

A caller is a `Principal`: from a bearer token (`shared.tokens`: JWT, HS256 with a local secret,
or EdDSA / ES256 verified against a JWKS of public keys), or, over mTLS, from a client
certificate that names one of the suite's services (role `internal`). Permission is decided
before anything is read, so nobody learns whether another account's resources exist.
"""

from __future__ import annotations

import contextvars
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

from shared.errors import NotFound, PermissionDenied, Unauthenticated

T = TypeVar("T")

ADMIN, GATEWAY, INTERNAL = "admin", "gateway", "internal"
ACCOUNT_FULL, ACCOUNT_READ = "account_full", "account_read"
ROLES = frozenset({ADMIN, GATEWAY, INTERNAL, ACCOUNT_FULL, ACCOUNT_READ})
# Roles that act for every account (within their policy); the others act for one account.
OPERATOR_ROLES = frozenset({ADMIN, GATEWAY, INTERNAL})
# The suite's own services: the only subjects an `internal` principal can have.
SUITE_SERVICES = frozenset({"quota", "billing", "notification"})


@dataclass(frozen=True)
class Principal:
    subject: str
    account: str | None
    roles: frozenset[str]
    regions: frozenset[str] | None = None
    # The member accounts this principal's account is the enterprise master of. Filled in by
    # the interceptor only on the read RPCs whose policy has `master_reads` (docs/security.md,
    # "Masters and members"), so on every other RPC an account acts for itself alone.
    members: frozenset[str] = frozenset()

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
        if self.is_operator:
            return True
        return self.account is not None and (
            self.account == account_id or account_id in self.members
        )

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
    (empty: no internal caller). `master_reads`: a read an enterprise master's tokens may make
    about its members (the interceptor then gives the principal its `members`)."""

    roles: frozenset[str]
    internal_callers: frozenset[str] = frozenset()
    account_field: str | None = None
    region_fields: tuple[str, ...] = field(default=())
    master_reads: bool = False

    def allows(self, principal: Principal) -> bool:
        if principal.roles & (self.roles - {INTERNAL}):
            return True
        return INTERNAL in principal.roles and principal.subject in self.internal_callers


def policy(
    *roles: str,
    internal: tuple[str, ...] = (),
    account: str | None = None,
    regions: tuple[str, ...] = (),
    master_reads: bool = False,
) -> Policy:
    """A policy row: `policy(ADMIN, GATEWAY, internal=("billing",), account=..., regions=...)`.
    `internal` names the suite services that may call as `internal`; `master_reads` marks a
    read a master may make for its members (only rows open to `account_read`: reads)."""
    unknown = set(roles) - ROLES
    if unknown:
        raise ValueError(f"unknown roles {unknown}")
    if INTERNAL in roles:
        raise ValueError("name internal callers with internal=(...), not as a role")
    strangers = set(internal) - SUITE_SERVICES
    if strangers:
        raise ValueError(f"unknown internal callers {strangers}")
    if master_reads and ACCOUNT_READ not in roles:
        raise ValueError("master_reads is for reads (rows open to account_read)")
    all_roles = frozenset(roles) | ({INTERNAL} if internal else frozenset())
    return Policy(all_roles, frozenset(internal), account, regions, master_reads)


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


def needs_members(principal: Principal, rule: Policy, request) -> bool:
    """Whether this call must know the caller's members: a master-readable RPC called by an
    account principal about an account not its own, or by id (whose owner is known only
    once the resource is loaded)."""
    if not rule.master_reads or principal.is_operator or principal.account is None:
        return False
    if rule.account_field:
        target = _field(request, rule.account_field)
        return bool(target) and target != principal.account
    return True


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
