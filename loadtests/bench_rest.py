"""Benchmark: the Open Inference Protocol over HTTP/REST on the inference service, against
Triton's own HTTP endpoint (the direct path it wraps) and the service's gRPC binding.

Starts the registry and the inference service (which starts Triton) with the service's HTTP
binding on (`SERVER__HTTP_PORT`), registers the demo fraud model and loads version 1, then for
each concurrency drives one-row requests through each path for a fixed time and prints
p50/p95/p99 latency, throughput and the CPU each request cost the service and Triton:

- triton HTTP, binary: `tritonclient.http.aio` straight to Triton's HTTP port, tensors as
  raw bytes after the JSON header (the client's default);
- REST binding, binary: the same client code pointed at the inference service's HTTP port;
- triton HTTP, JSON: the request as curl would send it (values in JSON) with aiohttp, to
  Triton;
- REST binding, JSON: the same request to the service;
- triton gRPC, gRPC binding: `tritonclient.grpc.aio` to Triton and to the service's gRPC
  port, for the cost of HTTP against gRPC in the same run.

The ratios printed are each binding's req/s over the same client's straight to Triton, and
its p50 over Triton's.

    .venv/bin/python loadtests/bench_rest.py --duration 5 --concurrency 1 16 64

Everything shares the machine's cores: compare ratios within one run, not across runs.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
import tritonclient.grpc.aio as grpc_client
import tritonclient.http as http_types
import tritonclient.http.aio as http_client
from bench import add_run_arguments, run_benchmark
from bench_inference import Measured, Route, _family, _load, _measure, _register
from tritonclient.grpc import InferInput, InferRequestedOutput

from modelserve_cli.stack import Stack, StackOptions, free_port
from modelserve_demo import fraud

TRITON_BINARY = "triton HTTP, binary"
REST_BINARY = "REST binding, binary"
TRITON_JSON = "triton HTTP, JSON"
REST_JSON = "REST binding, JSON"
TRITON_GRPC = "triton gRPC"
GRPC_BINDING = "gRPC binding"
#: (the service's path, the same client straight to Triton).
PAIRS = ((REST_BINARY, TRITON_BINARY), (REST_JSON, TRITON_JSON), (GRPC_BINDING, TRITON_GRPC))


async def main(args: argparse.Namespace) -> None:
    run_dir = Path(tempfile.mkdtemp(prefix="modelserve-bench-rest-"))
    http_port = free_port()
    env = {f"MODELSERVE_{s}_TELEMETRY__LOG_LEVEL": "warning" for s in ("INFERENCE", "REGISTRY")}
    env["MODELSERVE_INFERENCE_SERVER__HTTP_PORT"] = str(http_port)
    stack = Stack(StackOptions(run_dir=run_dir, env=env))
    try:
        for service in ("registry", "inference"):
            stack.spawn(service)
            await stack.wait_serving(service)
        (v1,) = await _register(stack, [fraud.train(seed=0)])
        loaded = await _load(stack.targets["inference"], v1)
        rows = fraud.make_dataset(64, seed=3)[0]
        measured = await _drive(
            args,
            stack,
            triton_http=loaded.triton_http_endpoint,
            triton_grpc=loaded.triton_endpoint,
            service_http=f"127.0.0.1:{http_port}",
            version=str(loaded.triton_model_version),
            rows=rows,
        )
        _print(measured, args)
    finally:
        await stack.stop()


async def _drive(
    args: argparse.Namespace,
    stack: Stack,
    *,
    triton_http: str,
    triton_grpc: str,
    service_http: str,
    version: str,
    rows: Any,
) -> list[Measured]:
    n = len(rows)
    binary_inputs = []
    grpc_inputs = []
    json_bodies = []
    for i in range(n):
        row = rows[i : i + 1]
        binary = http_types.InferInput("features", list(row.shape), "FP32")
        binary.set_data_from_numpy(row)
        binary_inputs.append([binary])
        typed = InferInput("features", list(row.shape), "FP32")
        typed.set_data_from_numpy(row)
        grpc_inputs.append([typed])
        json_bodies.append(
            {
                "inputs": [
                    {"name": "features", "datatype": "FP32", "shape": [1, 8], "data": row.tolist()}
                ]
            }
        )
    binary_outputs = [
        http_types.InferRequestedOutput("label"),
        http_types.InferRequestedOutput("probabilities"),
    ]
    grpc_outputs = [InferRequestedOutput("label"), InferRequestedOutput("probabilities")]
    limit = max(args.concurrency)
    clients_http = {
        target: http_client.InferenceServerClient(target, conn_limit=limit)
        for target in (triton_http, service_http)
    }
    clients_grpc = {
        target: grpc_client.InferenceServerClient(target)
        for target in (triton_grpc, stack.targets["inference"])
    }
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit))
    service = _family(stack.processes["inference"].pid)
    front, triton = service[:1], service[1:]

    def binary(target: str) -> Any:
        client = clients_http[target]
        return lambda i: client.infer(
            "fraud", binary_inputs[i % n], model_version=version, outputs=binary_outputs
        )

    def json_path(target: str) -> Any:
        url = f"http://{target}/v2/models/fraud/versions/{version}/infer"

        async def call(i: int) -> None:
            async with session.post(url, json=json_bodies[i % n]) as response:
                if response.status != 200:
                    raise RuntimeError(await response.text())
                await response.read()

        return call

    def grpc_path(target: str) -> Any:
        client = clients_grpc[target]
        return lambda i: client.infer(
            "fraud", grpc_inputs[i % n], model_version=version, outputs=grpc_outputs
        )

    paths = [
        Route(TRITON_BINARY, binary(triton_http), None),
        Route(REST_BINARY, binary(service_http), front),
        Route(TRITON_JSON, json_path(triton_http), None),
        Route(REST_JSON, json_path(service_http), front),
        Route(TRITON_GRPC, grpc_path(triton_grpc), None),
        Route(GRPC_BINDING, grpc_path(stack.targets["inference"]), front),
    ]
    measured: list[Measured] = []
    try:
        for concurrency in args.concurrency:
            for path in paths:
                measured.append(await _measure(path, concurrency, args.duration, triton))
    finally:
        await session.close()
        for http in clients_http.values():
            await http.close()
        for grpc in clients_grpc.values():
            await grpc.close()
    return measured


def _print(measured: list[Measured], args: argparse.Namespace) -> None:
    print(f"\nduration={args.duration}s per path and concurrency\n")
    print(
        "| path | conc | p50 ms | p95 ms | p99 ms | req/s | errors"
        " | service CPU µs/req | Triton CPU µs/req |"
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
    print("\n| measure | conc | req/s ratio | p50 ms over Triton's |")
    print("|---|---:|---:|---:|")
    for c in args.concurrency:
        for path, direct in PAIRS:
            ours, theirs = by[(path, c)], by[(direct, c)]
            ratio = f"{ours.rps / theirs.rps:.2f}" if theirs.rps else "n/a"
            added = ours.percentile(50) - theirs.percentile(50)
            print(f"| {path} / {direct} | {c} | {ratio} | {added:.2f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_run_arguments(parser)
    run_benchmark(main(parser.parse_args()))
