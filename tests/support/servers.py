"""What the services under test share: the test secret, tokens for every kind of caller, free
loopback ports, and a service started as its own process."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time

from shared.auth import ACCOUNT_FULL, ACCOUNT_READ, ADMIN, GATEWAY
from shared.settings import REPO_ROOT
from shared.tokens import TokenSigner

TEST_SECRET = "test-secret-" + "x" * 40


class Tokens:
    """Signed tokens for every kind of caller, and call metadata built from them."""

    def __init__(self, secret: str = TEST_SECRET, signer: TokenSigner | None = None) -> None:
        # `signer`: tokens signed with a private key (EdDSA / ES256), for services that verify
        # them against a JWKS rather than the test secret.
        self.signer = signer or TokenSigner(secret)

    def admin(self, regions: list[str] | None = None) -> str:
        return self.signer.mint(ADMIN, user="op", regions=regions)

    def gateway(self, regions: list[str] | None = None) -> str:
        return self.signer.mint(GATEWAY, user="gateway", regions=regions)

    def internal(self, service: str) -> str:
        """The token a suite service presents on a plaintext (local) run."""
        return self.signer.mint_internal(service)

    def account(
        self, account_id: str, read_only: bool = False, regions: list[str] | None = None
    ) -> str:
        return self.signer.mint(
            ACCOUNT_READ if read_only else ACCOUNT_FULL, account=account_id, regions=regions
        )

    @staticmethod
    def md(token: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {token}"),)


# Tests start many services side by side: none listens on the default metrics ports unless a
# test gives it one (tests/service/test_metrics.py).
METRICS_OFF = {
    "ALLOT_QUOTA_METRICS_ADDR": "",
    "ALLOT_BILLING_METRICS_ADDR": "",
    "ALLOT_NOTIFICATION_METRICS_ADDR": "",
}
METRICS_OFF_SETTINGS = {
    "quota_metrics_addr": "",
    "billing_metrics_addr": "",
    "notification_metrics_addr": "",
}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServiceProcess:
    """A service started as its own process (`python -m services.<name>`), like production."""

    def __init__(self, name: str, env: dict[str, str], log_path: pathlib.Path) -> None:
        self.name = name
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.addr = ""

    def start(self, timeout: float = 30.0) -> str:
        env = {**os.environ, **METRICS_OFF, **self.env}
        log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(
            [sys.executable, "-m", f"services.{self.name}"],
            env=env,
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=log,
        )
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline().decode()
            if line.startswith(f"READY {self.name} "):
                self.addr = line.split()[2]
                return self.addr
            if not line and self.proc.poll() is not None:
                break
        raise RuntimeError(f"{self.name} did not become ready; log: {self.log_path.read_text()}")

    def terminate(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
