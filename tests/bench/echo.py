"""The echo reference: `python -m tests.bench.echo_server` as its own process, measured with
the same driver, payload size and metadata as the quota calls."""

from __future__ import annotations

import pathlib
import signal
import subprocess
import sys
import time

import grpc

from shared.settings import REPO_ROOT
from tests.bench.echo_server import METHOD as ECHO_METHOD
from tests.bench.measure import Measurement, drive
from tests.support.servers import free_port


class EchoProcess:
    """`python -m tests.bench.echo_server` as its own process, like ServiceProcess does quota."""

    def __init__(self, log_path: pathlib.Path) -> None:
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.addr = ""

    def start(self, timeout: float = 30.0) -> str:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.bench.echo_server", f"127.0.0.1:{free_port()}"],
                cwd=REPO_ROOT,
                stdout=subprocess.PIPE,
                stderr=log,
            )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline().decode()
            if line.startswith("READY echo "):
                self.addr = line.split()[2]
                return self.addr
            if not line and self.proc.poll() is not None:
                break
        raise RuntimeError(f"echo server did not become ready; log: {self.log_path.read_text()}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


async def measure_echo(
    addr: str, payload: bytes, metadata, concurrencies
) -> dict[int, Measurement]:
    channel = grpc.aio.insecure_channel(addr)
    # Identity (de)serializers: the bytes go out and come back as they are.
    echo = channel.unary_unary(ECHO_METHOD)
    try:
        await channel.channel_ready()

        async def call(_worker: int) -> None:
            # The same authorization metadata as the quota calls, so the bytes on the wire match.
            await echo(payload, metadata=metadata)

        results = {}
        for c in concurrencies:
            results[c] = await drive("echo", call, c)
            results[c].scenario = "echo"
        return results
    finally:
        await channel.close()
