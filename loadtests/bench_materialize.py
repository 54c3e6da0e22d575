"""Benchmark: `modelserve features materialize` of a generated Parquet table into Redis.

Generates N rows (default 1,000,000) over N/2 entities of a five-feature view (double,
int64, string, bool, float vector of 8), starts its own redis-server, materializes the file
twice (the second run finds everything unchanged) and prints rows/s and the Redis round
trips each run took, counted by Redis itself (INFO commandstats).

    .venv/bin/python loadtests/bench_materialize.py --rows 1000000
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import redis.asyncio as aioredis

from modelserve_cli.feature_commands import MaterializeSummary, materialize
from modelserve_cli.stack import RedisProcess
from modelserve_features.online import OnlineStore
from modelserve_features.views import FeatureDtype, FeatureSpec, FeatureView

VIEW = FeatureView(
    name="customer",
    entity_type="customer",
    features=(
        FeatureSpec("avg_amount_30d", FeatureDtype.DOUBLE),
        FeatureSpec("chargebacks_90d", FeatureDtype.INT64),
        FeatureSpec("segment", FeatureDtype.STRING),
        FeatureSpec("vip", FeatureDtype.BOOL),
        FeatureSpec("embedding", FeatureDtype.FLOAT_VECTOR),
    ),
)


def generate(path: Path, rows: int, entities: int) -> None:
    """Writes `rows` random rows over `entities` entity ids as Parquet."""
    rng = np.random.default_rng(7)
    ids = rng.integers(0, entities, rows)
    embedding = rng.random((rows, 8), dtype=np.float32).astype(np.float64)
    table = pa.table(
        {
            "entity_id": pa.array([f"c-{i}" for i in ids]),
            "event_timestamp": pa.array(1_700_000_000 + rng.integers(0, 86_400, rows)),
            "avg_amount_30d": pa.array(rng.random(rows) * 500),
            "chargebacks_90d": pa.array(rng.integers(0, 5, rows)),
            "segment": pa.array(rng.choice(["new", "gold", "silver"], rows)),
            "vip": pa.array(rng.random(rows) < 0.1),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(embedding.ravel()), 8).cast(
                pa.list_(pa.float64())
            ),
        }
    )
    pq.write_table(table, path)


async def round_trips(client: aioredis.Redis) -> dict[str, int]:
    """Calls per command so far, as Redis counts them."""
    stats = await client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


async def run(args: argparse.Namespace, work: Path) -> None:
    path = work / "table.parquet"
    generate(path, args.rows, args.entities or max(1, args.rows // 2))
    print(f"generated {args.rows:,} rows, {path.stat().st_size / 1e6:.1f} MB")
    server = RedisProcess(work / "redis")
    server.start()
    client = aioredis.Redis.from_url(server.url)
    try:
        await OnlineStore(client).apply_view(VIEW)
        for label in ("first run", "rerun"):
            before = await round_trips(client)
            summary: MaterializeSummary = await materialize(
                client, path, "customer", batch_entities=args.batch_entities
            )
            after = await round_trips(client)
            calls = {k: after.get(k, 0) - before.get(k, 0) for k in after}
            calls.pop("info", None)
            scripts = calls.get("evalsha", 0)
            # One HMGET pipeline per batch, one EVALSHA per batch with values to write (plus
            # the failed first one before redis-py loads the script), one view load (a MULTI).
            # Redis also counts the commands a script runs, so HMGET calls are not trips.
            batches = -(-summary.entities // args.batch_entities)
            trips = batches + scripts + calls.get("multi", 0)
            print(
                f"{label}: {summary.rows:,} rows, {summary.entities:,} entities, "
                f"{summary.values_written:,} values written, {summary.values_stale:,} stale, "
                f"{summary.values_unchanged:,} unchanged in {summary.seconds:.2f} s = "
                f"{summary.rows / summary.seconds:,.0f} rows/s; redis round trips {trips:,} "
                f"({batches:,} HMGET pipelines, {scripts:,} EVALSHA, "
                f"{calls.get('multi', 0)} view load)"
            )
    finally:
        await client.aclose()
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--entities", type=int, default=0, help="default: rows / 2")
    parser.add_argument("--batch-entities", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        asyncio.run(run(args, Path(work)))


if __name__ == "__main__":
    main()
