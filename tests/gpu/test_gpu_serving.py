"""Serving on a GPU: deployments with device GPU run in Triton's python backend on
onnxruntime's CUDA provider, beside CPU ones, and answer as onnxruntime on the CPU does."""

from __future__ import annotations

import subprocess

import numpy as np
import psutil
from inference_testing import RunningInference
from reconcile_testing import RestartableRegistry, answer, expected, ready, recording, tiny_onnx
from support import eventually

from modelserve.inference.v1 import inference_service_pb2 as inference_pb
from modelserve.registry.v1 import registry_service_pb2 as registry_pb
from modelserve_triton.runner import TritonRunner

LOAD_S = 120.0


def _gpu_pids() -> set[int]:
    """The processes that hold memory on a GPU, as nvidia-smi lists them."""
    listed = subprocess.run(
        ["nvidia-smi", "--query-compute-apps=pid", "--format=csv,noheader"],
        capture_output=True,
        text=True,
        check=True,
    )
    return {int(line) for line in listed.stdout.split() if line.strip().isdigit()}


def _triton_family(service: RunningInference) -> set[int]:
    triton = service.app.triton
    assert triton is not None and triton.pid is not None
    process = psutil.Process(triton.pid)
    return {process.pid, *(child.pid for child in process.children(recursive=True))}


async def test_gpu_and_cpu_deployments_serve_side_by_side(
    inference_service: RunningInference, registry: RestartableRegistry
) -> None:
    """A GPU deployment and a CPU one turn READY and answer as onnxruntime; the GPU one's
    instance holds GPU memory in a process of Triton's, and its Triton config says KIND_GPU."""
    stub = inference_service.stub
    await registry.create_model("on-gpu")
    await registry.create_model("on-cpu")
    gpu_version = await registry.upload("on-gpu", tiny_onnx(2.0))
    cpu_version = await registry.upload("on-cpu", tiny_onnx(3.0))

    async with recording(stub) as states:
        await registry.deploy(
            "on-gpu",
            {gpu_version: 100},
            inference=registry_pb.InferenceConfig(device=registry_pb.DEVICE_GPU, gpus=[0]),
        )
        await registry.deploy("on-cpu", {cpu_version: 100})
        await ready(stub, gpu_version, cpu_version)

    assert states.states(gpu_version)[-3:] == ["LOADING", "WARMING", "READY"]
    np.testing.assert_allclose(await answer(stub, gpu_version), expected(2.0), rtol=1e-5)
    np.testing.assert_allclose(await answer(stub, cpu_version), expected(3.0), rtol=1e-5)

    runner = TritonRunner(inference_service.app.versions.triton_endpoint)
    try:
        gpu_config = await runner.model_config("on-gpu")
        cpu_config = await runner.model_config("on-cpu")
    finally:
        await runner.close()
    assert [(g["kind"], list(g.get("gpus", []))) for g in gpu_config["instance_group"]] == [
        ("KIND_GPU", [0])
    ]
    assert [g["kind"] for g in cpu_config["instance_group"]] == ["KIND_CPU"]
    assert _gpu_pids() & _triton_family(inference_service), (
        "no process of Triton's holds GPU memory"
    )
    listed = {
        v.name: (v.device, list(v.gpus))
        for v in (
            await stub.ListModelVersions(inference_pb.ListModelVersionsRequest())
        ).model_versions
    }
    assert listed[gpu_version] == (inference_pb.INSTANCE_DEVICE_GPU, [0])
    assert listed[cpu_version] == (inference_pb.INSTANCE_DEVICE_CPU, [])


async def test_a_version_moves_between_cpu_and_gpu_and_keeps_answering(
    inference_service: RunningInference, registry: RestartableRegistry
) -> None:
    """Moving a deployment from the CPU to the GPU and back reconfigures its model in Triton
    each time; the version answers the same on both devices."""
    stub = inference_service.stub
    await registry.create_model("mover")
    version = await registry.upload("mover", tiny_onnx(4.0))
    await registry.deploy("mover", {version: 100})
    await ready(stub, version)
    on_cpu = await answer(stub, version)
    runner = TritonRunner(inference_service.app.versions.triton_endpoint)

    async def kind_is(kind: str) -> bool:
        config = await runner.model_config("mover")
        return [g["kind"] for g in config["instance_group"]] == [kind]

    async def listed_on(device: int) -> bool:
        response = await stub.ListModelVersions(inference_pb.ListModelVersionsRequest())
        return next(v.device for v in response.model_versions if v.name == version) == device

    try:
        await registry.deploy(
            "mover",
            {version: 100},
            inference=registry_pb.InferenceConfig(device=registry_pb.DEVICE_GPU),
        )
        await eventually(lambda: kind_is("KIND_GPU"), "mover on the GPU", within_s=LOAD_S)
        await ready(stub, version)
        on_gpu = await answer(stub, version)
        await eventually(lambda: listed_on(inference_pb.INSTANCE_DEVICE_GPU), "listed on GPU")
        await registry.deploy(
            "mover",
            {version: 100},
            inference=registry_pb.InferenceConfig(device=registry_pb.DEVICE_CPU),
        )
        await eventually(lambda: kind_is("KIND_CPU"), "mover back on the CPU", within_s=LOAD_S)
        await ready(stub, version)
        await eventually(lambda: listed_on(inference_pb.INSTANCE_DEVICE_CPU), "listed on CPU")
    finally:
        await runner.close()

    np.testing.assert_allclose(on_gpu, on_cpu, rtol=1e-5)
    np.testing.assert_allclose(await answer(stub, version), expected(4.0), rtol=1e-5)


async def test_a_gpu_the_machine_lacks_leaves_the_version_serving_where_it_is(
    inference_service: RunningInference, registry: RestartableRegistry
) -> None:
    """Asking for GPU 63, which no test machine has, is refused by Triton; the version keeps
    serving on GPU 0, READY, saying why the new config is not applied."""
    stub = inference_service.stub
    await registry.create_model("stayer")
    version = await registry.upload("stayer", tiny_onnx(7.0))
    on_gpu0 = registry_pb.InferenceConfig(device=registry_pb.DEVICE_GPU, gpus=[0])
    await registry.deploy("stayer", {version: 100}, inference=on_gpu0)
    await ready(stub, version)

    async with recording(stub) as states:
        await registry.deploy(
            "stayer",
            {version: 100},
            inference=registry_pb.InferenceConfig(device=registry_pb.DEVICE_GPU, gpus=[63]),
        )
        await eventually(
            lambda: any(e.reason for e in states.of(version)), "the refusal", within_s=LOAD_S
        )
        answered = await answer(stub, version)

    assert {e.state for e in states.of(version)} == {"READY"}
    assert "gpu id 63" in next(e.reason for e in states.of(version) if e.reason)
    np.testing.assert_allclose(answered, expected(7.0), rtol=1e-5)
    runner = TritonRunner(inference_service.app.versions.triton_endpoint)
    try:
        config = await runner.model_config("stayer")
    finally:
        await runner.close()
    assert [list(g.get("gpus", [])) for g in config["instance_group"]] == [[0]]
