"""Benchmark: the Open Inference Protocol through the router against Triton's own.

Starts the local stack (redis-server, Triton, the five services as separate processes) and
deploys the demo model to endpoint `fraud`, then for each concurrency drives one-row
ModelInfer requests with the same tensors (raw contents, both outputs asked for) through
two paths for a fixed time, and prints p50/p95/p99 latency, throughput and their ratios:

- router OIP ModelInfer: `tritonclient.grpc.aio` pointed at the router, model `fraud` (the
  endpoint): routing, breaker, in-flight and rate bookkeeping, the prediction record, then
  Triton;
- triton ModelInfer (direct): the same client code straight to Triton, on the version the
  router routes to.

    .venv/bin/python loadtests/bench_router_oip.py --duration 5 --concurrency 1 16 64
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable

import uvloop
from bench import (
    Result,
    add_run_arguments,
    add_stack_arguments,
    drive,
    print_results,
    start_demo_stack,
)
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.grpc.aio import InferenceServerClient

from modelserve_cli.demo import ENDPOINT
from modelserve_demo import fraud
from modelserve_runtime.channels import create_channel
from modelserve_runtime.clients import InferenceClient

PATHS = ("router OIP ModelInfer", "triton ModelInfer (direct)")


async def main(args: argparse.Namespace) -> None:
    stack, demo = await start_demo_stack(
        args.model_runner, args.feature_reader, with_monitor=args.with_monitor
    )
    try:
        async with create_channel(stack.targets["inference"]) as channel:
            held = await InferenceClient(channel).list_model_versions()
        served = next(h for h in held if h.name == demo.model_version and h.triton_endpoint)
        results = await _drive_all(
            args,
            stack.targets["router"],
            served.triton_endpoint,
            served.triton_model_name,
            str(served.triton_model_version),
        )
        _print(results, args)
    finally:
        await stack.stop()


async def _drive_all(
    args: argparse.Namespace,
    router_target: str,
    triton_endpoint: str,
    triton_model: str,
    triton_version: str,
) -> list[Result]:
    rows = fraud.make_dataset(64, seed=3)[0]
    n = len(rows)
    requests = []
    for i in range(n):
        features = InferInput("features", [1, rows.shape[1]], "FP32")
        features.set_data_from_numpy(rows[i : i + 1])
        requests.append([features])
    outputs = [InferRequestedOutput("label"), InferRequestedOutput("probabilities")]
    router = InferenceServerClient(router_target)
    direct = InferenceServerClient(triton_endpoint)
    paths: dict[str, Callable[[int], Awaitable[object]]] = {
        PATHS[0]: lambda i: router.infer(ENDPOINT, requests[i % n], outputs=outputs),
        PATHS[1]: lambda i: direct.infer(
            triton_model, requests[i % n], model_version=triton_version, outputs=outputs
        ),
    }
    results: list[Result] = []
    try:
        for concurrency in args.concurrency:
            for name, call in paths.items():
                await drive(name, call, concurrency, min(1.0, args.duration))  # warm-up
                results.append(await drive(name, call, concurrency, args.duration))
    finally:
        await router.close()
        await direct.close()
    return results


def _print(results: list[Result], args: argparse.Namespace) -> None:
    print(f"\nmodel_runner={args.model_runner} duration={args.duration}s\n")
    print_results(results)
    by = {(r.path, r.concurrency): r for r in results}
    print("\n| ratio | conc | p50 x | p99 x | req/s x | p50 added ms |")
    print("|---|---:|---:|---:|---:|---:|")
    for c in args.concurrency:
        routed, direct = by[(PATHS[0], c)], by[(PATHS[1], c)]
        print(
            f"| {PATHS[0]} / {PATHS[1]} | {c} | "
            f"{routed.percentile(50) / direct.percentile(50):.2f} | "
            f"{routed.percentile(99) / direct.percentile(99):.2f} | "
            f"{routed.rps / direct.rps:.2f} | "
            f"{routed.percentile(50) - direct.percentile(50):.2f} |"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_run_arguments(parser)
    add_stack_arguments(parser)
    uvloop.run(main(parser.parse_args()))
