"""Inference as several processes (`server.workers` > 1): a worker serves Infer and the Open
Inference Protocol from a mirror of the first process's versions, relays loads to it, and
follows its health; the real console script runs both on one port."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import numpy as np
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from inference_testing import (
    ROWS,
    V1,
    V2,
    RunningInference,
    assert_answers_as,
    held,
    infer,
    infer_request,
    load,
    local_settings,
    reference,
    refused,
)
from support import eventually, running
from tritonclient.grpc import service_pb2, service_pb2_grpc

from modelserve.inference.v1 import inference_service_pb2 as pb
from modelserve.inference.v1 import inference_service_pb2_grpc as pb_grpc
from modelserve_cli.stack import free_port
from modelserve_demo import fraud
from modelserve_inference import server as inference_server
from modelserve_inference.config import InferenceSettings
from modelserve_inference.server import InferenceApp, WorkerApp
from modelserve_inference.workers import Owner
from modelserve_runtime.config import ServerSettings
from modelserve_runtime.convert import numpy_to_tensor

pytestmark = pytest.mark.triton


@dataclass
class Pair:
    """The first process (owning Triton) and one worker, each on a port of its own so that a
    test knows which one it calls."""

    owner: RunningInference
    worker_app: WorkerApp
    worker_channel: grpc.aio.Channel

    @property
    def worker(self) -> pb_grpc.InferenceServiceAsyncStub:
        return pb_grpc.InferenceServiceStub(self.worker_channel)


@pytest.fixture(scope="module")
async def pair(
    tmp_path_factory: pytest.TempPathFactory, registry_target: str
) -> AsyncIterator[Pair]:
    settings = local_settings(tmp_path_factory, registry_target, server=ServerSettings(workers=2))
    async with running(inference_server.build_server, settings) as (srv, channel, app):
        assert isinstance(app, InferenceApp)
        owner = Owner.from_env(app.worker_env())
        assert owner is not None and owner.address.startswith("unix:")
        owner_run = RunningInference(srv, channel, app, pb_grpc.InferenceServiceStub(channel))
        # A different default batch limit: the worker must take the first process's.
        worker_settings = settings.model_copy(
            update={"server": ServerSettings(), "max_batch_size": 512}
        )

        async def build(s: InferenceSettings) -> Any:
            return await inference_server.build_worker(s, owner)

        async with running(build, worker_settings) as (_, worker_channel, worker_app):
            assert isinstance(worker_app, WorkerApp)
            yield Pair(owner_run, worker_app, worker_channel)
    assert not Path(owner.address.removeprefix("unix:")).parent.exists()


async def _unloaded(stub: pb_grpc.InferenceServiceAsyncStub, *names: str) -> None:
    for name in names:
        if name in {v.name for v in await held(stub)}:
            await stub.UnloadModelVersion(pb.UnloadModelVersionRequest(name=name))


@pytest.fixture
async def clean(pair: Pair) -> AsyncIterator[Pair]:
    """The pair with nothing loaded before and after the test."""
    await _unloaded(pair.owner.stub, V1, V2)
    await eventually(lambda: _lists(pair.worker, []), "the worker to list nothing")
    yield pair
    await _unloaded(pair.owner.stub, V1, V2)


async def _lists(stub: pb_grpc.InferenceServiceAsyncStub, expected: list[Any]) -> bool:
    return [(v.name, v.state) for v in await held(stub)] == expected


class TestWorkerMirror:
    async def test_a_load_relayed_by_the_worker_serves_from_both(
        self, clean: Pair, fraud_models: dict[str, fraud.TrainedModel]
    ) -> None:
        """LoadModelVersion sent to the worker loads in the first process; the worker then
        lists the version as the first process does (endpoint, limits, device) and answers
        Infer and the Open Inference Protocol itself, with the model's outputs."""
        loaded = await load(clean.worker, V1)
        ready = [(V1, pb.MODEL_VERSION_STATE_READY)]
        await eventually(lambda: _lists(clean.worker, ready), "the worker to list V1 READY")

        assert loaded.max_batch_size == 256 and loaded.instance_count == 1
        assert await held(clean.worker) == await held(clean.owner.stub) == [loaded]
        assert loaded.triton_endpoint == clean.owner.app.runner.url
        assert_answers_as(await infer(clean.worker, infer_request(V1)), fraud_models[V1])
        oip = service_pb2_grpc.GRPCInferenceServiceStub(clean.worker_channel)
        answer = await oip.ModelInfer(_oip_request())
        assert [o.name for o in answer.outputs] == ["probabilities"]
        probabilities = np.frombuffer(answer.raw_output_contents[0], np.float32).reshape(-1, 2)
        np.testing.assert_allclose(probabilities, reference(fraud_models[V1])[1], atol=1e-5)
        assert (await oip.ModelReady(service_pb2.ModelReadyRequest(name="fraud"))).ready

    async def test_the_worker_checks_requests_as_the_first_process_does(self, clean: Pair) -> None:
        """A bad tensor sent to the worker is refused there with the first process's error,
        a batch above the limit the version was loaded with too, and a version the worker does
        not hold."""
        await load(clean.owner.stub, V1)
        await eventually(
            lambda: _lists(clean.worker, [(V1, pb.MODEL_VERSION_STATE_READY)]), "V1 mirrored"
        )
        bad = infer_request(V1, numpy_to_tensor("features", np.zeros((2, 3), np.float32)))
        at_worker = await refused(clean.worker.Infer(bad))
        at_owner = await refused(clean.owner.stub.Infer(bad))
        assert at_worker.code is grpc.StatusCode.INVALID_ARGUMENT
        assert at_worker == at_owner
        assert "expected [-1, " in at_worker.violations[0].description
        rows = np.zeros((300, ROWS.shape[1]), np.float32)
        too_many = await refused(
            clean.worker.Infer(infer_request(V1, numpy_to_tensor("features", rows)))
        )
        assert too_many.code is grpc.StatusCode.INVALID_ARGUMENT
        assert "from 1 to 256; got [300]" in too_many.violations[0].description
        missing = await refused(clean.worker.Infer(infer_request(V2)))
        assert missing.code is grpc.StatusCode.NOT_FOUND

    async def test_an_error_of_the_first_process_comes_back_as_it_was(self, clean: Pair) -> None:
        """A load the first process refuses comes back from the worker with the same code,
        message, reason and field violations, and nothing is loaded."""
        for name in ("models/fraud/versions/99", "models/fraud"):
            request = pb.LoadModelVersionRequest(name=name)
            at_worker = await refused(clean.worker.LoadModelVersion(request))
            at_owner = await refused(clean.owner.stub.LoadModelVersion(request))
            assert at_worker.code is not grpc.StatusCode.UNKNOWN
            assert at_worker == at_owner, name
        assert await held(clean.worker) == [] == await held(clean.owner.stub)

    async def test_the_worker_watch_follows_loads_and_unloads(self, clean: Pair) -> None:
        """WatchModelStates on the worker reports what the first process does: LOADING to
        READY, then the version removed after an unload sent to the worker."""
        call = clean.worker.WatchModelStates(pb.WatchModelStatesRequest(), timeout=60)
        seen: list[tuple[str, int]] = []
        removed: list[str] = []

        async def record() -> None:
            async for message in call:
                seen.extend((v.name, v.state) for v in message.model_versions)
                removed.extend(message.removed_names)

        task = asyncio.create_task(record())
        try:
            await load(clean.worker, V1)
            await clean.worker.UnloadModelVersion(pb.UnloadModelVersionRequest(name=V1))
            await eventually(lambda: removed == [V1], "V1 removed on the worker's watch")
        finally:
            call.cancel()
            task.cancel()
        states = [state for name, state in seen if name == V1]
        assert states[0] == pb.MODEL_VERSION_STATE_LOADING
        assert pb.MODEL_VERSION_STATE_READY in states
        assert await held(clean.worker) == []
        assert (await refused(clean.worker.Infer(infer_request(V1)))).code is (
            grpc.StatusCode.NOT_FOUND
        )

    async def test_the_worker_follows_the_first_process_health(self, clean: Pair) -> None:
        """When the first process turns NOT_SERVING (its supervisor does when Triton dies) the
        worker does, and the facade's ServerReady says so; both come back together."""
        health = health_pb2_grpc.HealthStub(clean.worker_channel)
        oip = service_pb2_grpc.GRPCInferenceServiceStub(clean.worker_channel)

        async def status() -> tuple[int, bool]:
            answer = await health.Check(health_pb2.HealthCheckRequest())
            ready = await oip.ServerReady(service_pb2.ServerReadyRequest())
            return answer.status, ready.ready

        serving = (health_pb2.HealthCheckResponse.SERVING, True)
        not_serving = (health_pb2.HealthCheckResponse.NOT_SERVING, False)
        assert await status() == serving
        await clean.owner.server.set_serving(False)
        try:
            await eventually(lambda: _is(status, not_serving), "the worker NOT_SERVING")
        finally:
            await clean.owner.server.set_serving(True)
        await eventually(lambda: _is(status, serving), "the worker SERVING again")

    async def test_a_triton_killed_under_the_first_process_is_followed_by_the_worker(
        self, clean: Pair, fraud_models: dict[str, fraud.TrainedModel]
    ) -> None:
        """kill -9 of Triton: the worker lists the version LOADING and refuses Infer with
        UNAVAILABLE while the first process restarts Triton, then lists it READY on the same
        endpoint and answers again, without anyone calling it."""
        loaded = await load(clean.owner.stub, V1)
        await eventually(
            lambda: _lists(clean.worker, [(V1, pb.MODEL_VERSION_STATE_READY)]), "V1 mirrored"
        )
        triton = clean.owner.app.triton
        assert triton is not None and triton.pid is not None
        os.kill(triton.pid, signal.SIGKILL)

        await eventually(
            lambda: _lists(clean.worker, [(V1, pb.MODEL_VERSION_STATE_LOADING)]),
            "V1 LOADING on the worker",
            within_s=60,
        )
        during = await refused(clean.worker.Infer(infer_request(V1)))
        await eventually(
            lambda: _lists(clean.worker, [(V1, pb.MODEL_VERSION_STATE_READY)]),
            "V1 READY again on the worker",
            within_s=60,
        )

        assert during.code is grpc.StatusCode.UNAVAILABLE
        (after,) = await held(clean.worker)
        assert after.triton_endpoint == loaded.triton_endpoint
        assert_answers_as(await infer(clean.worker, infer_request(V1)), fraud_models[V1])


async def _is(probe: Any, expected: object) -> bool:
    return bool(await probe() == expected)


def _oip_request() -> Any:
    rows = ROWS.astype(np.float32)
    request = service_pb2.ModelInferRequest(model_name="fraud", model_version="1")
    request.inputs.add(name="features", datatype="FP32", shape=list(rows.shape))
    request.outputs.add(name="probabilities")
    request.raw_input_contents.append(rows.tobytes())
    return request


async def _http_infers(port: int, connections: int) -> list[dict[str, Any]]:
    """One ModelInfer of ROWS over each of `connections` HTTP connections of their own."""
    body = {
        "inputs": [
            {
                "name": "features",
                "datatype": "FP32",
                "shape": list(ROWS.shape),
                "data": ROWS.tolist(),
            }
        ]
    }
    answers = []
    for _ in range(connections):
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"http://127.0.0.1:{port}/v2/models/fraud/versions/1/infer", json=body
            ) as r,
        ):
            assert r.status == 200, await r.text()
            answers.append(await r.json())
    return answers


class TestConsoleScript:
    async def test_two_processes_serve_one_port_and_stop_together(
        self,
        tmp_path: Path,
        registry_target: str,
        fraud_models: dict[str, fraud.TrainedModel],
    ) -> None:
        """`modelserve-inference` with SERVER__WORKERS=2: the first process starts Triton and
        then the worker; a version loaded through one answers through both (connections spread
        over them), over gRPC and over the shared HTTP port; SIGTERM to the first stops both
        and removes the worker socket."""
        port, http_port = free_port(), free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("MODELSERVE_")}
        env |= {
            "MODELSERVE_INFERENCE_" + k.upper(): v
            for k, v in {
                "registry_target": registry_target,
                "triton_mode": "local",
                "triton_work_dir": str(tmp_path / "triton"),
                "server__port": str(port),
                "server__workers": "2",
                "server__http_port": str(http_port),
                "telemetry__log_format": "json",
            }.items()
        }
        script = Path(sys.executable).parent / "modelserve-inference"
        process = await asyncio.create_subprocess_exec(
            str(script), env=env, cwd=tmp_path, stdout=asyncio.subprocess.PIPE
        )
        events: list[dict[str, Any]] = []

        async def read() -> None:
            assert process.stdout is not None
            async for line in process.stdout:
                events.append(json.loads(line))

        reader = asyncio.create_task(read())
        channels: list[grpc.aio.Channel] = []
        try:
            started = lambda: {e["pid"] for e in events if e["event"] == "service_started"}  # noqa: E731
            await eventually(
                lambda: len(started()) == 2,
                "both processes serving",
                within_s=90,
                explain=lambda: "\n".join(map(str, events[-20:])),
            )
            (worker,) = started() - {process.pid}
            assert psutil.Process(worker).ppid() == process.pid
            owner = Owner.from_env(psutil.Process(worker).environ())
            assert owner is not None
            socket_dir = Path(owner.address.removeprefix("unix:")).parent
            assert socket_dir.is_dir()

            # A channel of its own per connection: channels with equal options share one.
            channels = [
                grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.channel_id", k)])
                for k in range(16)
            ]
            stubs = [pb_grpc.InferenceServiceStub(c) for c in channels]
            await load(stubs[0], V1)
            for stub in stubs:
                await eventually(
                    lambda s=stub: _lists(s, [(V1, pb.MODEL_VERSION_STATE_READY)]),
                    "V1 READY on every connection",
                )
                assert_answers_as(await infer(stub, infer_request(V1)), fraud_models[V1])
            answered_by = {
                e.get("worker", 0)
                for e in events
                if e["event"] == "rpc" and e["rpc"].endswith("/Infer") and e["code"] == "OK"
            }
            assert answered_by == {0, 1}, "16 connections all reached one process"
            http_answers = await _http_infers(http_port, connections=16)
            assert {a["model_version"] for a in http_answers} == {"1"}
            http_answered_by = {
                e.get("worker", 0)
                for e in events
                if e["event"] == "rpc" and e["rpc"].endswith("/ModelInfer") and e["code"] == "OK"
            }
            assert http_answered_by == {0, 1}, "16 HTTP connections all reached one process"

            process.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(process.wait(), 60) == 0
            assert not psutil.pid_exists(worker) or psutil.Process(worker).status() == "zombie"
            assert not socket_dir.exists()
            assert not [
                e for e in events if e["event"] in ("service_failed", "owner_stream_broken")
            ]
        finally:
            for channel in channels:
                await channel.close()
            if process.returncode is None:
                process.kill()
                await process.wait()
            reader.cancel()
