"""`allot certs new` (shared/certs.py) and how `allot run` hands each service its certificate
(shared/cli.py): names, validity, private keys, a kept CA, per-service TLS settings."""

from __future__ import annotations

import datetime
import stat

import pytest
from cryptography import x509

from shared import certs, cli
from shared.settings import Settings, SettingsError

SERVICES = ("quota", "billing", "notification")


def load(path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def names(certificate: x509.Certificate) -> tuple[list[str], list[str], list[str]]:
    san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return (
        san.get_values_for_type(x509.UniformResourceIdentifier),
        san.get_values_for_type(x509.DNSName),
        [str(ip) for ip in san.get_values_for_type(x509.IPAddress)],
    )


def test_certs_new_writes_a_ca_a_certificate_per_service_and_a_client_certificate(tmp_path):
    assert cli.main(["certs", "new", str(tmp_path / "tls"), "--days", "10"]) == 0
    tls = tmp_path / "tls"
    ca = load(tls / "ca.pem")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    now = datetime.datetime.now(datetime.UTC)
    for name in (*SERVICES, "client"):
        certificate = load(tls / f"{name}.pem")
        certificate.verify_directly_issued_by(ca)
        assert certificate.not_valid_after_utc - now < datetime.timedelta(days=10, minutes=1)
        assert certificate.not_valid_after_utc - now > datetime.timedelta(days=9)
    for name in (*SERVICES, "client", "ca"):
        mode = stat.S_IMODE((tls / f"{name}-key.pem").stat().st_mode)
        assert mode == 0o600, f"{name}-key.pem is {oct(mode)}"
    for service in SERVICES:
        uris, dns, ips = names(load(tls / f"{service}.pem"))
        assert uris == [f"spiffe://allot/{service}"]
        assert dns == [service, "localhost"]
        assert ips == ["127.0.0.1"]
    uris, dns, _ = names(load(tls / "client.pem"))
    assert not {u.removeprefix("spiffe://allot/") for u in uris} & set(SERVICES)
    assert not set(dns) & set(SERVICES)


def test_a_second_run_keeps_the_ca_and_issues_new_certificates(tmp_path):
    first = certs.write_dev_certificates(tmp_path)
    ca, quota = load(first["ca"]), load(first["quota"])
    second = certs.write_dev_certificates(tmp_path)
    assert load(second["ca"]) == ca
    renewed = load(second["quota"])
    assert renewed.serial_number != quota.serial_number
    renewed.verify_directly_issued_by(ca)


@pytest.mark.parametrize("days", [0, -1, certs.MAX_DAYS + 1])
def test_days_out_of_range_are_refused(tmp_path, days):
    with pytest.raises(ValueError, match="--days"):
        certs.write_dev_certificates(tmp_path, days)
    assert not (tmp_path / "ca.pem").exists()


def test_each_child_gets_its_own_certificate_else_the_shared_one():
    base = {
        "ALLOT_TLS_CERT_FILE": "/shared.pem",
        "ALLOT_TLS_KEY_FILE": "/shared-key.pem",
        "ALLOT_BILLING_TLS_CERT_FILE": "/billing.pem",
        "ALLOT_BILLING_TLS_KEY_FILE": "/billing-key.pem",
    }
    billing = cli.service_env(base, "billing")
    assert (billing["ALLOT_TLS_CERT_FILE"], billing["ALLOT_TLS_KEY_FILE"]) == (
        "/billing.pem",
        "/billing-key.pem",
    )
    quota = cli.service_env(base, "quota")
    assert (quota["ALLOT_TLS_CERT_FILE"], quota["ALLOT_TLS_KEY_FILE"]) == (
        "/shared.pem",
        "/shared-key.pem",
    )
    with pytest.raises(SettingsError, match="ALLOT_QUOTA_TLS_KEY_FILE"):
        cli.service_env({"ALLOT_QUOTA_TLS_CERT_FILE": "/q.pem"}, "quota")


def test_grpcurl_flags_follow_the_tls_settings(tmp_path):
    plain = Settings.from_env(environ={})
    assert cli.grpcurl_flags(plain) == "-plaintext"
    tls = tmp_path / "tls"
    mtls = Settings.from_env(
        environ={
            "ALLOT_TLS_CERT_FILE": str(tls / "quota.pem"),
            "ALLOT_TLS_KEY_FILE": str(tls / "quota-key.pem"),
            "ALLOT_TLS_CA_FILE": str(tls / "ca.pem"),
            "ALLOT_TLS_CLIENT_AUTH": "require",
        }
    )
    resolved = tls.resolve()
    assert cli.grpcurl_flags(mtls).split() == [
        "-cacert",
        str(resolved / "ca.pem"),
        "-cert",
        str(resolved / "client.pem"),
        "-key",
        str(resolved / "client-key.pem"),
    ]
