"""Streaming predictions: a worker that reads events from a Redis Stream as a member of a
consumer group, scores them in batches as the router scores a request (the batch job's
scorer), appends each result to an output stream and acknowledges the event only then.

Delivery is at least once, and the event id makes a retry idempotent: the result and the
acknowledgement go in one script call that appends only when the event's result was not
already appended (a `{output_stream}:done:{event_id}` key, kept `dedup_ttl_s`). A worker that
dies between reading and acknowledging leaves its events pending: it takes them again when it
restarts (same consumer name), and any worker of the group claims them once they have been
idle `claim_idle_ms`.

An event's fields are what a batch table's columns are: one per entity type (`customer`), one
per request feature (`amount`), and optionally `event_time`, `user_agent` and `query`. Its
result has `event_id`, the entity ids, `model_version`, `computed_at` (ISO-8601), each output
as JSON, and `error` for an event that cannot be scored (acknowledged all the same, so a bad
event is not retried forever). Inference or Redis failing leaves the batch pending and the
worker tries again after `retry_s`.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import redis.asyncio as redis
import structlog
import typer
from redis.asyncio import RedisCluster

from modelserve_cli.batch import (
    JobConnection,
    JobError,
    Resolved,
    Row,
    RowScorer,
    Scored,
    resolve,
)
from modelserve_cli.output import errors, fail
from modelserve_cli.redis_targets import FeatureRedisUrl, RouterRedisUrl
from modelserve_features.online import OnlineStore
from modelserve_runtime.clients import InferenceClient, RegistryClient
from modelserve_runtime.config import ConfigError
from modelserve_runtime.errors import ModelServeError
from modelserve_runtime.redis_connect import RedisClient
from modelserve_runtime.waiting import wait_until_set

log = structlog.get_logger()

#: KEYS: output stream, the event's done key, input stream. ARGV: group, event id, done ttl
#: (s), output max length (approximate), then the result's fields and values. Appends the
#: result unless the event's was appended before, and acknowledges the event either way.
_PUBLISH = """
local appended = 0
if redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[3]) then
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[4], '*', unpack(ARGV, 5))
  appended = 1
end
redis.call('XACK', KEYS[3], ARGV[1], ARGV[2])
return appended
"""


def default_consumer() -> str:
    """`host-pid`: unique per worker, and the same for a worker restarted in place only when
    its pid is; pass `--consumer` (a pod's name, say) to take back a dead worker's events."""
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True, slots=True)
class StreamJob:
    """What a streaming worker reads, scores with, and writes."""

    endpoint: str
    input_stream: str
    output_stream: str
    group: str = "modelserve"
    consumer: str = field(default_factory=default_consumer)
    model_version: str | None = None
    """The version to score with; None: the deployment's largest share, looked up again every
    `refresh_s`, so the worker follows the deployment."""
    batch_events: int = 64
    """Events read and scored together."""
    block_ms: int = 1000
    """How long one read waits for new events; 0: it does not wait."""
    claim_idle_ms: int = 60_000
    """Another consumer's pending event idle this long is taken over."""
    output_max_len: int = 1_000_000
    """The output stream is trimmed to about this many results."""
    dedup_ttl_s: int = 86_400
    """How long an event's result is remembered as appended."""
    start_id: str = "$"
    """Where a new group starts: `$` (events added from now on) or `0` (the whole stream)."""
    refresh_s: float = 10.0
    retry_s: float = 1.0
    """Pause after a failed batch before it is tried again."""


@dataclass(slots=True)
class StreamStats:
    """What a worker has done so far."""

    events: int = 0
    scored: int = 0
    failed: int = 0
    """Events answered with an error (acknowledged)."""
    duplicates: int = 0
    """Events whose result had been appended already (a retry): acknowledged, not appended."""
    retries: int = 0
    """Batches left pending after a failure, to be tried again."""


class StreamWorker:
    """One member of the consumer group; `process_once` handles one batch, `run` loops."""

    def __init__(
        self,
        job: StreamJob,
        *,
        registry: RegistryClient,
        inference: InferenceClient,
        features: OnlineStore,
        client: RedisClient,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        if isinstance(client, RedisCluster):
            raise JobError(
                "streaming predictions need one Redis node for the input stream, the output "
                "stream and the acknowledgement (standalone or Sentinel), not a Cluster"
            )
        if job.batch_events < 1 or job.block_ms < 0 or job.claim_idle_ms < 0:
            raise JobError("--batch-events must be at least 1, --block-ms and --claim-idle-ms >= 0")
        self._job = job
        self._registry = registry
        self._inference = inference
        self._features = features
        self._client = client
        self._clock = clock
        self._publish = client.register_script(_PUBLISH)
        self._model: tuple[Resolved, RowScorer] | None = None
        self._refresh_at = 0.0
        self._own_pending = True
        self._claim_at = 0.0
        self.stats = StreamStats()

    async def setup(self) -> None:
        """Creates the group (and the input stream) unless they exist, and resolves the model."""
        try:
            await self._client.xgroup_create(
                self._job.input_stream, self._job.group, id=self._job.start_id, mkstream=True
            )
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        await self._resolve()

    async def _resolve(self) -> tuple[Resolved, RowScorer]:
        """The model to score with and its scorer, looked up again every `refresh_s` unless
        the job names a version."""
        now = time.monotonic()
        model = self._model
        if model is None or (self._job.model_version is None and now >= self._refresh_at):
            resolved = await resolve(
                self._registry, self._features, self._job.endpoint, self._job.model_version
            )
            if model is not None and resolved.version_name != model[0].version_name:
                log.info(
                    "stream_version_changed",
                    endpoint=self._job.endpoint,
                    model_version=resolved.version_name,
                )
            model = self._model = (
                resolved,
                RowScorer(
                    plan=resolved.plan,
                    version_name=resolved.version_name,
                    endpoint=self._job.endpoint,
                    features=self._features,
                    inference=self._inference,
                    precomputed=None,
                    hybrid_type=None,
                    entity_types=resolved.entity_types,
                    request_names=resolved.request_names,
                    ttl_s=None,
                    clock=self._clock,
                ),
            )
            self._refresh_at = now + self._job.refresh_s
        return model

    async def process_once(self) -> int:
        """Reads one batch (this consumer's own pending events first, then others' idle ones,
        then new ones), scores it and publishes it; how many events it handled. A failure
        leaves the batch pending and is raised."""
        entries = await self._next()
        if not entries:
            return 0
        resolved, scorer = await self._resolve()
        rows = [Row(i, _cells(fields)) for i, (_, fields) in enumerate(entries)]
        scored = await scorer.score(rows)
        await self._send([event_id for event_id, _ in entries], scored, resolved)
        return len(entries)

    async def _next(self) -> list[tuple[str, dict[str, str]]]:
        job = self._job
        if self._own_pending:
            # After a restart, what this consumer read and never acknowledged.
            own = await self._read("0")
            if own:
                return own
            self._own_pending = False
        now = time.monotonic()
        if job.claim_idle_ms and now >= self._claim_at:
            claimed: Any = await self._client.xautoclaim(
                job.input_stream,
                job.group,
                job.consumer,
                min_idle_time=job.claim_idle_ms,
                start_id="0-0",
                count=job.batch_events,
            )
            entries = [(i, f) for i, f in claimed[1] if f is not None]
            # Others' idle events are looked for again once a full batch no longer comes
            # back, at most every claim_idle_ms (up to 5 s): not a round trip per batch.
            if len(claimed[1]) < job.batch_events:
                self._claim_at = now + min(job.claim_idle_ms / 1000, 5.0)
            if entries:
                return [(_text(i), _fields(f)) for i, f in entries]
        return await self._read(">", block_ms=job.block_ms or None)

    async def _read(
        self, start: str, *, block_ms: int | None = None
    ) -> list[tuple[str, dict[str, str]]]:
        job = self._job
        answer: Any = await self._client.xreadgroup(
            job.group,
            job.consumer,
            {job.input_stream: start},
            count=job.batch_events,
            block=block_ms,
        )
        if not answer:
            return []
        _, entries = answer[0]
        return [(_text(i), _fields(f)) for i, f in entries if f]

    async def _send(self, event_ids: Sequence[str], scored: Scored, resolved: Resolved) -> None:
        job = self._job
        computed_at = scored.computed_at.isoformat()
        async with self._client.pipeline(transaction=False) as pipe:
            for event_id, row, outputs, error in zip(
                event_ids, scored.rows, scored.outputs, scored.errors, strict=True
            ):
                result: dict[str, str] = {"event_id": event_id}
                for entity_type in resolved.entity_types:
                    result[entity_type] = _text(row.cells.get(entity_type) or "")
                if outputs is not None:
                    result["model_version"] = resolved.version_name
                    result["computed_at"] = computed_at
                    for name, value in outputs.items():
                        result[name] = json.dumps(np.asarray(value).tolist())
                else:
                    result["error"] = error or "not scored"
                args: list[Any] = [job.group, event_id, job.dedup_ttl_s, job.output_max_len]
                for key, value in result.items():
                    args += [key, value]
                await self._publish(
                    keys=[
                        job.output_stream,
                        f"{job.output_stream}:done:{event_id}",
                        job.input_stream,
                    ],
                    args=args,
                    client=pipe,
                )
            appended = await pipe.execute()
        self.stats.events += len(event_ids)
        self.stats.duplicates += sum(1 for a in appended if not a)
        self.stats.failed += sum(1 for e in scored.errors if e is not None)
        self.stats.scored += sum(1 for e in scored.errors if e is None)

    async def run(self, stop: asyncio.Event) -> None:
        """Handles batches until `stop` is set; a failed batch is logged, left pending, and
        tried again after `retry_s`."""
        await self.setup()
        while not stop.is_set():
            try:
                await self.process_once()
            except (ModelServeError, redis.RedisError, OSError) as exc:
                self.stats.retries += 1
                self._own_pending = True
                log.warning("stream_batch_failed", error=str(exc) or type(exc).__name__)
                await wait_until_set(stop, self._job.retry_s)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _fields(raw: Mapping[Any, Any]) -> dict[str, str]:
    return {_text(k): _text(v) for k, v in raw.items()}


def _cells(fields: Mapping[str, str]) -> dict[str, Any]:
    """An event's fields as the scorer reads a table row: empty text is no value."""
    return {k: (None if v == "" else v) for k, v in fields.items()}


def stream_predict_command(
    endpoint: str = typer.Argument(..., help="The deployment whose model scores the events."),
    input_stream: str = typer.Option(..., "--input", help="The stream of events."),
    output_stream: str = typer.Option(..., "--output", help="The stream results go to."),
    group: str = typer.Option("modelserve", help="The consumer group."),
    consumer: str | None = typer.Option(
        None,
        help="This worker's name in the group (default: host-pid); a restarted worker "
        "that keeps its name takes its unacknowledged events back at once.",
    ),
    version: str | None = typer.Option(
        None,
        "--version",
        help="models/{model}/versions/{n} (default: the largest share, followed).",
    ),
    batch_events: int = typer.Option(64, min=1, help="Events scored together."),
    claim_idle_ms: int = typer.Option(
        60_000, min=0, help="Take over others' events idle this long."
    ),
    start_id: str = typer.Option("$", help="Where a new group starts: $ (new events) or 0 (all)."),
    output_max_len: int = typer.Option(
        1_000_000, min=1, help="Trim the output stream to about this."
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
    timeout_s: float = typer.Option(10.0, help="Deadline of each call to a service."),
) -> None:
    """Score the events of a Redis Stream as they come (a consumer group member), appending
    each result to an output stream; runs until SIGTERM or Ctrl-C."""
    job = StreamJob(
        endpoint=endpoint,
        input_stream=input_stream,
        output_stream=output_stream,
        group=group,
        consumer=consumer or default_consumer(),
        model_version=version,
        batch_events=batch_events,
        claim_idle_ms=claim_idle_ms,
        start_id=start_id,
        output_max_len=output_max_len,
    )

    async def work() -> StreamStats:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        connection = JobConnection(
            registry, inference, redis_url, feature_redis_url, api_key, timeout_s
        )
        async with connection as clients:
            worker = StreamWorker(
                job,
                registry=clients.registry,
                inference=clients.inference,
                features=clients.features,
                client=clients.redis,
            )
            await worker.run(stop)
            return worker.stats

    try:
        stats = asyncio.run(work())
    except (ConfigError, JobError, ModelServeError, redis.RedisError, OSError) as exc:
        fail(str(exc))
    errors.print(
        f"stopped: {stats.events} events, {stats.scored} scored, {stats.failed} failed, "
        f"{stats.duplicates} already answered, {stats.retries} batches retried",
        highlight=False,
        markup=False,
    )
