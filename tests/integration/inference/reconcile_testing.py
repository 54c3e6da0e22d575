"""Helpers of the reconcile tests: a registry that can be stopped and started again on its port,
tiny real ONNX models (one that Triton refuses), deployments, and a WatchModelStates recorder."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import onnx
import pytest
from google.protobuf import field_mask_pb2
from onnx import TensorProto, helper, numpy_helper
from support import eventually

from modelserve.inference.v1 import inference_service_pb2 as pb
from modelserve.inference.v1 import inference_service_pb2_grpc as pb_grpc
from modelserve.registry.v1 import registry_service_pb2 as registry_pb
from modelserve.registry.v1 import registry_service_pb2_grpc as registry_grpc
from modelserve.type.v1 import tensor_pb2
from modelserve_cli.stack import free_port
from modelserve_inference.config import InferenceSettings
from modelserve_registry import server as registry_server
from modelserve_registry.config import RegistrySettings
from modelserve_registry.server import RegistryApp
from modelserve_runtime.channels import create_channel
from modelserve_runtime.config import ServerSettings
from modelserve_runtime.convert import numpy_to_tensor, tensor_to_numpy
from modelserve_runtime.server import GrpcServer

#: Three rows of the tiny models' one input.
ROWS = np.array([[1.0, 2.0, 3.0], [0.5, 0.0, -1.0], [2.0, 2.0, 2.0]], dtype=np.float32)
STATE_NAMES = {
    pb.MODEL_VERSION_STATE_LOADING: "LOADING",
    pb.MODEL_VERSION_STATE_WARMING: "WARMING",
    pb.MODEL_VERSION_STATE_READY: "READY",
    pb.MODEL_VERSION_STATE_FAILED: "FAILED",
    pb.MODEL_VERSION_STATE_UNLOADING: "UNLOADING",
}
REMOVED = "REMOVED"
#: How long a load may take on a busy 2-core machine.
LOAD_S = 60.0


def tiny_onnx(weight: float, *, rows_of_w: int = 3) -> bytes:
    """`y = x @ W` with W all `weight`: x FP32 [N, 3], y FP32 [N, 2]. With `rows_of_w` other
    than 3 the graph still passes onnx.checker (and so the registry) but onnxruntime refuses to
    load it: the MatMul's dimensions do not match."""
    weights = numpy_helper.from_array(np.full((rows_of_w, 2), weight, dtype=np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
        initializer=[weights],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def expected(weight: float, rows: npt.NDArray[np.float32] = ROWS) -> npt.NDArray[np.float32]:
    """What a tiny model of `weight` answers."""
    return rows @ np.full((3, 2), weight, dtype=np.float32)


class RestartableRegistry:
    """A real registry service in this process over one data directory and one port, which a
    test can stop (the port refuses connections) and start again with the same data."""

    def __init__(self, data_dir: Path) -> None:
        self.port = free_port()
        # Versions take traffic straight from DEVELOPMENT: stages and approvals are not what
        # these tests are about.
        self._settings = RegistrySettings(
            data_dir=data_dir,
            server=ServerSettings(port=self.port),
            production_traffic_only=False,
        )
        self._running: tuple[GrpcServer, RegistryApp] | None = None
        self.channel = create_channel(self.target, default_timeout_s=30)
        self.stub = registry_grpc.RegistryServiceStub(self.channel)

    @property
    def target(self) -> str:
        """`host:port` of the registry, the same across restarts."""
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        """Starts serving on the port."""
        grpc_server, app = await registry_server.build_server(self._settings)
        await grpc_server.server.start()
        await app.check_ready()
        await grpc_server.set_serving(True)
        self._running = (grpc_server, app)

    async def stop(self) -> None:
        """Ends the watch streams and stops serving."""
        if self._running is not None:
            grpc_server, app = self._running
            self._running = None
            await app.begin_shutdown()
            await grpc_server.server.stop(0)
            await app.close()

    async def close(self) -> None:
        """Stops and closes the test's channel."""
        await self.stop()
        await self.channel.close()

    async def __aenter__(self) -> RestartableRegistry:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def create_model(self, model_id: str) -> None:
        """Creates `models/{model_id}`."""
        await self.stub.CreateModel(
            registry_pb.CreateModelRequest(model_id=model_id, model=registry_pb.Model())
        )

    async def upload(
        self,
        model_id: str,
        onnx_bytes: bytes,
        *,
        sample_inputs: npt.NDArray[np.float32] | None = None,
        allow_non_finite: bool = False,
    ) -> str:
        """Uploads a tiny model as the model's next version; returns the version's name.
        `allow_non_finite`: its input takes NaN and infinity."""
        signature = registry_pb.Signature(
            inputs=[
                tensor_pb2.TensorSpec(
                    name="x",
                    datatype=tensor_pb2.DATA_TYPE_FP32,
                    shape=[-1, 3],
                    allow_non_finite=allow_non_finite,
                )
            ],
            outputs=[
                tensor_pb2.TensorSpec(name="y", datatype=tensor_pb2.DATA_TYPE_FP32, shape=[-1, 2])
            ],
        )
        version = registry_pb.ModelVersion(
            format=registry_pb.ARTIFACT_FORMAT_ONNX,
            signature=signature,
            sample_inputs=[] if sample_inputs is None else [numpy_to_tensor("x", sample_inputs)],
        )

        async def requests() -> AsyncIterator[registry_pb.CreateModelVersionRequest]:
            yield registry_pb.CreateModelVersionRequest(
                upload=registry_pb.ModelVersionUpload(
                    parent=f"models/{model_id}",
                    model_version=version,
                    sha256=hashlib.sha256(onnx_bytes).hexdigest(),
                )
            )
            yield registry_pb.CreateModelVersionRequest(chunk=onnx_bytes)

        response = await self.stub.CreateModelVersion(requests())
        return response.model_version.name

    async def deploy(
        self,
        endpoint: str,
        traffic: dict[str, int],
        *,
        shadow: Sequence[str] = (),
        fallback: str = "",
        inference: registry_pb.InferenceConfig | None = None,
    ) -> registry_pb.Deployment:
        """Writes every field of `deployments/{endpoint}` (creating it): absent ones are
        cleared."""
        response = await self.stub.UpdateDeployment(
            registry_pb.UpdateDeploymentRequest(
                deployment=registry_pb.Deployment(
                    name=f"deployments/{endpoint}",
                    traffic=[
                        registry_pb.TrafficTarget(model_version=v, percent=p)
                        for v, p in traffic.items()
                    ],
                    shadow=list(shadow),
                    fallback_version=fallback,
                    inference=inference,
                ),
                update_mask=field_mask_pb2.FieldMask(paths=["*"]),
                allow_missing=True,
            )
        )
        return response.deployment

    async def last_sequence(self, endpoint: str) -> int:
        """The registry-wide sequence of the deployment's newest revision."""
        response = await self.stub.ListDeploymentRevisions(
            registry_pb.ListDeploymentRevisionsRequest(name=f"deployments/{endpoint}", page_size=1)
        )
        return response.revisions[0].sequence


def reconciling_settings(
    tmp_path_factory: pytest.TempPathFactory, registry: RestartableRegistry, **settings: Any
) -> InferenceSettings:
    """A service that reconciles against `registry`, in a Triton work directory of its own,
    with `settings` on top of the defaults."""
    return InferenceSettings(
        triton_work_dir=tmp_path_factory.mktemp("triton"),
        registry_target=registry.target,
        **settings,
    )


@dataclass
class StateEvent:
    """One version's state in one WatchModelStates message, when the test received it."""

    at: float
    name: str
    state: str
    reason: str = ""
    endpoint: str = ""


@dataclass
class StateRecorder:
    """Every message of one WatchModelStates stream, as it arrives."""

    initial: list[pb.LoadedModelVersion] | None = None
    events: list[StateEvent] = field(default_factory=list)
    messages: int = 0

    def states(self, name: str) -> list[str]:
        """The states the version went through (REMOVED for its removal), in order."""
        return [e.state for e in self.events if e.name == name]

    def of(self, name: str) -> list[StateEvent]:
        """The version's events, in order."""
        return [e for e in self.events if e.name == name]

    def last(self, name: str) -> str:
        """The version's latest state; "" when none was seen."""
        states = self.states(name)
        return states[-1] if states else ""


@contextlib.asynccontextmanager
async def recording(stub: pb_grpc.InferenceServiceAsyncStub) -> AsyncIterator[StateRecorder]:
    """Records a WatchModelStates stream for the duration of the block, which starts once the
    stream's first message (the whole state) has arrived."""
    recorder = StateRecorder()
    # The channel's default 5 s deadline would end the stream during the test.
    call = stub.WatchModelStates(pb.WatchModelStatesRequest(), timeout=600)

    async def read() -> None:
        async for message in call:
            recorder.messages += 1
            now = time.monotonic()
            if message.initial:
                recorder.initial = list(message.model_versions)
                continue
            for version in message.model_versions:
                recorder.events.append(
                    StateEvent(
                        now,
                        version.name,
                        STATE_NAMES[version.state],
                        version.reason,
                        version.triton_endpoint,
                    )
                )
            for name in message.removed_names:
                recorder.events.append(StateEvent(now, name, REMOVED))

    task = asyncio.create_task(read())
    try:
        # Changes made before the stream is open would only show in its first message.
        await eventually(lambda: recorder.initial is not None, "the first WatchModelStates message")
        yield recorder
    finally:
        call.cancel()
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            await task


async def held_states(stub: pb_grpc.InferenceServiceAsyncStub) -> dict[str, str]:
    """What ListModelVersions says: each held version's state."""
    listed = await stub.ListModelVersions(pb.ListModelVersionsRequest())
    return {v.name: STATE_NAMES[v.state] for v in listed.model_versions}


async def answer(stub: pb_grpc.InferenceServiceAsyncStub, name: str) -> npt.NDArray[Any]:
    """The version's `y` for ROWS through Infer."""
    response = await stub.Infer(
        pb.InferRequest(name=name, inputs=[numpy_to_tensor("x", ROWS)]), timeout=10
    )
    (output,) = response.outputs
    return tensor_to_numpy(output)


async def ready(stub: pb_grpc.InferenceServiceAsyncStub, *names: str) -> None:
    """Waits until every named version is READY in ListModelVersions."""

    async def check() -> bool:
        states = await held_states(stub)
        return all(states.get(name) == "READY" for name in names)

    await eventually(check, f"{', '.join(names)} READY", within_s=LOAD_S)
