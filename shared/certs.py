"""Development certificates for TLS and mTLS (`allot certs new DIR`; docs/security.md).

One CA (`ca.pem`, `ca-key.pem`) signs one certificate per suite service (`<service>.pem`,
`<service>-key.pem`) naming it by URI SAN `spiffe://allot/<service>` (what makes a peer that
service, with the `internal` role) and by DNS SANs `<service>` and `localhost` and IP SAN
`127.0.0.1` (how the services are dialled, in a cluster and locally), and a client certificate
for an operator's tools (`client.pem`, `client-key.pem`) that names no suite service, so its
holder still needs a token. Keys are EC P-256 and written readable by this user only.

A second `allot certs new` into the same folder keeps the CA and issues fresh service and
client certificates: servers and channels pick up the replaced files on their next handshake.
Production uses its own CA (cert-manager, see deploy/k8s); these are for `make run-mtls`.
"""

from __future__ import annotations

import datetime
import ipaddress
import pathlib
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared.auth import SUITE_SERVICES
from shared.keys import write_private

SPIFFE_PREFIX = "spiffe://allot/"
DEFAULT_DAYS = 90
MAX_DAYS = 825  # what browsers and most TLS stacks still accept for a leaf certificate
CLIENT = "client"
# The operator's client certificate: a SPIFFE name outside the suite's services.
OPERATOR_URI = f"{SPIFFE_PREFIX}operator"
# Certificates are valid from a little before now, for clocks slightly behind.
BACKDATE = datetime.timedelta(minutes=5)
# A kept CA that expires sooner than this is replaced rather than reused.
RENEW_CA_WITHIN = datetime.timedelta(days=1)


@dataclass(frozen=True)
class Issued:
    """A private key and its certificate."""

    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    @property
    def cert_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def write(self, directory: pathlib.Path, name: str) -> tuple[pathlib.Path, pathlib.Path]:
        """`<name>.pem` and the private `<name>-key.pem` in `directory`."""
        cert_path, key_path = directory / f"{name}.pem", directory / f"{name}-key.pem"
        write_private(key_path, self.key_pem)
        cert_path.write_bytes(self.cert_pem)
        return cert_path, key_path


def _check_days(days: int) -> None:
    if not 1 <= days <= MAX_DAYS:
        raise ValueError(f"--days must be between 1 and {MAX_DAYS}, got {days}")


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Allot development"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def new_ca(days: int = DEFAULT_DAYS, common_name: str = "Allot development CA") -> Issued:
    """A self-signed CA that may sign leaf certificates only."""
    _check_days(days)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    name = _name(common_name)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    return Issued(key, certificate)


def issue(
    ca_key,
    ca_certificate: x509.Certificate,
    common_name: str,
    *,
    uris: Iterable[str] = (),
    dns_names: Iterable[str] = (),
    ip_addresses: Iterable[str] = (),
    days: int = DEFAULT_DAYS,
    server: bool = True,
) -> Issued:
    """A leaf certificate signed by the CA (any key type `cryptography` signs with), for TLS
    clients and, when `server`, servers too."""
    _check_days(days)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
    names += [x509.DNSName(d) for d in dns_names]
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH] + ([ExtendedKeyUsageOID.SERVER_AUTH] * server)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(
            min(now + datetime.timedelta(days=days), ca_certificate.not_valid_after_utc)
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return Issued(key, builder.sign(ca_key, hashes.SHA256()))


def issue_service(ca_key, ca_certificate, service: str, days: int = DEFAULT_DAYS) -> Issued:
    """The certificate of one suite service: `spiffe://allot/<service>`, DNS `<service>` and
    `localhost`, IP 127.0.0.1."""
    if service not in SUITE_SERVICES:
        raise ValueError(f"unknown service {service!r}: one of {sorted(SUITE_SERVICES)}")
    return issue(
        ca_key,
        ca_certificate,
        service,
        uris=[f"{SPIFFE_PREFIX}{service}"],
        dns_names=[service, "localhost"],
        ip_addresses=["127.0.0.1"],
        days=days,
    )


def issue_client(ca_key, ca_certificate, days: int = DEFAULT_DAYS) -> Issued:
    """An operator's client certificate: trusted by the CA, naming no suite service."""
    return issue(ca_key, ca_certificate, "operator", uris=[OPERATOR_URI], days=days, server=False)


def load_ca(directory: pathlib.Path) -> Issued | None:
    """The CA of an earlier `allot certs new` in `directory`, if there is one."""
    cert_path, key_path = directory / "ca.pem", directory / "ca-key.pem"
    if not (cert_path.exists() and key_path.exists()):
        return None
    certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
    if certificate.not_valid_after_utc < datetime.datetime.now(datetime.UTC) + RENEW_CA_WITHIN:
        return None  # (nearly) expired: a new CA, and every certificate issued again
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    return Issued(key, certificate)  # type: ignore[arg-type]


def write_dev_certificates(
    directory: pathlib.Path | str, days: int = DEFAULT_DAYS
) -> dict[str, pathlib.Path]:
    """The CA (kept when the folder has one), a certificate per service and the client's;
    returns name -> certificate path ("ca", "quota", ..., "client")."""
    _check_days(days)
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    ca = load_ca(directory)
    written: dict[str, pathlib.Path] = {}
    if ca is None:
        ca = new_ca(days)
        written["ca"], _ = ca.write(directory, "ca")
    else:
        written["ca"] = directory / "ca.pem"
    for service in sorted(SUITE_SERVICES):
        written[service], _ = issue_service(ca.key, ca.certificate, service, days).write(
            directory, service
        )
    written[CLIENT], _ = issue_client(ca.key, ca.certificate, days).write(directory, CLIENT)
    return written
