"""`modelserve features materialize`: offline tables into the online store on a real Redis."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import redis.asyncio as aioredis
from click.testing import Result
from typer.testing import CliRunner

from modelserve_cli.main import app
from modelserve_features.online import FeatureResult, OnlineStore
from modelserve_features.redis_store import EntityKey
from modelserve_features.views import FeatureDtype, FeatureRef, FeatureSpec, FeatureView

T0 = 1_700_000_000
FEATURES = ("avg_amount_30d", "chargebacks_90d", "segment", "vip")


def customer_view() -> FeatureView:
    """View `customer`: a double, an int64, a string and a bool."""
    return FeatureView(
        name="customer",
        entity_type="customer",
        features=(
            FeatureSpec("avg_amount_30d", FeatureDtype.DOUBLE),
            FeatureSpec("chargebacks_90d", FeatureDtype.INT64),
            FeatureSpec("segment", FeatureDtype.STRING),
            FeatureSpec("vip", FeatureDtype.BOOL),
        ),
    )


def rows_table(rows: list[tuple[str, Any, float, int, str, bool]]) -> pa.Table:
    """A table of (entity_id, event_timestamp, avg_amount_30d, chargebacks_90d, segment, vip)."""
    columns = list(zip(*rows, strict=True))
    names = ["entity_id", "event_timestamp", *FEATURES]
    return pa.table({name: list(column) for name, column in zip(names, columns, strict=True)})


def write_parquet(path: Path, table: pa.Table) -> Path:
    """Writes `table` as Parquet."""
    pq.write_table(table, path)
    return path


async def materialize(redis_url: str, path: Path, *args: str) -> Result:
    """Runs `modelserve features materialize PATH --view customer ARGS` in-process."""
    command = ["features", "materialize", str(path), "--view", "customer"]
    command += ["--redis-url", redis_url, *args]
    return await asyncio.to_thread(CliRunner().invoke, app, command)


async def read(client: aioredis.Redis, *entity_ids: str) -> list[dict[str, FeatureResult]]:
    """The customer view's values of each entity, through OnlineStore."""
    refs = [FeatureRef("customer", name) for name in FEATURES]
    rows = await OnlineStore(client).read([EntityKey("customer", e) for e in entity_ids], refs)
    return [{ref.name: row[ref] for ref in refs} for row in rows]


async def setup_view(client: aioredis.Redis) -> None:
    """Applies the customer view."""
    await OnlineStore(client).apply_view(customer_view())


def summary(result: Result) -> dict[str, str]:
    """The summary table's rows by measure."""
    found: dict[str, str] = {}
    for line in result.stdout.splitlines():
        cells = [c.strip() for c in line.strip("│┃ ").split("│")]
        if len(cells) == 2:
            found[cells[0]] = cells[1]
    return found


class TestMaterialize:
    async def test_values_land_with_their_event_times(
        self, redis_client: aioredis.Redis, redis_url: str, tmp_path: Path
    ) -> None:
        """Each entity's values are readable through OnlineStore with the row's event time."""
        await setup_view(redis_client)
        path = write_parquet(
            tmp_path / "t.parquet",
            rows_table([("c-1", T0, 12.5, 3, "gold", True), ("c-2", T0 + 1, 7.0, 0, "new", False)]),
        )
        result = await materialize(redis_url, path)
        assert result.exit_code == 0, result.output
        assert summary(result)["entities written"] == "2"
        c1, c2 = await read(redis_client, "c-1", "c-2")
        assert {n: r.value for n, r in c1.items()} == {
            "avg_amount_30d": 12.5,
            "chargebacks_90d": 3,
            "segment": "gold",
            "vip": True,
        }
        assert c1["segment"].event_time_us == T0 * 1_000_000
        assert c2["avg_amount_30d"].value == 7.0
        assert c2["vip"].event_time_us == (T0 + 1) * 1_000_000

    async def test_latest_row_per_entity_wins(
        self, redis_client: aioredis.Redis, redis_url: str, tmp_path: Path
    ) -> None:
        """Of several rows of one entity, across chunks and in any order, the latest is stored."""
        await setup_view(redis_client)
        rows = [("c-1", T0 + k, float(k), k, f"s{k}", k % 2 == 0) for k in (5, 9, 1, 7, 3)]
        path = tmp_path / "t.parquet"
        pq.write_table(rows_table(rows), path, row_group_size=2)
        result = await materialize(redis_url, path)
        assert result.exit_code == 0, result.output
        assert summary(result)["rows read"] == "5"
        (c1,) = await read(redis_client, "c-1")
        assert c1["chargebacks_90d"].value == 9
        assert c1["segment"].value == "s9"
        assert c1["avg_amount_30d"].event_time_us == (T0 + 9) * 1_000_000

    async def test_older_file_after_newer_changes_nothing(
        self, redis_client: aioredis.Redis, redis_url: str, tmp_path: Path
    ) -> None:
        """A file older than what is stored writes nothing and reports every value stale."""
        await setup_view(redis_client)
        newer = write_parquet(
            tmp_path / "new.parquet", rows_table([("c-1", T0 + 10, 2.0, 2, "b", True)])
        )
        older = write_parquet(
            tmp_path / "old.parquet", rows_table([("c-1", T0, 1.0, 1, "a", False)])
        )
        assert (await materialize(redis_url, newer)).exit_code == 0
        result = await materialize(redis_url, older)
        assert result.exit_code == 0, result.output
        assert summary(result)["values skipped as stale"] == "4"
        assert summary(result)["entities written"] == "0"
        (c1,) = await read(redis_client, "c-1")
        assert c1["segment"].value == "b"
        assert c1["segment"].event_time_us == (T0 + 10) * 1_000_000

    async def test_rerun_is_idempotent(
        self, redis_client: aioredis.Redis, redis_url: str, tmp_path: Path
    ) -> None:
        """Running the same file twice leaves Redis as it was and writes nothing the second time."""
        await setup_view(redis_client)
        rows = [(f"c-{k}", T0, float(k), k, "x", False) for k in range(2500)]
        path = write_parquet(tmp_path / "t.parquet", rows_table(rows))
        first = await materialize(redis_url, path)
        assert first.exit_code == 0, first.output
        assert summary(first)["values written"] == str(4 * 2500)
        before = {
            k: await redis_client.hgetall(k) async for k in redis_client.scan_iter("fs:{customer:*")
        }
        second = await materialize(redis_url, path)
        assert second.exit_code == 0, second.output
        assert summary(second)["values written"] == "0"
        assert summary(second)["values unchanged"] == str(4 * 2500)
        after = {
            k: await redis_client.hgetall(k) async for k in redis_client.scan_iter("fs:{customer:*")
        }
        assert after == before
        assert len(after) == 2500

    async def test_bad_value_names_row_and_column_and_writes_nothing(
        self, redis_client: aioredis.Redis, redis_url: str, tmp_path: Path
    ) -> None:
        """A value of the wrong dtype anywhere in the file exits 1 naming its row and column,
        before any entity is written."""
        await setup_view(redis_client)
        path = tmp_path / "t.csv"
        path.write_text(
            "entity_id,event_timestamp,avg_amount_30d,chargebacks_90d,segment,vip\n"
            "c-1,2024-01-01T00:00:00Z,1.5,1,a,true\n"
            "c-2,2024-01-01T00:00:00Z,2.5,oops,b,false\n"
        )
        result = await materialize(redis_url, path)
        assert result.exit_code == 1
        assert "row 2, column 'chargebacks_90d': expected int64, got 'oops'" in result.stderr
        assert [k async for k in redis_client.scan_iter("fs:{customer:*")] == []

    async def test_epoch_milliseconds_are_refused_before_anything_is_written(
        self, redis_client: aioredis.Redis, redis_url: str, tmp_path: Path
    ) -> None:
        """Epoch milliseconds in an epoch-seconds column put a row some 55,000 years ahead,
        where it would outrank every true write: the file exits 1 naming the row, how far
        ahead it is and the likely cause, and no entity is written."""
        await setup_view(redis_client)
        path = tmp_path / "t.csv"
        path.write_text(
            "entity_id,event_timestamp,avg_amount_30d,chargebacks_90d,segment,vip\n"
            f"c-1,{T0},1.5,1,a,true\n"
            f"c-2,{T0 * 1000},2.5,2,b,false\n"
        )
        result = await materialize(redis_url, path)
        assert result.exit_code == 1
        assert "row 2, column 'event_timestamp': is " in result.stderr
        assert "epoch milliseconds read as seconds?" in result.stderr
        assert [k async for k in redis_client.scan_iter("fs:{customer:*")] == []

    async def test_missing_feature_column_is_refused(
        self, redis_client: aioredis.Redis, redis_url: str, tmp_path: Path
    ) -> None:
        """A table without one of the view's features exits 1 naming it, and writes nothing."""
        await setup_view(redis_client)
        table = rows_table([("c-1", T0, 1.0, 1, "a", True)]).drop_columns(["vip"])
        path = write_parquet(tmp_path / "t.parquet", table)
        result = await materialize(redis_url, path)
        assert result.exit_code == 1
        assert "features missing from the table: vip" in result.stderr
        assert [k async for k in redis_client.scan_iter("fs:{customer:*")] == []

    async def test_csv_and_unknown_columns(
        self, redis_client: aioredis.Redis, redis_url: str, tmp_path: Path
    ) -> None:
        """A CSV with ISO-8601 times, epoch seconds and an extra column loads; the extra
        column is reported and ignored."""
        await setup_view(redis_client)
        table = rows_table(
            [("c-1", "2024-01-01T00:00:00+00:00", 1.5, 1, "007", True)]
        ).append_column("note", pa.array(["hi"]))
        path = tmp_path / "t.csv"
        pa_csv.write_csv(table, path)
        result = await materialize(redis_url, path)
        assert result.exit_code == 0, result.output
        assert "ignored columns not in view 'customer': note" in result.stdout
        (c1,) = await read(redis_client, "c-1")
        assert c1["segment"].value == "007"
        when = datetime(2024, 1, 1, tzinfo=UTC)
        assert c1["vip"].event_time_us == int(when.timestamp()) * 1_000_000
        assert await redis_client.hget("fs:{customer:c-1}:customer", "note") is None

    async def test_parquet_timestamp_column_and_renamed_columns(
        self, redis_client: aioredis.Redis, redis_url: str, tmp_path: Path
    ) -> None:
        """Parquet timestamps are read as event times and the id and time columns may be renamed."""
        await setup_view(redis_client)
        when = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
        table = pa.table(
            {
                "customer_id": ["c-9"],
                "ts": pa.array([when], pa.timestamp("us", tz="UTC")),
                "avg_amount_30d": [3],
                "chargebacks_90d": [4],
                "segment": ["z"],
                "vip": [False],
            }
        )
        path = write_parquet(tmp_path / "t.data", table)
        args = ("--format", "parquet", "--entity-column", "customer_id", "--timestamp-column", "ts")
        result = await materialize(redis_url, path, *args)
        assert result.exit_code == 0, result.output
        (c9,) = await read(redis_client, "c-9")
        assert c9["avg_amount_30d"].value == 3.0
        assert c9["avg_amount_30d"].event_time_us == 1_714_979_289_123_456

    async def test_unknown_view_is_refused(
        self, redis_client: aioredis.Redis, redis_url: str, tmp_path: Path
    ) -> None:
        """A view that does not exist exits 1 with one line naming it."""
        path = write_parquet(tmp_path / "t.parquet", rows_table([("c-1", T0, 1.0, 1, "a", True)]))
        result = await materialize(redis_url, path)
        assert result.exit_code == 1
        assert "customer" in result.stderr
        assert len(result.stderr.splitlines()) == 1
        assert [k async for k in redis_client.scan_iter("fs:{customer:*")] == []
