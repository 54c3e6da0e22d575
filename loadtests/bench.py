"""Benchmark: Predict through the router against the direct paths it wraps, in one run.

Starts the local stack (redis-server, Triton, the five services), deploys the demo model,
then for each concurrency drives five paths for a fixed time and prints p50/p95/p99
latency and throughput, plus the ratios router/Triton and feature-service/Redis. The fifth
is `PredictStream`: the same requests down one stream that every caller shares
(`PredictStreamClient`).

    .venv/bin/python loadtests/bench.py --duration 5 --concurrency 1 16 64
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import redis.asyncio as aioredis
import uvloop

from modelserve.feature.v1 import feature_service_pb2 as feature_pb
from modelserve.feature.v1 import feature_service_pb2_grpc as feature_grpc
from modelserve.router.v1 import router_service_pb2 as router_pb
from modelserve.router.v1 import router_service_pb2_grpc as router_grpc
from modelserve_cli.demo import DemoDeployment, demo_request, deploy_demo
from modelserve_cli.stack import SERVICES, Stack, StackOptions
from modelserve_demo import fraud
from modelserve_features.redis_store import EntityKey, redis_key
from modelserve_runtime.channels import create_channel
from modelserve_runtime.predict_stream import PredictStreamClient
from modelserve_triton.runner import TritonRunner


@dataclass
class Result:
    """Latencies of one path at one concurrency."""

    path: str
    concurrency: int
    latencies_ms: list[float]
    seconds: float
    errors: int
    cpu_s: dict[str, float] = field(default_factory=dict)
    """CPU seconds (user + system) each process group spent during the run."""

    def cpu_us_per_request(self, group: str) -> float:
        done = len(self.latencies_ms)
        return self.cpu_s.get(group, 0.0) / done * 1e6 if done else float("nan")

    @property
    def rps(self) -> float:
        return len(self.latencies_ms) / self.seconds

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")


def process_groups(stack: Stack) -> dict[str, list[int]]:
    """The stack's processes by group (a service with its children, e.g. inference's Triton
    and its backend stubs as `triton`), and this process as `client`."""
    import psutil

    groups: dict[str, list[int]] = {"client": [os.getpid()]}
    if stack.redis.pid is not None:
        groups["redis"] = [stack.redis.pid]
    for service, process in stack.processes.items():
        groups[service] = [process.pid]
        with contextlib.suppress(psutil.NoSuchProcess):
            children = psutil.Process(process.pid).children(recursive=True)
            if children:
                groups["triton" if service == "inference" else f"{service}-children"] = [
                    c.pid for c in children
                ]
    return groups


async def wait_workers(stack: Stack, service: str, timeout_s: float = 60.0) -> int:
    """Waits until the service's extra workers (`MODELSERVE_<SERVICE>_SERVER__WORKERS` - 1 in
    this environment), which the first process waits for before it serves, are its children
    and each listens on the service's port; returns how many processes serve it. A worker
    that exits at start would otherwise be counted while every call went to the first."""
    import psutil

    workers = int(os.environ.get(f"MODELSERVE_{service.upper()}_SERVER__WORKERS", "1"))
    port = int(stack.targets[service].rsplit(":", 1)[1])
    deadline = time.monotonic() + timeout_s
    first = psutil.Process(stack.processes[service].pid)

    def listening(process: psutil.Process) -> bool:
        try:
            sockets = process.net_connections(kind="tcp")
        except psutil.NoSuchProcess:
            return False
        return any(s.status == psutil.CONN_LISTEN and s.laddr.port == port for s in sockets)

    while sum(map(listening, first.children())) < workers - 1:
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{service}: {workers - 1} workers did not listen on port {port} in {timeout_s} s"
                f" (see {stack.log_path(service)})"
            )
        await asyncio.sleep(0.1)
    return workers


def cpu_seconds(groups: Mapping[str, list[int]]) -> dict[str, float]:
    """CPU seconds used so far by each group's processes (user + system)."""
    import psutil

    used: dict[str, float] = {}
    for group, pids in groups.items():
        total = 0.0
        for pid in pids:
            with contextlib.suppress(psutil.NoSuchProcess):
                times = psutil.Process(pid).cpu_times()
                total += times.user + times.system
        used[group] = total
    return used


class SharedStream:
    """One bidirectional call that concurrent callers share, as a streaming client would:
    each sends its request and awaits the answer that carries its id. `answered(response)`
    says which request a response answers, and with what: (id, result, error message)."""

    def __init__(self, call: Any, answered: Callable[[Any], tuple[str, object, str]]) -> None:
        self._call = call
        self._answered = answered
        self._waiting: dict[str, asyncio.Future[object]] = {}
        self._write = asyncio.Lock()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for response in self._call:
                request_id, result, error = self._answered(response)
                waiting = self._waiting.pop(request_id, None)
                if waiting is None:
                    raise RuntimeError(f"an answer to no request: {request_id!r}")
                if error:
                    waiting.set_exception(RuntimeError(error))
                else:
                    waiting.set_result(result)
        except BaseException as exc:
            # Every caller still waiting learns that the stream is gone.
            for waiting in self._waiting.values():
                waiting.set_exception(RuntimeError(f"the stream ended: {exc!r}"))
            self._waiting.clear()
            raise

    async def send(self, request_id: str, request: Any) -> object:
        answered = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = answered
        async with self._write:  # grpc.aio takes one write at a time per call
            await self._call.write(request)
        return await answered

    async def close(self) -> None:
        await self._call.done_writing()
        with contextlib.suppress(Exception):
            await self._reader


async def drive(
    path: str,
    call: Callable[[int], Awaitable[object]],
    concurrency: int,
    duration: float,
    groups: Mapping[str, list[int]] | None = None,
) -> Result:
    """Runs `concurrency` loops calling `call` back to back for `duration` seconds; with
    `groups`, also what CPU each process group spent meanwhile."""
    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + duration

    async def loop(worker: int) -> None:
        nonlocal errors
        i = worker
        while time.perf_counter() < stop_at:
            start = time.perf_counter()
            try:
                await call(i)
            except Exception:
                errors += 1
                continue
            latencies.append((time.perf_counter() - start) * 1000)
            i += concurrency

    before = cpu_seconds(groups) if groups else {}
    started = time.perf_counter()
    await asyncio.gather(*(loop(w) for w in range(concurrency)))
    seconds = time.perf_counter() - started
    after = cpu_seconds(groups) if groups else {}
    spent = {g: after[g] - before.get(g, 0.0) for g in after}
    return Result(path, concurrency, latencies, seconds, errors, spent)


def stack_env(model_runner: str, feature_reader: str) -> dict[str, str]:
    """The services' environment for a benchmark: the router's two paths, logs at warning."""
    return {
        "MODELSERVE_ROUTER_MODEL_RUNNER": model_runner,
        "MODELSERVE_ROUTER_FEATURE_READER": feature_reader,
        "MODELSERVE_ROUTER_TELEMETRY__LOG_LEVEL": "warning",
        "MODELSERVE_FEATURE_TELEMETRY__LOG_LEVEL": "warning",
        "MODELSERVE_INFERENCE_TELEMETRY__LOG_LEVEL": "warning",
        "MODELSERVE_REGISTRY_TELEMETRY__LOG_LEVEL": "warning",
        "MODELSERVE_MONITOR_TELEMETRY__LOG_LEVEL": "warning",
    }


async def start_demo_stack(
    model_runner: str, feature_reader: str, *, with_monitor: bool = False
) -> tuple[Stack, DemoDeployment]:
    """Starts the local stack in a new temporary directory and deploys the demo model.

    Without `with_monitor` the monitor does not run: the router still appends every
    prediction record to the stream, but nothing consumes it during the run. On a 2-core
    machine a colocated monitor takes most of a core from the router; in production it runs
    on hosts of its own, and `bench_monitor.py` measures its ingestion. The caller stops the
    stack; when the deployment fails, it is stopped here.
    """
    run_dir = Path(tempfile.mkdtemp(prefix="modelserve-bench-"))
    services = SERVICES if with_monitor else tuple(s for s in SERVICES if s != "monitor")
    stack = Stack(
        StackOptions(
            run_dir=run_dir,
            env=stack_env(model_runner, feature_reader),
            services=services,
            router_http_port=0,
        )
    )
    await stack.start()
    try:
        return stack, await deploy_demo(stack.targets)
    except BaseException:
        await stack.stop()
        raise


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """How long each point runs and at which concurrencies."""
    parser.add_argument(
        "--duration", type=float, default=5.0, help="seconds per path and concurrency"
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])


def add_stack_arguments(parser: argparse.ArgumentParser) -> None:
    """The router's paths (its defaults: straight to Triton and Redis) and whether the monitor
    runs beside it."""
    parser.add_argument("--model-runner", choices=["service", "triton"], default="triton")
    parser.add_argument("--feature-reader", choices=["service", "redis"], default="redis")
    parser.add_argument(
        "--with-monitor",
        action="store_true",
        help="also run the monitor, consuming the prediction log on the same cores",
    )


def predict_requests(customers: Iterable[str]) -> list[router_pb.PredictRequest]:
    """One Predict request per demo customer id, each with its own amount."""
    return [demo_request(c, 10.0 + i) for i, c in enumerate(customers)]


T = TypeVar("T")


def batch_row(name: str, batch: int, seconds: list[float], items: int, wall_s: float) -> str:
    """A results row for a batch path: batches, p50/p95/p99 ms of one batch, items/s."""
    ms = np.asarray(seconds) * 1000
    p50, p95, p99 = (float(np.percentile(ms, q)) for q in (50, 95, 99))
    return (
        f"| {name} | {batch} | {len(seconds)} | {p50:.2f} | {p95:.2f} | {p99:.2f} | "
        f"{items / wall_s:,.0f} |"
    )


def run_benchmark(main: Coroutine[object, object, T]) -> T:
    """Runs a benchmark's `main` on uvloop. SIGTERM (from `timeout`, say) cancels it as
    Ctrl-C would, so its `finally` blocks stop every process it started, and exits 143."""

    async def guarded() -> T:
        task = asyncio.current_task()
        if task is not None:
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        return await main

    try:
        return uvloop.run(guarded())
    except asyncio.CancelledError:
        print("terminated; the processes this benchmark started are stopped", file=sys.stderr)
        raise SystemExit(128 + signal.SIGTERM) from None


async def main(args: argparse.Namespace) -> None:
    stack, demo = await start_demo_stack(
        args.model_runner, args.feature_reader, with_monitor=args.with_monitor
    )
    try:
        customers = list(demo.customers)
        requests = predict_requests(customers)
        rows = np.stack(
            [
                fraud.feature_vector(
                    {
                        **{f"customer:{k}": v for k, v in demo.customers[c].items()},
                        "request:amount": 10.0,
                        "request:hour_of_day": 3.0,
                        "request:day_of_week": 1.0,
                        "request:is_mobile": 1.0,
                    }
                )
                for c in customers
            ]
        )
        feature_requests = [
            feature_pb.GetOnlineFeaturesRequest(
                entities=[feature_pb.EntityKey(entity_type="customer", entity_id=c)],
                features=[r for r in fraud.FEATURE_REFS if r.startswith("customer:")],
            )
            for c in customers
        ]
        keys = [redis_key(EntityKey("customer", c)) for c in customers]
        inference = await _triton_endpoint(stack)
        _, version = demo.model_version.rsplit("/", 1)

        # Several channels (connections) when asked: SO_REUSEPORT workers share connections,
        # not calls. A channel option makes each its own connection rather than a shared one.
        router_channels = [
            grpc.aio.insecure_channel(stack.targets["router"], options=[("grpc.channel_id", k)])
            for k in range(args.channels)
        ]
        feature_channel = create_channel(stack.targets["feature"])
        routers = [router_grpc.RouterServiceStub(c) for c in router_channels]
        features = feature_grpc.FeatureServiceStub(feature_channel)
        triton = TritonRunner(inference)
        redis_client = aioredis.Redis.from_url(stack.redis.url)
        n = len(customers)
        paths: dict[str, Callable[[int], Awaitable[object]]] = {
            "router Predict": lambda i: routers[i % len(routers)].Predict(
                requests[i % n], timeout=5
            ),
            "triton Infer (direct)": lambda i: triton.infer(
                "fraud",
                int(version),
                {"features": rows[i % n : i % n + 1]},
                ["label", "probabilities"],
                timeout_s=5,
            ),
            "feature GetOnlineFeatures": lambda i: features.GetOnlineFeatures(
                feature_requests[i % n]
            ),
            "redis HGETALL (direct)": lambda i: redis_client.hgetall(keys[i % n]),
        }
        stream = await PredictStreamClient(router_channels[0]).__aenter__()

        def streamed(i: int) -> Awaitable[object]:
            predict = router_pb.PredictRequest()
            predict.CopyFrom(requests[i % n])
            predict.request_id = ""  # the client gives each its own
            return stream.predict(predict)

        paths["router PredictStream (one stream)"] = streamed
        groups = process_groups(stack)
        results: list[Result] = []
        for concurrency in args.concurrency:
            for name, call in paths.items():
                await drive(name, call, concurrency, min(1.0, args.duration))  # warm-up
                results.append(await drive(name, call, concurrency, args.duration, groups))
        _print(results, args)
        print_cpu(results, sorted(groups))
        await stream.close()
        for channel in router_channels:
            await channel.close()
        await feature_channel.close()
        await triton.close()
        await redis_client.aclose()
    finally:
        await stack.stop()


async def _triton_endpoint(stack: Stack) -> str:
    from modelserve_runtime.clients import InferenceClient

    async with create_channel(stack.targets["inference"]) as channel:
        held = await InferenceClient(channel).list_model_versions()
    return next(h.triton_endpoint for h in held if h.triton_endpoint)


def print_results(results: Iterable[Result]) -> None:
    """The latency and throughput table of the runs, one row per path and concurrency."""
    print("| path | conc | p50 ms | p95 ms | p99 ms | req/s | errors |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r.path} | {r.concurrency} | {r.percentile(50):.2f} | {r.percentile(95):.2f} | "
            f"{r.percentile(99):.2f} | {r.rps:.0f} | {r.errors} |"
        )


def print_cpu(results: list[Result], groups: list[str]) -> None:
    """CPU microseconds per answered request, by process group: unlike throughput on a shared
    machine, this hardly moves with what else runs."""
    print("\nCPU us per request (user + system), by process group:\n")
    print("| path | conc | " + " | ".join(groups) + " | all |")
    print("|---|---:|" + "---:|" * (len(groups) + 1))
    for r in results:
        cells = [f"{r.cpu_us_per_request(g):.0f}" for g in groups]
        total = sum(r.cpu_s.values()) / len(r.latencies_ms) * 1e6 if r.latencies_ms else 0.0
        print(f"| {r.path} | {r.concurrency} | " + " | ".join(cells) + f" | {total:.0f} |")


def _print(results: list[Result], args: argparse.Namespace) -> None:
    print(
        f"\nmodel_runner={args.model_runner} feature_reader={args.feature_reader} duration={args.duration}s\n"
    )
    print_results(results)
    print("\n| ratio | conc | p50 x | req/s x |")
    print("|---|---:|---:|---:|")
    by = {(r.path, r.concurrency): r for r in results}
    for wrapped, direct in (
        ("router Predict", "triton Infer (direct)"),
        ("feature GetOnlineFeatures", "redis HGETALL (direct)"),
    ):
        for c in args.concurrency:
            a, b = by[(wrapped, c)], by[(direct, c)]
            print(
                f"| {wrapped} / {direct} | {c} | {a.percentile(50) / b.percentile(50):.2f} | "
                f"{a.rps / b.rps:.2f} |"
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_run_arguments(parser)
    add_stack_arguments(parser)
    parser.add_argument(
        "--channels",
        type=int,
        default=1,
        help="gRPC channels (TCP connections) the client spreads its router calls over",
    )
    run_benchmark(main(parser.parse_args()))
