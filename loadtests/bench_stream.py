"""Benchmark: `modelserve stream-predict`'s worker against the direct path it wraps, in one run.

Starts the local stack (redis-server, Triton, the services but the monitor), deploys the demo
model, appends `--events` events (the demo customers in turn, each with an amount and the demo
request's context) to an input stream, then, for each batch size:

- worker: a `StreamWorker` (what the command runs) answering the whole backlog: each batch
  read in its consumer group, its customers' features in one Redis pipeline, its rows built
  as the router builds them, one `Infer` through the inference service, then one pipeline of
  result-and-acknowledge script calls;
- direct: the same backlog with nothing around it: XREADGROUP, one pipeline of HGETALLs, one
  ModelInfer of a ready-made input straight to Triton, then one pipeline of XADDs and one
  XACK.

Prints, per path and batch size, the p50/p95/p99 milliseconds of one batch, events/s, and the
worker's events/s as a ratio of the direct path's.

    .venv/bin/python loadtests/bench_stream.py --events 20000 --batch-events 16 64 256
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import redis.asyncio as aioredis
from bench import batch_row, run_benchmark, start_demo_stack

from modelserve_cli.demo import ENDPOINT, demo_request
from modelserve_cli.stream import StreamJob, StreamWorker
from modelserve_demo import fraud
from modelserve_features.online import OnlineStore
from modelserve_features.redis_store import EntityKey, redis_key
from modelserve_runtime.channels import create_channel
from modelserve_runtime.clients import InferenceClient, RegistryClient
from modelserve_triton.runner import TritonRunner


async def _fill(client: aioredis.Redis, stream: str, events: int, customers: list[str]) -> None:
    demo = demo_request()
    rng = np.random.default_rng(7)
    amounts = rng.uniform(1, 2000, events).round(2)
    for first in range(0, events, 1000):
        async with client.pipeline(transaction=False) as pipe:
            for i in range(first, min(first + 1000, events)):
                pipe.xadd(
                    stream,
                    {
                        "customer": customers[i % len(customers)],
                        "amount": str(amounts[i]),
                        "event_time": str(demo.context.event_time.seconds),
                        "user_agent": demo.context.user_agent,
                    },
                )
            await pipe.execute()


async def main(args: argparse.Namespace) -> None:
    stack, demo = await start_demo_stack("triton", "redis")
    try:
        customers = list(demo.customers)
        registry_channel = create_channel(stack.targets["registry"], default_timeout_s=60)
        inference_channel = create_channel(stack.targets["inference"], default_timeout_s=60)
        client = aioredis.Redis.from_url(stack.redis.url)
        try:
            inference = InferenceClient(inference_channel, timeout_s=60)
            held = await inference.list_model_versions()
            triton = TritonRunner(next(h.triton_endpoint for h in held if h.triton_endpoint))
            model, version = demo.model_version.split("/")[1], int(demo.model_version.split("/")[3])
            keys = [redis_key(EntityKey(fraud.ENTITY_TYPE, c), fraud.VIEW) for c in customers]
            lines = []
            for batch in args.batch_events:
                name = f"bench-{batch}"
                await _fill(client, f"{name}:in", args.events, customers)
                worker = StreamWorker(
                    StreamJob(
                        endpoint=ENDPOINT,
                        input_stream=f"{name}:in",
                        output_stream=f"{name}:out",
                        consumer="bench",
                        start_id="0",
                        batch_events=batch,
                        block_ms=0,
                        claim_idle_ms=0,
                    ),
                    registry=RegistryClient(registry_channel),
                    inference=inference,
                    features=OnlineStore(client, timeout_s=60),
                    client=client,
                )
                await worker.setup()
                worker_seconds: list[float] = []
                started = time.perf_counter()
                while worker.stats.events < args.events:
                    began = time.perf_counter()
                    await worker.process_once()
                    worker_seconds.append(time.perf_counter() - began)
                worker_wall = time.perf_counter() - started
                if worker.stats.failed or worker.stats.scored != args.events:
                    raise RuntimeError(f"the worker scored {worker.stats.scored} events")

                await _fill(client, f"{name}:direct", args.events, customers)
                await client.xgroup_create(f"{name}:direct", "direct", id="0")
                inputs = np.random.default_rng(1).random((batch, 8), dtype=np.float32)
                direct_seconds: list[float] = []
                done = 0
                started = time.perf_counter()
                while done < args.events:
                    began = time.perf_counter()
                    answer = await client.xreadgroup(
                        "direct", "bench", {f"{name}:direct": ">"}, count=batch
                    )
                    entries = answer[0][1]
                    async with client.pipeline(transaction=False) as pipe:
                        for i in range(len(entries)):
                            pipe.hgetall(keys[(done + i) % len(keys)])
                        await pipe.execute()
                    outputs = await triton.infer(
                        model,
                        version,
                        {"features": inputs[: len(entries)]},
                        ["label", "probabilities"],
                        timeout_s=60,
                    )
                    async with client.pipeline(transaction=False) as pipe:
                        for i, (event_id, _) in enumerate(entries):
                            pipe.xadd(
                                f"{name}:direct-out",
                                {
                                    "event_id": event_id,
                                    "probabilities": json.dumps(
                                        outputs["probabilities"][i].tolist()
                                    ),
                                },
                            )
                        pipe.xack(f"{name}:direct", "direct", *(e for e, _ in entries))
                        await pipe.execute()
                    done += len(entries)
                    direct_seconds.append(time.perf_counter() - began)
                direct_wall = time.perf_counter() - started
                lines.append(batch_row("worker", batch, worker_seconds, args.events, worker_wall))
                lines.append(batch_row("direct", batch, direct_seconds, args.events, direct_wall))
                lines.append(
                    f"| worker / direct events/s | {batch} | | | | | "
                    f"{direct_wall / worker_wall:.2f} |"
                )
                print(f"done: batch {batch}", flush=True)
            await triton.close()
        finally:
            await registry_channel.close()
            await inference_channel.close()
            await client.aclose()
        print(f"\n{args.events:,} events in the stream's backlog; per-batch latency\n")
        print("| path | batch events | batches | p50 ms | p95 ms | p99 ms | events/s |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for line in lines:
            print(line)
    finally:
        await stack.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=20_000, help="events in the backlog")
    parser.add_argument("--batch-events", type=int, nargs="+", default=[16, 64, 256])
    run_benchmark(main(parser.parse_args()))
