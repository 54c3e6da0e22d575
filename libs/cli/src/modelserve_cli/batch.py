"""Batch prediction: score a table of entities through the inference service in large batches,
each row's input built as the router builds it online, and write every prediction to a file
and, for a deployment whose hybrid lookup is on, to Redis, where the router answers from it.

The table (Parquet or CSV) has a column per entity type the model's features are keyed by
(`customer`, say, holding ids), a column per request feature the model takes (`amount`), and
optionally `event_time`, `user_agent` and `query`, the facts request-time features are computed
from (as `PredictRequest.context` carries them online). Other columns are ignored.

A job can run as shard `i` of `n`: it takes the rows whose index is `i` modulo `n`, so a
Kubernetes Indexed Job (`JOB_COMPLETION_INDEX`) spreads one table over many machines, each
writing its own output file (`{shard}` in the output path).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import redis.asyncio as redis
import typer
from rich.console import Console
from rich.progress import MofNCompleteColumn, Progress, TimeElapsedColumn
from rich.table import Table

from modelserve.inference.v1 import inference_service_pb2 as inference_pb
from modelserve.registry.v1 import registry_service_pb2 as registry_pb
from modelserve.type.v1 import tensor_pb2
from modelserve_cli.feature_commands import MaterializeError, TableFormat, table_format
from modelserve_cli.output import errors, fail
from modelserve_cli.redis_targets import (
    FeatureRedisUrl,
    RouterRedisUrl,
    configured,
    service_redis,
)
from modelserve_cli.tls import cli_tls
from modelserve_features.online import FeatureResult, OnlineStore
from modelserve_features.redis_store import EntityKey
from modelserve_features.request_time import RequestFacts, registered_features
from modelserve_features.views import FeatureRef
from modelserve_router.predict import REQUEST_ENTITY, VersionPlan, assemble_row
from modelserve_runtime.channels import create_channel
from modelserve_runtime.clients import InferenceClient, RegistryClient
from modelserve_runtime.config import ConfigError
from modelserve_runtime.convert import DTYPES, numpy_to_tensor, tensor_to_numpy
from modelserve_runtime.errors import InvalidArgumentError, ModelServeError
from modelserve_runtime.precomputed import write_precomputed
from modelserve_runtime.redis_connect import RedisClient, connect
from modelserve_triton.model_config import conform_outputs

#: The columns every output file has, besides the entity ids and the model's outputs.
MODEL_VERSION_COLUMN, COMPUTED_AT_COLUMN, ERROR_COLUMN = "model_version", "computed_at", "error"
#: Rows read from the table at a time.
_READ_ROWS = 65_536
console = Console()


class JobError(Exception):
    """A scoring job (batch or streaming) cannot run as asked; nothing was scored or
    written."""


@dataclass(frozen=True, slots=True)
class BatchJob:
    """What one batch prediction run scores, with what, and where the answers go."""

    endpoint: str
    """The deployment whose model scores the rows (and whose hybrid lookup is fed)."""
    input_path: Path
    output_path: Path | None = None
    """Where each row's prediction goes (Parquet or CSV, by extension or `fmt`); `{shard}` is
    replaced by the shard index. None: no file."""
    fmt: TableFormat | None = None
    """The input's format; None: from its extension."""
    model_version: str | None = None
    """The version to score with; None: the deployment's version with the largest traffic
    share (the first listed of equals). Any version may be named, to fill the hybrid lookup
    before traffic moves to it."""
    batch_rows: int = 256
    """Rows per Infer call; at most the version's `max_batch_size` in Triton (256 unless the
    version's Triton config says otherwise)."""
    in_flight: int = 4
    """Batches scored at once."""
    shard: int = 0
    shards: int = 1
    precompute: bool | None = None
    """Write the predictions to Redis for the hybrid lookup; None: when the deployment's
    hybrid lookup is on."""
    precompute_ttl_s: float | None = None
    """How long a written prediction is kept; None: until overwritten."""


@dataclass(slots=True)
class BatchSummary:
    """What one run read, scored and wrote."""

    model_version: str
    rows: int = 0
    """Rows of this shard read."""
    scored: int = 0
    failed: int = 0
    """Rows not scored: each is in the output file with its `error`."""
    precomputed: int = 0
    """Predictions written to Redis for the hybrid lookup."""
    seconds: float = 0.0
    output_path: Path | None = None
    errors: list[str] = field(default_factory=list)
    """The first few row errors, `row N: why`."""


@dataclass(frozen=True, slots=True)
class Resolved:
    """A deployment's model as a scoring job needs it."""

    deployment: registry_pb.Deployment
    version_name: str
    version: registry_pb.ModelVersion
    plan: VersionPlan
    entity_types: list[str]
    """The entity types its stored features are keyed by, sorted."""
    request_names: list[str]
    """Its request features (`request:NAME`), by name, in signature order."""


async def resolve(
    registry: RegistryClient, features: OnlineStore, endpoint: str, model_version: str | None
) -> Resolved:
    """The deployment, the version to score with (`model_version`, else the largest share),
    its signature's plan and the entity types of its views."""
    deployment = await registry.get_deployment(f"deployments/{endpoint}")
    version_name = model_version or main_version(deployment)
    version = await registry.get_model_version(version_name)
    plan = VersionPlan.of(version.signature)
    if not plan.refs or not plan.input_name:
        raise JobError(
            f"{version_name} declares no feature_refs: a scoring job builds its input from them"
        )
    views = await features.views(plan.views) if plan.views else {}
    return Resolved(
        deployment=deployment,
        version_name=version_name,
        version=version,
        plan=plan,
        entity_types=sorted({view.entity_type for view in views.values()}),
        request_names=[
            r.partition(":")[2] for r in plan.refs if r.startswith(REQUEST_ENTITY + ":")
        ],
    )


def main_version(deployment: registry_pb.Deployment) -> str:
    """The version with the largest traffic share (the first listed of equals)."""
    if not deployment.traffic:
        raise JobError(f"{deployment.name} routes to no version; name one with --version")
    best = max(deployment.traffic, key=lambda t: t.percent)
    return best.model_version


async def run_batch(
    job: BatchJob,
    *,
    registry: RegistryClient,
    inference: InferenceClient,
    features: OnlineStore,
    precomputed: RedisClient | None,
    on_batch: Callable[[int, float], None] | None = None,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> BatchSummary:
    """Scores the job's shard of its table; see the module's description.

    JobError (or a ModelServeError from the registry or the feature store) before anything
    is scored when the job cannot run: an unknown deployment or version, a table without a
    column the model needs, a hybrid write asked of a deployment without a hybrid lookup.
    A row that cannot be scored (no entity id, a request feature that is not a number, a
    batch inference refused as INVALID_ARGUMENT) is written to the output with its error and
    counted in `failed`; the other rows go on. Redis or inference failing part way (any other
    error) stops the job with that error; what was written stays, and a rerun rewrites it.
    `on_batch` hears of each batch done: its rows and the seconds it took (features,
    inference and the Redis write).
    """
    _check_job(job)
    started = time.perf_counter()
    resolved = await resolve(registry, features, job.endpoint, job.model_version)
    deployment, version_name, plan = resolved.deployment, resolved.version_name, resolved.plan
    hybrid = deployment.hybrid if deployment.hybrid.enabled else None
    precompute = hybrid is not None if job.precompute is None else job.precompute
    if precompute and hybrid is None:
        raise JobError(
            f"{deployment.name} has no hybrid lookup on: nothing would read the predictions "
            "written to Redis; turn it on, or leave the Redis write out (--no-precompute)"
        )
    if precompute and precomputed is None:
        raise JobError("writing predictions for the hybrid lookup needs a Redis client")
    entity_types = resolved.entity_types
    hybrid_type = hybrid.entity_type if precompute and hybrid is not None else None
    id_columns = sorted({*entity_types, *([hybrid_type] if hybrid_type else [])})
    request_names = resolved.request_names
    try:
        fmt = table_format(job.input_path, job.fmt)
    except MaterializeError as exc:
        raise JobError(str(exc)) from None
    columns, batches = _open(job.input_path, fmt, id_columns)
    missing = [c for c in id_columns if c not in columns]
    computed = set(registered_features())
    missing += [n for n in request_names if n not in columns and n not in computed]
    if missing:
        raise JobError(
            f"{job.input_path} has no column {', '.join(repr(m) for m in missing)}: "
            f"{version_name} needs "
            + ", ".join(
                [f"the {t!r} entity id" for t in id_columns if t in missing]
                + [f"request feature {n!r}" for n in request_names if n in missing]
            )
        )
    output_path = (
        None
        if job.output_path is None
        else Path(str(job.output_path).replace("{shard}", str(job.shard)))
    )
    summary = BatchSummary(model_version=version_name, output_path=output_path)
    writer = (
        None
        if output_path is None
        else _Writer(output_path, id_columns, resolved.version.signature.outputs, version_name)
    )
    scorer = RowScorer(
        plan=plan,
        version_name=version_name,
        endpoint=job.endpoint,
        features=features,
        inference=inference,
        precomputed=precomputed if precompute else None,
        hybrid_type=hybrid_type,
        entity_types=entity_types,
        request_names=[n for n in request_names if n in columns],
        ttl_s=job.precompute_ttl_s,
        clock=clock,
    )
    try:
        pending: list[asyncio.Task[Scored]] = []
        for chunk in _shard_chunks(batches, job):
            summary.rows += len(chunk)
            pending.append(asyncio.create_task(scorer.score(chunk)))
            if len(pending) >= job.in_flight:
                _take(await pending.pop(0), summary, writer, on_batch)
        for task in pending:
            _take(await task, summary, writer, on_batch)
    except BaseException:
        for task in pending:
            task.cancel()
        raise
    finally:
        if writer is not None:
            writer.close()
    summary.seconds = time.perf_counter() - started
    return summary


def _check_job(job: BatchJob) -> None:
    problems = []
    if job.shards < 1:
        problems.append("--shards must be at least 1")
    elif not 0 <= job.shard < job.shards:
        problems.append(f"--shard must be in [0, {job.shards - 1}]")
    if job.batch_rows < 1:
        problems.append("--batch-rows must be at least 1")
    if job.in_flight < 1:
        problems.append("--in-flight must be at least 1")
    if problems:
        raise JobError("; ".join(problems))


def _open(
    path: Path, fmt: TableFormat, id_columns: Sequence[str]
) -> tuple[list[str], Iterator[pa.RecordBatch]]:
    try:
        if fmt is TableFormat.PARQUET:
            parquet = pq.ParquetFile(path)
            return list(parquet.schema_arrow.names), parquet.iter_batches(batch_size=_READ_ROWS)
        # Entity ids are text even when they look like numbers ("007" stays "007").
        reader = pa_csv.open_csv(
            path,
            read_options=pa_csv.ReadOptions(block_size=8 * 1024 * 1024),
            convert_options=pa_csv.ConvertOptions(
                column_types={c: pa.string() for c in id_columns}
            ),
        )
    except (OSError, pa.ArrowException) as exc:
        raise JobError(f"{path}: {exc}") from None
    return list(reader.schema.names), iter(reader)


@dataclass(frozen=True, slots=True)
class Row:
    index: int
    """The row's index in the whole table."""
    cells: dict[str, Any]


def _shard_chunks(batches: Iterator[pa.RecordBatch], job: BatchJob) -> Iterator[list[Row]]:
    """This shard's rows, `batch_rows` at a time."""
    chunk: list[Row] = []
    index = 0
    for batch in batches:
        for cells in batch.to_pylist():
            if index % job.shards == job.shard:
                chunk.append(Row(index, cells))
                if len(chunk) == job.batch_rows:
                    yield chunk
                    chunk = []
            index += 1
    if chunk:
        yield chunk


@dataclass(slots=True)
class Scored:
    rows: list[Row]
    outputs: list[dict[str, Any] | None]
    """Each row's outputs (one row's slice of each), None where it failed."""
    errors: list[str | None]
    computed_at: datetime
    precomputed: int
    seconds: float


@dataclass(slots=True)
class RowScorer:
    plan: VersionPlan
    version_name: str
    endpoint: str
    features: OnlineStore
    inference: InferenceClient
    precomputed: RedisClient | None
    hybrid_type: str | None
    entity_types: list[str]
    request_names: list[str]
    ttl_s: float | None
    clock: Callable[[], datetime]

    async def score(self, rows: list[Row]) -> Scored:
        started = time.perf_counter()
        errors: list[str | None] = [None] * len(rows)
        outputs: list[dict[str, Any] | None] = [None] * len(rows)
        id_types = sorted({*self.entity_types, *filter(None, [self.hybrid_type])})
        for i, row in enumerate(rows):
            blank = [t for t in id_types if not _text(row.cells.get(t))]
            if blank:
                errors[i] = f"no {' or '.join(blank)} id"
        stored = await self._read(rows, errors)
        inputs: list[list[float]] = []
        scored: list[int] = []
        for i, row in enumerate(rows):
            if errors[i] is not None:
                continue
            try:
                vector, _, _ = assemble_row(
                    self.plan.refs,
                    stored[i],
                    {n: _number(row.cells.get(n), n) for n in self.request_names},
                    _facts(row.cells),
                    model_version=self.version_name,
                    allow_non_finite=self.plan.allow_non_finite,
                )
            except (ModelServeError, ValueError) as exc:
                errors[i] = str(exc)
                continue
            inputs.append(vector)
            scored.append(i)
        computed_at = self.clock()
        written = 0
        if inputs:
            try:
                arrays = await self._infer(inputs)
            except InvalidArgumentError as exc:
                # The batch's data refused; inference being down or slow (UNAVAILABLE,
                # DEADLINE_EXCEEDED) or the version not served stops the job instead.
                for i in scored:
                    errors[i] = f"inference: {exc}"
            else:
                for k, i in enumerate(scored):
                    outputs[i] = {name: array[k] for name, array in arrays.items()}
                if self.precomputed is not None and self.hybrid_type is not None:
                    written = await write_precomputed(
                        self.precomputed,
                        endpoint=self.endpoint,
                        entity_type=self.hybrid_type,
                        model_version=self.version_name,
                        entity_ids=[str(rows[i].cells[self.hybrid_type]) for i in scored],
                        outputs=arrays,
                        computed_at=computed_at,
                        ttl_s=self.ttl_s,
                    )
        return Scored(rows, outputs, errors, computed_at, written, time.perf_counter() - started)

    async def _read(
        self, rows: list[Row], errors: list[str | None]
    ) -> list[dict[FeatureRef, FeatureResult]]:
        """Each row's stored features, in one read for the whole batch."""
        found: list[dict[FeatureRef, FeatureResult]] = [{} for _ in rows]
        if not self.plan.stored:
            return found
        keys: list[EntityKey] = []
        owners: list[int] = []
        for i, row in enumerate(rows):
            if errors[i] is None:
                for entity_type in self.entity_types:
                    keys.append(EntityKey(entity_type, str(row.cells[entity_type])))
                    owners.append(i)
        if keys:
            for owner, values in zip(
                owners, await self.features.read(keys, self.plan.stored), strict=True
            ):
                found[owner].update(values)
        return found

    async def _infer(self, inputs: list[list[float]]) -> dict[str, npt.NDArray[Any]]:
        array = np.asarray(inputs, dtype=self.plan.input_dtype)
        response = await self.inference.infer(
            inference_pb.InferRequest(
                name=self.version_name,
                inputs=[numpy_to_tensor(self.plan.input_name, array)],
                output_names=list(self.plan.output_names),
            )
        )
        raw = {t.name: np.asarray(tensor_to_numpy(t)) for t in response.outputs}
        return conform_outputs(raw, self.plan.output_shapes)


def _text(value: object) -> str:
    return "" if value is None else str(value).strip()


def _number(value: object, name: str) -> float | None:
    """A request feature's cell as a number; None when empty."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        return float(value)
    try:
        return float(str(value))
    except ValueError:
        raise ValueError(f"features.{name}: {value!r} is not a number") from None


def _facts(cells: Mapping[str, Any]) -> RequestFacts:
    raw = cells.get("event_time")
    if isinstance(raw, datetime):
        event_time = raw if raw.tzinfo else raw.replace(tzinfo=UTC)
    elif raw is None or raw == "":
        event_time = datetime.now(UTC)
    elif isinstance(raw, int | float):
        event_time = datetime.fromtimestamp(float(raw), UTC)
    else:
        text = str(raw).strip()
        try:
            event_time = datetime.fromtimestamp(float(text), UTC)
        except ValueError:
            try:
                event_time = datetime.fromisoformat(text)
            except ValueError:
                raise ValueError(f"event_time: {raw!r} is not ISO-8601 or epoch seconds") from None
        if event_time.tzinfo is None:
            event_time = event_time.replace(tzinfo=UTC)
    return RequestFacts(
        event_time=event_time,
        user_agent=_text(cells.get("user_agent")),
        query=_text(cells.get("query")),
    )


def _take(
    scored: Scored,
    summary: BatchSummary,
    writer: _Writer | None,
    on_batch: Callable[[int, float], None] | None,
) -> None:
    for row, error in zip(scored.rows, scored.errors, strict=True):
        if error is None:
            summary.scored += 1
        else:
            summary.failed += 1
            if len(summary.errors) < 10:
                summary.errors.append(f"row {row.index}: {error}")
    summary.precomputed += scored.precomputed
    if writer is not None:
        writer.write(scored)
    if on_batch is not None:
        on_batch(len(scored.rows), scored.seconds)


class _Writer:
    """The output table: the rows' entity ids, the version, when, each output, and the error."""

    def __init__(
        self,
        path: Path,
        id_columns: Sequence[str],
        outputs: Sequence[tensor_pb2.TensorSpec],
        version: str,
    ) -> None:
        self._ids = list(id_columns)
        # Each output: its name, and whether a row's value is a list (rank above 1).
        self._outputs = [(o.name, len(o.shape) > 1) for o in outputs]
        self._version = version
        self._csv = path.suffix.lower() == ".csv"
        if not self._csv and path.suffix.lower() not in (".parquet", ".pq"):
            raise JobError(f"{path}: the output must be .parquet or .csv")
        fields = [pa.field(c, pa.string()) for c in self._ids]
        fields += [
            pa.field(MODEL_VERSION_COLUMN, pa.string()),
            pa.field(COMPUTED_AT_COLUMN, pa.timestamp("us", tz="UTC")),
        ]
        for spec in outputs:
            value = pa.from_numpy_dtype(DTYPES.get(spec.datatype, np.dtype(np.float32)))
            if len(spec.shape) > 1:
                value = pa.string() if self._csv else pa.list_(value)
            fields.append(pa.field(spec.name, value))
        fields.append(pa.field(ERROR_COLUMN, pa.string()))
        self._schema = pa.schema(fields)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._sink: pa_csv.CSVWriter | pq.ParquetWriter = (
            pa_csv.CSVWriter(path, self._schema)
            if self._csv
            else pq.ParquetWriter(path, self._schema)
        )

    def write(self, scored: Scored) -> None:
        columns: dict[str, list[Any]] = {
            c: [None if r.cells.get(c) is None else str(r.cells[c]) for r in scored.rows]
            for c in self._ids
        }
        ok = [o is not None for o in scored.outputs]
        columns[MODEL_VERSION_COLUMN] = [self._version if k else None for k in ok]
        columns[COMPUTED_AT_COLUMN] = [scored.computed_at if k else None for k in ok]
        for name, is_list in self._outputs:
            values: list[Any] = []
            for outputs in scored.outputs:
                if outputs is None:
                    values.append(None)
                    continue
                value = np.asarray(outputs[name])
                if is_list:
                    flat = value.reshape(-1).tolist()
                    values.append(json.dumps(flat) if self._csv else flat)
                else:
                    values.append(value.reshape(-1)[0].item())
            columns[name] = values
        columns[ERROR_COLUMN] = list(scored.errors)
        self._sink.write_table(pa.table(columns, schema=self._schema))

    def close(self) -> None:
        self._sink.close()


@dataclass(slots=True)
class JobClients:
    """What a scoring job calls: the registry, inference, the feature store and its Redis."""

    registry: RegistryClient
    inference: InferenceClient
    features: OnlineStore
    redis: RedisClient


class JobConnection:
    """Opens a job's clients from the command line's addresses (TLS as `cli_tls` says) and
    closes them all: `async with JobConnection(...) as clients`.

    Redis is the router's (`redis_url`, else the router's settings: `redis_targets`); the
    feature store is at `feature_redis_url`, else where the feature service's settings say,
    else in the router's Redis. ConfigError when those settings cannot work.
    """

    def __init__(
        self,
        registry: str,
        inference: str,
        redis_url: str | None,
        feature_redis_url: str | None,
        api_key: str | None,
        timeout_s: float,
    ) -> None:
        router_redis = service_redis("router", redis_url, timeout_s=timeout_s)
        feature_redis = (
            service_redis("feature", feature_redis_url, timeout_s=timeout_s)
            if feature_redis_url is not None or configured("feature")
            else None
        )
        tls = cli_tls()
        self._channels = [
            create_channel(target, default_timeout_s=timeout_s, api_key=api_key, tls=tls)
            for target in (registry, inference)
        ]
        self._redis = connect(router_redis)
        self._feature_redis = self._redis if feature_redis is None else connect(feature_redis)
        self._timeout_s = timeout_s

    async def __aenter__(self) -> JobClients:
        registry_channel, inference_channel = self._channels
        return JobClients(
            registry=RegistryClient(registry_channel),
            inference=InferenceClient(inference_channel, timeout_s=self._timeout_s),
            features=OnlineStore(self._feature_redis, timeout_s=self._timeout_s),
            redis=self._redis,
        )

    async def __aexit__(self, *exc: object) -> None:
        for channel in self._channels:
            await channel.close()
        await self._redis.aclose()
        if self._feature_redis is not self._redis:
            await self._feature_redis.aclose()


def batch_predict_command(
    endpoint: str = typer.Argument(..., help="The deployment whose model scores the rows."),
    input_path: Path = typer.Argument(..., help="The table to score: a Parquet or CSV file."),
    output: Path | None = typer.Option(
        None, "--output", "-o", help="Where predictions go (.parquet or .csv; {shard} expands)."
    ),
    version: str | None = typer.Option(
        None, "--version", help="models/{model}/versions/{n} (default: the largest share)."
    ),
    fmt: TableFormat | None = typer.Option(
        None, "--format", help="The input's format, parquet or csv (default: its extension)."
    ),
    batch_rows: int = typer.Option(256, min=1, help="Rows per Infer call."),
    in_flight: int = typer.Option(4, min=1, help="Batches scored at once."),
    shard: int = typer.Option(
        0,
        envvar="JOB_COMPLETION_INDEX",
        help="This run's shard (a Kubernetes Indexed Job's index).",
    ),
    shards: int = typer.Option(1, min=1, help="How many shards the table is split into."),
    precompute: bool | None = typer.Option(
        None,
        "--precompute/--no-precompute",
        help="Write predictions to Redis for the hybrid lookup (default: when it is on).",
        show_default=False,
    ),
    precompute_ttl_s: float | None = typer.Option(
        None, help="Seconds each written prediction is kept (default: until overwritten)."
    ),
    registry: str = typer.Option(
        ..., envvar="MODELSERVE_REGISTRY", help="The registry's host:port."
    ),
    inference: str = typer.Option(
        ..., envvar="MODELSERVE_INFERENCE", help="The inference service's host:port."
    ),
    redis_url: RouterRedisUrl = None,
    feature_redis_url: FeatureRedisUrl = None,
    api_key: str | None = typer.Option(
        None, envvar="MODELSERVE_API_KEY", help="API key, when the services have auth on."
    ),
    timeout_s: float = typer.Option(60.0, help="Deadline of each call to a service."),
) -> None:
    """Score a table through the inference service in batches; write each prediction to a
    file and, for a hybrid endpoint, to Redis. Exit 1 when the job cannot run (nothing is
    written) or Redis or inference fail part way, 2 when some rows could not be scored (each
    is in the output with its error)."""
    job = BatchJob(
        endpoint=endpoint,
        input_path=input_path,
        output_path=output,
        fmt=fmt,
        model_version=version,
        batch_rows=batch_rows,
        in_flight=in_flight,
        shard=shard,
        shards=shards,
        precompute=precompute,
        precompute_ttl_s=precompute_ttl_s,
    )

    async def work(progress: Progress) -> BatchSummary:
        task = progress.add_task("rows scored", total=None)
        connection = JobConnection(
            registry, inference, redis_url, feature_redis_url, api_key, timeout_s
        )
        async with connection as clients:
            return await run_batch(
                job,
                registry=clients.registry,
                inference=clients.inference,
                features=clients.features,
                precomputed=clients.redis,
                on_batch=lambda rows, _seconds: progress.update(task, advance=rows),
            )

    progress = Progress(
        "[progress.description]{task.description}",
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )
    try:
        with progress:
            summary = asyncio.run(work(progress))
    except (
        ConfigError,
        JobError,
        ModelServeError,
        redis.RedisError,
        OSError,
        pa.ArrowException,
    ) as exc:
        fail(str(exc))
    table = Table(title=f"batch predictions of {endpoint} by {summary.model_version}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("rows read (this shard)", f"{summary.rows}")
    table.add_row("scored", f"{summary.scored}")
    table.add_row("failed", f"{summary.failed}")
    table.add_row("written for the hybrid lookup", f"{summary.precomputed}")
    table.add_row("output", str(summary.output_path or "-"))
    table.add_row("seconds", f"{summary.seconds:.2f}")
    table.add_row("rows/s", f"{summary.rows / max(summary.seconds, 1e-9):,.0f}")
    console.print(table)
    for line in summary.errors:
        errors.print(line, highlight=False, markup=False)
    if summary.failed:
        raise typer.Exit(2)
