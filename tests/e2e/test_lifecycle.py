"""Process life cycle: SIGTERM drains in-flight work; `modelserve up` leaves no process behind."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc
from onnx import TensorProto, helper
from support import eventually

from modelserve.registry.v1 import registry_service_pb2 as registry_pb
from modelserve.registry.v1 import registry_service_pb2_grpc as registry_grpc
from modelserve.type.v1 import tensor_pb2
from modelserve_cli.stack import Stack, StackOptions
from modelserve_runtime.channels import create_channel
from modelserve_runtime.clients import RegistryAdminClient

#: `modelserve up` with the router on free ports (gRPC and HTTP).
_ANY_PORTS = ("--router-port", "0", "--router-http-port", "0")


def _identity_model() -> bytes:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["features"], ["scores"])],
        "identity",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, [None, 3])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [None, 3])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def _identity_version() -> registry_pb.ModelVersion:
    spec = tensor_pb2.TensorSpec(name="features", datatype=tensor_pb2.DATA_TYPE_FP32, shape=[-1, 3])
    out = tensor_pb2.TensorSpec(name="scores", datatype=tensor_pb2.DATA_TYPE_FP32, shape=[-1, 3])
    return registry_pb.ModelVersion(
        format=registry_pb.ARTIFACT_FORMAT_ONNX,
        signature=registry_pb.Signature(inputs=[spec], outputs=[out]),
    )


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


class TestGracefulShutdown:
    async def test_sigterm_reports_not_serving_and_finishes_in_flight_upload(
        self, tmp_path: Path
    ) -> None:
        """On SIGTERM health turns NOT_SERVING, an upload already in flight still completes, exit 0."""
        stack = Stack(StackOptions(run_dir=tmp_path))
        process = stack.spawn("registry")
        try:
            await stack.wait_serving("registry")
            artifact = _identity_model()
            spec = [
                tensor_pb2.TensorSpec(
                    name="features", datatype=tensor_pb2.DATA_TYPE_FP32, shape=[-1, 3]
                )
            ]
            out = [
                tensor_pb2.TensorSpec(
                    name="scores", datatype=tensor_pb2.DATA_TYPE_FP32, shape=[-1, 3]
                )
            ]
            async with create_channel(stack.targets["registry"], default_timeout_s=30) as channel:
                registry = registry_grpc.RegistryServiceStub(channel)
                await registry.CreateModel(
                    registry_pb.CreateModelRequest(model_id="m", model=registry_pb.Model())
                )
                watch = health_pb2_grpc.HealthStub(channel).Watch(
                    health_pb2.HealthCheckRequest(service="")
                )
                assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
                upload = registry.CreateModelVersion()
                await upload.write(
                    registry_pb.CreateModelVersionRequest(
                        upload=registry_pb.ModelVersionUpload(
                            parent="models/m",
                            sha256=hashlib.sha256(artifact).hexdigest(),
                            model_version=registry_pb.ModelVersion(
                                format=registry_pb.ARTIFACT_FORMAT_ONNX,
                                signature=registry_pb.Signature(inputs=spec, outputs=out),
                            ),
                        )
                    )
                )
                half = len(artifact) // 2
                await upload.write(registry_pb.CreateModelVersionRequest(chunk=artifact[:half]))
                # A finished client write only means the bytes left this process: SIGTERM
                # sent then can reach the registry before the call does, and a call that
                # arrives once the server is stopping is refused (CI saw it CANCELLED). The
                # upload is in flight once the registry has staged its temp file.
                staging = tmp_path / "registry" / "artifacts" / "tmp"
                await eventually(
                    lambda: any(staging.glob("*.partial")), "the registry staging the upload"
                )

                process.send_signal(signal.SIGTERM)
                assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
                watch.cancel()

                await upload.write(registry_pb.CreateModelVersionRequest(chunk=artifact[half:]))
                await upload.done_writing()
                created = await upload
                assert created.model_version.name == "models/m/versions/1"
            assert await asyncio.to_thread(process.wait, 30) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()

    async def test_open_watch_streams_do_not_hold_the_stop(self, tmp_path: Path) -> None:
        """On SIGTERM the registry ends its WatchDeployments streams instead of waiting out
        a 60 s grace period on them; the watcher sees the stream end cleanly."""
        stack = Stack(
            StackOptions(run_dir=tmp_path, env={"MODELSERVE_REGISTRY_SERVER__GRACE_PERIOD_S": "60"})
        )
        process = stack.spawn("registry")
        try:
            await stack.wait_serving("registry")
            async with create_channel(stack.targets["registry"], default_timeout_s=120) as channel:
                admin = RegistryAdminClient(channel)
                await admin.create_model("m")
                version = await admin.upload_model_version(
                    "models/m", _identity_version(), _identity_model()
                )
                await admin.set_traffic("m", {version.name: 100})
                watch = registry_grpc.RegistryServiceStub(channel).WatchDeployments(
                    registry_pb.WatchDeploymentsRequest(), timeout=120
                )
                first = await watch.read()
                assert first.revision.deployment.name == "deployments/m"
                started = time.monotonic()
                process.send_signal(signal.SIGTERM)
                assert [r async for r in watch] == []
                assert await asyncio.to_thread(process.wait, 30) == 0
                assert time.monotonic() - started < 30
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


class TestMakeUp:
    def test_up_serves_a_traced_prediction_and_a_kill_leaves_no_orphans(
        self, tmp_path: Path
    ) -> None:
        """`modelserve up` prints a prediction with its trace id. Killed outright (SIGKILL:
        the OOM killer, `kill -9`), it has no chance to stop anything, and still every
        process it started ends: the services, Redis, and through inference Triton and its
        stubs (Linux signals each as its parent ends)."""
        env = dict(os.environ, NO_PROXY="127.0.0.1,localhost", COLUMNS="200", TERM="dumb")
        script = Path(sys.executable).parent / "modelserve"
        up = subprocess.Popen(
            [str(script), "up", *_ANY_PORTS, "--run-dir", str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            text=True,
        )
        output: list[str] = []
        descendants: list[int] = []
        try:
            assert up.stdout is not None
            deadline = time.monotonic() + 240
            for line in up.stdout:
                output.append(line)
                if "ready" in line and "Ctrl-C" in line:
                    break
                assert time.monotonic() < deadline, "".join(output)
            text = "".join(output)
            assert "prediction: fraud probability" in text, text
            assert "trace " in text
            descendants = [p.pid for p in psutil.Process(up.pid).children(recursive=True)]
            names = {psutil.Process(p).name() for p in descendants if not _gone(p)}
            assert "tritonserver" in names and "redis-server" in names, names
            # Redis, five services, Triton and at least one stub.
            assert len(descendants) >= 8, names
            up.kill()
            up.communicate(timeout=120)
            # (A test of blocking calls, so its one wait runs a loop of its own.)
            asyncio.run(
                eventually(
                    lambda: all(_gone(p) for p in descendants),
                    "every process that up started ends with it",
                    within_s=60,
                    explain=lambda: str([p for p in descendants if not _gone(p)]),
                )
            )
        finally:
            if up.poll() is None:
                up.kill()
            for pid in descendants:
                if not _gone(pid):
                    os.kill(pid, signal.SIGKILL)
