"""The event loop a service runs on (README "Settings", ALLOT_EVENT_LOOP): uvloop where it is
installed, asyncio's own when asked or when uvloop is missing; a gRPC server answers on it."""

from __future__ import annotations

import asyncio
import builtins

import grpc
import pytest

from shared.event_loop import new_event_loop
from shared.settings import Settings, SettingsError


def test_the_setting_takes_auto_or_asyncio_only():
    assert Settings.from_env({}).event_loop == "auto"
    assert Settings.from_env({"ALLOT_EVENT_LOOP": "asyncio"}).event_loop == "asyncio"
    with pytest.raises(SettingsError, match="ALLOT_EVENT_LOOP"):
        Settings.from_env({"ALLOT_EVENT_LOOP": "trio"})


def test_asyncio_is_chosen_when_asked_or_when_uvloop_is_missing(monkeypatch):
    loop, name = new_event_loop("asyncio")
    loop.close()
    assert name == "asyncio"

    real_import = builtins.__import__

    def no_uvloop(module, *args, **kwargs):
        if module == "uvloop":
            raise ImportError("no uvloop here")
        return real_import(module, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_uvloop)
    loop, name = new_event_loop("auto")
    loop.close()
    assert (name, type(loop)) == ("asyncio", type(asyncio.new_event_loop()))


def test_a_grpc_server_answers_on_the_loop_auto_picks():
    uvloop = pytest.importorskip("uvloop")
    loop, name = new_event_loop("auto")
    assert (name, isinstance(loop, uvloop.Loop)) == ("uvloop", True)

    async def round_trip() -> bytes:
        server = grpc.aio.server()
        echo = grpc.unary_unary_rpc_method_handler(lambda request, context: request)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.T", {"E": echo}),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                return await channel.unary_unary("/t.T/E")(b"ping", timeout=10)
        finally:
            await server.stop(None)

    try:
        assert loop.run_until_complete(round_trip()) == b"ping"
    finally:
        loop.close()
