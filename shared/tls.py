"""TLS for servers and for the channels between the suite's services (docs/security.md).

Servers serve TLS when a certificate is configured, and with client auth `require` demand a
client certificate from the CA. A client certificate that names a suite service (URI SAN
`spiffe://allot/<service>`, or a DNS SAN equal to the service name) makes the caller that
service, with the `internal` role. Certificate files are read again when they change
(cert-manager rotates them in place): servers on the next handshake, channels on the next call.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from shared import logs, tracing
from shared.auth import SUITE_SERVICES

log = logging.getLogger("allot.tls")

SPIFFE_PREFIX = "spiffe://allot/"


@dataclass(frozen=True)
class TlsFiles:
    """The PEM files of one process: its certificate and key, and the CA it trusts."""

    cert_file: str = ""
    key_file: str = ""
    ca_file: str = ""
    client_auth: bool = False

    @staticmethod
    def from_settings(settings) -> TlsFiles:
        return TlsFiles(
            cert_file=settings.tls_cert_file,
            key_file=settings.tls_key_file,
            ca_file=settings.tls_ca_file,
            client_auth=settings.tls_client_auth == "require",
        )

    @property
    def serves_tls(self) -> bool:
        return bool(self.cert_file and self.key_file)

    @property
    def dials_tls(self) -> bool:
        """Outbound channels use TLS when a CA is configured to verify the peers with."""
        return bool(self.ca_file)

    def _paths(self) -> tuple[str, ...]:
        return tuple(p for p in (self.cert_file, self.key_file, self.ca_file) if p)

    def stamp(self) -> tuple:
        """Changes whenever one of the files is replaced or rewritten."""
        stamp = []
        for path in self._paths():
            try:
                st = os.stat(path)
                stamp.append((path, st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                stamp.append((path, None))
        return tuple(stamp)

    def read(self) -> tuple[bytes | None, bytes | None, bytes | None]:
        def load(path: str) -> bytes | None:
            return pathlib.Path(path).read_bytes() if path else None

        return load(self.key_file), load(self.cert_file), load(self.ca_file)


def server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    """Server credentials that pick up rotated files: gRPC asks the fetcher at every new
    handshake, and it answers with the files again when they changed since the last read."""
    state = {"stamp": files.stamp()}

    def config() -> grpc.ServerCertificateConfiguration:
        key, cert, ca = files.read()
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        stamp = files.stamp()
        if stamp == state["stamp"]:
            return None
        try:
            fresh = config()
        except OSError as exc:  # mid-rotation: keep serving the certificate we have
            log.warning("TLS files changed but cannot be read yet (%s); keeping the old ones", exc)
            return None
        state["stamp"] = stamp
        log.info("TLS certificate reloaded from %s", files.cert_file)
        return fresh

    return grpc.dynamic_ssl_server_credentials(
        config(), fetch, require_client_authentication=files.client_auth
    )


def peer_service(context) -> str | None:
    """The suite service a peer's verified client certificate names, if any."""
    try:
        auth = context.auth_context()
    except Exception:  # no transport security on this call
        return None
    if not auth or auth.get("transport_security_type") != [b"ssl"]:
        return None
    for uri in auth.get("peer_uri", ()):
        name = uri.decode(errors="replace")
        if name.startswith(SPIFFE_PREFIX) and name[len(SPIFFE_PREFIX) :] in SUITE_SERVICES:
            return name[len(SPIFFE_PREFIX) :]
    for dns in auth.get("peer_dns", ()):
        name = dns.decode(errors="replace")
        if name in SUITE_SERVICES:
            return name
    return None


class Channels:
    """Outbound channels to the other services, one per address: TLS verified against the
    CA (presenting this service's certificate as client certificate) when a CA is set,
    plaintext otherwise. A channel is replaced when the certificate files change."""

    # How long a replaced channel stays open for the calls still running on it.
    RETIRE_SECONDS = 60.0

    def __init__(self, files: TlsFiles, options: Sequence[tuple[str, object]] = ()) -> None:
        self.files = files
        self.options = tuple(options)
        # Every outbound call carries the request id of the call it serves (shared/logs.py)
        # and, when traced, a client span and `traceparent` (shared/tracing.py).
        self.interceptors = [*tracing.client_interceptors(), *logs.client_interceptors()]
        self._channels: dict[str, tuple[tuple, grpc.aio.Channel]] = {}
        self._retired: list[grpc.aio.Channel] = []

    def get(self, addr: str) -> grpc.aio.Channel:
        stamp = self.files.stamp() if self.files.dials_tls else ()
        known = self._channels.get(addr)
        if known is not None and known[0] == stamp:
            return known[1]
        channel = self._open(addr)
        if known is not None:
            self._retire(known[1])
        self._channels[addr] = (stamp, channel)
        return channel

    def _open(self, addr: str) -> grpc.aio.Channel:
        if not self.files.dials_tls:
            return grpc.aio.insecure_channel(
                addr, options=self.options, interceptors=self.interceptors
            )
        key, cert, ca = self.files.read()
        credentials = grpc.ssl_channel_credentials(
            root_certificates=ca, private_key=key, certificate_chain=cert
        )
        return grpc.aio.secure_channel(
            addr, credentials, options=self.options, interceptors=self.interceptors
        )

    def _retire(self, channel: grpc.aio.Channel) -> None:
        import asyncio

        async def later() -> None:
            await asyncio.sleep(self.RETIRE_SECONDS)
            with contextlib.suppress(Exception):
                await channel.close()

        with contextlib.suppress(RuntimeError):  # no running loop: closed with the others
            self._retired.append(channel)
            asyncio.get_running_loop().create_task(later())

    async def close(self) -> None:
        channels = [c for _, c in self._channels.values()] + self._retired
        self._channels.clear()
        self._retired.clear()
        for channel in channels:
            with contextlib.suppress(Exception):
                await channel.close()
