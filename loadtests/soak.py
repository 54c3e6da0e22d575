"""Soak: Predict through the whole local stack for minutes, watching for what only time shows.

A benchmark answers "how fast"; this answers "does it stay that way": a leak, a queue that
only grows, a connection that dies after a while (the keepalive bug was found by a long run).
It starts the stack as `bench.py` does, with the monitor consuming the prediction log, deploys
the demo model and a second READY version of it, and drives Predict at a steady concurrency
for `--minutes`. Every `--flip-every` seconds the demo endpoint flips between the two versions
(blue-green), so snapshots, lanes and caches are rebuilt under load the whole time.

Each `--interval` it prints one row: throughput, p50/p99, errors and degraded answers in the
interval, which version answered, the resident memory of every process (MB), Redis's memory,
the prediction stream's length and the monitor's backlog on it. At the end it compares each
process's memory after the warm-up with the end of the run, per 100k requests, breaks down
what Redis holds by kind of key (bytes per stream entry and per key: what sizing Redis
takes), and exits non-zero when a service or Triton grew more than `--max-growth-mb` or any
request failed.
Redis is expected to grow: the stream up to `PREDICTION_STREAM_MAX_LEN`, the monitor's keys
up to their TTLs.

    .venv/bin/python loadtests/soak.py --minutes 10 --concurrency 32
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import sys
import time
from dataclasses import dataclass, field

import grpc
import numpy as np
import psutil
import redis.asyncio as aioredis
from bench import predict_requests, process_groups, run_benchmark, start_demo_stack

from modelserve.router.v1 import router_service_pb2 as router_pb
from modelserve.router.v1 import router_service_pb2_grpc as router_grpc
from modelserve_cli.demo import ENDPOINT, add_ready_version
from modelserve_runtime.channels import create_channel
from modelserve_runtime.clients import RegistryAdminClient

STREAM = "modelserve:predictions"
"""The router's default `PREDICTION_STREAM`."""


@dataclass
class Window:
    """What the load saw since the last row."""

    latencies_ms: list[float] = field(default_factory=list)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    degraded: int = 0
    versions: collections.Counter[str] = field(default_factory=collections.Counter)


class Load:
    """`concurrency` loops calling Predict back to back until stopped."""

    def __init__(
        self, router: router_grpc.RouterServiceStub, requests: list[router_pb.PredictRequest]
    ) -> None:
        self._router = router
        self._requests = requests
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []
        self.window = Window()
        self.total = 0
        self.failed = 0

    def start(self, concurrency: int) -> None:
        self._tasks = [asyncio.create_task(self._loop(w, concurrency)) for w in range(concurrency)]

    async def stop(self) -> None:
        self._stopping = True
        await asyncio.gather(*self._tasks)

    def take(self) -> Window:
        window, self.window = self.window, Window()
        return window

    async def _loop(self, worker: int, concurrency: int) -> None:
        i = worker
        n = len(self._requests)
        while not self._stopping:
            started = time.perf_counter()
            try:
                answer = await self._router.Predict(self._requests[i % n], timeout=5)
            except grpc.aio.AioRpcError as exc:
                self.window.errors[exc.code().name] += 1
                self.failed += 1
                await asyncio.sleep(0.01)  # a failing stack is not hammered by the soak
                continue
            finally:
                i += concurrency
            self.window.latencies_ms.append((time.perf_counter() - started) * 1000)
            self.window.versions[answer.model_version.rsplit("/", 1)[-1]] += 1
            self.window.degraded += answer.degraded
            self.total += 1


def rss_mb(groups: dict[str, list[int]]) -> dict[str, float]:
    """Resident memory of each process group, MB."""
    sizes: dict[str, float] = {}
    for group, pids in groups.items():
        total = 0
        for pid in pids:
            with contextlib.suppress(psutil.NoSuchProcess):
                total += psutil.Process(pid).memory_info().rss
        sizes[group] = total / 2**20
    return sizes


async def stream_state(client: aioredis.Redis) -> tuple[int, int]:
    """The prediction stream's length and the entries its consumer groups have not read yet
    (the monitor's backlog; 0 when no group exists)."""
    length = await client.xlen(STREAM)
    backlog = 0
    with contextlib.suppress(aioredis.ResponseError):
        for group in await client.xinfo_groups(STREAM):
            lag = group.get("lag")
            backlog = max(backlog, int(lag) if lag is not None else 0)
    return length, backlog


async def redis_breakdown(client: aioredis.Redis) -> list[tuple[str, int, float]]:
    """What Redis holds, by kind of key: (kind, keys, MB); for the prediction stream, its
    entries rather than keys. Counted over every key (SCAN), with MEMORY USAGE measured on up
    to 200 keys of each kind and scaled; the stream exactly."""
    kinds: dict[str, list[str]] = collections.defaultdict(list)
    counts: collections.Counter[str] = collections.Counter()
    async for key in client.scan_iter(count=5000):
        parts = key.split(":")
        kind = ":".join(parts[:3]) if parts[0] == "modelserve" else parts[0]
        counts[kind] += 1
        if len(kinds[kind]) < 200:
            kinds[kind].append(key)
    rows = []
    for kind, sample in kinds.items():
        samples = "0" if kind == STREAM else "5"
        sizes = [
            int(await client.execute_command("MEMORY", "USAGE", key, "SAMPLES", samples) or 0)
            for key in sample
        ]
        many = await client.xlen(STREAM) if kind == STREAM else counts[kind]
        rows.append((kind, many, sum(sizes) / len(sizes) * counts[kind] / 2**20))
    return sorted(rows, key=lambda row: -row[2])


async def main(args: argparse.Namespace) -> int:
    stack, demo = await start_demo_stack("triton", "redis", with_monitor=True)
    try:
        blue = demo.model_version
        green = await add_ready_version(stack.targets, demo)
        requests = predict_requests(demo.customers)
        groups = process_groups(stack)
        groups.pop("client", None)
        redis_client = aioredis.Redis.from_url(stack.redis.url, decode_responses=True)
        async with (
            create_channel(stack.targets["router"]) as channel,
            create_channel(stack.targets["registry"]) as registry_channel,
        ):
            admin = RegistryAdminClient(registry_channel)
            load = Load(router_grpc.RouterServiceStub(channel), requests)
            load.start(args.concurrency)
            names = sorted(groups)
            print(
                "| t s | req/s | p50 ms | p99 ms | errors | degraded | answered by | "
                + " | ".join(f"{n} MB" for n in names)
                + " | redis used MB | stream | backlog |"
            )
            print("|" + "---:|" * (9 + len(names)) + "---|")
            started = time.monotonic()
            end = started + args.minutes * 60
            flips = 0

            async def flip() -> None:
                nonlocal flips
                to_green = True
                while True:
                    await asyncio.sleep(args.flip_every)
                    target, other = (green, blue) if to_green else (blue, green)
                    await admin.set_traffic(ENDPOINT, {target: 100, other: 0})
                    to_green = not to_green
                    flips += 1

            flipper = asyncio.create_task(flip()) if args.flip_every > 0 else None
            first: dict[str, float] | None = None
            first_total = 0
            last: dict[str, float] = {}
            while time.monotonic() < end:
                await asyncio.sleep(args.interval)
                now = time.monotonic()
                window = load.take()
                last = rss_mb(groups)
                if first is None and now - started >= args.warmup:
                    first, first_total = last, load.total
                info = await redis_client.info("memory")
                length, backlog = await stream_state(redis_client)
                lat = window.latencies_ms or [float("nan")]
                errors = ",".join(f"{k}={v}" for k, v in window.errors.items()) or "0"
                answered = "/".join(f"{k}:{v}" for k, v in sorted(window.versions.items()))
                print(
                    f"| {now - started:.0f} | {len(window.latencies_ms) / args.interval:.0f} | "
                    f"{np.percentile(lat, 50):.2f} | {np.percentile(lat, 99):.2f} | {errors} | "
                    f"{window.degraded} | {answered} | "
                    + " | ".join(f"{last[n]:.0f}" for n in names)
                    + f" | {int(info['used_memory']) / 2**20:.0f} | {length} | {backlog} |",
                    flush=True,
                )
            if flipper is not None:
                flipper.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await flipper
            await load.stop()
        breakdown = await redis_breakdown(redis_client)
        await redis_client.aclose()
    finally:
        await stack.stop()

    print(f"\n{load.total} requests, {load.failed} failed, {flips} blue-green flips\n")
    print("| in Redis | keys (stream: entries) | MB | bytes each |")
    print("|---|---:|---:|---:|")
    for kind, keys, mb in breakdown:
        print(f"| {kind} | {keys} | {mb:.1f} | {mb * 2**20 / max(1, keys):.0f} |")
    print()
    grew = []
    if first is not None:
        served = max(1, load.total - first_total)
        print("| process | MB after warm-up | MB at end | growth MB | KB per 100k requests |")
        print("|---|---:|---:|---:|---:|")
        for name in sorted(first):
            growth = last[name] - first[name]
            print(
                f"| {name} | {first[name]:.0f} | {last[name]:.0f} | {growth:+.1f} | "
                f"{growth * 1024 / served * 1e5:+.0f} |"
            )
            if name != "redis" and growth > args.max_growth_mb:
                grew.append(name)
    if grew:
        print(f"memory grew more than {args.max_growth_mb} MB: {', '.join(grew)}")
    return 1 if grew or load.failed else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--interval", type=float, default=30.0, help="seconds per row")
    parser.add_argument(
        "--warmup", type=float, default=60.0, help="seconds before memory is first taken"
    )
    parser.add_argument(
        "--flip-every", type=float, default=20.0, help="seconds between flips; 0: none"
    )
    parser.add_argument(
        "--max-growth-mb",
        type=float,
        default=50.0,
        help="a process whose memory grew more than this after the warm-up fails the soak",
    )
    sys.exit(run_benchmark(main(parser.parse_args())))
