"""Every RPC of QuotaService, BillingService and NotificationService, fuzzed from its proto
descriptor (docs/security.md, "Hostile input").

Hypothesis builds request messages field by field from the descriptors: strings (empty, unicode,
long, or one of the suite's real ids), int64 extremes, extreme Timestamps and Durations, unknown
enum numbers, repeated fields with several items, nested messages to a bounded depth, one member
of each oneof. Each is sent with an admin token to real in-process servers (quota; billing
following that quota; notification), one set per module. Whatever comes back, the status is never
UNKNOWN or INTERNAL, and a call that failed left its service's database exactly as it was (a
digest of every table's rows before and after).

A new RPC is fuzzed without listing it here: the parameters are read from the descriptors.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import threading

import grpc
import pytest
import sqlalchemy as sa
from allot.billing.v1 import billing_service_pb2, billing_service_pb2_grpc
from allot.notification.v1 import notification_service_pb2, notification_service_pb2_grpc
from allot.quota.v1 import quota_service_pb2, quota_service_pb2_grpc
from google.protobuf import descriptor as pb_descriptor
from google.protobuf import message_factory
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.billing import billing_settings, running_billing, write_catalog
from tests.support.databases import create_postgres_database, drop_postgres_database
from tests.support.notification import notification_settings, running_notification
from tests.support.quota import QuotaCalls, running_quota
from tests.support.quota import quota_settings as quota_settings_for
from tests.support.servers import Tokens

CLOCK_START = "2024-01-01T00:00:00Z"
ACCOUNT = "fuzz-acct"
# Examples per RPC; PostgreSQL runs fewer (same code paths, slower round trips).
EXAMPLES = {"sqlite": int(os.environ.get("ALLOT_FUZZ_EXAMPLES", "30")), "postgresql": 8}
STREAM_WAIT = 0.3  # seconds a streaming call is read before it is cancelled
MAX_DEPTH = 3

INT64 = (-(2**63), 2**63 - 1)
INT32 = (-(2**31), 2**31 - 1)
UINT32 = (0, 2**32 - 1)
UINT64 = (0, 2**64 - 1)
# Timestamp's own range, 0001-01-01 .. 9999-12-31T23:59:59Z.
TS_SECONDS = (-62135596800, 253402300799)
DURATION_SECONDS = (-315576000000, 315576000000)

SERVICES = {
    "quota": (quota_service_pb2, "QuotaService", quota_service_pb2_grpc.QuotaServiceStub),
    "billing": (billing_service_pb2, "BillingService", billing_service_pb2_grpc.BillingServiceStub),
    "notification": (
        notification_service_pb2,
        "NotificationService",
        notification_service_pb2_grpc.NotificationServiceStub,
    ),
}

FD = pb_descriptor.FieldDescriptor
# Numbers that get a request past its first checks, by field name.
INT_HINTS = {
    "http_status": [200, 503],
    "quantity": [1, 5],
    "total_quantity": [10],
    "periods": [1, 2],
    "lead_days": [7],
    "page_size": [10],
}
# Written by the services' own background work (a consumer's lease heartbeat), not by calls.
BACKGROUND_TABLES = {"consumer_leases"}


# --- strategies from descriptors -------------------------------------------------------------


def _ints(low: int, high: int) -> st.SearchStrategy[int]:
    edges = [low, high, 0, 1, -1, low + 1, high - 1]
    return st.one_of(
        st.sampled_from([e for e in edges if low <= e <= high]),
        st.integers(max(low, -1000), min(high, 1000)),
        st.integers(low, high),
    )


def _strings(known: dict[str, list[str]]) -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(sorted({v for values in known.values() for v in values})),
        st.just(""),
        st.text(max_size=12),
        st.text(min_size=200, max_size=2000, alphabet=st.characters(codec="utf-8")),
        # Digits of other scripts, spaces, controls: what a strict parser must refuse.
        st.sampled_from(["٢٠٢٤-٠١", "２０２４-０１", " 2024-01", "2024-01\n", "\x00", "9999-12"]),
    )


def _floats() -> st.SearchStrategy[float]:
    return st.one_of(
        st.sampled_from([float("nan"), float("inf"), -float("inf"), 0.0, 50.0, 100.0, 1e308]),
        st.floats(allow_nan=True, allow_infinity=True),
    )


_SCALARS = {
    FD.TYPE_INT64: _ints(*INT64),
    FD.TYPE_SINT64: _ints(*INT64),
    FD.TYPE_SFIXED64: _ints(*INT64),
    FD.TYPE_INT32: _ints(*INT32),
    FD.TYPE_SINT32: _ints(*INT32),
    FD.TYPE_SFIXED32: _ints(*INT32),
    FD.TYPE_UINT32: _ints(*UINT32),
    FD.TYPE_FIXED32: _ints(*UINT32),
    FD.TYPE_UINT64: _ints(*UINT64),
    FD.TYPE_FIXED64: _ints(*UINT64),
    FD.TYPE_BOOL: st.booleans(),
    FD.TYPE_DOUBLE: _floats(),
    FD.TYPE_FLOAT: _floats(),
    FD.TYPE_BYTES: st.binary(max_size=64),
}


def _well_known(name: str) -> st.SearchStrategy[dict] | None:
    if name == "google.protobuf.Timestamp":
        return st.fixed_dictionaries(
            {
                "seconds": st.one_of(
                    # The ends of Timestamp, of the accepted range (2000, 9000), and now.
                    st.sampled_from(
                        [*TS_SECONDS, 946684799, 946684800, 221845392000, 221845391999]
                        + [1704067200, 253402214400, 221813856000]
                    ),
                    st.integers(*TS_SECONDS),
                    st.integers(1704067200 - 86400 * 60, 1704067200 + 86400 * 60),
                ),
                "nanos": st.one_of(st.just(0), st.integers(0, 999_999_999)),
            }
        )
    if name == "google.protobuf.Duration":
        seconds = _ints(*DURATION_SECONDS)
        return st.fixed_dictionaries(
            {"seconds": seconds, "nanos": st.one_of(st.just(0), st.integers(-999_999_999, 0))}
        )
    if name == "google.type.Money":
        return st.fixed_dictionaries(
            {
                "currency_code": st.one_of(st.just("USD"), st.text(max_size=4)),
                "units": _ints(*INT64),
                "nanos": _ints(*INT32),
            }
        )
    return None


def message_dicts(
    descriptor: pb_descriptor.Descriptor, known: dict[str, list[str]], depth: int = 0
) -> st.SearchStrategy[dict]:
    """Field values of a message as a dict (nested messages as dicts), any subset of fields."""
    special = _well_known(descriptor.full_name)
    if special is not None:
        return special
    fields = {}
    oneofs = [o for o in descriptor.oneofs if len(o.fields) > 1]
    in_oneof = {f.name for o in oneofs for f in o.fields}
    for f in descriptor.fields:
        if f.name in in_oneof:
            continue
        value = _field(f, known, depth)
        if value is not None:
            fields[f.name] = st.one_of(st.none(), value)
    for o in oneofs:
        choices = [
            st.tuples(st.just(f.name), value)
            for f in o.fields
            if (value := _field(f, known, depth)) is not None
        ]
        fields[f"oneof:{o.name}"] = st.one_of(st.none(), *choices)
    return st.fixed_dictionaries(fields)


def _field(f: pb_descriptor.FieldDescriptor, known, depth) -> st.SearchStrategy | None:
    if f.type == FD.TYPE_MESSAGE:
        if f.message_type.GetOptions().map_entry:
            return None
        if depth >= MAX_DEPTH:
            return None
        single = message_dicts(f.message_type, known, depth + 1)
    elif f.type == FD.TYPE_ENUM:
        numbers = st.sampled_from([v.number for v in f.enum_type.values])
        single = st.one_of(numbers, numbers, _ints(*INT32))
    elif f.type == FD.TYPE_STRING:
        if f.name == "paths":  # FieldMask: real field names too
            single = st.one_of(
                st.sampled_from(["enabled", "remaining_quantity", "address", "message_types"]),
                _strings(known),
            )
        elif f.name in known:
            # Mostly a real value, so that requests get past the first checks and reach the
            # extreme numbers and times next to it.
            hint = st.sampled_from(known[f.name])
            single = st.one_of(hint, hint, hint, _strings(known))
        else:
            single = _strings(known)
    elif f.name in INT_HINTS and f.type in _SCALARS:
        hint = st.sampled_from(INT_HINTS[f.name])
        single = st.one_of(hint, hint, _SCALARS[f.type])
    else:
        single = _SCALARS[f.type]
    if f.is_repeated:
        return st.lists(single, max_size=4)
    return single


def build(descriptor: pb_descriptor.Descriptor, values: dict):
    message = message_factory.GetMessageClass(descriptor)()
    _fill(message, values)
    return message


def _fill(message, values: dict) -> None:
    fields = message.DESCRIPTOR.fields_by_name
    for key, value in values.items():
        if value is None:
            continue
        if key.startswith("oneof:"):
            key, value = value
        f = fields[key]
        if f.is_repeated:
            target = getattr(message, key)
            for item in value:
                if f.type == FD.TYPE_MESSAGE:
                    _fill(target.add(), item)
                else:
                    target.append(item)
        elif f.type == FD.TYPE_MESSAGE:
            sub = getattr(message, key)
            sub.SetInParent()
            _fill(sub, value)
        else:
            setattr(message, key, value)


# --- the servers ------------------------------------------------------------------------------


async def snapshot(db) -> dict[str, str]:
    """A digest of every table's rows, by table (idempotency and outbox tables included)."""

    async def work(uow):
        conn = await uow.session.connection()
        names = await conn.run_sync(lambda c: sorted(sa.inspect(c).get_table_names()))
        digests = {}
        for name in names:
            if name in BACKGROUND_TABLES:
                continue
            rows = (await conn.execute(sa.text(f'SELECT * FROM "{name}"'))).all()
            digest = hashlib.sha256()
            for row in sorted(repr(tuple(r)) for r in rows):
                digest.update(row.encode())
            digests[name] = digest.hexdigest()
        return digests

    return await db.read(work)


class Suite:
    def __init__(self, dialect, quota, billing, notification, known: dict[str, list[str]]) -> None:
        self.dialect = dialect
        self.known = known
        self.dbs = {
            "quota": quota.server.runtime.db,
            "billing": billing.server.runtime.db,
            "notification": notification.server.runtime.db,
        }
        tokens = Tokens()
        self.admin = tokens.md(tokens.admin())
        self.stubs = {
            "quota": quota.stub,
            "billing": billing.calls.stub,
            "notification": notification.calls.stub,
        }


async def _seed(quota, billing) -> list[str]:
    """An account with money, a purchased package (with auto-renewal) and a granted one, so
    that generated requests can name things that exist."""
    calls = billing.calls
    await calls.create_account(ACCOUNT)
    await calls.top_up(ACCOUNT, "100")
    order = await calls.stub.PurchasePackage(
        billing_service_pb2.PurchasePackageRequest(
            request_id="fuzz-buy",
            account_id=ACCOUNT,
            offer_id="passport-100-1y",
            region="ap-southeast-1",
            auto_renew=True,
        ),
        metadata=calls.admin,
    )
    granted = await QuotaCalls(quota).grant(
        ACCOUNT, 10, region="ap-southeast-1", api="passport", expire="8999-12-31T00:00:00Z"
    )
    return {
        "account_id": [ACCOUNT],
        "master_account_id": [ACCOUNT],
        "region": ["ap-southeast-1", "ap-southeast-2"],
        "api": ["passport", "general-text"],
        "offer_id": ["passport-100-1y"],
        "currency_code": ["USD"],
        "month": ["2024-01", "9999-12", "0000-01", "2024-13"],
        "address": ["ops@example.com", "+8613800000000", "https://example.com/hook"],
        "order_id": [order.order_id],
        "package_id": [order.package_id, granted.package_id],
        "event_id": ["fuzz-event-1", "fuzz-event-2"],
        "request_id": ["fuzz-request-1"],
    }


async def _start(dialect: str, tmp, stack: contextlib.AsyncExitStack) -> Suite:
    urls = {}
    for name in ("quota", "billing", "notification"):
        (tmp / name).mkdir()
        if dialect == "sqlite":
            urls[name] = f"sqlite+aiosqlite:///{tmp / name / 'db.sqlite'}"
        else:
            urls[name] = await create_postgres_database()
            stack.push_async_callback(drop_postgres_database, urls[name])
    catalog = str(write_catalog(tmp))
    quota = await stack.enter_async_context(
        running_quota(
            quota_settings_for(
                urls["quota"],
                tmp / "quota",
                clock="manual",
                clock_start=CLOCK_START,
                catalog=catalog,
            )
        )
    )
    billing = await stack.enter_async_context(
        running_billing(
            billing_settings(
                urls["billing"], tmp / "billing", quota.addr, CLOCK_START, catalog=catalog
            )
        )
    )
    notification = await stack.enter_async_context(
        running_notification(
            notification_settings(
                urls["notification"], tmp / "notification", quota.addr, catalog=catalog
            )
        )
    )
    known = await _seed(quota, billing)
    return Suite(dialect, quota, billing, notification, known)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def suite(request, tmp_path_factory):
    """The servers run on their own event loop in a thread; Hypothesis drives them from here
    (it does not run coroutines itself)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    stack = contextlib.AsyncExitStack()

    def run(coro, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)

    try:
        tmp = tmp_path_factory.mktemp(f"fuzz-{request.param}")
        started = run(_start(request.param, tmp, stack))
        started.run = run
        yield started
    finally:
        run(stack.aclose())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


# --- the test -----------------------------------------------------------------------------------


def _rpcs():
    for service, (module, name, _stub) in SERVICES.items():
        for method in module.DESCRIPTOR.services_by_name[name].methods:
            yield pytest.param(service, method, id=f"{name}.{method.name}")


async def _call(suite: Suite, service: str, method, request):
    """The call's status code (OK when it succeeded)."""
    stub_method = getattr(suite.stubs[service], method.name)
    try:
        if method.server_streaming:
            call = stub_method(request, metadata=suite.admin, timeout=STREAM_WAIT)
            for _ in range(3):  # a few items at most, within STREAM_WAIT
                if await call.read() is grpc.aio.EOF:
                    break
            call.cancel()
        else:
            await stub_method(request, metadata=suite.admin, timeout=30)
    except grpc.aio.AioRpcError as error:
        return error.code(), error.details()
    return grpc.StatusCode.OK, ""


@pytest.mark.parametrize(("service", "method"), list(_rpcs()))
def test_fuzz_rpc(suite: Suite, service: str, method) -> None:
    strategy = message_dicts(method.input_type, suite.known)
    streaming = method.server_streaming
    examples = EXAMPLES[suite.dialect] // (3 if streaming else 1)
    db = suite.dbs[service]

    @settings(
        max_examples=max(examples, 2),
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(values=strategy)
    def check(values):
        request = build(method.input_type, values)
        before = None if streaming else suite.run(snapshot(db))
        code, details = suite.run(_call(suite, service, method, request))
        assert code not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), (
            f"{method.full_name} answered {code.name}: {details}\nrequest: {request}"
        )
        if code != grpc.StatusCode.OK and before is not None:
            after = suite.run(snapshot(db))
            changed = sorted(t for t in after if after[t] != before.get(t))
            assert not changed, (
                f"{method.full_name} failed with {code.name} ({details}) but changed "
                f"{changed}\nrequest: {request}"
            )

    check()
