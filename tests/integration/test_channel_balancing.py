"""Client-side balancing on the channels between the services (shared/channels.py,
deploy/README.md "Scaling"): a target that resolves to several addresses gets its calls spread
over all of them (`round_robin`), as `dns:///billing:50052` does over the replicas behind a
headless Kubernetes Service; and `dns:///` targets are accepted. The channels are the
services' own (`Channels` with `CHANNEL_OPTIONS`), dialling real gRPC servers on loopback."""

from __future__ import annotations

import grpc

from shared.channels import CHANNEL_OPTIONS, KEEPALIVE_OPTIONS
from shared.tls import Channels, TlsFiles

METHOD = "/allot.test.v1.Echo/Call"
CALL_TIMEOUT = 5.0
CALLS = 20


class Replica:
    """A server whose one method answers and counts its calls."""

    def __init__(self, addr: str = "127.0.0.1:0") -> None:
        self.calls = 0
        self.server = grpc.aio.server()
        handler = grpc.unary_unary_rpc_method_handler(self._call)  # bytes in, bytes out
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("allot.test.v1.Echo", {"Call": handler}),)
        )
        self.port = self.server.add_insecure_port(addr)

    async def _call(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self.calls += 1
        return b"ok:" + request


async def _calls_per_replica(options) -> list[int]:
    replicas = [Replica(), Replica()]
    for replica in replicas:
        await replica.server.start()
    channels = Channels(TlsFiles(), options)
    # The ipv4 resolver: one name for both addresses, as DNS gives for a headless Service.
    target = "ipv4:" + ",".join(f"127.0.0.1:{r.port}" for r in replicas)
    try:
        stub = channels.get(target).unary_unary(METHOD)
        for _ in range(CALLS):
            assert await stub(b"x", timeout=CALL_TIMEOUT, wait_for_ready=True) == b"ok:x"
        return [r.calls for r in replicas]
    finally:
        await channels.close()
        for replica in replicas:
            await replica.server.stop(None)


async def test_calls_spread_over_every_address_of_the_target():
    calls = await _calls_per_replica(CHANNEL_OPTIONS)
    assert sum(calls) == CALLS
    # round_robin alternates over the ready subchannels; both connect at once, so each gets
    # a fair share (allow for the first calls going where the first connection came up).
    assert min(calls) >= CALLS // 4, calls


async def test_without_the_balancing_config_one_address_takes_every_call():
    """The control: gRPC's default (pick_first) sends everything to one replica."""
    calls = await _calls_per_replica(KEEPALIVE_OPTIONS)
    assert sorted(calls) == [0, CALLS]


async def test_a_dns_target_is_dialled():
    replica = Replica("localhost:0")
    await replica.server.start()
    channels = Channels(TlsFiles(), CHANNEL_OPTIONS)
    try:
        stub = channels.get(f"dns:///localhost:{replica.port}").unary_unary(METHOD)
        assert await stub(b"y", timeout=CALL_TIMEOUT, wait_for_ready=True) == b"ok:y"
        assert replica.calls == 1
    finally:
        await channels.close()
        await replica.server.stop(None)
