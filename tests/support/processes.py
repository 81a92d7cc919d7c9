"""A service as a real process for integration and end-to-end tests, with bounded start and stop.

`ServiceProcess.start` reads the child's stdout line by line, so a child that hangs before
printing anything would block the test forever. `WatchedProcess` reads stdout in a thread
instead, so every wait has a deadline, and it does not pass the caller's own `ALLOT_*`
variables on to the child (the test decides every setting the process runs with).
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import queue
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable

from shared.settings import REPO_ROOT
from tests.support.servers import METRICS_OFF, ServiceProcess

# A loaded 2-core machine may take a while to import grpc and SQLAlchemy and run migrations.
START_TIMEOUT = 60.0


def mtls_env(tls_dir: pathlib.Path, service: str, jwks_file: pathlib.Path) -> dict[str, str]:
    """Settings that make a process serve and dial mTLS with its own certificate from
    `tls_dir` (the layout of `allot certs new`: ca.pem, <service>.pem, <service>-key.pem) and
    verify tokens against a JWKS only. No HS256 secret: the services cannot mint tokens, so
    their certificates are the only way they can call each other."""
    return {
        "ALLOT_TLS_CERT_FILE": str(tls_dir / f"{service}.pem"),
        "ALLOT_TLS_KEY_FILE": str(tls_dir / f"{service}-key.pem"),
        "ALLOT_TLS_CA_FILE": str(tls_dir / "ca.pem"),
        "ALLOT_TLS_CLIENT_AUTH": "require",
        "ALLOT_AUTH_JWKS_FILE": str(jwks_file),
        "ALLOT_AUTH_SECRET": "",
    }


class WatchedProcess(ServiceProcess):
    """`python -m services.<name>` with a deadline on every wait: ready once it prints
    `READY <name> <address>`."""

    def __init__(self, name: str, env: dict[str, str], log_path: pathlib.Path) -> None:
        super().__init__(name, env, log_path)
        self._lines: queue.Queue[str | None] = queue.Queue()

    def start(self, timeout: float = START_TIMEOUT) -> str:
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("ALLOT_")}
        self._lines = queue.Queue()
        with open(self.log_path, "ab") as log:  # the child keeps its own handle
            self.proc = subprocess.Popen(
                [sys.executable, "-m", f"services.{self.name}"],
                env={**inherited, **METRICS_OFF, **self.env},
                cwd=REPO_ROOT,
                stdout=subprocess.PIPE,
                stderr=log,
            )
        # Drains stdout until the child closes it, so the pipe never fills up.
        threading.Thread(target=self._read_stdout, args=(self.proc,), daemon=True).start()
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:  # stdout closed: the child is gone
                break
            if line.startswith(f"READY {self.name} "):
                self.addr = line.split()[2]
                return self.addr
        self.kill()
        raise RuntimeError(f"{self.name} did not become ready; log:\n{self.log_text()}")

    def _read_stdout(self, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            self._lines.put(raw.decode(errors="replace"))
        self._lines.put(None)

    def printed(self) -> list[str]:
        """The lines of stdout read so far and not yet taken (after READY), without waiting."""
        lines = []
        while True:
            try:
                line = self._lines.get_nowait()
            except queue.Empty:
                return lines
            if line is not None:
                lines.append(line)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def send_signal(self, sig: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        """The exit code; raises subprocess.TimeoutExpired after `timeout` seconds."""
        assert self.proc is not None
        return self.proc.wait(timeout)


async def grown_to(
    read: Callable[[], Awaitable[int]],
    at_least: int,
    within: float,
    finished: Callable[[], bool] = lambda: False,
    still: float = 4.0,
    what: str = "value",
) -> int:
    """Until `read()` reaches `at_least`, or, once `finished()` (nothing more will come), it
    has not moved for `still` seconds; an AssertionError after `within` seconds."""
    deadline = time.monotonic() + within
    last, since = -1, time.monotonic()
    while (value := await read()) < at_least:
        now = time.monotonic()
        if value != last:
            last, since = value, now
        elif finished() and now - since > still:
            return value
        if now > deadline:
            raise AssertionError(f"{what} {value}, not {at_least}, within {within} s")
        await asyncio.sleep(0.01)
    return value


def file_modes(root: pathlib.Path) -> dict[str, int]:
    """Permission bits of `root` and everything below it, by path from `root`'s parent."""
    out = {}
    for path in [root, *root.rglob("*")]:
        out[str(path.relative_to(root.parent))] = stat.S_IMODE(path.stat().st_mode)
    return out
