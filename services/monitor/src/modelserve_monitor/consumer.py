"""Reads the prediction log stream in a consumer group and counts each record in the store."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence, Set
from typing import Any

import redis.asyncio as redis
import structlog
from google.protobuf.message import DecodeError
from prometheus_client import Counter

from modelserve_monitor.aggregate import RecordContribution, contribution
from modelserve_monitor.monitor import Clock
from modelserve_monitor.store import AggregateStore
from modelserve_runtime.prediction_log import decode_record
from modelserve_runtime.waiting import wait_for_notify

log = structlog.get_logger()

RECORDS_READ = Counter(
    "modelserve_monitor_records_total",
    "Prediction log entries read, by outcome (counted, duplicate, malformed, refused: Redis"
    " refused to count it).",
    ["outcome"],
)

#: Entries never delivered to the group.
_NEW = ">"
_MAX_BACKOFF_S = 5.0

Entry = tuple[bytes, Mapping[bytes, bytes] | None]
#: Told the (endpoint, version) pairs of every batch counted.
VersionsObserver = Callable[[Set[tuple[str, str]]], None]


def _stream_id(raw: bytes | str) -> tuple[int, int]:
    text = raw.decode() if isinstance(raw, bytes) else raw
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


class PredictionLogConsumer:
    """Reads the stream in a consumer group; counts and acknowledges each batch atomically.

    A batch is counted and acknowledged by one Lua script (`AggregateStore.count_and_ack`),
    which skips records counted before, so a record is counted exactly once however often
    it is delivered. After a Redis error the consumer first re-reads its own unacknowledged
    entries; every `claim_min_idle_ms` it also claims (XAUTOCLAIM) entries that another
    consumer of the group left unacknowledged for that long, for example because it was
    killed. A malformed entry is logged, counted in `malformed` and acknowledged, so it
    cannot stop the stream. `on_versions` is told the (endpoint, version) pairs of each
    batch once it is counted (the baseline resolver learns of new versions that way).
    """

    def __init__(
        self,
        client: redis.Redis,
        store: AggregateStore,
        *,
        stream: str,
        group: str,
        consumer: str,
        block_ms: int,
        batch_size: int,
        claim_min_idle_ms: int,
        clock: Clock = time.time,
        on_versions: VersionsObserver | None = None,
    ) -> None:
        self._redis = client
        self._on_versions = on_versions
        self._store = store
        self._clock = clock
        self._claim_min_idle_ms = claim_min_idle_ms
        self._next_claim_s = 0.0
        self._stream = stream
        self._group = group
        self._consumer = consumer
        self._block_ms = block_ms
        self._batch_size = batch_size
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._progress = asyncio.Condition()
        self.malformed = 0
        self.duplicates = 0
        self.claimed = 0
        self.refused = 0
        """Entries acknowledged uncounted because Redis refused their counters (see `_handle`)."""

    async def ensure_group(self) -> None:
        """Creates the group, and the stream, when missing; a new group reads from the start."""
        try:
            await self._redis.xgroup_create(self._stream, self._group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if not str(exc).startswith("BUSYGROUP"):
                raise
        else:
            log.info("consumer_group_created", stream=self._stream, group=self._group)

    def start(self) -> None:
        """Starts reading in a background task (once)."""
        if self._task is None:
            self._stopping = False
            self._task = asyncio.create_task(self.run(), name="prediction-log-consumer")

    async def close(self) -> None:
        """Stops the background task and waits for it to end."""
        task, self._task = self._task, None
        if task is None:
            return
        # On Python 3.11, redis-py can swallow a cancellation (its socket writes go through
        # asyncio.wait_for), so the loop also stops when it sees `_stopping`.
        self._stopping = True
        task.cancel()
        await asyncio.wait({task})
        if not task.cancelled() and task.exception() is not None:
            log.error("prediction_log_consumer_crashed", error=str(task.exception()))

    async def run(self) -> None:
        """Reads until closed; Redis errors are logged and retried with a growing pause."""
        backoff_s = 0.1
        recovering = True
        while not self._stopping:
            try:
                if recovering:
                    await self.ensure_group()
                    await self._read_pending()
                    recovering = False
                if time.monotonic() >= self._next_claim_s:
                    await self.claim_stale()
                await self._read_batch(_NEW, block_ms=self._block_ms)
                backoff_s = 0.1
            except redis.RedisError as exc:
                # A lost connection, or NOGROUP when the stream was deleted: start over from
                # the group and this consumer's own pending entries.
                log.warning("prediction_log_read_failed", retry_in_s=backoff_s, error=str(exc))
                recovering = True
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, _MAX_BACKOFF_S)
            except Exception:
                # A bug must not silence the monitor; the traceback goes to the log.
                log.exception("prediction_log_consumer_failed", retry_in_s=backoff_s)
                recovering = True
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, _MAX_BACKOFF_S)

    async def process_available(self) -> int:
        """Counts every entry waiting for this consumer, without blocking; returns how many.

        That is its own unacknowledged entries, those that other consumers left idle for
        `claim_min_idle_ms`, and new ones.
        """
        handled = await self._read_pending()
        handled += await self.claim_stale()
        while batch := await self._read_batch(_NEW, block_ms=None):
            handled += len(batch)
        return handled

    async def drain(self, timeout_s: float = 10.0) -> None:
        """Returns once every entry appended before the call is aggregated and acknowledged.

        Waits by asking Redis after each batch (or each `block_ms`) rather than by sleeping;
        TimeoutError after `timeout_s`.
        """
        newest = await self._redis.xrevrange(self._stream, count=1)
        target = newest[0][0] if newest else None
        if target is None:
            return
        async with asyncio.timeout(timeout_s):
            while not await self._handled_up_to(target):
                if self._task is None and await self.process_available():
                    continue
                async with self._progress:
                    await wait_for_notify(self._progress, self._block_ms / 1000)

    async def _handled_up_to(self, target: bytes | str) -> bool:
        """True when the group has delivered `target` and holds nothing pending up to it."""
        groups: Sequence[Mapping[str, Any]] = await self._redis.xinfo_groups(self._stream)
        group = next((g for g in groups if _as_str(g["name"]) == self._group), None)
        if group is None or _stream_id(group["last-delivered-id"]) < _stream_id(target):
            return False
        pending = await self._redis.xpending_range(
            self._stream, self._group, min="-", max=target, count=1
        )
        return not pending

    async def _read_pending(self) -> int:
        """Re-reads this consumer's unacknowledged entries, oldest first; returns how many.

        Each read starts after the last entry of the one before, so the pass ends even
        when an entry stays pending.
        """
        handled, after = 0, b"0"
        while batch := await self._read_batch(after, block_ms=None):
            handled += len(batch)
            after = batch[-1]
        return handled

    async def claim_stale(self) -> int:
        """Claims and counts entries other consumers left unacknowledged; returns how many."""
        self._next_claim_s = time.monotonic() + self._claim_min_idle_ms / 1000
        handled, cursor = 0, b"0-0"
        while True:
            response: Any = await self._redis.xautoclaim(
                self._stream,
                self._group,
                self._consumer,
                min_idle_time=self._claim_min_idle_ms,
                start_id=cursor,
                count=self._batch_size,
            )
            cursor, entries = response[0], list(response[1])
            if entries:
                self.claimed += len(entries)
                log.info("prediction_log_entries_claimed", count=len(entries))
                await self._handle(entries)
                handled += len(entries)
            if _stream_id(cursor) == (0, 0):
                return handled

    async def _read_batch(self, start_id: str | bytes, *, block_ms: int | None) -> list[bytes]:
        """Reads one batch after `start_id`, counts and acknowledges it; returns its ids."""
        response: Any = await self._redis.xreadgroup(
            self._group,
            self._consumer,
            {self._stream: start_id},
            count=self._batch_size,
            block=block_ms,
        )
        entries = _entries(response)
        if not entries:
            return []
        await self._handle(entries)
        return [entry_id for entry_id, _ in entries]

    async def _handle(self, entries: list[Entry]) -> None:
        parts = [(entry_id, self._contribution(entry_id, fields)) for entry_id, fields in entries]
        records = sum(1 for _, part in parts if part is not None)
        try:
            counted = await self._store.count_and_ack(
                stream=self._stream, group=self._group, entries=parts, now=self._clock()
            )
        except redis.ResponseError as exc:
            if not _refuses_the_data(exc):
                raise
            # Redis answered, refusing what this batch asks of it (a key of the monitor's
            # that something else overwrote with another kind of value, a counter that
            # cannot take the increment): the same batch would fail again on every retry and
            # stop all counting. Each entry is counted on its own, and the ones Redis still
            # refuses are acknowledged uncounted, counted as refused and logged.
            counted, refused = await self._handle_one_by_one(parts)
            records -= refused
        self.duplicates += records - counted
        if self._on_versions is not None:
            self._on_versions(
                {(part.endpoint, part.model_version) for _, part in parts if part is not None}
            )
        RECORDS_READ.labels("counted").inc(counted)
        RECORDS_READ.labels("duplicate").inc(records - counted)
        async with self._progress:
            self._progress.notify_all()

    async def _handle_one_by_one(
        self, parts: list[tuple[bytes, RecordContribution | None]]
    ) -> tuple[int, int]:
        """Counts and acknowledges each entry on its own; (records counted, records refused)."""
        counted = refused = 0
        for entry_id, part in parts:
            try:
                counted += await self._store.count_and_ack(
                    stream=self._stream,
                    group=self._group,
                    entries=[(entry_id, part)],
                    now=self._clock(),
                )
            except redis.ResponseError as exc:
                if not _refuses_the_data(exc):
                    raise
                await self._redis.xack(self._stream, self._group, entry_id)
                self.refused += 1
                refused += part is not None
                RECORDS_READ.labels("refused").inc()
                log.error(
                    "prediction_record_refused_by_redis",
                    entry_id=entry_id.decode(),
                    endpoint=part.endpoint if part is not None else None,
                    model_version=part.model_version if part is not None else None,
                    error=str(exc),
                )
        return counted, refused

    def _contribution(
        self, entry_id: bytes, fields: Mapping[bytes, bytes] | None
    ) -> RecordContribution | None:
        try:
            if fields is None:
                raise ValueError("entry was deleted from the stream before it was read")
            return contribution(decode_record(fields), entry_id.decode())
        except (ValueError, DecodeError) as exc:
            self.malformed += 1
            RECORDS_READ.labels("malformed").inc()
            log.warning("prediction_record_malformed", entry_id=entry_id.decode(), error=str(exc))
            return None


#: What Redis says when the data of one batch, not Redis, is at fault: a key of the monitor's
#: that holds another kind of value, a counter that cannot take the increment.
_DATA_REFUSALS = (
    "WRONGTYPE",
    "value is not",
    "hash value is not",
    "increment",
)


def _refuses_the_data(error: redis.ResponseError) -> bool:
    """Whether Redis refused this batch's data. Any other refusal (out of memory, a read-only
    replica, missing permissions, a failing script) is Redis's or the monitor's state: the
    batch is retried whole and its records wait in the stream, uncounted, until it passes."""
    # redis-py drops the generic `ERR ` of a reply; a script's error keeps Redis's words.
    message = str(error).removeprefix("ERR ")
    return type(error) is redis.ResponseError and message.startswith(_DATA_REFUSALS)


def _entries(response: Any) -> list[Entry]:
    """The entries of a one-stream XREADGROUP reply, in RESP2 or RESP3 shape."""
    if not response:
        return []
    if isinstance(response, Mapping):
        return [(entry_id, fields) for entry_id, fields in next(iter(response.values()))]
    return list(response[0][1])


def _as_str(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
