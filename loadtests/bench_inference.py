"""Benchmark: the inference service's two front doors against Triton itself and a bare hop.

Starts the registry and the inference service (which starts Triton) as separate processes,
registers and loads the demo fraud model, starts a bare grpc.aio echo server in another
process, then for each concurrency drives one-row requests through four paths for a fixed
time and prints p50/p95/p99 latency, throughput, and the facade's ratios:

- triton direct: `tritonclient.grpc.aio` straight to Triton (the router's direct path);
- OIP facade: the same client code pointed at the inference service;
- service Infer: `InferenceService.Infer` with the project's own tensors;
- echo (bare hop): a grpc.aio server that answers the OIP request's bytes, i.e. the cost
  of one Python gRPC hop with no work in it.

    .venv/bin/python loadtests/bench_inference.py --duration 5 --concurrency 1 16 64
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import numpy as np
import uvloop
from bench import Result, drive
from tritonclient.grpc import InferInput, InferRequestedOutput, service_pb2
from tritonclient.grpc.aio import InferenceServerClient

from modelserve.inference.v1 import inference_service_pb2 as pb
from modelserve.inference.v1 import inference_service_pb2_grpc as pb_grpc
from modelserve.registry.v1 import registry_service_pb2 as registry_pb
from modelserve.type.v1 import tensor_pb2
from modelserve_cli.stack import Stack, StackOptions
from modelserve_demo import fraud
from modelserve_runtime.channels import create_channel
from modelserve_runtime.clients import RegistryAdminClient
from modelserve_runtime.convert import TRITON_NAMES, numpy_to_tensor

_ECHO_METHOD = "/bench.Echo/Echo"
_DATATYPES = {name: code for code, name in TRITON_NAMES.items()}


async def serve_echo() -> None:
    """A bare grpc.aio server whose one method answers the request's bytes; prints its port."""
    handler = grpc.method_handlers_generic_handler(
        "bench.Echo",
        {"Echo": grpc.unary_unary_rpc_method_handler(_echo)},
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()


async def _echo(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    return request


def _spec(spec: object) -> tensor_pb2.TensorSpec:
    name, datatype, shape = spec.name, spec.datatype, spec.shape  # type: ignore[attr-defined]
    return tensor_pb2.TensorSpec(name=name, datatype=_DATATYPES[datatype], shape=list(shape))


async def _register_and_load(stack: Stack, trained: fraud.TrainedModel) -> pb.LoadedModelVersion:
    async with create_channel(
        stack.targets["registry"], default_timeout_s=60, max_message_bytes=64 << 20
    ) as registry:
        admin = RegistryAdminClient(registry)
        await admin.create_model("fraud", "benchmark")
        version = await admin.upload_model_version(
            "models/fraud",
            registry_pb.ModelVersion(
                format=registry_pb.ARTIFACT_FORMAT_ONNX,
                signature=registry_pb.Signature(
                    inputs=[_spec(s) for s in trained.inputs],
                    outputs=[_spec(s) for s in trained.outputs],
                    feature_refs=list(trained.feature_refs),
                ),
            ),
            trained.onnx_bytes,
        )
    async with create_channel(stack.targets["inference"], default_timeout_s=120) as channel:
        loaded = await pb_grpc.InferenceServiceStub(channel).LoadModelVersion(
            pb.LoadModelVersionRequest(name=version.name)
        )
    if loaded.model_version.state != pb.MODEL_VERSION_STATE_READY:
        raise RuntimeError(f"the demo model did not load: {loaded.model_version.reason}")
    return loaded.model_version


async def main(args: argparse.Namespace) -> None:
    run_dir = Path(tempfile.mkdtemp(prefix="modelserve-bench-inference-"))
    env = {f"MODELSERVE_{s}_TELEMETRY__LOG_LEVEL": "warning" for s in ("INFERENCE", "REGISTRY")}
    stack = Stack(StackOptions(run_dir=run_dir, env=env))
    echo = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--serve-echo", stdout=asyncio.subprocess.PIPE
    )
    try:
        for service in ("registry", "inference"):
            stack.spawn(service)
            await stack.wait_serving(service)
        assert echo.stdout is not None
        echo_target = f"127.0.0.1:{(await echo.stdout.readline()).decode().strip()}"
        loaded = await _register_and_load(stack, fraud.train(seed=0))
        version = str(loaded.triton_model_version)
        rows = fraud.make_dataset(64, seed=3)[0]
        results = await _drive_all(args, stack, loaded.triton_endpoint, echo_target, version, rows)
        _print(results, args)
    finally:
        echo.terminate()
        await echo.wait()
        await stack.stop()


async def _drive_all(
    args: argparse.Namespace,
    stack: Stack,
    triton_endpoint: str,
    echo_target: str,
    version: str,
    rows: np.ndarray,
) -> list[Result]:
    n = len(rows)
    oip_inputs = []
    for i in range(n):
        features = InferInput("features", [1, rows.shape[1]], "FP32")
        features.set_data_from_numpy(rows[i : i + 1])
        oip_inputs.append([features])
    outputs = [InferRequestedOutput("label"), InferRequestedOutput("probabilities")]
    infer_requests = [
        pb.InferRequest(
            name=f"models/fraud/versions/{version}",
            inputs=[numpy_to_tensor("features", rows[i : i + 1])],
        )
        for i in range(n)
    ]
    echo_payloads = [
        service_pb2.ModelInferRequest(
            model_name="fraud",
            model_version=version,
            inputs=[{"name": "features", "datatype": "FP32", "shape": [1, rows.shape[1]]}],
            raw_input_contents=[rows[i : i + 1].tobytes()],
        ).SerializeToString()
        for i in range(n)
    ]
    direct = InferenceServerClient(triton_endpoint)
    facade = InferenceServerClient(stack.targets["inference"])
    service_channel = create_channel(stack.targets["inference"])
    service = pb_grpc.InferenceServiceStub(service_channel)
    echo_channel = grpc.aio.insecure_channel(echo_target)
    echo = echo_channel.unary_unary(_ECHO_METHOD)
    paths: dict[str, Callable[[int], Awaitable[object]]] = {
        "triton direct": lambda i: direct.infer(
            "fraud", oip_inputs[i % n], model_version=version, outputs=outputs
        ),
        "OIP facade": lambda i: facade.infer(
            "fraud", oip_inputs[i % n], model_version=version, outputs=outputs
        ),
        "service Infer": lambda i: service.Infer(infer_requests[i % n]),
        "echo (bare hop)": lambda i: echo(echo_payloads[i % n]),
    }
    results: list[Result] = []
    try:
        for concurrency in args.concurrency:
            for name, call in paths.items():
                await drive(name, call, concurrency, min(1.0, args.duration))  # warm-up
                results.append(await drive(name, call, concurrency, args.duration))
    finally:
        await direct.close()
        await facade.close()
        await service_channel.close()
        await echo_channel.close()
    return results


def _print(results: list[Result], args: argparse.Namespace) -> None:
    print(f"\nduration={args.duration}s per path and concurrency\n")
    print("| path | conc | p50 ms | p95 ms | p99 ms | req/s | errors |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r.path} | {r.concurrency} | {r.percentile(50):.2f} | {r.percentile(95):.2f} | "
            f"{r.percentile(99):.2f} | {r.rps:.0f} | {r.errors} |"
        )
    by = {(r.path, r.concurrency): r for r in results}
    print("\n| measure | conc | value |")
    print("|---|---:|---:|")
    for c in args.concurrency:
        direct, facade, echo = (
            by[("triton direct", c)],
            by[("OIP facade", c)],
            by[("echo (bare hop)", c)],
        )
        added = facade.percentile(50) - direct.percentile(50)
        print(
            f"| facade p50 - direct p50, in bare hops (target ≤ 1.2) | {c} | {added / echo.percentile(50):.2f} |"
        )
        print(
            f"| facade req/s / echo req/s (target ≥ 0.8 at 64) | {c} | {facade.rps / echo.rps:.2f} |"
        )
        print(f"| facade req/s / direct req/s | {c} | {facade.rps / direct.rps:.2f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--duration", type=float, default=5.0, help="seconds per path and concurrency"
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--serve-echo", action="store_true", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    uvloop.run(serve_echo() if arguments.serve_echo else main(arguments))
