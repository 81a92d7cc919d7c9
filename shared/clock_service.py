"""allot.testing.v1.ClockService: the manual clock's controls, served only with
ALLOT_CLOCK=manual (docs/design/time.md), admin only."""

from __future__ import annotations

from allot.testing.v1 import clock_service_pb2, clock_service_pb2_grpc

from shared.auth import ADMIN, policy
from shared.clock import ClockBackwards, Scheduler
from shared.errors import FailedPrecondition
from shared.timeutil import from_duration, from_timestamp, to_timestamp


class ClockServicer(clock_service_pb2_grpc.ClockServiceServicer):
    """allot.testing.v1.ClockService over the scheduler's manual clock."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler

    async def GetTime(self, request, context):
        return clock_service_pb2.GetTimeResponse(time=to_timestamp(self.scheduler.clock.now()))

    async def SetTime(self, request, context):
        try:
            now = await self.scheduler.set_time(from_timestamp(request.time, "time"))
        except ClockBackwards as exc:
            raise FailedPrecondition("CLOCK_BACKWARDS", str(exc)) from exc
        return clock_service_pb2.SetTimeResponse(time=to_timestamp(now))

    async def AdvanceTime(self, request, context):
        try:
            now = await self.scheduler.advance(from_duration(request.duration, "duration"))
        except ClockBackwards as exc:
            raise FailedPrecondition("CLOCK_BACKWARDS", str(exc)) from exc
        return clock_service_pb2.AdvanceTimeResponse(time=to_timestamp(now))


CLOCK_SERVICE = clock_service_pb2.DESCRIPTOR.services_by_name["ClockService"].full_name
CLOCK_POLICIES = {
    f"/{CLOCK_SERVICE}/{m}": policy(ADMIN) for m in ("GetTime", "SetTime", "AdvanceTime")
}


def add_clock_service(server, scheduler: Scheduler) -> None:
    clock_service_pb2_grpc.add_ClockServiceServicer_to_server(ClockServicer(scheduler), server)
