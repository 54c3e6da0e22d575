"""Removing one version of a model while another version of it answers a steady stream of
concurrent requests, with a real registry, a real inference service and a real Triton: the
version that stays never fails a request (through the service's Infer, its Open Inference
Protocol facade, and straight to Triton as the router's direct path calls it), and the one
removed goes away."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import pytest
import tritonclient.grpc as triton_grpc
from inference_testing import RunningInference, refused
from reconcile_testing import (
    LOAD_S,
    REMOVED,
    ROWS,
    RestartableRegistry,
    answer,
    expected,
    held_states,
    ready,
    reconciling_settings,
    recording,
    tiny_onnx,
)
from support import eventually
from tritonclient.grpc.aio import InferenceServerClient

from modelserve.inference.v1 import inference_service_pb2 as pb
from modelserve_inference.config import InferenceSettings
from modelserve_inference.models import parse_version_name
from modelserve_triton.runner import TritonRunner

pytestmark = pytest.mark.triton

#: How long a version no deployment references stays loaded.
GRACE_S = 1.0
#: Concurrent callers per way in.
CALLERS = 3
#: Answers each way in must give after the removal before the stream stops.
AFTER = 5


@pytest.fixture(scope="module")
def inference_settings(
    tmp_path_factory: pytest.TempPathFactory, registry: RestartableRegistry
) -> InferenceSettings:
    """Reconcile on with a short grace, so an unwanted version goes within the test."""
    return reconciling_settings(
        tmp_path_factory, registry, unload_grace_s=GRACE_S, warmup_batch_sizes=(1, 8)
    )


@pytest.fixture
async def facade(inference_service: RunningInference) -> AsyncIterator[InferenceServerClient]:
    """tritonclient's asyncio client on the service's Open Inference Protocol facade."""
    client = InferenceServerClient(inference_service.target)
    yield client
    await client.close()


@pytest.fixture
async def triton(inference_service: RunningInference) -> AsyncIterator[TritonRunner]:
    """A client straight to the Triton endpoint the service publishes, as the router's."""
    runner = TritonRunner(inference_service.app.versions.triton_endpoint)
    yield runner
    await runner.close()


@dataclass
class SteadyStream:
    """Concurrent callers asking one version, through every way in, until stopped; each
    answer is checked, and every failure (an error or a wrong answer) is kept."""

    calls: dict[str, Callable[[], Awaitable[npt.NDArray[Any]]]]
    want: npt.NDArray[Any]
    answered: dict[str, list[float]] = field(default_factory=dict)
    """Per way in, when each answer came (time.monotonic)."""
    failures: list[tuple[str, str]] = field(default_factory=list)
    stopping: bool = False

    def since(self, moment: float) -> dict[str, int]:
        """Answers per way in that came after `moment`."""
        return {way: sum(t > moment for t in times) for way, times in self.answered.items()}

    async def ask(self, way: str) -> None:
        call = self.calls[way]
        while not self.stopping:
            try:
                np.testing.assert_allclose(await call(), self.want, rtol=1e-6)
            except Exception as exc:  # an error or a wrong answer: either is a failure
                self.failures.append((way, repr(exc)))
            else:
                self.answered.setdefault(way, []).append(time.monotonic())


@contextlib.asynccontextmanager
async def steady_stream(
    calls: dict[str, Callable[[], Awaitable[npt.NDArray[Any]]]], want: npt.NDArray[Any]
) -> AsyncIterator[SteadyStream]:
    """Runs a SteadyStream of CALLERS callers per way in for the block, which starts once every
    way in has answered."""
    stream = SteadyStream(calls, want)
    tasks = [asyncio.create_task(stream.ask(way)) for way in calls for _ in range(CALLERS)]
    try:
        await eventually(
            lambda: set(stream.answered) == set(calls) or bool(stream.failures),
            "every way in answering",
        )
        yield stream
    finally:
        stream.stopping = True
        await asyncio.gather(*tasks)


def _ways_in(
    inference_service: RunningInference,
    facade: InferenceServerClient,
    triton: TritonRunner,
    name: str,
) -> dict[str, Callable[[], Awaitable[npt.NDArray[Any]]]]:
    """One version asked through Infer, the facade (ModelInfer) and straight to Triton."""
    model, version = parse_version_name(name)
    features = triton_grpc.InferInput("x", list(ROWS.shape), "FP32")
    features.set_data_from_numpy(ROWS)

    async def through_facade() -> npt.NDArray[Any]:
        result = await facade.infer(
            model, [features], model_version=str(version), client_timeout=10
        )
        return np.asarray(result.as_numpy("y"))

    async def straight_to_triton() -> npt.NDArray[Any]:
        outputs = await triton.infer(model, version, {"x": ROWS}, ["y"], timeout_s=10)
        return outputs["y"]

    return {
        "Infer": lambda: answer(inference_service.stub, name),
        "ModelInfer": through_facade,
        "triton": straight_to_triton,
    }


async def _two_versions(registry: RestartableRegistry, model: str) -> tuple[str, str]:
    """Versions A (answers 1.0 weights) and B (2.0) of a new model."""
    await registry.create_model(model)
    kept, removed = [await registry.upload(model, tiny_onnx(w)) for w in (1.0, 2.0)]
    return kept, removed


async def _assert_gone(
    inference_service: RunningInference, triton: TritonRunner, name: str
) -> None:
    """The version is neither held by the service nor loaded in Triton."""
    model, version = parse_version_name(name)
    assert name not in await held_states(inference_service.stub)
    assert not await triton.is_model_ready(model, version, timeout_s=5)
    error = await refused(answer(inference_service.stub, name))
    assert (error.code, error.reason) == (grpc.StatusCode.NOT_FOUND, "VERSION_NOT_LOADED")


class TestUnloadUnderLoad:
    async def test_a_version_taken_out_of_every_deployment_goes_while_its_sibling_answers(
        self,
        inference_service: RunningInference,
        registry: RestartableRegistry,
        facade: InferenceServerClient,
        triton: TritonRunner,
    ) -> None:
        """Version B, taken out of both deployments that referenced it, is unloaded after the
        grace while version A answers a steady concurrent stream through Infer, ModelInfer and
        Triton directly: not one request on A fails, A never leaves READY, and B is gone from
        the service and from Triton."""
        stub = inference_service.stub
        a, b = await _two_versions(registry, "kappa")
        await registry.deploy("kappa", {a: 50, b: 50})
        await registry.deploy("kappa-shadow", {a: 100}, shadow=[b])
        await ready(stub, a, b)
        np.testing.assert_allclose(await answer(stub, a), expected(1.0))
        np.testing.assert_allclose(await answer(stub, b), expected(2.0))

        async with (
            recording(stub) as states,
            steady_stream(_ways_in(inference_service, facade, triton, a), expected(1.0)) as load,
        ):
            await registry.deploy("kappa", {a: 100})
            await registry.deploy("kappa-shadow", {a: 100})
            await eventually(lambda: states.last(b) == REMOVED, "B removed", within_s=LOAD_S)
            removed_at = time.monotonic()
            await eventually(
                lambda: min(load.since(removed_at).values()) >= AFTER or bool(load.failures),
                "A answering on every way in after B went",
            )

        assert load.failures == []
        assert states.states(b) == ["UNLOADING", REMOVED]
        assert states.states(a) == []
        await _assert_gone(inference_service, triton, b)

    async def test_unloading_a_pinned_version_leaves_its_sibling_answering(
        self,
        inference_service: RunningInference,
        registry: RestartableRegistry,
        facade: InferenceServerClient,
        triton: TritonRunner,
    ) -> None:
        """UnloadModelVersion of version B, held only by its LoadModelVersion pin, removes it at
        once while version A (deployed) answers a steady concurrent stream through Infer,
        ModelInfer and Triton directly: not one request on A fails, and B is gone from the
        service and from Triton."""
        stub = inference_service.stub
        a, b = await _two_versions(registry, "lambda")
        await registry.deploy("lambda", {a: 100})
        pinned = await stub.LoadModelVersion(pb.LoadModelVersionRequest(name=b), timeout=LOAD_S)
        assert pinned.model_version.state == pb.MODEL_VERSION_STATE_READY
        await ready(stub, a)
        np.testing.assert_allclose(await answer(stub, a), expected(1.0))
        np.testing.assert_allclose(await answer(stub, b), expected(2.0))

        async with (
            recording(stub) as states,
            steady_stream(_ways_in(inference_service, facade, triton, a), expected(1.0)) as load,
        ):
            await stub.UnloadModelVersion(pb.UnloadModelVersionRequest(name=b), timeout=LOAD_S)
            unloaded_at = time.monotonic()
            assert b not in await held_states(stub)
            await eventually(
                lambda: min(load.since(unloaded_at).values()) >= AFTER or bool(load.failures),
                "A answering on every way in after B went",
            )

        assert load.failures == []
        assert states.states(b) == ["UNLOADING", REMOVED]
        assert states.states(a) == []
        await _assert_gone(inference_service, triton, b)
