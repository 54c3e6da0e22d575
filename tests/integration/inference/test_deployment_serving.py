"""How a deployment's versions are served: its InferenceConfig in Triton's model config, the
backend it asks for, and warmup from the version's sample inputs."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path

import grpc
import numpy as np
import pytest
from inference_testing import RunningInference, held, refused
from reconcile_testing import (
    LOAD_S,
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
from structlog.testing import capture_logs
from support import eventually
from tritonclient.grpc import service_pb2, service_pb2_grpc

from modelserve.inference.v1 import inference_service_pb2 as pb
from modelserve.registry.v1 import registry_service_pb2 as registry_pb
from modelserve_inference.config import InferenceSettings
from modelserve_runtime.convert import numpy_to_tensor, tensor_to_numpy
from modelserve_triton.runner import TritonRunner

pytestmark = pytest.mark.triton

#: Long enough that a retry within a test can only come from a config change.
RETRY_INITIAL_S = 600.0


@pytest.fixture(scope="module")
def inference_settings(
    tmp_path_factory: pytest.TempPathFactory, registry: RestartableRegistry
) -> InferenceSettings:
    """Reconcile on, the default warmup sizes (1, 8, 64), FAILED versions retried only after
    ten minutes."""
    return reconciling_settings(
        tmp_path_factory,
        registry,
        unload_grace_s=0.5,
        load_retry_initial_s=RETRY_INITIAL_S,
        load_retry_max_s=RETRY_INITIAL_S,
    )


@pytest.fixture
async def triton(inference_service: RunningInference) -> AsyncIterator[TritonRunner]:
    """A client of the service's own Triton."""
    runner = TritonRunner(inference_service.app.versions.triton_endpoint)
    yield runner
    await runner.close()


class TestInferenceConfig:
    async def test_the_deployments_config_is_what_triton_runs(
        self,
        inference_service: RunningInference,
        registry: RestartableRegistry,
        triton: TritonRunner,
    ) -> None:
        """Triton's model config API reports the deployment's max_batch_size, preferred batch
        sizes, queue delay and instance count; warmup and Infer keep within its batch limit;
        a changed config reloads the model with it while the version stays READY, and the
        version's listed limits follow."""
        stub = inference_service.stub
        await registry.create_model("lambda")
        v1 = await registry.upload("lambda", tiny_onnx(1.0))

        await registry.deploy(
            "lambda",
            {v1: 100},
            inference=registry_pb.InferenceConfig(
                max_batch_size=8,
                preferred_batch_sizes=[2, 4],
                max_queue_delay_us=100,
                instance_count=2,
            ),
        )
        await ready(stub, v1)
        first = await triton.model_config("lambda")
        stats = await triton.statistics(timeout_s=5)
        too_big = await refused(
            stub.Infer(
                pb.InferRequest(name=v1, inputs=[numpy_to_tensor("x", np.tile(ROWS, (3, 1)))])
            )
        )
        async with recording(stub) as states:
            await registry.deploy(
                "lambda",
                {v1: 100},
                inference=registry_pb.InferenceConfig(max_batch_size=16, instance_count=1),
            )

            async def reconfigured() -> bool:
                config = await triton.model_config("lambda")
                return int(config["max_batch_size"]) == 16

            await eventually(reconfigured, "the new config in Triton", within_s=LOAD_S)
            second = await triton.model_config("lambda")

            async def new_limit_listed() -> bool:
                (listed,) = [v for v in await held(stub) if v.name == v1]
                return listed.max_batch_size == 16

            await eventually(new_limit_listed, "the new limit listed")

        assert int(first["max_batch_size"]) == 8
        assert [int(g["count"]) for g in first["instance_group"]] == [2]
        assert [int(s) for s in first["dynamic_batching"]["preferred_batch_size"]] == [2, 4]
        assert int(first["dynamic_batching"]["max_queue_delay_microseconds"]) == 100
        (version_stats,) = [
            m for m in stats["model_stats"] if (m["name"], m["version"]) == ("lambda", "1")
        ]
        assert {int(b["batch_size"]) for b in version_stats["batch_stats"]} == {1, 8}
        assert too_big.code is grpc.StatusCode.INVALID_ARGUMENT
        assert "from 1 to 8" in too_big.violations[0].description
        assert [int(g["count"]) for g in second["instance_group"]] == [1]
        # Without preferred sizes Triton fills in its own default ([max_batch_size]).
        assert second["dynamic_batching"].get("preferred_batch_size") != [2, 4]
        # The version stays READY throughout; watchers hear of its new limits once.
        assert states.states(v1) == ["READY"]
        np.testing.assert_allclose(await answer(stub, v1), expected(1.0))

    async def test_the_native_onnxruntime_backend_fails_with_a_clear_reason(
        self, inference_service: RunningInference, registry: RestartableRegistry
    ) -> None:
        """Asking for Triton's native onnxruntime backend, which the nvidia-pytriton wheel does
        not ship, leaves the version FAILED saying so; switching the deployment back to the
        python backend loads it at once, without waiting out the retry backoff."""
        stub = inference_service.stub
        await registry.create_model("mu")
        v1 = await registry.upload("mu", tiny_onnx(2.0))

        async with recording(stub) as states:
            await registry.deploy(
                "mu",
                {v1: 100},
                inference=registry_pb.InferenceConfig(backend=registry_pb.BACKEND_ONNXRUNTIME),
            )
            await eventually(lambda: states.last(v1) == "FAILED", "v1 FAILED", within_s=LOAD_S)
            await registry.deploy(
                "mu",
                {v1: 100},
                inference=registry_pb.InferenceConfig(
                    backend=registry_pb.BACKEND_PYTHON_ONNXRUNTIME
                ),
            )
            await ready(stub, v1)

        (failed,) = [e for e in states.of(v1) if e.state == "FAILED"]
        assert "'onnxruntime' backend is not installed in this Triton" in failed.reason
        assert "ships only the python backend" in failed.reason
        assert states.states(v1)[-3:] == ["LOADING", "WARMING", "READY"]
        np.testing.assert_allclose(await answer(stub, v1), expected(2.0))

    async def test_a_gpu_deployment_without_a_usable_gpu_fails_with_the_reason(
        self, inference_service: RunningInference, registry: RestartableRegistry
    ) -> None:
        """Device GPU where Triton sees no GPU (CI), or where onnxruntime has no CUDA provider
        (a GPU machine with the CPU onnxruntime): FAILED saying which, never a quiet CPU
        fallback; moving the deployment to the CPU serves it."""
        stub = inference_service.stub
        await registry.create_model("pi")
        v1 = await registry.upload("pi", tiny_onnx(5.0))

        async with recording(stub) as states:
            await registry.deploy(
                "pi",
                {v1: 100},
                inference=registry_pb.InferenceConfig(device=registry_pb.DEVICE_GPU, gpus=[0]),
            )
            await eventually(lambda: states.last(v1) == "FAILED", "v1 FAILED", within_s=LOAD_S)
            await registry.deploy(
                "pi",
                {v1: 100},
                inference=registry_pb.InferenceConfig(device=registry_pb.DEVICE_CPU),
            )
            await ready(stub, v1)

        (listed,) = [
            v
            for v in (await stub.ListModelVersions(pb.ListModelVersionsRequest())).model_versions
            if v.name == v1
        ]
        assert listed.device == pb.INSTANCE_DEVICE_CPU
        (failed,) = [e for e in states.of(v1) if e.state == "FAILED"]
        assert (
            "unsupported gpu id 0" in failed.reason or "GPU 0, but onnxruntime" in failed.reason
        ), failed.reason
        assert states.states(v1)[-3:] == ["LOADING", "WARMING", "READY"]
        np.testing.assert_allclose(await answer(stub, v1), expected(5.0))

    async def test_a_refused_new_config_leaves_the_version_serving_as_it_was(
        self,
        inference_service: RunningInference,
        registry: RestartableRegistry,
        triton: TritonRunner,
    ) -> None:
        """Moving a serving deployment to a config Triton refuses (the GPU, where it sees
        none) does not take the version down: Triton keeps serving it as it was, every Infer
        meanwhile is answered, the version stays READY saying why the new config is not
        applied, and going back to the old config clears that."""
        stub = inference_service.stub
        await registry.create_model("rho")
        v1 = await registry.upload("rho", tiny_onnx(6.0))
        await registry.deploy("rho", {v1: 100})
        await ready(stub, v1)

        async with recording(stub) as states:
            with capture_logs() as logs:
                await registry.deploy(
                    "rho",
                    {v1: 100},
                    inference=registry_pb.InferenceConfig(device=registry_pb.DEVICE_GPU),
                )
                answers = []
                await eventually(
                    lambda: any(e.reason for e in states.of(v1)),
                    "the refusal reported",
                    within_s=LOAD_S,
                    nudge=lambda: _record(answers, answer(stub, v1)),
                    nudge_every_s=0.05,
                )
                for _ in range(20):
                    answers.append(await answer(stub, v1))
                refused = (await triton.model_config("rho"))["instance_group"]
            await registry.deploy("rho", {v1: 100})
            await eventually(lambda: states.of(v1)[-1].reason == "", "the reason cleared")

        assert {e.state for e in states.of(v1)} == {"READY"}
        reason = next(e.reason for e in states.of(v1) if e.reason)
        assert reason.startswith("the deployment's new inference config was refused")
        assert "GPU" in reason
        assert [g["kind"] for g in refused] == ["KIND_CPU"]
        assert len(answers) >= 5
        for got in answers:
            np.testing.assert_allclose(got, expected(6.0))
        assert (await held_states(stub))[v1] == "READY"
        # Tried once, then again only after the retry wait: not in a loop.
        events = [e["event"] for e in logs if e["event"].startswith("model_reconfigure")]
        assert events == ["model_reconfigure_refused", "model_reconfigure_retry_scheduled"]
        (scheduled,) = [e for e in logs if e["event"] == "model_reconfigure_retry_scheduled"]
        assert scheduled["retry_in_s"] == RETRY_INITIAL_S


class TestNonFiniteInputs:
    async def test_an_input_that_allows_nan_takes_it_and_others_refuse_it(
        self, inference_service: RunningInference, registry: RestartableRegistry
    ) -> None:
        """A version whose signature lets its input take NaN and infinity (its sample inputs
        hold some) warms, lists the flag, and answers them through Infer and the Open
        Inference Protocol; a version of the same model family without the flag refuses the
        same request."""
        stub = inference_service.stub
        rows = np.array([[1.0, 2.0, 3.0], [np.nan, 1.0, 1.0], [np.inf, 0.0, 0.0]], np.float32)
        await registry.create_model("nan-ok")
        takes = await registry.upload(
            "nan-ok", tiny_onnx(1.0), sample_inputs=rows, allow_non_finite=True
        )
        await registry.create_model("nan-refused")
        refuses = await registry.upload("nan-refused", tiny_onnx(1.0))
        await registry.deploy("nan-ok", {takes: 100})
        await registry.deploy("nan-refused", {refuses: 100})
        await ready(stub, takes, refuses)

        listed = {v.name: v for v in await held(stub)}
        response = await stub.Infer(
            pb.InferRequest(name=takes, inputs=[numpy_to_tensor("x", rows)]), timeout=10
        )
        oip = service_pb2_grpc.GRPCInferenceServiceStub(inference_service.channel)
        request = service_pb2.ModelInferRequest(model_name="nan-ok", model_version="1")
        request.inputs.add(name="x", datatype="FP32", shape=list(rows.shape))
        request.raw_input_contents.append(rows.tobytes())
        raw = await oip.ModelInfer(request, timeout=10)
        error = await refused(
            stub.Infer(pb.InferRequest(name=refuses, inputs=[numpy_to_tensor("x", rows)]))
        )

        assert listed[takes].inputs[0].allow_non_finite
        assert not listed[refuses].inputs[0].allow_non_finite
        with np.errstate(invalid="ignore"):  # inf * 0 is NaN, as in the model
            want = expected(1.0, rows)
        (output,) = response.outputs
        np.testing.assert_array_equal(tensor_to_numpy(output), want)
        via_oip = np.frombuffer(raw.raw_output_contents[0], np.float32).reshape(3, 2)
        np.testing.assert_array_equal(via_oip, want)
        assert error.code is grpc.StatusCode.INVALID_ARGUMENT
        assert [(v.field, v.description) for v in error.violations] == [
            ("inputs[x]", "contains NaN or infinity")
        ]


async def _record(answers: list[object], call: Awaitable[object]) -> None:
    answers.append(await call)


class TestVersionsCommand:
    async def test_lists_state_device_and_endpoint_and_fails_in_one_line(
        self, inference_service: RunningInference, registry: RestartableRegistry
    ) -> None:
        """`modelserve versions` shows each held version's state, device, limits (as the
        deployment's config set them) and Triton endpoint; an inference it cannot reach is one
        error line (in a narrow terminal too) and exit 1."""
        stub = inference_service.stub
        await registry.create_model("sigma")
        v1 = await registry.upload("sigma", tiny_onnx(8.0))
        await registry.deploy(
            "sigma",
            {v1: 100},
            inference=registry_pb.InferenceConfig(max_batch_size=32, instance_count=2),
        )
        await ready(stub, v1)
        (held,) = [
            v
            for v in (await stub.ListModelVersions(pb.ListModelVersionsRequest())).model_versions
            if v.name == v1
        ]

        code, out, err = await _modelserve(
            "versions", "--inference", f"127.0.0.1:{inference_service.server.port}"
        )
        unreachable = await _modelserve(
            "versions", "--inference", "127.0.0.1:1", "--timeout-s", "2", columns=60
        )

        assert code == 0, err
        (row,) = [line for line in out.splitlines() if v1 in line]
        cells = [cell.strip() for cell in row.strip("│ ").split("│")]
        assert cells[:5] == [v1, "READY", "cpu", "batch 32 x2", held.triton_endpoint]
        assert unreachable[0] == 1
        assert unreachable[2].startswith("error: UNAVAILABLE") and unreachable[2].count("\n") == 1


async def _modelserve(*args: str, columns: int = 250) -> tuple[int, str, str]:
    """Runs the `modelserve` command line in a terminal `columns` wide; its exit code, stdout
    and stderr."""
    process = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "modelserve"),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "COLUMNS": str(columns)},
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


class TestWarmup:
    async def test_sample_inputs_warm_the_version(
        self, inference_service: RunningInference, registry: RestartableRegistry
    ) -> None:
        """A version with sample inputs is warmed with them (their rows repeated to each warmup
        batch size); one without is warmed with synthesized inputs."""
        stub = inference_service.stub
        await registry.create_model("nu")
        with_samples = await registry.upload("nu", tiny_onnx(3.0), sample_inputs=ROWS)
        without = await registry.upload("nu", tiny_onnx(4.0))

        with capture_logs() as logs:
            await registry.deploy("nu", {with_samples: 50, without: 50})
            await ready(stub, with_samples, without)

        warmed = {e["version"]: e for e in logs if e["event"] == "model_version_warmed"}
        assert warmed[with_samples]["inputs"] == "sample_inputs"
        assert warmed[with_samples]["batch_sizes"] == [1, 8, 64]
        assert warmed[without]["inputs"] == "synthesized"
        np.testing.assert_allclose(await answer(stub, with_samples), expected(3.0))
