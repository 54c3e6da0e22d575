"""`modelserve features materialize`: an offline table (Parquet or CSV) into the online store.

The table is read in chunks and every value is checked against the view's dtypes before
anything is written; one row per entity (the latest event time, the later row on a tie) is
kept in memory. Then the entities go to Redis in batches through `OnlineStore.write`, the
service's own validated, timestamp-guarded Lua script, several batches in flight at once.
Before each batch one pipelined HMGET reads the stored values, so a value whose stored copy
is newer (stale) or the same bytes (unchanged) is counted and not sent; the script still
keeps a newer stored value should one arrive in between. Any failure prints one line,
`error: ...`, and exits 1.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import redis.asyncio as redis
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
from rich.table import Table

from modelserve_cli.output import fail
from modelserve_cli.redis_targets import service_redis
from modelserve_features.online import (
    MAX_EVENT_TIME_AHEAD_S,
    FeatureWrite,
    OnlineStore,
    event_time_problem,
    now_us,
)
from modelserve_features.redis_store import EntityKey, decode_value, encode_value, redis_key
from modelserve_features.views import FeatureDtype, FeatureView, Value, value_problem
from modelserve_runtime.config import ConfigError
from modelserve_runtime.errors import ModelServeError
from modelserve_runtime.redis_connect import RedisClient, connect

console = Console()

features_app = typer.Typer(help="Load feature values into the online store.")

#: Rows per chunk read from the file.
CHUNK_ROWS = 65_536
#: Script calls in flight at once.
IN_FLIGHT = 4
#: Deadline of each Redis call of a materialization (a write script carries many entities).
MATERIALIZE_TIMEOUT_S = 60.0
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class TableFormat(StrEnum):
    """Offline table formats."""

    PARQUET = "parquet"
    CSV = "csv"


class MaterializeError(Exception):
    """The table cannot be materialized; nothing was written."""


@dataclass(frozen=True, slots=True)
class MaterializeSummary:
    """What one materialization read and wrote."""

    rows: int
    entities: int
    entities_written: int
    values_written: int
    values_stale: int
    values_unchanged: int
    unknown_columns: tuple[str, ...]
    seconds: float


@dataclass(slots=True)
class _Latest:
    event_time_us: int
    values: dict[str, Value]


def table_format(path: Path, given: TableFormat | None) -> TableFormat:
    """The format given, else the one the file's extension names."""
    if given is not None:
        return given
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        return TableFormat.PARQUET
    if suffix == ".csv":
        return TableFormat.CSV
    raise MaterializeError(f"{path}: cannot tell the format from {suffix!r}; pass --format")


def _open(
    path: Path, fmt: TableFormat, view: FeatureView, chunk_rows: int
) -> tuple[list[str], Iterator[pa.RecordBatch], int | None]:
    """Column names, record batches and (for Parquet) the row count."""
    if fmt is TableFormat.PARQUET:
        parquet = pq.ParquetFile(path)
        names = list(parquet.schema_arrow.names)
        return names, parquet.iter_batches(batch_size=chunk_rows), parquet.metadata.num_rows
    # Feature cells are read as text and parsed by the feature's dtype (see `_parse`), so a
    # string feature keeps "007" and a bad cell is named by its row rather than turning the
    # whole column into strings.
    types = {f.name: pa.string() for f in view.features}
    reader = pa_csv.open_csv(
        path,
        read_options=pa_csv.ReadOptions(block_size=8 * 1024 * 1024),
        convert_options=pa_csv.ConvertOptions(column_types=types),
    )
    return list(reader.schema.names), iter(reader), None


def _event_time_us(raw: object) -> int:
    if isinstance(raw, datetime):
        moment = raw if raw.tzinfo else raw.replace(tzinfo=UTC)
        return (moment - _EPOCH) // timedelta(microseconds=1)
    if isinstance(raw, bool):
        raise ValueError(f"{raw!r} is not a time")
    if isinstance(raw, int):
        return raw * 1_000_000
    if isinstance(raw, float):
        if not math.isfinite(raw):
            raise ValueError(f"{raw!r} is not a time")
        return round(raw * 1_000_000)
    if isinstance(raw, str):
        return _event_time_us(datetime.fromisoformat(raw.strip()))
    raise ValueError(f"{raw!r} is not an ISO-8601 time or epoch seconds")


_TRUE = {"true", "t", "1", "yes"}
_FALSE = {"false", "f", "0", "no"}


def _parse(dtype: FeatureDtype, text: str) -> object:
    """A CSV cell as the feature's dtype: int64 and double as Python writes them, bool as
    true/false/1/0/yes/no, a float vector as a JSON list; ValueError otherwise."""
    if dtype is FeatureDtype.INT64:
        return int(text)
    if dtype is FeatureDtype.DOUBLE:
        return float(text)
    if dtype is FeatureDtype.BOOL:
        word = text.strip().lower()
        if word in _TRUE or word in _FALSE:
            return word in _TRUE
        raise ValueError(text)
    if dtype is FeatureDtype.FLOAT_VECTOR:
        parsed = json.loads(text)
        if not isinstance(parsed, list):
            raise ValueError(text)
        return parsed
    return text


def _value(dtype: FeatureDtype, raw: object, text: bool) -> tuple[Value | None, str | None]:
    """The feature value of a cell (`text`: a CSV cell to parse), or why it is not one."""
    if text and isinstance(raw, str):
        try:
            raw = _parse(dtype, raw)
        except ValueError:
            return None, f"expected {dtype.value}, got {raw!r}"
    if raw is None:
        return None, f"expected {dtype.value}, got no value"
    value: Any = raw
    # File formats widen what the wire keeps strict: an integer column may hold a double
    # feature, and a vector is a list.
    if dtype is FeatureDtype.DOUBLE and isinstance(raw, int) and not isinstance(raw, bool):
        value = float(raw)
    elif isinstance(raw, list):
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in raw):
            return None, "expected float_vector, got a list with non-numbers"
        value = tuple(float(v) for v in raw)
    elif not isinstance(raw, int | float | str | bool):
        return None, f"expected {dtype.value}, got {type(raw).__name__}"
    problem = value_problem(dtype, value)
    return (None, problem) if problem else (value, None)


def read_latest(
    batches: Iterator[pa.RecordBatch],
    view: FeatureView,
    entity_column: str,
    timestamp_column: str,
    on_rows: Callable[[int], None],
    *,
    text: bool = False,
) -> tuple[int, dict[str, _Latest]]:
    """Rows read, and the latest checked values per entity id; MaterializeError at the first
    bad cell, naming its row (1 = the first data row) and column."""
    latest: dict[str, _Latest] = {}
    specs = view.features
    row0 = 0
    clock_us = now_us()
    max_ahead_us = round(MAX_EVENT_TIME_AHEAD_S * 1e6)
    for batch in batches:
        ids = batch.column(entity_column).to_pylist()
        times = batch.column(timestamp_column).to_pylist()
        columns = [batch.column(spec.name).to_pylist() for spec in specs]
        for i in range(batch.num_rows):
            row = row0 + i + 1
            entity_id = ids[i]
            if entity_id is None or entity_id == "":
                raise MaterializeError(f"row {row}, column {entity_column!r}: no entity id")
            entity_id = str(entity_id)
            try:
                event_time_us = _event_time_us(times[i])
            except ValueError as exc:
                raise MaterializeError(f"row {row}, column {timestamp_column!r}: {exc}") from None
            problem = event_time_problem(event_time_us, clock_us, max_ahead_us)
            if problem:
                raise MaterializeError(f"row {row}, column {timestamp_column!r}: {problem}")
            values: dict[str, Value] = {}
            for spec, column in zip(specs, columns, strict=True):
                value, problem = _value(spec.dtype, column[i], text)
                if value is None:
                    raise MaterializeError(f"row {row}, column {spec.name!r}: {problem}")
                values[spec.name] = value
            held = latest.get(entity_id)
            if held is None or event_time_us >= held.event_time_us:
                latest[entity_id] = _Latest(event_time_us, values)
        row0 += batch.num_rows
        on_rows(batch.num_rows)
    return row0, latest


async def _write_batch(
    store: OnlineStore, client: RedisClient, view: FeatureView, batch: Sequence[tuple[str, _Latest]]
) -> tuple[int, int, int, int]:
    """(entities written, values written, stale, unchanged) for one batch."""
    names = [spec.name for spec in view.features]
    dtypes = {spec.name: spec.dtype for spec in view.features}
    async with client.pipeline(transaction=False) as pipe:
        for entity_id, _ in batch:
            pipe.hmget(redis_key(EntityKey(view.entity_type, entity_id), view.name), names)
        stored: list[list[bytes | None]] = await pipe.execute()
    writes: list[FeatureWrite] = []
    stale = unchanged = 0
    for (entity_id, latest), held in zip(batch, stored, strict=True):
        values: dict[str, Value | None] = {}
        for name, raw in zip(names, held, strict=True):
            new = latest.values[name]
            if raw is not None:
                try:
                    held_time = decode_value(raw)[2]
                except ValueError:  # unreadable: overwritten
                    held_time = -1
                if held_time > latest.event_time_us:
                    stale += 1
                    continue
                if raw == encode_value(dtypes[name], new, latest.event_time_us):
                    unchanged += 1
                    continue
            values[name] = new
        if values:
            writes.append(
                FeatureWrite(
                    EntityKey(view.entity_type, entity_id), view.name, values, latest.event_time_us
                )
            )
    if not writes:
        return 0, 0, stale, unchanged
    result = await store.write(writes)
    return len(writes), result.written, stale + result.stale, unchanged


async def materialize(
    client: RedisClient,
    path: Path,
    view_name: str,
    *,
    fmt: TableFormat | None = None,
    entity_column: str = "entity_id",
    timestamp_column: str = "event_timestamp",
    batch_entities: int = 1000,
    chunk_rows: int = CHUNK_ROWS,
    on_rows: Callable[[int], None] = lambda n: None,
    on_entities: Callable[[int], None] = lambda n: None,
    on_total: Callable[[int], None] = lambda n: None,
) -> MaterializeSummary:
    """Reads and checks the whole table, then writes the latest value per entity; a bad
    table raises MaterializeError before anything is written."""
    started = time.perf_counter()
    store = OnlineStore(client, timeout_s=MATERIALIZE_TIMEOUT_S)
    view = (await store.views([view_name]))[view_name]
    fmt = table_format(path, fmt)
    names, batches, total = _open(path, fmt, view, chunk_rows)
    if total is not None:
        on_total(total)
    for column in (entity_column, timestamp_column):
        if column not in names:
            raise MaterializeError(f"{path}: no column {column!r}")
    missing = [spec.name for spec in view.features if spec.name not in names]
    if missing:
        raise MaterializeError(
            f"{path}: view {view.name!r} features missing from the table: {', '.join(missing)}"
        )
    features = {spec.name for spec in view.features}
    unknown = tuple(n for n in names if n not in features | {entity_column, timestamp_column})
    rows, latest = read_latest(
        batches, view, entity_column, timestamp_column, on_rows, text=fmt is TableFormat.CSV
    )
    items = list(latest.items())
    chunks = [items[i : i + batch_entities] for i in range(0, len(items), batch_entities)]
    gate = asyncio.Semaphore(IN_FLIGHT)

    async def one(chunk: Sequence[tuple[str, _Latest]]) -> tuple[int, int, int, int]:
        async with gate:
            counts = await _write_batch(store, client, view, chunk)
        on_entities(len(chunk))
        return counts

    results = await asyncio.gather(*(one(chunk) for chunk in chunks))
    return MaterializeSummary(
        rows=rows,
        entities=len(items),
        entities_written=sum(r[0] for r in results),
        values_written=sum(r[1] for r in results),
        values_stale=sum(r[2] for r in results),
        values_unchanged=sum(r[3] for r in results),
        unknown_columns=unknown,
        seconds=time.perf_counter() - started,
    )


@features_app.command("materialize")
def materialize_command(
    path: Path = typer.Argument(..., help="The offline table: a Parquet or CSV file."),
    view: str = typer.Option(..., "--view", help="The feature view the columns belong to."),
    entity_column: str = typer.Option("entity_id", help="Column of entity ids."),
    timestamp_column: str = typer.Option(
        "event_timestamp", help="Column of event times: ISO-8601, epoch seconds or timestamps."
    ),
    fmt: TableFormat | None = typer.Option(
        None, "--format", help="parquet or csv (default: from the extension)."
    ),
    redis_url: str | None = typer.Option(
        None,
        help="A standalone Redis (redis://host:port/db); default: the feature service's Redis"
        " as MODELSERVE_FEATURE_REDIS__* (Sentinel, cluster, TLS) or _REDIS_URL say.",
        show_default=False,
    ),
    batch_entities: int = typer.Option(1000, min=1, help="Entities per write script call."),
    config: Path | None = typer.Option(
        None,
        "--config",
        envvar="MODELSERVE_CONFIG",
        help="The feature service's YAML settings file: its redis and redis_url are read as"
        " the service reads them, the environment winning.",
        show_default=False,
    ),
) -> None:
    """Load the latest value per entity from a table into Redis; reruns change nothing."""
    try:
        connection = service_redis(
            "feature", redis_url, timeout_s=MATERIALIZE_TIMEOUT_S, config_file=config
        )
    except ConfigError as exc:
        fail(str(exc))

    async def work(progress: Progress) -> MaterializeSummary:
        reading = progress.add_task("rows read", total=None)
        writing = progress.add_task("entities written", total=None, visible=False)

        def entities(n: int) -> None:
            progress.update(writing, advance=n, visible=True)

        client = connect(connection)
        try:
            return await materialize(
                client,
                path,
                view,
                fmt=fmt,
                entity_column=entity_column,
                timestamp_column=timestamp_column,
                batch_entities=batch_entities,
                on_rows=lambda n: progress.update(reading, advance=n),
                on_entities=entities,
                on_total=lambda n: progress.update(reading, total=n),
            )
        finally:
            await client.aclose()

    progress = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )
    try:
        with progress:
            summary = asyncio.run(work(progress))
    except (MaterializeError, ModelServeError, redis.RedisError, OSError, pa.ArrowException) as exc:
        fail(str(exc))
    if summary.unknown_columns:
        console.print(
            f"ignored columns not in view {view!r}: {', '.join(summary.unknown_columns)}",
            highlight=False,
        )
    table = Table(title=f"materialized {path.name} into view {view}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("rows read", f"{summary.rows}")
    table.add_row("entities", f"{summary.entities}")
    table.add_row("entities written", f"{summary.entities_written}")
    table.add_row("values written", f"{summary.values_written}")
    table.add_row("values skipped as stale", f"{summary.values_stale}")
    table.add_row("values unchanged", f"{summary.values_unchanged}")
    table.add_row("seconds", f"{summary.seconds:.2f}")
    table.add_row("rows/s", f"{summary.rows / max(summary.seconds, 1e-9):,.0f}")
    console.print(table)
