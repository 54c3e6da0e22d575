"""Benchmark: how fast the monitor counts the prediction log, against a bare stream consumer.

Starts its own redis-server. For each batch size (100 and 500 by default) it runs two paths
on the same stream layout, each on a fresh keyspace:

- **monitor**: the service's own `PredictionLogConsumer` and `AggregateStore`: decode each
  record, sum its increments per version, count the batch and acknowledge it in one Lua
  script that skips records counted before (exactly once);
- **direct**: `XREADGROUP` + `XACK` of the same entries, nothing decoded or counted.

and two phases per path:

1. backlog: `--records` fraud-model records (8 features, two-class output, two versions)
   are appended first, then read: records/s = records / seconds until the last is counted;
2. live: a writer process appends `--rate` records/s for `--seconds`, in a pipeline every
   5 ms, as the router's log writer does; lag = when the batch holding a record was counted
   and acknowledged minus when Redis appended it (the entry id's millisecond, the same clock)
   → p50/p95/p99.

The monitor's count is checked against the records appended (each counted exactly once, no
duplicates, nothing left pending). Prints one table and the monitor/direct ratios.

    .venv/bin/python loadtests/bench_monitor.py --records 20000 --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import redis
import redis.asyncio as aioredis

from modelserve.type.v1 import feature_value_pb2, prediction_record_pb2, tensor_pb2
from modelserve_cli.stack import RedisProcess
from modelserve_monitor.aggregate import RecordContribution
from modelserve_monitor.consumer import PredictionLogConsumer
from modelserve_monitor.monitor import Monitor
from modelserve_monitor.store import AggregateStore, StoreTtls, Window
from modelserve_runtime.prediction_log import RECORD_FIELD

STREAM = "modelserve:predictions"
GROUP = "monitor"
ENDPOINT = "fraud"
VERSIONS = ("models/fraud/versions/1", "models/fraud/versions/2")
FEATURE_REFS = (
    "customer:avg_amount_30d",
    "customer:account_age_days",
    "customer:chargebacks_90d",
    "customer:txn_count_24h",
    "request:amount",
    "request:hour_of_day",
    "request:day_of_week",
    "request:is_mobile",
)
#: How often the live writer appends what is due.
WRITE_TICK_S = 0.005


class RecordFactory:
    """Serialized prediction records with unique request ids; 9 in 10 go to version 1."""

    def __init__(self, prefix: str, seed: int = 7) -> None:
        rng = np.random.default_rng(seed)
        self._prefix = prefix
        self._rows = rng.normal(50.0, 20.0, (1000, len(FEATURE_REFS)))
        self._probabilities = rng.uniform(0.0, 1.0, 1000)
        self._latencies = rng.integers(800, 5000, 1000)

    def record(self, i: int) -> bytes:
        k = i % 1000
        record = prediction_record_pb2.PredictionRecord(
            request_id=f"{self._prefix}-{i}",
            endpoint=ENDPOINT,
            model_version=VERSIONS[1] if i % 10 == 9 else VERSIONS[0],
            route_reason="weighted",
            latency_us=int(self._latencies[k]),
            status=prediction_record_pb2.PREDICTION_STATUS_OK,
            trace_id=f"{i:032x}",
        )
        record.entities["customer"] = f"c-{k}"
        for ref, value in zip(FEATURE_REFS, self._rows[k], strict=True):
            record.features[ref].CopyFrom(feature_value_pb2.FeatureValue(double_value=value))
        p = float(self._probabilities[k])
        record.outputs.append(
            tensor_pb2.Tensor(
                name="probabilities",
                datatype=tensor_pb2.DATA_TYPE_FP32,
                shape=[1, 2],
                contents=tensor_pb2.TensorContents(fp32_contents=[1 - p, p]),
            )
        )
        return record.SerializeToString()


def _append(client: redis.Redis, records: Sequence[bytes]) -> None:
    pipe = client.pipeline(transaction=False)
    for data in records:
        pipe.xadd(STREAM, {RECORD_FIELD: data})
    pipe.execute()


def live_writer(url: str, prefix: str, rate: float, seconds: float, start: Any) -> None:
    """Appends int(rate * seconds) records, `rate` a second, once `start` is set (run in a
    process of its own)."""
    client = redis.Redis.from_url(url)
    factory = RecordFactory(prefix)
    total = int(rate * seconds)
    start.wait()
    began = time.monotonic()
    sent = 0
    while sent < total:
        due = min(int((time.monotonic() - began) * rate), total) - sent
        if due > 0:
            _append(client, [factory.record(sent + i) for i in range(due)])
            sent += due
        time.sleep(WRITE_TICK_S)
    client.close()


def _entry_s(entry_id: bytes) -> float:
    return int(entry_id.split(b"-", 1)[0]) / 1000


class Tally:
    """Entries counted so far, and the lag of each from its append to its count."""

    def __init__(self) -> None:
        self.handled = 0
        self.lags_s: list[float] = []
        self.target = 0
        self.done = asyncio.Event()

    def add(self, entry_ids: Sequence[bytes]) -> None:
        now = time.time()
        self.lags_s.extend(now - _entry_s(entry_id) for entry_id in entry_ids)
        self.handled += len(entry_ids)
        if self.target and self.handled >= self.target:
            self.done.set()

    def expect(self, count: int) -> None:
        self.target, self.handled, self.lags_s = count, 0, []
        self.done.clear()


class TimedStore(AggregateStore):
    """The monitor's store, noting when each batch was counted and acknowledged."""

    def __init__(self, client: aioredis.Redis, tally: Tally) -> None:
        super().__init__(
            client, ttls=StoreTtls(seen_s=600, prediction_s=3600), baseline_records=1000
        )
        self.tally = tally

    async def count_and_ack(
        self,
        *,
        stream: str,
        group: str,
        entries: Sequence[tuple[bytes, RecordContribution | None]],
        now: float,
    ) -> int:
        counted = await super().count_and_ack(stream=stream, group=group, entries=entries, now=now)
        self.tally.add([entry_id for entry_id, _ in entries])
        return counted


class StreamReader(Protocol):
    """One way of reading the stream: started, then stopped."""

    name: str

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class MonitorPath:
    name = "monitor"

    def __init__(self, client: aioredis.Redis, tally: Tally, batch_size: int) -> None:
        self.store = TimedStore(client, tally)
        self.consumer = PredictionLogConsumer(
            client,
            self.store,
            stream=STREAM,
            group=GROUP,
            consumer="bench",
            block_ms=100,
            batch_size=batch_size,
            claim_min_idle_ms=60_000,
        )

    async def start(self) -> None:
        await self.consumer.ensure_group()
        self.consumer.start()

    async def stop(self) -> None:
        await self.consumer.close()


class DirectPath:
    name = "direct"

    def __init__(self, client: aioredis.Redis, tally: Tally, batch_size: int) -> None:
        self._redis = client
        self._tally = tally
        self._batch_size = batch_size
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    async def start(self) -> None:
        await self._redis.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while not self._stopping:
            response: Any = await self._redis.xreadgroup(
                GROUP, "bench", {STREAM: ">"}, count=self._batch_size, block=100
            )
            if not response:
                continue
            ids = [entry_id for entry_id, _ in response[0][1]]
            await self._redis.xack(STREAM, GROUP, *ids)
            self._tally.add(ids)

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            await self._task


@dataclass
class Result:
    path: str
    batch_size: int
    records_per_s: float
    lag_ms: tuple[float, float, float]
    live_records: int
    checked: str


async def run_path(
    url: str,
    make: Callable[[aioredis.Redis, Tally, int], StreamReader],
    batch_size: int,
    args: argparse.Namespace,
) -> Result:
    client = aioredis.Redis.from_url(url)
    await client.flushall()
    tally = Tally()
    path = make(client, tally, batch_size)
    sync_client = redis.Redis.from_url(url)
    factory = RecordFactory("backlog")
    for first in range(0, args.records, 1000):
        _append(
            sync_client, [factory.record(i) for i in range(first, min(first + 1000, args.records))]
        )
    sync_client.close()

    tally.expect(args.records)
    began = time.perf_counter()
    await path.start()
    await asyncio.wait_for(tally.done.wait(), args.timeout_s)
    records_per_s = args.records / (time.perf_counter() - began)

    live = int(args.rate * args.seconds)
    tally.expect(live)
    spawn = multiprocessing.get_context("spawn")
    start = spawn.Event()
    writer = spawn.Process(
        target=live_writer, args=(url, f"live-{path.name}", args.rate, args.seconds, start)
    )
    writer.start()
    start.set()
    try:
        await asyncio.wait_for(tally.done.wait(), args.seconds + args.timeout_s)
    finally:
        writer.join()
    lags_ms = np.array(tally.lags_s) * 1000
    p50, p95, p99 = (float(np.percentile(lags_ms, q)) for q in (50, 95, 99))
    await path.stop()

    total = args.records + live
    pending: Any = await client.xpending(STREAM, GROUP)
    checked = f"{pending['pending']} pending"
    if isinstance(path, MonitorPath):
        summary = await Monitor(path.store).endpoint_stats(ENDPOINT, Window.TOTAL)
        if summary.request_count != total or path.consumer.duplicates:
            raise SystemExit(
                f"monitor counted {summary.request_count} of {total} records "
                f"({path.consumer.duplicates} duplicates)"
            )
        checked = f"{summary.request_count}/{total} counted once, " + checked
    await client.aclose()
    return Result(path.name, batch_size, records_per_s, (p50, p95, p99), live, checked)


async def run(args: argparse.Namespace, work: Path) -> None:
    server = RedisProcess(work / "redis")
    server.start()
    results: list[Result] = []
    try:
        for batch_size in args.batch_sizes:
            for make in (MonitorPath, DirectPath):
                results.append(await run_path(server.url, make, batch_size, args))
    finally:
        server.stop()
    print(
        f"backlog {args.records:,} records; live {args.rate:,.0f} records/s for "
        f"{args.seconds:g} s (writer in its own process, a pipeline every "
        f"{WRITE_TICK_S * 1000:g} ms)\n"
    )
    print("| path | batch | records/s (backlog) | lag p50 ms | p95 ms | p99 ms | check |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for r in results:
        p50, p95, p99 = r.lag_ms
        print(
            f"| {r.path} | {r.batch_size} | {r.records_per_s:,.0f} | {p50:.1f} | {p95:.1f} "
            f"| {p99:.1f} | {r.checked} |"
        )
    print("\n| ratio monitor / direct | batch | records/s x | lag p50 x | lag p99 x |")
    print("|---|---:|---:|---:|---:|")
    for batch_size in args.batch_sizes:
        monitor, direct = (
            next(r for r in results if r.path == name and r.batch_size == batch_size)
            for name in ("monitor", "direct")
        )
        print(
            f"| monitor / direct | {batch_size} | "
            f"{monitor.records_per_s / direct.records_per_s:.2f} | "
            f"{monitor.lag_ms[0] / max(direct.lag_ms[0], 1e-9):.2f} | "
            f"{monitor.lag_ms[2] / max(direct.lag_ms[2], 1e-9):.2f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=20_000, help="backlog records per run")
    parser.add_argument("--rate", type=float, default=1000.0, help="live records per second")
    parser.add_argument("--seconds", type=float, default=10.0, help="live phase length")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[100, 500])
    parser.add_argument("--timeout-s", type=float, default=120.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        asyncio.run(run(args, Path(work)))


if __name__ == "__main__":
    main()
