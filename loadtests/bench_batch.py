"""Benchmark: `modelserve batch-predict` against the direct path it wraps, in one run.

Starts the local stack (redis-server, Triton, the services but the monitor), deploys the demo
model with its hybrid lookup on, writes a Parquet table of `--rows` rows (the demo customers
in turn, each with an amount and the demo request's context), then, for each batch size:

- batch job: `run_batch` (what the command runs): the table read, each batch's stored
  features in one Redis pipeline, its rows built as the router builds them, one `Infer`
  call through the inference service, the predictions written to the hybrid lookup and to
  a Parquet file;
- direct: the same batches with nothing around them: one pipeline of HGETALLs for the
  batch's customers, then one ModelInfer of a ready-made input of that many rows straight
  to Triton, `--in-flight` batches at once like the job.

Prints, per path and batch size, the p50/p95/p99 milliseconds of one batch, rows/s, and the
job's rows/s as a ratio of the direct path's.

    .venv/bin/python loadtests/bench_batch.py --rows 50000 --batch-rows 64 256
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import redis.asyncio as aioredis
from bench import batch_row, run_benchmark, start_demo_stack

from modelserve.registry.v1 import registry_service_pb2 as registry_pb
from modelserve.registry.v1 import registry_service_pb2_grpc as registry_grpc
from modelserve_cli.batch import BatchJob, run_batch
from modelserve_cli.demo import ENDPOINT, demo_request
from modelserve_demo import fraud
from modelserve_features.online import OnlineStore
from modelserve_features.redis_store import EntityKey, redis_key
from modelserve_runtime.channels import create_channel
from modelserve_runtime.clients import InferenceClient, RegistryClient
from modelserve_triton.runner import TritonRunner


def _table(path: Path, rows: int, customers: list[str]) -> None:
    demo = demo_request()
    rng = np.random.default_rng(7)
    pq.write_table(
        pa.table(
            {
                "customer": [customers[i % len(customers)] for i in range(rows)],
                "amount": rng.uniform(1, 2000, rows).round(2),
                "event_time": np.full(rows, demo.context.event_time.seconds),
                "user_agent": [demo.context.user_agent] * rows,
            }
        ),
        path,
    )


async def main(args: argparse.Namespace) -> None:
    stack, demo = await start_demo_stack("triton", "redis")
    work = Path(tempfile.mkdtemp(prefix="modelserve-bench-batch-"))
    try:
        customers = list(demo.customers)
        source = work / "table.parquet"
        _table(source, args.rows, customers)
        registry_channel = create_channel(stack.targets["registry"], default_timeout_s=60)
        inference_channel = create_channel(stack.targets["inference"], default_timeout_s=60)
        redis_client = aioredis.Redis.from_url(stack.redis.url)
        try:
            stub = registry_grpc.RegistryServiceStub(registry_channel)
            deployment = (
                await stub.GetDeployment(
                    registry_pb.GetDeploymentRequest(name=f"deployments/{ENDPOINT}")
                )
            ).deployment
            deployment.hybrid.enabled = True
            deployment.hybrid.entity_type = fraud.ENTITY_TYPE
            deployment.hybrid.max_age.FromSeconds(3600)
            await stub.UpdateDeployment(registry_pb.UpdateDeploymentRequest(deployment=deployment))
            inference = InferenceClient(inference_channel, timeout_s=60)
            held = await inference.list_model_versions()
            triton = TritonRunner(next(h.triton_endpoint for h in held if h.triton_endpoint))
            _, version = demo.model_version.rsplit("/", 1)
            lines = []
            for batch in args.batch_rows:
                job_seconds: list[float] = []
                job = BatchJob(
                    ENDPOINT,
                    source,
                    output_path=work / f"out-{batch}.parquet",
                    batch_rows=batch,
                    in_flight=args.in_flight,
                )
                started = time.perf_counter()
                summary = await run_batch(
                    job,
                    registry=RegistryClient(registry_channel),
                    inference=inference,
                    features=OnlineStore(redis_client, timeout_s=60),
                    precomputed=redis_client,
                    on_batch=lambda _rows, seconds, into=job_seconds: into.append(seconds),
                )
                job_wall = time.perf_counter() - started
                if summary.failed or summary.scored != args.rows:
                    raise RuntimeError(f"the job scored {summary.scored}, failed {summary.failed}")

                direct_seconds: list[float] = []
                keys = [redis_key(EntityKey(fraud.ENTITY_TYPE, c), fraud.VIEW) for c in customers]
                inputs = np.random.default_rng(1).random((batch, 8), dtype=np.float32)
                batches = [
                    (first, min(batch, args.rows - first)) for first in range(0, args.rows, batch)
                ]
                gate = asyncio.Semaphore(args.in_flight)

                async def direct(
                    first: int,
                    size: int,
                    keys: list[str] = keys,
                    gate: asyncio.Semaphore = gate,
                    inputs: np.ndarray = inputs,
                    into: list[float] = direct_seconds,
                ) -> None:
                    async with gate:
                        began = time.perf_counter()
                        async with redis_client.pipeline(transaction=False) as pipe:
                            for i in range(first, first + size):
                                pipe.hgetall(keys[i % len(keys)])
                            await pipe.execute()
                        await triton.infer(
                            demo.model_version.split("/")[1],
                            int(version),
                            {"features": inputs[:size]},
                            ["label", "probabilities"],
                            timeout_s=60,
                        )
                        into.append(time.perf_counter() - began)

                started = time.perf_counter()
                await asyncio.gather(*(direct(first, size) for first, size in batches))
                direct_wall = time.perf_counter() - started
                lines.append(batch_row("batch job", batch, job_seconds, args.rows, job_wall))
                lines.append(batch_row("direct", batch, direct_seconds, args.rows, direct_wall))
                lines.append(
                    f"| job / direct rows/s | {batch} | | | | | {direct_wall / job_wall:.2f} |"
                )
                print(f"done: batch {batch}", flush=True)
            await triton.close()
        finally:
            await registry_channel.close()
            await inference_channel.close()
            await redis_client.aclose()
        print(
            f"\n{args.rows:,} rows, {args.in_flight} batches in flight; per-batch latency "
            "(features, inference, and for the job the hybrid write)\n"
        )
        print("| path | batch rows | batches | p50 ms | p95 ms | p99 ms | rows/s |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for line in lines:
            print(line)
    finally:
        await stack.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=50_000, help="rows in the table")
    parser.add_argument("--batch-rows", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--in-flight", type=int, default=4, help="batches at once")
    run_benchmark(main(parser.parse_args()))
