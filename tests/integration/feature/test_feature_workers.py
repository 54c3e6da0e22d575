"""The feature service as several processes (`server.workers` > 1), started the two ways it is
started: its console script, `python -c` (what `modelserve up` runs where the console
script is not installed) and `python -m`. The first process reports SERVING only once every worker listens
on the port, so that the connections of a client that starts with the service spread over
all of them."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support import eventually

from modelserve.feature.v1 import feature_service_pb2 as pb
from modelserve.feature.v1 import feature_service_pb2_grpc as pb_grpc
from modelserve_cli.stack import free_port

WORKERS = 3
CONSOLE_SCRIPT = "console script"
DASH_C = "python -c"
DASH_M = "python -m"


def _command(how: str) -> list[str]:
    if how == CONSOLE_SCRIPT:
        return [str(Path(sys.executable).parent / "modelserve-feature")]
    if how == DASH_M:
        return [sys.executable, "-m", "modelserve_feature.server"]
    return [sys.executable, "-c", "from modelserve_feature.server import main; main()"]


def _listening(pid: int, port: int) -> bool:
    try:
        sockets = psutil.Process(pid).net_connections(kind="tcp")
    except psutil.NoSuchProcess:
        return False
    return any(s.status == psutil.CONN_LISTEN and s.laddr.port == port for s in sockets)


class Service:
    """The started service: its first process and the JSON log lines of every process."""

    def __init__(self, process: asyncio.subprocess.Process, port: int) -> None:
        self.process = process
        self.port = port
        self.events: list[dict[str, Any]] = []

    def listeners(self) -> list[int]:
        """The pids of the first process and its workers that listen on the port."""
        family = [self.process.pid, *(c.pid for c in psutil.Process(self.process.pid).children())]
        return [pid for pid in family if _listening(pid, self.port)]

    def named(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == event]

    def explain(self) -> str:
        return "\n".join(map(str, self.events[-20:]))


@pytest.fixture(params=[CONSOLE_SCRIPT, DASH_C, DASH_M])
async def service(
    request: pytest.FixtureRequest, redis_url: str, tmp_path: Path
) -> AsyncIterator[Service]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELSERVE_")}
    env |= {
        "MODELSERVE_FEATURE_REDIS_URL": redis_url,
        "MODELSERVE_FEATURE_SERVER__PORT": str(port),
        "MODELSERVE_FEATURE_SERVER__WORKERS": str(WORKERS),
        "MODELSERVE_FEATURE_TELEMETRY__LOG_FORMAT": "json",
    }
    process = await asyncio.create_subprocess_exec(
        *_command(request.param), env=env, cwd=tmp_path, stdout=asyncio.subprocess.PIPE
    )
    running = Service(process, port)

    async def read() -> None:
        assert process.stdout is not None
        async for line in process.stdout:
            running.events.append(json.loads(line))

    reader = asyncio.create_task(read())
    try:
        yield running
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), 30)
            except TimeoutError:
                process.kill()
                await process.wait()
        reader.cancel()


async def _serving(port: int) -> bool:
    # A channel per question: one kept would wait out gRPC's reconnect backoff, and the
    # moment SERVING is first answered is what the test looks at.
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            answer = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=0.5
            )
        except grpc.aio.AioRpcError:
            return False
    return answer.status == health_pb2.HealthCheckResponse.SERVING


async def test_serving_is_reported_once_every_worker_listens(service: Service) -> None:
    seen: list[list[int]] = []

    async def serving_then_listeners() -> bool:
        if not await _serving(service.port):
            return False
        seen.append(service.listeners())
        return True

    await eventually(
        serving_then_listeners, "the service SERVING", within_s=60, explain=service.explain
    )
    assert len(seen[0]) == WORKERS, (
        f"SERVING was answered while {len(seen[0])} of {WORKERS} processes listened"
    )
    first_started = lambda: [e for e in service.named("service_started") if "worker" not in e]  # noqa: E731
    await eventually(lambda: first_started(), "the first process's service_started line")
    (ready,) = service.named("workers_ready")
    assert ready["count"] == WORKERS - 1
    assert service.events.index(ready) < service.events.index(first_started()[0])


async def test_connections_made_at_serving_spread_over_every_worker(service: Service) -> None:
    await eventually(
        lambda: _serving(service.port), "the service SERVING", within_s=60, explain=service.explain
    )
    # A channel of its own per connection: channels with equal options share one. With 24
    # connections over 3 processes, one left out by chance is a 1-in-5,000 event.
    channels = [
        grpc.aio.insecure_channel(f"127.0.0.1:{service.port}", options=[("grpc.channel_id", k)])
        for k in range(24)
    ]
    try:
        for channel in channels:
            await pb_grpc.FeatureServiceStub(channel).ListFeatureViews(
                pb.ListFeatureViewsRequest(), timeout=10
            )
    finally:
        for channel in channels:
            await channel.close()
    answered_by = {
        e.get("worker", 0)
        for e in service.events
        if e["event"] == "rpc" and e["rpc"].endswith("/ListFeatureViews") and e["code"] == "OK"
    }
    assert answered_by == set(range(WORKERS)), service.explain()
    assert not service.named("worker_exited"), service.named("worker_exited")
    assert not service.named("workers_not_ready")
