"""`python -m tests.bench.echo_server [ADDR]`: a bare grpc.aio server, the benchmark's reference.

One unary method, `/bench.Echo/Echo`, registered through a generic handler with no
(de)serializers: it gets the request bytes and returns them. No interceptor, no auth, no
database: what is left is the cost of gRPC and asyncio in Python. Prints `READY echo <addr>`
when it listens and stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import signal
import sys

import grpc

SERVICE = "bench.Echo"
METHOD = f"/{SERVICE}/Echo"


async def _echo(request: bytes, context) -> bytes:
    return request


async def serve(addr: str) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    handler = grpc.method_handlers_generic_handler(
        SERVICE, {"Echo": grpc.unary_unary_rpc_method_handler(_echo)}
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port(addr)
    if port == 0:
        raise OSError(f"cannot listen on {addr}")
    await server.start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    host = addr.rsplit(":", 1)[0] or "127.0.0.1"
    print(f"READY echo {host}:{port}", flush=True)
    await stopping.wait()
    await server.stop(1)


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:0"))
