"""Benchmark: the inference service's front doors against Triton itself and a bare hop.

Starts the registry and the inference service (which starts Triton) as separate processes,
registers the demo fraud model (two versions) and loads version 1, starts two grpc.aio echo
servers in their own processes, then for each concurrency drives one-row requests through
each path for a fixed time and prints p50/p95/p99 latency, throughput, the CPU each request
cost the serving processes, and the ratios the inference issue sets targets on:

- triton direct: `tritonclient.grpc.aio` straight to Triton, as any Triton client calls it;
- OIP facade: the same client code pointed at the inference service;
- service Infer: `InferenceService.Infer` with the project's own tensors;
- echo (bare hop): a grpc.aio server answering the OIP request's bytes: the cost of one
  Python gRPC hop with no work in it;
- bare proxy (gRPC to Triton), bare proxy (HTTP to Triton): a grpc.aio server whose ModelInfer
  forwards the request's bytes to Triton over gRPC, or parses it and sends it over HTTP with
  the service's own client, with no checks, interceptors or tracing: the floor under any
  Python facade of Triton, for each way of calling it;
- echo + interceptors: the same server behind the project's standard server interceptors
  (tracing, request context, logs and metrics, error status), which every service runs: the
  floor under any handler of ours.

At the highest concurrency, two more: Triton with dynamic batching off (the same model loaded
under another name without `dynamic_batching`: Triton's batching gain), and the facade of a
second inference service with coalescing off (`COALESCE_IN_FLIGHT=0`, remote mode on the same
Triton: the service's own batching gain). With `--workers N`, one more path at every
concurrency: the facade of a third inference service (remote mode, the same Triton) run as N
processes on one port (`SERVER__WORKERS`), called over 4N channels (connections) in turn,
since the kernel spreads connections over the processes, not calls; its CPU is that of all N.
Two streaming paths at every concurrency: Triton's ModelStreamInfer straight to Triton and
the same on the facade, each one stream that all `concurrency` callers share (requests
matched to answers by id). Last, the first request after READY: version 2 is
unloaded and loaded again `--fresh-loads` times, and each time the first Infer is sent the
moment LoadModelVersion answers READY; its latency is set against the steady-state p50.

    .venv/bin/python loadtests/bench_inference.py --duration 5 --concurrency 1 16 64

Everything shares the machine's cores: compare ratios within one run, not across runs.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil
import uvloop
from bench import Result, SharedStream, add_run_arguments, drive, run_benchmark
from tritonclient.grpc import InferInput, InferRequestedOutput, service_pb2, service_pb2_grpc
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
from modelserve_triton.http import TritonHttpRunner
from modelserve_triton.model_config import build_model_config, model_files
from modelserve_triton.runner import TritonRunner

_ECHO_METHOD = "/bench.Echo/Echo"
_DATATYPES = {name: code for code, name in TRITON_NAMES.items()}
#: The Triton model name of the demo model loaded without dynamic batching.
_UNBATCHED = "fraud_unbatched"

DIRECT = "triton direct"
FACADE = "OIP facade"
INFER = "service Infer"
ECHO = "echo (bare hop)"
ECHO_INTERCEPTED = "echo + interceptors"
PROXY = "bare proxy (gRPC to Triton)"
PROXY_HTTP = "bare proxy (HTTP to Triton)"
FACADE_WORKERS = "OIP facade, {} workers"
DIRECT_UNBATCHED = "triton direct, dynamic batching off"
FACADE_UNCOALESCED = "OIP facade, coalescing off"
DIRECT_STREAM = "triton direct, one stream"
FACADE_STREAM = "OIP facade, one stream"


def _stream_caller(target: str) -> tuple[grpc.aio.Channel, SharedStream]:
    """One ModelStreamInfer stream to `target` that callers share, answers matched by id."""
    channel = grpc.aio.insecure_channel(target)
    call = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer()

    def answered(response: Any) -> tuple[str, object, str]:
        return response.infer_response.id, response.infer_response, response.error_message

    return channel, SharedStream(call, answered)


async def serve_echo(interceptors: bool) -> None:
    """A grpc.aio server whose one method answers the request's bytes, behind the standard
    interceptors when asked (logs at warning, tracing on, as the services run); prints its port."""
    from modelserve_runtime.interceptors import server_interceptors
    from modelserve_runtime.logs import configure_logging
    from modelserve_runtime.tracing import configure_tracing

    configure_logging("bench-echo", "warning", "json")
    configure_tracing("bench-echo", None)
    await _serve_bytes(
        "bench.Echo", "Echo", _echo, server_interceptors("bench") if interceptors else None
    )


async def _echo(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    return request


async def serve_proxy(triton: str) -> None:
    """The least any Python facade of Triton can do: a grpc.aio server whose ModelInfer passes
    the request's bytes to Triton over a grpc.aio channel and answers Triton's bytes, with no
    parsing, checks, interceptors or tracing; prints its port."""
    channel = grpc.aio.insecure_channel(triton)
    forward = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")

    async def model_infer(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        answer: bytes = await forward(request, timeout=context.time_remaining())
        return answer

    await _serve_bytes("inference.GRPCInferenceService", "ModelInfer", model_infer, None)


async def serve_proxy_http(triton_http: str) -> None:
    """The least a facade that calls Triton over HTTP, as inference does, can do: ModelInfer
    parsed and sent to Triton's HTTP endpoint by `TritonHttpRunner` (the service's own client),
    Triton's answer returned, with no checks, interceptors or tracing; prints its port."""
    runner = TritonHttpRunner(triton_http)

    async def model_infer(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        remaining = context.time_remaining()
        answer = await runner.infer_request(
            service_pb2.ModelInferRequest.FromString(request),
            timeout_s=60.0 if remaining is None else remaining,
        )
        return bytes(answer.SerializeToString())

    await _serve_bytes("inference.GRPCInferenceService", "ModelInfer", model_infer, None)


async def _serve_bytes(
    service: str,
    method: str,
    answer: Callable[[bytes, grpc.aio.ServicerContext[bytes, bytes]], Awaitable[bytes]],
    interceptors: Sequence[grpc.aio.ServerInterceptor] | None,
) -> None:
    """Serves one unary method on bytes (no (de)serialization) on a free port, printed on
    stdout, until killed."""
    handler = grpc.method_handlers_generic_handler(
        service, {method: grpc.unary_unary_rpc_method_handler(answer)}
    )
    server = grpc.aio.server(interceptors=interceptors)
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()


def _spec(spec: object) -> tensor_pb2.TensorSpec:
    name, datatype, shape = spec.name, spec.datatype, spec.shape  # type: ignore[attr-defined]
    return tensor_pb2.TensorSpec(name=name, datatype=_DATATYPES[datatype], shape=list(shape))


async def _register(stack: Stack, models: Sequence[fraud.TrainedModel]) -> list[str]:
    """Registers each model as the next version of `models/fraud`; their names."""
    async with create_channel(
        stack.targets["registry"], default_timeout_s=60, max_message_bytes=64 << 20
    ) as registry:
        admin = RegistryAdminClient(registry)
        await admin.create_model("fraud", "benchmark")
        names = []
        for trained in models:
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
            names.append(version.name)
    return names


async def _load(target: str, name: str) -> pb.LoadedModelVersion:
    async with create_channel(target, default_timeout_s=120) as channel:
        loaded = await pb_grpc.InferenceServiceStub(channel).LoadModelVersion(
            pb.LoadModelVersionRequest(name=name)
        )
    if loaded.model_version.state != pb.MODEL_VERSION_STATE_READY:
        raise RuntimeError(f"{name} did not load: {loaded.model_version.reason}")
    return loaded.model_version


async def _load_unbatched(triton_endpoint: str, trained: fraud.TrainedModel) -> None:
    """The demo model as Triton model `_UNBATCHED`, batched inputs but no dynamic batcher."""
    config = build_model_config(_UNBATCHED, trained.inputs, trained.outputs)
    del config["dynamic_batching"]
    triton = TritonRunner(triton_endpoint)
    try:
        await triton.load(_UNBATCHED, config, model_files({1: trained.onnx_bytes}), timeout_s=120)
    finally:
        await triton.close()


async def _start_echo(
    interceptors: bool, proxy_to: str | None = None, http_proxy_to: str | None = None
) -> tuple[asyncio.subprocess.Process, str]:
    if http_proxy_to is not None:
        args = ["--serve-proxy-http", http_proxy_to]
    elif proxy_to is not None:
        args = ["--serve-proxy", proxy_to]
    else:
        args = ["--serve-echo", *(["--with-interceptors"] if interceptors else [])]
    process = await asyncio.create_subprocess_exec(
        sys.executable, __file__, *args, stdout=asyncio.subprocess.PIPE
    )
    assert process.stdout is not None
    port = (await process.stdout.readline()).decode().strip()
    return process, f"127.0.0.1:{port}"


def _family(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def _cpu_seconds(processes: Sequence[psutil.Process]) -> float:
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


@dataclass
class Measured:
    """A path's latencies plus the CPU its front process and Triton spent per request."""

    result: Result
    front_us: float | None
    triton_us: float


@dataclass
class Route:
    """One way to send the benchmark's request, and the process that answers it first."""

    name: str
    call: Callable[[int], Awaitable[object]]
    front: list[psutil.Process] | None


async def _measure(
    path: Route, concurrency: int, duration: float, triton: list[psutil.Process]
) -> Measured:
    await drive(path.name, path.call, concurrency, min(1.0, duration))  # warm-up
    front_before = _cpu_seconds(path.front) if path.front else 0.0
    triton_before = _cpu_seconds(triton)
    result = await drive(path.name, path.call, concurrency, duration)
    count = max(1, len(result.latencies_ms))
    front_us = (
        (_cpu_seconds(path.front) - front_before) / count * 1e6 if path.front is not None else None
    )
    triton_us = (_cpu_seconds(triton) - triton_before) / count * 1e6
    return Measured(result, front_us, triton_us)


async def _first_answers(target: str, name: str, rows: np.ndarray, loads: int) -> list[float]:
    """Milliseconds from LoadModelVersion answering READY to the first Infer's answer, over
    `loads` fresh loads of `name` (unloaded before each)."""
    request = pb.InferRequest(name=name, inputs=[numpy_to_tensor("features", rows[:1])])
    firsts = []
    async with create_channel(target, default_timeout_s=120) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        for _ in range(loads):
            held = await stub.ListModelVersions(pb.ListModelVersionsRequest())
            if name in [v.name for v in held.model_versions]:
                await stub.UnloadModelVersion(pb.UnloadModelVersionRequest(name=name))
            loaded = await stub.LoadModelVersion(pb.LoadModelVersionRequest(name=name))
            ready_at = time.perf_counter()
            if loaded.model_version.state != pb.MODEL_VERSION_STATE_READY:
                raise RuntimeError(f"{name} did not load: {loaded.model_version.reason}")
            await stub.Infer(request)
            firsts.append((time.perf_counter() - ready_at) * 1000)
    return firsts


async def main(args: argparse.Namespace) -> None:
    run_dir = Path(tempfile.mkdtemp(prefix="modelserve-bench-inference-"))
    env = {f"MODELSERVE_{s}_TELEMETRY__LOG_LEVEL": "warning" for s in ("INFERENCE", "REGISTRY")}
    stack = Stack(StackOptions(run_dir=run_dir, env=env))
    second: Stack | None = None
    third: Stack | None = None
    echoes = [await _start_echo(False), await _start_echo(True)]
    try:
        for service in ("registry", "inference"):
            stack.spawn(service)
            await stack.wait_serving(service)
        models = [fraud.train(seed=0), fraud.train(seed=1)]
        v1, v2 = await _register(stack, models)
        loaded = await _load(stack.targets["inference"], v1)
        await _load_unbatched(loaded.triton_endpoint, models[0])
        echoes.append(await _start_echo(False, proxy_to=loaded.triton_endpoint))
        echoes.append(await _start_echo(False, http_proxy_to=loaded.triton_http_endpoint))
        # A second inference service on the same Triton, coalescing off, for the batching gain.
        second = Stack(
            StackOptions(
                run_dir=run_dir / "uncoalesced",
                env={
                    **env,
                    "MODELSERVE_INFERENCE_TRITON_MODE": "remote",
                    "MODELSERVE_INFERENCE_TRITON_URL": loaded.triton_endpoint,
                    "MODELSERVE_INFERENCE_REGISTRY_TARGET": stack.targets["registry"],
                    "MODELSERVE_INFERENCE_RECONCILE": "false",
                    "MODELSERVE_INFERENCE_COALESCE_IN_FLIGHT": "0",
                },
            )
        )
        second.spawn("inference")
        await second.wait_serving("inference")
        await _load(second.targets["inference"], v1)
        if args.workers > 1:
            third = Stack(
                StackOptions(
                    run_dir=run_dir / "workers",
                    env={
                        **env,
                        "MODELSERVE_INFERENCE_TRITON_MODE": "remote",
                        "MODELSERVE_INFERENCE_TRITON_URL": loaded.triton_endpoint,
                        "MODELSERVE_INFERENCE_TRITON_HTTP_URL": loaded.triton_http_endpoint,
                        "MODELSERVE_INFERENCE_REGISTRY_TARGET": stack.targets["registry"],
                        "MODELSERVE_INFERENCE_RECONCILE": "false",
                        "MODELSERVE_INFERENCE_SERVER__WORKERS": str(args.workers),
                    },
                )
            )
            third.spawn("inference")
            await third.wait_serving("inference")
            await _load(third.targets["inference"], v1)

        rows = fraud.make_dataset(64, seed=3)[0]
        triton_processes = _family(stack.processes["inference"].pid)[1:]
        measured = await _drive_all(
            args,
            stack,
            second,
            loaded.triton_endpoint,
            [target for _, target in echoes],
            [process.pid for process, _ in echoes],
            str(loaded.triton_model_version),
            rows,
            triton_processes,
            third,
        )
        firsts = await _first_answers(stack.targets["inference"], v2, rows, args.fresh_loads)
        _print(measured, firsts, args)
    finally:
        for process, _ in echoes:
            process.terminate()
            await process.wait()
        for extra in (second, third):
            if extra is not None:
                await extra.stop()
        await stack.stop()


async def _drive_all(
    args: argparse.Namespace,
    stack: Stack,
    second: Stack,
    triton_endpoint: str,
    echo_targets: list[str],
    echo_pids: list[int],
    version: str,
    rows: np.ndarray,
    triton_processes: list[psutil.Process],
    workers: Stack | None,
) -> list[Measured]:
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
    uncoalesced = InferenceServerClient(second.targets["inference"])
    service_channel = create_channel(stack.targets["inference"])
    service = pb_grpc.InferenceServiceStub(service_channel)
    echo_channels = [grpc.aio.insecure_channel(target) for target in echo_targets]
    echo, echo_intercepted = (channel.unary_unary(_ECHO_METHOD) for channel in echo_channels[:2])
    proxy = InferenceServerClient(echo_targets[2])
    proxy_http = InferenceServerClient(echo_targets[3])
    inference = [psutil.Process(stack.processes["inference"].pid)]

    def oip(client: InferenceServerClient, model: str) -> Callable[[int], Awaitable[object]]:
        return lambda i: client.infer(
            model, oip_inputs[i % n], model_version=version, outputs=outputs
        )

    paths = [
        Route(DIRECT, oip(direct, "fraud"), None),
        Route(FACADE, oip(facade, "fraud"), inference),
        Route(INFER, lambda i: service.Infer(infer_requests[i % n]), inference),
        Route(ECHO, lambda i: echo(echo_payloads[i % n]), [psutil.Process(echo_pids[0])]),
        Route(
            ECHO_INTERCEPTED,
            lambda i: echo_intercepted(echo_payloads[i % n]),
            [psutil.Process(echo_pids[1])],
        ),
        Route(PROXY, oip(proxy, "fraud"), [psutil.Process(echo_pids[2])]),
        Route(PROXY_HTTP, oip(proxy_http, "fraud"), [psutil.Process(echo_pids[3])]),
    ]
    last = [
        Route(DIRECT_UNBATCHED, oip(direct, _UNBATCHED), None),
        Route(
            FACADE_UNCOALESCED,
            oip(uncoalesced, "fraud"),
            [psutil.Process(second.processes["inference"].pid)],
        ),
    ]
    spread: list[InferenceServerClient] = []
    if workers is not None:
        # One client per connection: channels with equal arguments would share one.
        target = workers.targets["inference"]
        spread = [
            InferenceServerClient(target, channel_args=[("grpc.channel_id", k)])
            for k in range(4 * args.workers)
        ]
        await _wait_mirrored(target, len(spread), f"models/fraud/versions/{version}")
        paths.append(
            Route(
                FACADE_WORKERS.format(args.workers),
                lambda i: spread[i % len(spread)].infer(
                    "fraud", oip_inputs[i % n], model_version=version, outputs=outputs
                ),
                _family(workers.processes["inference"].pid),
            )
        )
    stream_requests = [service_pb2.ModelInferRequest.FromString(p) for p in echo_payloads]
    for request in stream_requests:
        request.outputs.add(name="label")
        request.outputs.add(name="probabilities")
    streams = [_stream_caller(triton_endpoint), _stream_caller(stack.targets["inference"])]
    sequence = iter(range(1 << 62))

    def streamed(
        stream: tuple[grpc.aio.Channel, SharedStream],
    ) -> Callable[[int], Awaitable[object]]:
        def call(i: int) -> Awaitable[object]:
            request = service_pb2.ModelInferRequest()
            request.CopyFrom(stream_requests[i % n])
            request.id = str(next(sequence))
            return stream[1].send(request.id, request)

        return call

    # Last at each concurrency: Triton 2.51's own stream handler has crashed Triton
    # (SIGSEGV) under this load; whatever runs after it would measure a restart.
    streaming = [
        Route(FACADE_STREAM, streamed(streams[1]), inference),
        Route(DIRECT_STREAM, streamed(streams[0]), None),
    ]
    measured: list[Measured] = []
    try:
        for concurrency in args.concurrency:
            extra = last if concurrency == max(args.concurrency) else []
            for path in [*paths, *extra, *streaming]:
                measured.append(await _measure(path, concurrency, args.duration, triton_processes))
    finally:
        for client in (direct, facade, uncoalesced, proxy, proxy_http, *spread):
            await client.close()
        for channel, stream in streams:
            await stream.close()
            await channel.close()
        await service_channel.close()
        for channel in echo_channels:
            await channel.close()
    return measured


async def _wait_mirrored(target: str, channels: int, name: str) -> None:
    """Returns once `name` is READY on `channels` connections to `target` (each may reach
    another process, whose mirror follows the first's)."""
    deadline = time.monotonic() + 60
    for k in range(channels):
        async with grpc.aio.insecure_channel(target, options=[("grpc.channel_id", k)]) as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            while True:
                held = (await stub.ListModelVersions(pb.ListModelVersionsRequest())).model_versions
                if any(v.name == name and v.state == pb.MODEL_VERSION_STATE_READY for v in held):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} is not READY on connection {k} of {target}")
                await asyncio.sleep(0.05)


def _ratio(a: Result, b: Result) -> str:
    """a's req/s over b's, or why there is none (b answered nothing: every call failed)."""
    if not b.rps:
        return f"n/a ({b.path}: {b.errors} errors)"
    return f"{a.rps / b.rps:.2f}"


def _print(measured: list[Measured], firsts: list[float], args: argparse.Namespace) -> None:
    print(f"\nduration={args.duration}s per path and concurrency\n")
    print(
        "| path | conc | p50 ms | p95 ms | p99 ms | req/s | errors"
        " | front CPU µs/req | Triton CPU µs/req |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for m in measured:
        r = m.result
        front = "" if m.front_us is None else f"{m.front_us:.0f}"
        print(
            f"| {r.path} | {r.concurrency} | {r.percentile(50):.2f} | {r.percentile(95):.2f} |"
            f" {r.percentile(99):.2f} | {r.rps:.0f} | {r.errors} | {front} | {m.triton_us:.0f} |"
        )
    by = {(m.result.path, m.result.concurrency): m.result for m in measured}
    print("\n| measure | conc | value |")
    print("|---|---:|---:|")
    workers = [FACADE_WORKERS.format(args.workers)] if args.workers > 1 else []
    for c in args.concurrency:
        direct, echo = by[(DIRECT, c)], by[(ECHO, c)]
        hop = echo.percentile(50)
        for name in (FACADE, *workers, INFER, PROXY, PROXY_HTTP, ECHO_INTERCEPTED):
            front = by[(name, c)]
            base = direct if name != ECHO_INTERCEPTED else echo
            added = front.percentile(50) - base.percentile(50)
            over = "direct" if name != ECHO_INTERCEPTED else "echo"
            target = " (target ≤ 1.2)" if name in (FACADE, *workers) else ""
            print(f"| {name}: p50 - {over} p50, in bare hops{target} | {c} | {added / hop:.2f} |")
        for name in (FACADE, *workers, INFER, PROXY, PROXY_HTTP, ECHO_INTERCEPTED):
            target = " (target ≥ 0.8 at the top)" if name in (FACADE, *workers) else ""
            ratio = by[(name, c)].rps / echo.rps
            print(f"| {name}: req/s / echo req/s{target} | {c} | {ratio:.2f} |")
        print(f"| {FACADE}: req/s / direct req/s | {c} | {by[(FACADE, c)].rps / direct.rps:.2f} |")
        streams = _ratio(by[(FACADE_STREAM, c)], by[(DIRECT_STREAM, c)])
        print(f"| {FACADE_STREAM}: req/s / {DIRECT_STREAM} req/s | {c} | {streams} |")
    top = max(args.concurrency)
    print(
        f"| Triton's dynamic batching gain: req/s on / off | {top} |"
        f" {_ratio(by[(DIRECT, top)], by[(DIRECT_UNBATCHED, top)])} |"
    )
    print(
        f"| the facade's coalescing gain: req/s on / off | {top} |"
        f" {_ratio(by[(FACADE, top)], by[(FACADE_UNCOALESCED, top)])} |"
    )
    steady = by[(INFER, min(args.concurrency))].percentile(50)
    print(
        f"\nfirst Infer after LoadModelVersion answered READY, {len(firsts)} fresh loads:"
        f" p50 {np.percentile(firsts, 50):.2f} ms, max {max(firsts):.2f} ms"
        f" ({', '.join(f'{f:.2f}' for f in firsts)});"
        f" steady-state {INFER} p50 at c={min(args.concurrency)}: {steady:.2f} ms"
        f" (first / steady: p50 {np.percentile(firsts, 50) / steady:.2f}x,"
        f" max {max(firsts) / steady:.2f}x)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_run_arguments(parser)
    parser.add_argument(
        "--fresh-loads", type=int, default=5, help="loads of version 2 timed to its first answer"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        help="also measure the facade run as this many processes (SERVER__WORKERS); 0: not",
    )
    parser.add_argument("--serve-echo", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--with-interceptors", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--serve-proxy", metavar="TRITON", help=argparse.SUPPRESS)
    parser.add_argument("--serve-proxy-http", metavar="TRITON_HTTP", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.serve_proxy_http:
        uvloop.run(serve_proxy_http(arguments.serve_proxy_http))
    elif arguments.serve_proxy:
        uvloop.run(serve_proxy(arguments.serve_proxy))
    elif arguments.serve_echo:
        uvloop.run(serve_echo(arguments.with_interceptors))
    else:
        run_benchmark(main(arguments))
