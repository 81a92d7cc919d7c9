"""gRPC's own retry on the channels between the services (docs/faults.md, "Callers classify
codes"): a call answered UNAVAILABLE is tried again within its deadline, up to 3 attempts in
all; other codes reach the caller at once, for it to decide. The channels are the services'
own (`Channels` with `CHANNEL_OPTIONS`), dialling a real gRPC server on loopback whose one
method answers what the test scripts and counts the attempts."""

from __future__ import annotations

import time

import grpc
import pytest

from shared.channels import CHANNEL_OPTIONS
from shared.tls import Channels, TlsFiles

METHOD = "/allot.test.v1.Flaky/Call"
CALL_TIMEOUT = 10.0


class Flaky:
    """Answers the scripted codes in turn (None: OK), then OK; counts every attempt."""

    def __init__(self, *codes: grpc.StatusCode | None) -> None:
        self.script = list(codes)
        self.attempts = 0
        self.server = grpc.aio.server()
        handler = grpc.unary_unary_rpc_method_handler(self._call)  # bytes in, bytes out
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("allot.test.v1.Flaky", {"Call": handler}),)
        )
        self.port = self.server.add_insecure_port("127.0.0.1:0")

    async def _call(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self.attempts += 1
        code = self.script.pop(0) if self.script else None
        if code is not None:
            await context.abort(code, f"scripted {code.name}")
        return b"ok:" + request


async def call(flaky: Flaky) -> bytes:
    await flaky.server.start()
    channels = Channels(TlsFiles(), CHANNEL_OPTIONS)
    try:
        stub = channels.get(f"127.0.0.1:{flaky.port}").unary_unary(METHOD)
        return await stub(b"x", timeout=CALL_TIMEOUT)
    finally:
        await channels.close()
        await flaky.server.stop(None)


async def test_unavailable_twice_is_retried_to_success_within_the_deadline():
    flaky = Flaky(grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE)
    started = time.monotonic()
    assert await call(flaky) == b"ok:x"
    assert flaky.attempts == 3
    # Backoff 0.2 s, then 0.4 s, each randomised by gRPC to at most that: well under a second.
    assert time.monotonic() - started < 5


async def test_unavailable_three_times_reaches_the_caller_after_three_attempts():
    flaky = Flaky(*[grpc.StatusCode.UNAVAILABLE] * 3)
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await call(flaky)
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert flaky.attempts == 3


@pytest.mark.parametrize(
    "code",
    [
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.FAILED_PRECONDITION,
    ],
)
async def test_other_codes_are_left_to_the_caller(code):
    flaky = Flaky(code)
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await call(flaky)
    assert failed.value.code() == code
    assert flaky.attempts == 1
