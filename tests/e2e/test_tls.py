"""TLS and mTLS end to end (docs/security.md): quota, billing and notification as processes
(SQLite, manual clocks), each serving TLS with its own certificate from a test CA (PyPI
`trustme`; the URI SAN `spiffe://allot/<service>` certificates are issued with
`shared.certs` under the trustme CA's key), demanding client certificates
(`ALLOT_TLS_CLIENT_AUTH=require`), and verifying operator tokens against a JWKS only: no
process holds an HS256 secret, so the services can call each other only with their
certificates.

- Work flows between the services: a purchase billing -> quota, pay-per-use quota -> billing,
  a usage-alert crossing quota -> notification.
- Refusals: no client certificate, or one from another CA: the handshake fails (UNAVAILABLE);
  a plaintext client too. The operator's certificate (naming no service) needs a token. A
  `billing` certificate may grant packages without a token but not report usage; a
  `notification` certificate may not grant.
- Quota's plaintext health-only port (ALLOT_HEALTH_ADDR, for kubelet probes) answers health
  and nothing else.
- The real `grpcurl` with `-cacert/-cert/-key` lists services and calls an RPC.
- A server's certificate files replaced while it runs: the next connection gets the new one.

The suite starts once for the module; every test has its own accounts.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import ssl
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import grpc
import pytest
import trustme
from allot.billing.v1 import billing_pb2, billing_service_pb2
from allot.quota.v1 import quota_pb2, quota_service_pb2
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared import certs, keys
from shared.tokens import TokenSigner
from tests.e2e.test_grpcurl import field, grpcurl_binary
from tests.support.billing import BillingCalls, billing_process, paired_env
from tests.support.events import AlertCalls
from tests.support.notification import (
    CLOCK_START,
    EMAIL,
    SENT,
    USAGE_ALERT,
    NotificationCalls,
    notification_env,
    notification_process,
    until,
)
from tests.support.processes import mtls_env
from tests.support.quota import API, REGION, QuotaCalls, quota_calls, quota_process
from tests.support.servers import Tokens, free_port

QUOTA_SERVICE = "allot.quota.v1.QuotaService"
CALL_TIMEOUT = 15.0
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
DENIED = grpc.StatusCode.PERMISSION_DENIED


@dataclass
class Pki:
    """The test CA's files in `dir` (ca.pem, <name>.pem, <name>-key.pem) and the CA itself."""

    dir: pathlib.Path
    ca: trustme.CA

    @staticmethod
    def create(directory: pathlib.Path) -> Pki:
        directory.mkdir(parents=True, exist_ok=True)
        ca = trustme.CA()
        (directory / "ca.pem").write_bytes(ca.cert_pem.bytes())
        pki = Pki(directory, ca)
        for service in ("quota", "billing", "notification"):
            pki.issue_service(service)
        certs.issue_client(ca._private_key, ca._certificate).write(directory, "client")
        return pki

    def issue_service(self, service: str, name: str | None = None) -> certs.Issued:
        issued = certs.issue_service(self.ca._private_key, self.ca._certificate, service)
        issued.write(self.dir, name or service)
        return issued

    def read(self, name: str) -> tuple[bytes, bytes]:
        return (self.dir / f"{name}.pem").read_bytes(), (self.dir / f"{name}-key.pem").read_bytes()

    def credentials(self, name: str | None = "client") -> grpc.ChannelCredentials:
        """Trusting the CA, presenting `name`'s certificate (none when None)."""
        ca = (self.dir / "ca.pem").read_bytes()
        if name is None:
            return grpc.ssl_channel_credentials(root_certificates=ca)
        cert, key = self.read(name)
        return grpc.ssl_channel_credentials(ca, private_key=key, certificate_chain=cert)


@dataclass
class Suite:
    pki: Pki
    tokens: Tokens
    quota: str
    billing: str
    notification: str
    quota_health: str  # quota's plaintext health-only port (ALLOT_HEALTH_ADDR)

    def channel(self, addr: str, name: str | None = "client") -> grpc.aio.Channel:
        return grpc.aio.secure_channel(addr, self.pki.credentials(name))


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    root = tmp_path_factory.mktemp("mtls")
    pki = Pki.create(root / "tls")
    private_key, jwks = keys.new_key_pair(root / "keys", "EdDSA")
    tokens = Tokens(signer=TokenSigner.from_key_file(private_key))
    q_env, b_env = paired_env(root, CLOCK_START)
    q_env.update(mtls_env(pki.dir, "quota", jwks))
    quota_health = q_env["ALLOT_HEALTH_ADDR"] = f"127.0.0.1:{free_port()}"
    b_env.update(mtls_env(pki.dir, "billing", jwks))
    with quota_process(q_env, root / "quota.log") as quota:
        b_env["ALLOT_QUOTA_ADDR"] = quota.addr
        with billing_process(b_env, root / "billing.log") as billing:
            n_data = root / "notification"
            n_data.mkdir()
            n_env = notification_env(
                f"sqlite+aiosqlite:///{n_data / 'notification.db'}",
                n_data,
                quota.addr,
                ALLOT_BILLING_ADDR=billing.addr,
                **mtls_env(pki.dir, "notification", jwks),
            )
            with notification_process(n_env, root / "notification.log") as notification:
                yield Suite(pki, tokens, quota.addr, billing.addr, notification.addr, quota_health)
                for process in (notification, billing, quota):
                    assert process.terminate(timeout=30) == 0, process.log_text()[-2000:]


@pytest.fixture
async def q(suite) -> QuotaCalls:
    async with suite.channel(suite.quota) as channel:
        yield quota_calls(channel, suite.tokens)


@pytest.fixture
async def b(suite) -> BillingCalls:
    async with suite.channel(suite.billing) as channel:
        yield BillingCalls(channel, suite.tokens)


@pytest.fixture
async def n(suite) -> NotificationCalls:
    async with suite.channel(suite.notification) as channel:
        yield NotificationCalls(channel, suite.tokens)


# --- work flows between the services over mTLS ----------------------------------------------


async def test_a_purchase_flows_from_billing_to_quota(b, q):
    account = "acct-tls-buy"
    await b.create_account(account)
    await b.top_up(account, "100")
    order = await b.stub.PurchasePackage(
        billing_service_pb2.PurchasePackageRequest(
            request_id="tls-buy-1", account_id=account, offer_id="passport-1k-1y", region=REGION
        ),
        metadata=b.admin,
    )
    fulfilled = await until(
        lambda: b.stub.GetOrder(
            billing_service_pb2.GetOrderRequest(order_id=order.order_id), metadata=b.admin
        ),
        lambda o: o.state == billing_pb2.ORDER_STATE_FULFILLED,
        what="the order fulfilled by quota's GrantPackage",
    )
    package = await q.get(fulfilled.package_id)
    assert (package.account_id, package.region, package.api) == (account, REGION, API)
    assert package.total_quantity == 1000
    assert package.state == quota_pb2.PACKAGE_STATE_ACTIVE


async def test_pay_per_use_flows_from_quota_to_billing(b, q):
    account = "acct-tls-ppu"
    await b.create_account(account)
    await b.top_up(account, "100")
    response = await q.report("tls-ppu-1", account, 3)  # no package: all pay-per-use
    assert response.pay_per_use_quantity == 3

    # The cycle of that hour settles once billing's clock is past it and it read the event.
    await b.set_time(datetime.fromisoformat(CLOCK_START) + timedelta(hours=1, seconds=1))

    async def bill():
        await b.advance()  # runs settlement due for usage that arrived since
        return await b.get_bill(account, "2024-01")

    settled = await until(
        bill,
        lambda found: any(
            line.kind == billing_pb2.BILL_LINE_KIND_PAY_PER_USE for line in found.lines
        ),
        what="a pay-per-use line read from quota's stream",
    )
    [line] = [x for x in settled.lines if x.kind == billing_pb2.BILL_LINE_KIND_PAY_PER_USE]
    assert line.quantity == 3


async def test_a_usage_alert_crossing_flows_from_quota_to_notification(n, q):
    account = "acct-tls-alert"
    mail = await n.create(account, EMAIL, f"ops+{account}@example.com", [USAGE_ALERT])
    await q.grant(account, 100)
    await AlertCalls(q).create(account, api=API, percent=20)
    assert (await q.report(f"{account}-1", account, 80)).remaining_quantity == 20

    [notification] = await n.settled(account, 1)
    assert notification.message_type == USAGE_ALERT
    assert [(d.contact_id, d.state) for d in notification.deliveries] == [(mail.contact_id, SENT)]


# --- who may connect, and as whom -------------------------------------------------------------


async def health(channel: grpc.aio.Channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    response = await stub.Check(health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT)
    return response.status


async def expect_code(call, code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value.details()
    return caught.value


async def test_the_operator_certificate_reaches_health(suite):
    async with suite.channel(suite.quota) as channel:
        assert await health(channel) == health_pb2.HealthCheckResponse.SERVING


async def test_a_client_without_a_certificate_is_refused_at_the_handshake(suite):
    async with suite.channel(suite.quota, name=None) as channel:
        await expect_code(health(channel), UNAVAILABLE)
    async with grpc.aio.insecure_channel(suite.quota) as plaintext:
        await expect_code(health(plaintext), UNAVAILABLE)


def grant_without_token(calls: QuotaCalls, account: str):
    """GrantPackage with no `authorization` metadata: only a certificate can make it pass."""
    return calls.stub.GrantPackage(
        quota_service_pb2.GrantPackageRequest(package=QuotaCalls.package(account, 5)),
        timeout=CALL_TIMEOUT,
    )


async def test_a_certificate_from_another_ca_is_refused_even_naming_billing(suite):
    other = trustme.CA()
    forged = certs.issue_service(other._private_key, other._certificate, "billing")
    credentials = grpc.ssl_channel_credentials(
        (suite.pki.dir / "ca.pem").read_bytes(),
        private_key=forged.key_pem,
        certificate_chain=forged.cert_pem,
    )
    async with grpc.aio.secure_channel(suite.quota, credentials) as channel:
        await expect_code(health(channel), UNAVAILABLE)
        forging = quota_calls(channel, suite.tokens)
        await expect_code(grant_without_token(forging, "acct-tls-forged"), UNAVAILABLE)


async def test_the_operator_certificate_still_needs_a_token(q):
    summary = quota_service_pb2.GetQuotaSummaryRequest(account_id="acct-tls-op", region=REGION)
    error = await expect_code(
        q.stub.GetQuotaSummary(summary, timeout=CALL_TIMEOUT), UNAUTHENTICATED
    )
    assert "bearer token" in error.details()
    answered = await q.stub.GetQuotaSummary(summary, metadata=q.admin, timeout=CALL_TIMEOUT)
    assert list(answered.items) == []


async def test_a_service_certificate_is_that_service_with_its_rights_only(suite):
    account = "acct-tls-internal"
    async with suite.channel(suite.quota, name="billing") as channel:
        as_billing = quota_calls(channel, suite.tokens)
        granted = await grant_without_token(as_billing, account)
        assert (granted.account_id, granted.total_quantity) == (account, 5)
        report = as_billing.usage("tls-internal-1", account, 1)
        await expect_code(as_billing.stub.ReportUsage(report, timeout=CALL_TIMEOUT), DENIED)
    async with suite.channel(suite.quota, name="notification") as channel:
        as_notification = quota_calls(channel, suite.tokens)
        await expect_code(grant_without_token(as_notification, account), DENIED)
    # What billing's certificate granted is there; notification's attempt changed nothing.
    async with suite.channel(suite.quota) as channel:
        packages = await quota_calls(channel, suite.tokens).package_ids(account)
    assert packages == [granted.package_id]


async def test_the_health_port_answers_plaintext_health_and_nothing_else(suite, q):
    """What kubelet's gRPC probe sees (it cannot speak TLS): health on ALLOT_HEALTH_ADDR."""
    async with grpc.aio.insecure_channel(suite.quota_health) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", QUOTA_SERVICE):
            answer = await stub.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=CALL_TIMEOUT
            )
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        plaintext = quota_calls(channel, suite.tokens)
        summary = quota_service_pb2.GetQuotaSummaryRequest(account_id="acct-tls-hp", region=REGION)
        await expect_code(
            plaintext.stub.GetQuotaSummary(summary, metadata=q.admin, timeout=CALL_TIMEOUT),
            grpc.StatusCode.UNIMPLEMENTED,
        )


# --- grpcurl ------------------------------------------------------------------------------------


def test_grpcurl_with_the_client_certificate(suite):
    tls = suite.pki.dir
    base = [
        grpcurl_binary(),
        "-max-time",
        "30",
        "-cacert",
        str(tls / "ca.pem"),
        "-cert",
        str(tls / "client.pem"),
        "-key",
        str(tls / "client-key.pem"),
    ]

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*base, *args], capture_output=True, text=True, timeout=60)

    listed = run(suite.quota, "list")
    assert listed.returncode == 0, listed.stderr
    assert {QUOTA_SERVICE, "grpc.health.v1.Health"} <= set(listed.stdout.split())

    token = suite.tokens.admin()
    data = json.dumps({"account_id": "acct-tls-grpcurl", "region": REGION})
    called = run(
        "-H",
        f"authorization: Bearer {token}",
        "-d",
        data,
        suite.quota,
        f"{QUOTA_SERVICE}/GetQuotaSummary",
    )
    assert called.returncode == 0, called.stderr
    answer = json.loads(called.stdout)
    assert field(answer, "account_id") == "acct-tls-grpcurl"
    assert answer.get("items", []) == []  # no packages

    without = subprocess.run(
        [grpcurl_binary(), "-max-time", "3", "-cacert", str(tls / "ca.pem"), suite.quota, "list"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert without.returncode != 0  # no client certificate: no connection


# --- certificate rotation ----------------------------------------------------------------------


def peer_certificate(pki: Pki, addr: str) -> x509.Certificate:
    """The certificate a fresh TLS connection to `addr` is shown (verified against the CA)."""
    host, port = addr.rsplit(":", 1)
    context = ssl.create_default_context(cafile=str(pki.dir / "ca.pem"))
    context.load_cert_chain(pki.dir / "client.pem", pki.dir / "client-key.pem")
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection((host, int(port)), timeout=CALL_TIMEOUT) as raw,
        context.wrap_socket(raw, server_hostname=host) as tls,
    ):
        return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))


def replace_files(pki: Pki, name: str, issued: certs.Issued) -> None:
    """Swap `name`'s certificate and key in place, each by an atomic rename."""
    staged = pki.dir / "staged"
    staged.mkdir(exist_ok=True)
    cert, key = issued.write(staged, name)
    os.replace(key, pki.dir / f"{name}-key.pem")
    os.replace(cert, pki.dir / f"{name}.pem")


async def test_a_replaced_certificate_is_served_on_the_next_connection(suite):
    before = peer_certificate(suite.pki, suite.notification)
    assert (
        before.serial_number
        == x509.load_pem_x509_certificate(suite.pki.read("notification")[0]).serial_number
    )

    ca = suite.pki.ca
    fresh = certs.issue_service(ca._private_key, ca._certificate, "notification")
    replace_files(suite.pki, "notification", fresh)

    after = peer_certificate(suite.pki, suite.notification)
    assert after.serial_number == fresh.certificate.serial_number != before.serial_number
    assert after.not_valid_after_utc > datetime.now(UTC)
    async with suite.channel(suite.notification) as channel:  # gRPC clients still connect
        assert await health(channel) == health_pb2.HealthCheckResponse.SERVING
