"""kill -9 of a real `modelserve-monitor` process under load: after a restart, exact counts."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelserve.monitor.v1 import monitor_service_pb2 as pb
from modelserve.monitor.v1 import monitor_service_pb2_grpc as pb_grpc
from modelserve.type.v1 import prediction_record_pb2 as rec_pb
from modelserve_cli.stack import free_port
from modelserve_runtime.prediction_log import DEFAULT_STREAM, PredictionLogWriter

V1 = "models/fraud/versions/1"
GROUP = "monitor"
DEADLINE_S = 60.0
POLL_S = 0.02
#: Unique requests written, and how often a record is appended a second time.
RECORDS = 12_000
DUPLICATE_EVERY = 7


class MonitorProcess:
    """One `modelserve-monitor` process on a fixed port, its output in a log file."""

    def __init__(self, redis_url: str, port: int, log_path: Path) -> None:
        self.port = port
        self.log_path = log_path
        self._env = {
            **os.environ,
            "MODELSERVE_MONITOR_REDIS_URL": redis_url,
            "MODELSERVE_MONITOR_SERVER__PORT": str(port),
            "MODELSERVE_MONITOR_BATCH_SIZE": "50",
            "MODELSERVE_MONITOR_BLOCK_MS": "100",
            "MODELSERVE_MONITOR_CLAIM_MIN_IDLE_MS": "300",
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }
        self.process: subprocess.Popen[bytes] | None = None

    def spawn(self) -> subprocess.Popen[bytes]:
        script = Path(sys.executable).parent / "modelserve-monitor"
        with self.log_path.open("ab") as log_file:
            self.process = subprocess.Popen(
                [str(script)],
                env=self._env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        return self.process

    async def wait_serving(self) -> None:
        """Asks the health service until SERVING; fails when the process exits first."""
        async with (
            asyncio.timeout(DEADLINE_S),
            grpc.aio.insecure_channel(f"127.0.0.1:{self.port}") as channel,
        ):
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                assert self.process is not None
                if self.process.poll() is not None:
                    pytest.fail(f"monitor exited early:\n{self.log_path.read_text()[-3000:]}")
                with contextlib.suppress(grpc.aio.AioRpcError):
                    answer = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if answer.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                await asyncio.sleep(POLL_S)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def monitor_process(redis_url: str, tmp_path: Path) -> Iterator[MonitorProcess]:
    """A monitor process definition; whatever it runs is stopped after the test."""
    process = MonitorProcess(redis_url, free_port(), tmp_path / "monitor.log")
    yield process
    process.stop()


@contextlib.asynccontextmanager
async def _stub(port: int) -> AsyncIterator[pb_grpc.MonitorServiceAsyncStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield pb_grpc.MonitorServiceStub(channel)


async def _count(stub: Any) -> int:
    """The endpoint's request count; 0 while the monitor has counted nothing."""
    try:
        response = await stub.GetEndpointStats(pb.GetEndpointStatsRequest(endpoint="fraud"))
    except grpc.aio.AioRpcError as exc:
        if exc.code() is grpc.StatusCode.NOT_FOUND:
            return 0
        raise
    return int(response.request_count)


async def _write(client: aioredis.Redis, written: asyncio.Event) -> None:
    """Appends RECORDS unique records, some twice, in chunks; sets `written` when done."""
    writer = PredictionLogWriter(client)
    for i in range(RECORDS):
        record = rec_pb.PredictionRecord(
            request_id=f"r{i}", endpoint="fraud", model_version=V1, latency_us=1000 + i % 500
        )
        writer.append(record)
        if i % DUPLICATE_EVERY == 0:
            writer.append(record)
        if i % 100 == 99:
            await writer.flush()
    await writer.flush()
    assert writer.dropped == 0
    written.set()


async def _all_acknowledged(client: aioredis.Redis) -> bool:
    """True when the group delivered the stream's last entry and nothing is pending."""
    last = await client.xrevrange(DEFAULT_STREAM, count=1)
    groups = await client.xinfo_groups(DEFAULT_STREAM)
    [group] = [g for g in groups if g["name"] == GROUP.encode()]
    pending = await client.xpending(DEFAULT_STREAM, GROUP)
    return bool(group["last-delivered-id"] == last[0][0] and pending["pending"] == 0)


class TestMonitorCrash:
    async def test_kill_9_under_load_then_restart_counts_each_record_once(
        self, redis_client: aioredis.Redis, monitor_process: MonitorProcess
    ) -> None:
        """A monitor killed with SIGKILL mid-stream and restarted counts every record exactly once."""
        first = monitor_process.spawn()
        await monitor_process.wait_serving()
        written = asyncio.Event()
        writer = asyncio.create_task(_write(redis_client, written))
        async with _stub(monitor_process.port) as stub, asyncio.timeout(DEADLINE_S):
            while await _count(stub) < RECORDS // 4:
                await asyncio.sleep(POLL_S)
        first.kill()
        first.wait()
        assert not written.is_set(), "the writer finished before the kill; the test proves nothing"
        monitor_process.spawn()
        await monitor_process.wait_serving()
        async with asyncio.timeout(DEADLINE_S):
            await writer
            while not await _all_acknowledged(redis_client):
                await asyncio.sleep(POLL_S)
        async with _stub(monitor_process.port) as stub:
            assert await _count(stub) == RECORDS
        assert await redis_client.xlen(DEFAULT_STREAM) == RECORDS + len(
            range(0, RECORDS, DUPLICATE_EVERY)
        )
