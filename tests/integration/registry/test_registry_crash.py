"""kill -9 of a real registry process in the middle of an upload leaves no trace of it."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from registry_testing import (
    create_model,
    files_under,
    tiny_onnx,
    upload_requests,
    upload_version,
)
from support import eventually, running

from modelserve.registry.v1 import registry_service_pb2 as pb
from modelserve.registry.v1 import registry_service_pb2_grpc as pb_grpc
from modelserve_cli.stack import free_port
from modelserve_registry.config import RegistrySettings
from modelserve_registry.server import build_server
from modelserve_runtime.channels import create_channel

#: How long the test waits for a condition it asks about; never a fixed sleep.
DEADLINE_S = 30.0
CHUNK = 64 * 1024


async def serving(channel: grpc.aio.Channel) -> None:
    """Returns once the registry's health watch reports SERVING."""
    health = health_pb2_grpc.HealthStub(channel)
    watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=DEADLINE_S, wait_for_ready=True)
    async for answer in watch:
        if answer.status == health_pb2.HealthCheckResponse.SERVING:
            watch.cancel()
            return
    raise AssertionError("the registry did not start")


class TestKillDuringUpload:
    async def test_kill_9_mid_upload_leaves_no_version_and_no_file(self, tmp_path: Path) -> None:
        """A registry process killed with SIGKILL while streaming an upload restarts with the
        versions it had, the same artifact files, no partial version and no orphan file."""
        data_dir = tmp_path / "registry"
        port = free_port()
        env = {
            **os.environ,
            "MODELSERVE_REGISTRY_DATA_DIR": str(data_dir),
            "MODELSERVE_REGISTRY_SERVER__PORT": str(port),
            "MODELSERVE_REGISTRY_TELEMETRY__LOG_FORMAT": "json",
        }
        process = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).parent / "modelserve-registry"),
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            async with create_channel(f"127.0.0.1:{port}", default_timeout_s=60) as channel:
                await serving(channel)
                stub = pb_grpc.RegistryServiceStub(channel)
                await create_model(stub)
                kept = await upload_version(stub)
                files_before = files_under(data_dir / "artifacts")
                metadata = upload_requests(tiny_onnx(weight=7.0))[0]
                stalled = asyncio.Event()

                async def stalls() -> AsyncIterator[pb.CreateModelVersionRequest]:
                    # Half a megabyte in, then the stream waits: the process dies mid-upload.
                    yield metadata
                    for _ in range(8):
                        yield pb.CreateModelVersionRequest(chunk=b"\0" * CHUNK)
                    stalled.set()
                    await asyncio.Event().wait()

                upload = asyncio.ensure_future(stub.CreateModelVersion(stalls()))
                await stalled.wait()
                tmp = data_dir / "artifacts" / "tmp"
                await eventually(
                    lambda: any(p.stat().st_size >= 8 * CHUNK for p in tmp.glob("*.partial")),
                    "the partial upload holds the bytes sent",
                    within_s=DEADLINE_S,
                )
                process.send_signal(signal.SIGKILL)
                await asyncio.wait_for(process.wait(), DEADLINE_S)
                upload.cancel()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()

        assert process.returncode == -signal.SIGKILL
        assert list((data_dir / "artifacts" / "tmp").glob("*.partial"))
        settings = RegistrySettings(production_traffic_only=False, data_dir=data_dir)
        async with running(build_server, settings) as (_, channel, _app):
            stub = pb_grpc.RegistryServiceStub(channel)
            listed = await stub.ListModelVersions(
                pb.ListModelVersionsRequest(parent="models/fraud")
            )
            assert [v.name for v in listed.model_versions] == [kept.name]
            assert files_under(data_dir / "artifacts") == files_before
            again = await upload_version(stub, tiny_onnx(weight=3.0))
            assert again.name == "models/fraud/versions/2"
        conn = sqlite3.connect(settings.db_path)
        try:
            assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        finally:
            conn.close()
