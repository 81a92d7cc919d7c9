"""The service process's event loop: uvloop where installed, and a bounded final clean-up."""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger("allot.server")

# How long the final clean-up waits for left-over tasks to finish their cancellation.
CLEANUP_SECONDS = 1.0


def new_event_loop(choice: str = "auto") -> tuple[asyncio.AbstractEventLoop, str]:
    """uvloop's event loop where it is installed and ALLOT_EVENT_LOOP is `auto`, else asyncio's
    (docs/architecture.md, "Shared pieces"); with the loop, the name of the one chosen."""
    if choice == "auto":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.new_event_loop(), "uvloop"
    return asyncio.new_event_loop(), "asyncio"


def run_until_done(main, loop: asyncio.AbstractEventLoop) -> None:
    """`asyncio.run`, except that the final clean-up is bounded: asyncio.run waits without limit
    for every task left over to finish its cancellation, and a task stuck on a dead database
    connection never does (docs/faults.md, "Shutdown")."""
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(main)
    finally:
        try:
            left = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for task in left:
                task.cancel()
            cleanup = [*left, loop.create_task(loop.shutdown_asyncgens())]
            _, stuck = loop.run_until_complete(asyncio.wait(cleanup, timeout=CLEANUP_SECONDS))
            if stuck:
                log.error("shutdown: %d task(s) ignored cancellation; exiting anyway", len(stuck))
        finally:
            asyncio.set_event_loop(None)
            loop.close()
