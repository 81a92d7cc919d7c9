"""The one server interceptor: request id, authentication and policy, stream caps, error
mapping, and the access line of every call (docs/faults.md, "Logs").

Business logic never lives here. Every method needs an entry in the service's policy table
(deny by default); health and reflection are public. Who is calling (docs/security.md): a peer
whose verified mTLS client certificate names a suite service is that service (`internal`);
everyone else presents a bearer token.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable

import grpc

from shared import logs, status
from shared.auth import (
    Policy,
    Principal,
    authorize,
    internal_principal,
    needs_members,
    set_principal,
)
from shared.errors import PermissionDenied, ResourceExhausted, Unavailable
from shared.tls import peer_service
from shared.tokens import TokenVerifier
from shared.validation import check_strings

PUBLIC_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
# A request id from the caller is logged as given, if it looks like one.
MAX_REQUEST_ID_CHARS = 64


def _stream_key(principal: Principal) -> tuple:
    return (principal.subject, principal.account, tuple(sorted(principal.roles)))


class CallInterceptor(grpc.aio.ServerInterceptor):
    """``ready`` is set once the service can answer (database reachable, migrations applied,
    background work started); until then every non-public call is UNAVAILABLE, which clients
    retry, while health says NOT_SERVING."""

    def __init__(
        self,
        policies: dict[str, Policy],
        verifier: TokenVerifier,
        ready: asyncio.Event,
        max_streams_per_caller: int = 16,
        database_lost: asyncio.Event | None = None,
        members_of: Callable[[str], Awaitable[frozenset[str]]] | None = None,
        tls: bool = True,
    ) -> None:
        self.policies = policies
        # Whether calls may come over TLS, so a peer may present a client certificate; a
        # plaintext server has none to look for (gRPC's auth context is costly to build).
        self.tls = tls
        # The service's lookup of an enterprise master's members (None: no master reads).
        self.members_of = members_of
        self.verifier = verifier
        self.ready = ready
        # Set while the database has been away longer than the health grace (shared/server.py).
        self.database_lost = database_lost
        self.max_streams_per_caller = max_streams_per_caller
        self._streams: Counter[tuple] = Counter()
        # method -> (the service's handler, our wrapping of it): the handlers a server holds
        # do not change, so each is wrapped once, not on every call.
        self._wrapped: dict[str, tuple[object, object]] = {}

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        known = self._wrapped.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        wrapped = self._wrap(method, handler)
        if handler is not None:
            self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap(self, method: str, handler):
        if handler is None or method.startswith(PUBLIC_PREFIXES):
            return handler
        rule = self.policies.get(method)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(method, rule, handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(method, rule, handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler  # no client-streaming RPCs in the contract

    async def _enter(
        self, method: str, rule: Policy | None, request, context, call: _Call
    ) -> Principal:
        metadata = dict(context.invocation_metadata() or ())
        given = metadata.get(logs.REQUEST_ID_HEADER) or ""
        rid = (
            given
            if given.isascii() and given.isprintable() and 0 < len(given) <= MAX_REQUEST_ID_CHARS
            # 16 hex digits for log lines only: no need for the OS's entropy on every call.
            else f"{random.getrandbits(64):016x}"
        )
        logs.request_id.set(rid)
        # Echoed to the caller at the end of every call, errors included (status.abort keeps it).
        context.set_trailing_metadata(((logs.REQUEST_ID_HEADER, rid),))
        if not self.ready.is_set():
            raise Unavailable("SERVICE_STARTING", "the service is starting: retry shortly")
        if self.database_lost is not None and self.database_lost.is_set():
            # Health says NOT_SERVING (docs/faults.md): fail fast with a status clients retry.
            raise Unavailable("DATABASE_UNAVAILABLE", "the service lost its database: retry later")
        service = peer_service(context) if self.tls else None
        if service is not None:
            principal = internal_principal(service)
        else:
            principal = self.verifier.verify(metadata.get("authorization"))
        if rule is None:
            raise PermissionDenied(f"no policy allows {method}")
        if self.members_of is not None and needs_members(principal, rule, request):
            # A master reading its members (docs/security.md, "Masters and members").
            members = await self.members_of(principal.account or "")
            principal = dataclasses.replace(principal, members=members)
        call.principal = principal
        authorize(principal, rule, request)
        # Hostile but well-formed input (docs/security.md): no NUL reaches a database.
        check_strings(request)
        set_principal(principal)
        return principal

    def _unary(self, method, rule, behavior):
        async def wrapper(request, context):
            call = _Call(method)
            try:
                await self._enter(method, rule, request, context, call)
                return await behavior(request, context)
            except grpc.aio.AbortError:
                call.code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            except asyncio.CancelledError:
                call.cancelled(context)
                raise
            except Exception as exc:  # the error table decides the code
                error = status.status_of(exc)
                call.code = _code(error.code)
                await status.abort(context, error)
            finally:
                call.log()

        return wrapper

    def _stream(self, method, rule, behavior):
        async def wrapper(request, context):
            call = _Call(method)
            key = None
            try:
                principal = await self._enter(method, rule, request, context, call)
                key = _stream_key(principal)
                if self._streams[key] >= self.max_streams_per_caller:
                    key = None
                    raise ResourceExhausted(
                        "TOO_MANY_STREAMS",
                        f"this caller already holds {self.max_streams_per_caller} streams "
                        "(ALLOT_MAX_STREAMS_PER_CALLER): close one first",
                        limit=self.max_streams_per_caller,
                    )
                self._streams[key] += 1
                # A stream may run for hours: the caller learns its request id as it opens.
                await context.send_initial_metadata(
                    ((logs.REQUEST_ID_HEADER, logs.request_id.get()),)
                )
                async for item in behavior(request, context):
                    yield item
            except grpc.aio.AbortError:
                call.code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            except (asyncio.CancelledError, GeneratorExit):
                call.cancelled(context)
                raise
            except Exception as exc:
                error = status.status_of(exc)
                call.code = _code(error.code)
                await status.abort(context, error)
            finally:
                if key is not None:
                    self._streams[key] -= 1
                    if self._streams[key] <= 0:
                        del self._streams[key]
                call.log()  # one line when the stream ends

        return wrapper


_CODES = {code.value[0]: code for code in grpc.StatusCode}


def _code(number: int) -> grpc.StatusCode:
    return _CODES.get(number, grpc.StatusCode.UNKNOWN)


class _Call:
    """What the access line of one call says: method, status code, duration in ms, and who
    called (subject, role, account; `-` when the caller was refused before it was known). The
    request id is the line's own (logs.request_id). Metadata is never logged: it holds tokens."""

    __slots__ = ("method", "started", "code", "principal")

    def __init__(self, method: str) -> None:
        self.method = method
        self.started = time.perf_counter()
        self.code = grpc.StatusCode.OK
        self.principal: Principal | None = None

    def cancelled(self, context) -> None:
        remaining = context.time_remaining()
        expired = remaining is not None and remaining <= 0
        self.code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED

    def log(self) -> None:
        if not logs.access_log.isEnabledFor(logging.INFO):
            return
        ms = round((time.perf_counter() - self.started) * 1000, 1)
        principal = self.principal
        subject = _shown(principal.subject) if principal else "-"
        role = ",".join(sorted(principal.roles)) if principal else "-"
        account = _shown(principal.account or "-") if principal else "-"
        code = self.code.name
        logs.access(
            f"{self.method} {code} {ms:.1f} ms subject={subject} role={role} account={account}",
            {
                "method": self.method,
                "code": code,
                "duration_ms": ms,
                "subject": subject,
                "role": role,
                "account": account,
                "request_id": logs.request_id.get(),
            },
        )


def _shown(text: str) -> str:
    """A name from a token as one printable line (a log line must stay one line)."""
    return text if text.isprintable() else repr(text)
