"""Fixtures of the monitor tests: a test clock, and a monitor on it built from the module's
`monitor_settings`."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from monitor_testing import TestClock
from support import running

from modelserve.monitor.v1 import monitor_service_pb2_grpc as pb_grpc
from modelserve_monitor.config import MonitorSettings
from modelserve_monitor.server import MonitorApp, build_server


@pytest.fixture
def clock() -> TestClock:
    """The clock the monitor under test reads."""
    return TestClock()


@pytest.fixture
async def monitor(
    monitor_settings: MonitorSettings, redis_client: aioredis.Redis, clock: TestClock
) -> AsyncIterator[tuple[pb_grpc.MonitorServiceStub, MonitorApp]]:
    """A monitor on the test clock with the settings the test module gives, on a clean
    keyspace, and a stub to it."""
    build = functools.partial(build_server, clock=clock)
    async with running(build, monitor_settings) as (_, channel, app):
        assert isinstance(app, MonitorApp)
        yield pb_grpc.MonitorServiceStub(channel), app
