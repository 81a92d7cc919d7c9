"""ALLOT_MAX_CONNECTION_AGE_SECONDS (docs/operations.md, "Spreading calls"): a server closes
connections that old with a GOAWAY, so a client connects again (and resolves its `dns:///`
target anew); a stream still open after the grace ends with UNAVAILABLE, and the channel's
next call simply goes over a new connection. Without the setting a stream stays open."""

from __future__ import annotations

import asyncio

import grpc
from allot.quota.v1 import quota_service_pb2

from tests.support.quota import quota_server, sqlite_in

# Generous for a loaded 2-core machine; the age and grace below are 1 s each.
STREAM_END_BOUND = 20.0


async def _open_stream(q):
    """A WatchEvents stream, open: the server sent its initial metadata (the request id)."""
    call = q.handle.stub.WatchEvents(
        quota_service_pb2.WatchEventsRequest(after_sequence=0), metadata=q.admin
    )
    await asyncio.wait_for(call.initial_metadata(), 10)
    return call


async def _drain(call) -> grpc.StatusCode:
    while True:  # ends: the server closes the stream (or the bound below fails the test)
        item = await call.read()
        if item is grpc.aio.EOF:
            return await call.code()


async def test_an_old_connection_is_closed_and_the_next_call_uses_a_new_one(tmp_path):
    async with quota_server(
        sqlite_in(tmp_path / "db"),
        tmp_path,
        max_connection_age="1",
        max_connection_age_grace="1",
    ) as q:
        call = await _open_stream(q)
        try:
            code = await asyncio.wait_for(_drain(call), STREAM_END_BOUND)
        except grpc.aio.AioRpcError as error:
            code = error.code()
        assert code == grpc.StatusCode.UNAVAILABLE
        # The same channel goes on: a new connection for the next call.
        response = await q.handle.stub.GetQuotaSummary(
            quota_service_pb2.GetQuotaSummaryRequest(account_id="acme"), metadata=q.admin
        )
        assert response is not None


async def test_without_the_setting_a_stream_outlives_that_age(tmp_path):
    async with quota_server(sqlite_in(tmp_path / "db"), tmp_path) as q:
        call = await _open_stream(q)
        try:
            # Three times the age and grace above: the stream is still open.
            done, _ = await asyncio.wait({asyncio.ensure_future(_drain(call))}, timeout=6)
            assert not done
        finally:
            call.cancel()
