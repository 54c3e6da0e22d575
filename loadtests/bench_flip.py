"""Benchmark: how fast a blue-green flip reaches all of an endpoint's traffic (issue #6:
"a blue-green flip reaches 100 % of traffic within 100 ms").

Starts the local stack as bench.py does, deploys the demo model (blue) and a second READY
version of it (green, the same artifact), and routes endpoint `fraud-flip` 100 % to blue. Then
it drives Predict through the stack's router at a steady concurrency, measures throughput for a
while, and flips the endpoint between blue and green `--flips` times, one UpdateDeployment each.

For each flip, measured both from the moment UpdateDeployment is called and from the moment
it returns (requests started before that moment are left out; in flight, they may go either
way, and how many of them answered old is shown too):

- last old answer: when the last request started after the moment and answered by the old
  version ended (0 when none was): from then on every answer comes from the new version;
- last old start: when that request started: every request started later was routed new;
- watch delivery: when this process's own WatchDeployments stream on the endpoint got the
  new revision, the direct path the router's snapshot is fed by; negative from the return
  when the message arrived before UpdateDeployment's answer.

It prints p50/p95/max of each, failed requests, throughput in the `--window` seconds after
each flip against steady state, and the ratio flip latency / watch delivery (from the call).

    .venv/bin/python loadtests/bench_flip.py --concurrency 16 --flips 10
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import time
from dataclasses import dataclass

import grpc
import numpy as np
import uvloop
from bench import add_stack_arguments, predict_requests, start_demo_stack

from modelserve.registry.v1 import registry_service_pb2 as registry_pb
from modelserve.registry.v1 import registry_service_pb2_grpc as registry_grpc
from modelserve.router.v1 import router_service_pb2 as router_pb
from modelserve.router.v1 import router_service_pb2_grpc as router_grpc
from modelserve_cli.demo import add_ready_version
from modelserve_runtime.channels import create_channel

ENDPOINT = "fraud-flip"
WARM = "fraud-flip-green"
"""An endpoint routed 100 % to green before any flip, so the router is known to see it READY."""


@dataclass(frozen=True, slots=True)
class Answer:
    """One Predict call: when it started and ended (perf_counter seconds) and who answered."""

    started: float
    ended: float
    model_version: str


@dataclass(frozen=True, slots=True)
class Flip:
    """One UpdateDeployment and what followed it (perf_counter seconds)."""

    to: str
    called: float
    returned: float
    watched: float
    """When this process's watch stream got the new revision."""
    last_old: Answer | None
    """The last answer from the old version among requests started after the call."""
    answers_in_window: int
    old_in_flight: int
    """Answers from the old version to requests started before the call that ended after it:
    the ones that may go either way (and show that old answers are seen when they happen)."""

    def since(self, moment: float, at: float | None) -> float:
        """`at` in ms after `moment`; 0 when there is no such answer."""
        return 0.0 if at is None else (at - moment) * 1000

    def last_old_end(self, moment: float) -> float:
        """ms after `moment` when the last old answer ended, among requests started after
        `moment` (0 when all of them answered new)."""
        old = self.last_old
        return 0.0 if old is None or old.started < moment else self.since(moment, old.ended)

    def last_old_start(self, moment: float) -> float:
        """ms after `moment` when the last request routed old started: later ones went new."""
        old = self.last_old
        return 0.0 if old is None or old.started < moment else self.since(moment, old.started)


def deployment(name: str, blue: str, green: str, to_green: bool) -> registry_pb.Deployment:
    """All of the traffic on one version, the other one kept at 0 % (a blue-green pair)."""
    return registry_pb.Deployment(
        name=f"deployments/{name}",
        traffic=[
            registry_pb.TrafficTarget(model_version=blue, percent=0 if to_green else 100),
            registry_pb.TrafficTarget(model_version=green, percent=100 if to_green else 0),
        ],
    )


async def answered_by(
    router: router_grpc.RouterServiceAsyncStub,
    request: router_pb.PredictRequest,
    version: str,
    within_s: float = 30.0,
) -> None:
    """Asks until the router answers `request` from `version` (it learns of deployments and
    READY versions from its watch streams)."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            if (await router.Predict(request)).model_version == version:
                return
        except grpc.aio.AioRpcError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the router does not answer {request.endpoint} from {version}")
        await asyncio.sleep(0.05)


class Load:
    """`concurrency` loops calling Predict back to back, recording every answer and failure."""

    def __init__(
        self, router: router_grpc.RouterServiceAsyncStub, requests: list[router_pb.PredictRequest]
    ) -> None:
        self._router = router
        self._requests = requests
        self.answers: list[Answer] = []
        self.failures: collections.Counter[str] = collections.Counter()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self, concurrency: int) -> None:
        self._tasks = [asyncio.create_task(self._loop(w, concurrency)) for w in range(concurrency)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def _loop(self, worker: int, concurrency: int) -> None:
        i = worker
        n = len(self._requests)
        while not self._stop.is_set():
            started = time.perf_counter()
            try:
                answer = await self._router.Predict(self._requests[i % n])
            except grpc.aio.AioRpcError as exc:
                self.failures[exc.code().name] += 1
            else:
                self.answers.append(Answer(started, time.perf_counter(), answer.model_version))
            i += concurrency


class Watcher:
    """This process's WatchDeployments stream on one deployment: when each revision arrived."""

    def __init__(self, registry: registry_grpc.RegistryServiceAsyncStub, name: str) -> None:
        self.arrived: dict[int, float] = {}
        self._news = asyncio.Event()
        self._call = registry.WatchDeployments(registry_pb.WatchDeploymentsRequest(name=name))
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for message in self._call:
            self.arrived[message.revision.deployment.revision] = time.perf_counter()
            self._news.set()

    async def arrival(self, revision: int, within_s: float = 10.0) -> float:
        """When `revision` arrived, waiting for it if need be."""
        deadline = time.monotonic() + within_s
        while revision not in self.arrived:
            self._news.clear()
            await asyncio.wait_for(self._news.wait(), max(0.0, deadline - time.monotonic()))
        return self.arrived[revision]

    async def close(self) -> None:
        self._call.cancel()
        # A cancelled call ends the reader with CancelledError: that is the stream's end here.
        await asyncio.gather(self._task, return_exceptions=True)


def last_old(answers: list[Answer], old: str, since: float, until: float) -> Answer | None:
    """The answer from `old` that started last among requests started in [since, until)."""
    late = [a for a in answers if since <= a.started < until and a.model_version == old]
    return max(late, key=lambda a: a.started, default=None)


async def main(args: argparse.Namespace) -> None:
    stack, demo = await start_demo_stack(
        args.model_runner, args.feature_reader, with_monitor=args.with_monitor
    )
    try:
        blue, green = demo.model_version, await add_ready_version(stack.targets, demo)
        registry_channel = create_channel(stack.targets["registry"], default_timeout_s=30)
        router_channel = create_channel(stack.targets["router"])
        registry = registry_grpc.RegistryServiceStub(registry_channel)
        router = router_grpc.RouterServiceStub(router_channel)
        requests = predict_requests(demo.customers)
        for request in requests:
            request.endpoint = ENDPOINT
        for name, to_green in ((ENDPOINT, False), (WARM, True)):
            await registry.UpdateDeployment(
                registry_pb.UpdateDeploymentRequest(
                    deployment=deployment(name, blue, green, to_green), allow_missing=True
                )
            )
        warm = router_pb.PredictRequest()
        warm.CopyFrom(requests[0])
        warm.endpoint = WARM
        await answered_by(router, warm, green)
        await answered_by(router, requests[0], blue)

        watcher = Watcher(registry, f"deployments/{ENDPOINT}")
        load = Load(router, requests)
        load.start(args.concurrency)
        await asyncio.sleep(args.warmup)
        steady_from = time.perf_counter()
        await asyncio.sleep(args.steady)
        steady_until = time.perf_counter()

        flips: list[Flip] = []
        for i in range(args.flips):
            to_green = i % 2 == 0
            target, old = (green, blue) if to_green else (blue, green)
            called = time.perf_counter()
            updated = await registry.UpdateDeployment(
                registry_pb.UpdateDeploymentRequest(
                    deployment=deployment(ENDPOINT, blue, green, to_green)
                )
            )
            returned = time.perf_counter()
            arrived = await watcher.arrival(updated.deployment.revision)
            await asyncio.sleep(args.hold)
            in_window = sum(1 for a in load.answers if called <= a.ended < called + args.window)
            late = last_old(load.answers, old, called, time.perf_counter())
            in_flight = sum(
                1 for a in load.answers if a.started < called < a.ended and a.model_version == old
            )
            flips.append(Flip(target, called, returned, arrived, late, in_window, in_flight))
        await load.stop()
        await watcher.close()
        await registry_channel.close()
        await router_channel.close()
        steady = sum(1 for a in load.answers if steady_from <= a.ended < steady_until)
        _print(args, flips, load, steady / (steady_until - steady_from))
    finally:
        await stack.stop()


def _stats(values: list[float]) -> str:
    p50, p95 = np.percentile(values, [50, 95])
    return f"{p50:.1f} | {p95:.1f} | {max(values):.1f}"


def _print(args: argparse.Namespace, flips: list[Flip], load: Load, steady_rps: float) -> None:
    print(
        f"\nmodel_runner={args.model_runner} feature_reader={args.feature_reader} "
        f"with_monitor={args.with_monitor} "
        f"concurrency={args.concurrency} flips={args.flips} hold={args.hold}s "
        f"window={args.window}s steady={args.steady}s\n"
    )
    print(
        "ms after UpdateDeployment was called (C) or returned (R); 'last old' counts requests "
        "started after that moment; 0: none of them answered old\n"
    )
    print(
        "| flip | to | UpdateDeployment ms | C: last old answer | C: last old start | "
        "C: watch delivery | R: last old answer | R: watch delivery | old answers in flight |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for i, f in enumerate(flips, 1):
        print(
            f"| {i} | {f.to.rsplit('/', 1)[-1]} | {f.since(f.called, f.returned):.1f} | "
            f"{f.last_old_end(f.called):.1f} | {f.last_old_start(f.called):.1f} | "
            f"{f.since(f.called, f.watched):.1f} | {f.last_old_end(f.returned):.1f} | "
            f"{f.since(f.returned, f.watched):.1f} | {f.old_in_flight} |"
        )
    rows = {
        "UpdateDeployment round trip": [f.since(f.called, f.returned) for f in flips],
        "C: last old answer (flip latency from the call)": [
            f.last_old_end(f.called) for f in flips
        ],
        "C: last old start (all new from here)": [f.last_old_start(f.called) for f in flips],
        "C: registry watch delivery (direct)": [f.since(f.called, f.watched) for f in flips],
        "R: last old answer (flip latency from the return)": [
            f.last_old_end(f.returned) for f in flips
        ],
        "R: registry watch delivery (direct)": [f.since(f.returned, f.watched) for f in flips],
    }
    print("\n| measure | p50 ms | p95 ms | max ms |")
    print("|---|---:|---:|---:|")
    for name, values in rows.items():
        p50, p95 = np.percentile(values, [50, 95])
        print(f"| {name} | {p50:.1f} | {p95:.1f} | {max(values):.1f} |")
    flip_rps = sum(f.answers_in_window for f in flips) / (len(flips) * args.window)
    failed = sum(load.failures.values())
    print(f"\nanswers: {len(load.answers)}; failed requests: {failed} {dict(load.failures)}")
    print(
        f"throughput: steady {steady_rps:.0f} req/s; in the {args.window}s after each flip "
        f"{flip_rps:.0f} req/s; flip/steady {flip_rps / steady_rps:.2f}"
    )
    flip = rows["C: last old answer (flip latency from the call)"]
    watch = rows["C: registry watch delivery (direct)"]
    print(
        f"ratio flip latency / watch delivery, both from the call: p50 "
        f"{float(np.percentile(flip, 50)) / float(np.percentile(watch, 50)):.2f}x, "
        f"max {max(flip) / max(watch):.2f}x"
    )
    from_return = rows["R: last old answer (flip latency from the return)"]
    within = sum(1 for e in from_return if e <= 100.0)
    print(
        f"flips whose last old answer (from the return) ended within 100 ms: {within}/{len(flips)}"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--flips", type=int, default=10, help="flips, back and forth")
    parser.add_argument("--hold", type=float, default=1.5, help="seconds between flips")
    parser.add_argument(
        "--window", type=float, default=0.5, help="seconds after a flip counted as 'during'"
    )
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of load, not measured")
    parser.add_argument("--steady", type=float, default=5.0, help="seconds of steady state")
    add_stack_arguments(parser)
    uvloop.run(main(parser.parse_args()))
