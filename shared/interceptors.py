"""The one server interceptor: request id, authentication and policy, error mapping, logging.

Business logic never lives here. Every method needs an entry in the service's policy table
(deny by default); health and reflection are public.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

import grpc

from shared import logs, status
from shared.auth import Policy, TokenVerifier, authorize, set_principal
from shared.errors import PermissionDenied, Unavailable

log = logging.getLogger("allot.rpc")

PUBLIC_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)


class CallInterceptor(grpc.aio.ServerInterceptor):
    """``ready`` is set once the service can answer (database reachable, migrations applied,
    background work started); until then every non-public call is UNAVAILABLE, which clients
    retry, while health says NOT_SERVING."""

    def __init__(
        self, policies: dict[str, Policy], verifier: TokenVerifier, ready: asyncio.Event
    ) -> None:
        self.policies = policies
        self.verifier = verifier
        self.ready = ready

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
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

    def _enter(self, method: str, rule: Policy | None, request, context) -> None:
        metadata = dict(context.invocation_metadata() or ())
        logs.request_id.set(metadata.get("x-request-id") or uuid.uuid4().hex[:16])
        if not self.ready.is_set():
            raise Unavailable("SERVICE_STARTING", "the service is starting: retry shortly")
        principal = self.verifier.verify(metadata.get("authorization"))
        if rule is None:
            raise PermissionDenied(f"no policy allows {method}")
        authorize(principal, rule, request)
        set_principal(principal)

    def _unary(self, method, rule, behavior):
        async def wrapper(request, context):
            started = time.perf_counter()
            try:
                self._enter(method, rule, request, context)
                return await behavior(request, context)
            except grpc.aio.AbortError:
                raise
            except Exception as exc:  # the error table decides the code
                await status.abort(context, status.status_of(exc))
            finally:
                log.debug("%s %.1f ms", method, (time.perf_counter() - started) * 1000)

        return wrapper

    def _stream(self, method, rule, behavior):
        async def wrapper(request, context):
            try:
                self._enter(method, rule, request, context)
                async for item in behavior(request, context):
                    yield item
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await status.abort(context, status.status_of(exc))

        return wrapper
