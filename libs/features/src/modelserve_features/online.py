"""Online reads and writes of feature views: statuses, defaults, max age, validation, metrics.

The feature service and the router's direct reader both use `OnlineStore`, so a read answers
the same through either path.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from enum import StrEnum

import redis.asyncio as redis
from redis.exceptions import AuthenticationError, RedisClusterException

from modelserve_features import metrics
from modelserve_features.catalog import ApplyResult, ViewCatalog
from modelserve_features.redis_store import (
    EntityKey,
    RedisFeatureStore,
    ViewsChangedError,
    decode_value,
    encode_value,
    redis_key,
)
from modelserve_features.views import FeatureRef, FeatureView, Value, value_problem
from modelserve_runtime.errors import (
    FailedPreconditionError,
    FieldViolation,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
)
from modelserve_runtime.redis_connect import RedisClient, ping

_WRITE_ATTEMPTS = 3
#: Most field violations one error carries: its details travel in gRPC trailers, which
#: are limited to 16 KiB, and the first few are what a caller acts on.
MAX_VIOLATIONS = 20


def refused(violations: Sequence[FieldViolation]) -> InvalidArgumentError:
    """An InvalidArgumentError with the first MAX_VIOLATIONS violations, saying how many
    more there were."""
    shown = list(violations[:MAX_VIOLATIONS])
    message = "; ".join(f"{v.field}: {v.description}" for v in shown)
    if len(violations) > len(shown):
        message += f"; and {len(violations) - len(shown)} more"
    return InvalidArgumentError(message, violations=shown)


def now_us() -> int:
    """Wall-clock time in microseconds since the epoch."""
    return time.time_ns() // 1000


class FeatureStatus(StrEnum):
    """Where a read value came from."""

    PRESENT = "present"
    """Stored and within the view's max age."""
    MISSING = "missing"
    """Not stored, and the feature has no default: no value."""
    EXPIRED = "expired"
    """Stored but older than the view's max age: the default (or no value)."""
    DEFAULTED = "defaulted"
    """Not stored: the feature's default."""


@dataclass(frozen=True, slots=True)
class FeatureResult:
    """One read value, its status and, when stored, its event time."""

    value: Value | None
    status: FeatureStatus
    event_time_us: int | None = None


@dataclass(frozen=True, slots=True)
class FeatureWrite:
    """Values of one entity in one view, true at `event_time_us` (None: now)."""

    entity: EntityKey
    view: str
    values: Mapping[str, Value | None]
    event_time_us: int | None = None


@dataclass(frozen=True, slots=True)
class WriteResult:
    """What a write stored."""

    written: int
    stale: int


class _Cache:
    """Decoded hashes by Redis key for `ttl_s`, at most `max_entries` (least recently used go)."""

    def __init__(self, ttl_s: float, max_entries: int) -> None:
        self.ttl_s = ttl_s
        self._max = max_entries
        self._entries: OrderedDict[str, tuple[float, dict[bytes, bytes]]] = OrderedDict()

    def get(self, key: str, now: float) -> dict[bytes, bytes] | None:
        entry = self._entries.get(key)
        if entry is None or entry[0] <= now:
            metrics.CACHE.labels("miss").inc()
            return None
        self._entries.move_to_end(key)
        metrics.CACHE.labels("hit").inc()
        return entry[1]

    def put(self, key: str, stored: dict[bytes, bytes], now: float) -> None:
        self._entries[key] = (now + self.ttl_s, stored)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    def drop(self, keys: Sequence[str]) -> None:
        for key in keys:
            self._entries.pop(key, None)


class OnlineStore:
    """Feature views and their values in Redis; reads and writes are one round trip each
    (plus one to reload the views after they changed)."""

    def __init__(
        self,
        client: RedisClient,
        *,
        timeout_s: float = 1.0,
        cache_ttl_s: float = 0.0,
        cache_max_entries: int = 100_000,
        clock_us: Callable[[], int] = now_us,
    ) -> None:
        self._store = RedisFeatureStore(client)
        self.catalog = ViewCatalog(client, clock_us=clock_us)
        self._timeout_s = timeout_s
        self._clock_us = clock_us
        self._cache = _Cache(cache_ttl_s, cache_max_entries) if cache_ttl_s > 0 else None

    @asynccontextmanager
    async def redis_call(self, op: str, timeout_s: float | None = None) -> AsyncIterator[None]:
        """Bounds a Redis call by the store's timeout and the caller's remaining time (the
        smaller), times it, and turns a Redis failure or timeout into UnavailableError."""
        # A tenth of the caller's time is kept back so that it hears UNAVAILABLE from us
        # rather than DEADLINE_EXCEEDED from its own clock.
        limit = self._timeout_s if timeout_s is None else min(self._timeout_s, 0.9 * timeout_s)
        limit = max(0.0, limit)
        started = time.perf_counter()
        try:
            async with asyncio.timeout(limit):
                yield
        except AuthenticationError as exc:
            raise UnavailableError(
                f"redis refused the credentials ({op}): {exc}; check the username and password",
                reason="REDIS_AUTH_FAILED",
                metadata={"operation": op},
            ) from exc
        except (redis.RedisError, RedisClusterException, TimeoutError, OSError) as exc:
            raise UnavailableError(
                f"redis did not answer ({op}): {exc or type(exc).__name__}",
                reason="REDIS_UNAVAILABLE",
                metadata={"operation": op},
            ) from exc
        finally:
            metrics.REDIS_LATENCY.labels(op).observe(time.perf_counter() - started)

    async def ping(self, timeout_s: float | None = None) -> None:
        """Returns when Redis (in a cluster: every primary) answers PING; UnavailableError
        otherwise."""
        async with self.redis_call("ping", timeout_s):
            await ping(self._store.client)

    async def views(
        self, names: Sequence[str], *, timeout_s: float | None = None
    ) -> dict[str, FeatureView]:
        """The named views (NotFoundError naming the first unknown one)."""
        async with self.redis_call("views", timeout_s):
            return await self.catalog.views(names)

    async def apply_view(self, view: FeatureView, *, force: bool = False) -> ApplyResult:
        """Creates or changes a view (see ViewCatalog.apply)."""
        async with self.redis_call("views"):
            return await self.catalog.apply(view, force=force)

    async def get_view(self, name: str, version: int = 0) -> FeatureView:
        """A view's current definition, or an earlier version."""
        async with self.redis_call("views"):
            return await self.catalog.get(name, version)

    async def list_views(self) -> list[FeatureView]:
        """Every view, by name."""
        async with self.redis_call("views"):
            return await self.catalog.list()

    async def delete_view(self, name: str) -> None:
        """Removes a view's definition."""
        async with self.redis_call("views"):
            await self.catalog.delete(name)

    async def read(
        self,
        entities: Sequence[EntityKey],
        refs: Sequence[FeatureRef],
        *,
        timeout_s: float | None = None,
    ) -> list[dict[FeatureRef, FeatureResult]]:
        """For each entity, every ref whose view's entity type is the entity's type.

        NotFoundError names an unknown view or feature; InvalidArgumentError a ref whose
        view has no entity of its type among `entities`; UnavailableError when Redis fails.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        for _ in range(2):
            views = await self.views(sorted({r.view for r in refs}), timeout_s=_left(deadline))
            self._check_refs(entities, refs, views)
            pairs = [
                (i, view)
                for i, entity in enumerate(entities)
                for view in views.values()
                if view.entity_type == entity.entity_type
            ]
            keys = [redis_key(entities[i], view.name) for i, view in pairs]
            stored = await self._fetch(keys, deadline)
            if stored is not None:
                return self._resolve(entities, refs, views, pairs, stored)
        raise UnavailableError(
            "feature views kept changing during the read", reason="FEATURE_VIEWS_CHANGING"
        )

    def _check_refs(
        self,
        entities: Sequence[EntityKey],
        refs: Sequence[FeatureRef],
        views: Mapping[str, FeatureView],
    ) -> None:
        types = {e.entity_type for e in entities}
        violations: list[FieldViolation] = []
        for i, ref in enumerate(refs):
            view = views[ref.view]
            if view.feature(ref.name) is None:
                raise NotFoundError(
                    f"feature {str(ref)!r} does not exist: view {view.name!r} (version "
                    f"{view.version}) has no feature {ref.name!r}",
                    reason="FEATURE_NOT_FOUND",
                    metadata={"feature_view": view.name, "feature": ref.name},
                )
            if view.entity_type not in types:
                violations.append(
                    FieldViolation(
                        f"features[{i}]",
                        f"view {view.name!r} is keyed by {view.entity_type!r} entities and "
                        "the request has none",
                    )
                )
        if violations:
            raise refused(violations)

    async def _fetch(
        self, keys: Sequence[str], deadline: float | None
    ) -> dict[str, dict[bytes, bytes]] | None:
        """The hashes by key, from the cache or one pipeline; None when the views changed."""
        found: dict[str, dict[bytes, bytes]] = {}
        wanted = list(dict.fromkeys(keys))
        now = time.monotonic()
        if self._cache is not None:
            for key in wanted:
                hit = self._cache.get(key, now)
                if hit is not None:
                    found[key] = hit
            wanted = [k for k in wanted if k not in found]
            if not wanted:
                return found
        async with self.redis_call("read", _left(deadline)):
            epoch, hashes = await self._store.read(wanted)
        async with self.redis_call("views", _left(deadline)):
            if await self.catalog.refresh_if(epoch):
                return None
        for key, stored in zip(wanted, hashes, strict=True):
            found[key] = stored
            if self._cache is not None:
                self._cache.put(key, stored, now)
        return found

    def _resolve(
        self,
        entities: Sequence[EntityKey],
        refs: Sequence[FeatureRef],
        views: Mapping[str, FeatureView],
        pairs: Sequence[tuple[int, FeatureView]],
        stored: Mapping[str, dict[bytes, bytes]],
    ) -> list[dict[FeatureRef, FeatureResult]]:
        now = self._clock_us()
        rows: list[dict[FeatureRef, FeatureResult]] = [{} for _ in entities]
        by_view: dict[str, list[FeatureRef]] = {}
        for ref in refs:
            by_view.setdefault(ref.view, []).append(ref)
        counts: dict[tuple[str, FeatureStatus], int] = {}
        for i, view in pairs:
            values = stored[redis_key(entities[i], view.name)]
            max_age_us = int(view.max_age_s * 1e6)
            metrics.ENTITIES.labels(view.name).inc()
            for ref in by_view[view.name]:
                result = _result(view, ref.name, values.get(ref.name.encode()), now, max_age_us)
                rows[i][ref] = result
                counts[view.name, result.status] = counts.get((view.name, result.status), 0) + 1
        for name in views:
            metrics.READS.labels(name).inc()
        for (name, status), count in counts.items():
            metrics.VALUES.labels(name, status.value).inc(count)
        return rows

    async def write(
        self, writes: Sequence[FeatureWrite], *, timeout_s: float | None = None
    ) -> WriteResult:
        """Validates every value against its view and writes the batch in one script call:
        all of it or, when any value is bad, nothing (InvalidArgumentError naming each).
        A stored value with a later event time than the written one is kept."""
        if not writes:
            raise InvalidArgumentError.for_field("writes", "at least one write is required")
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        for _ in range(_WRITE_ATTEMPTS):
            views = await self.views(sorted({w.view for w in writes}), timeout_s=_left(deadline))
            batch = self._encode(writes, views)
            try:
                async with self.redis_call("write", _left(deadline)):
                    counts = await self._store.write(self.catalog.epoch or "0", batch)
            except ViewsChangedError:
                async with self.redis_call("views", _left(deadline)):
                    await self.catalog.load()
                continue
            if self._cache is not None:
                self._cache.drop([key for key, _ in batch])
            written = stale = 0
            for write, (w, s) in zip(writes, counts, strict=True):
                metrics.WRITES.labels(write.view, "written").inc(w)
                metrics.WRITES.labels(write.view, "stale").inc(s)
                written, stale = written + w, stale + s
            return WriteResult(written=written, stale=stale)
        raise FailedPreconditionError(
            "feature views kept changing during the write; try again",
            reason="FEATURE_VIEWS_CHANGING",
        )

    def _encode(
        self, writes: Sequence[FeatureWrite], views: Mapping[str, FeatureView]
    ) -> list[tuple[str, dict[str, bytes]]]:
        violations: list[FieldViolation] = []
        batch: list[tuple[str, dict[str, bytes]]] = []
        now = self._clock_us()
        for i, write in enumerate(writes):
            view = views[write.view]
            entity = write.entity
            who = f"entity {entity.entity_type}/{entity.entity_id}"
            if not entity.entity_type or not entity.entity_id:
                violations.append(
                    FieldViolation(f"writes[{i}].entity", "entity_type and entity_id are required")
                )
            elif entity.entity_type != view.entity_type:
                violations.append(
                    FieldViolation(
                        f"writes[{i}].entity.entity_type",
                        f"view {view.name!r} is keyed by {view.entity_type!r}, "
                        f"not {entity.entity_type!r}",
                    )
                )
            if not write.values:
                violations.append(
                    FieldViolation(f"writes[{i}].values", "at least one value is required")
                )
            event_time = now if write.event_time_us is None else write.event_time_us
            if event_time < 0:
                violations.append(
                    FieldViolation(f"writes[{i}].event_time", "must not be before 1970")
                )
            encoded: dict[str, bytes] = {}
            for name, value in write.values.items():
                path = f"writes[{i}].values[{name!r}]"
                spec = view.feature(name)
                if spec is None:
                    violations.append(
                        FieldViolation(path, f"{who}: view {view.name!r} has no feature {name!r}")
                    )
                    continue
                if value is None:
                    violations.append(
                        FieldViolation(
                            path,
                            f"{who}, feature {name!r}: expected {spec.dtype.value}, got no value",
                        )
                    )
                    continue
                problem = value_problem(spec.dtype, value)
                if problem:
                    violations.append(FieldViolation(path, f"{who}, feature {name!r}: {problem}"))
                    continue
                encoded[name] = encode_value(spec.dtype, value, max(event_time, 0))
            batch.append((redis_key(entity, view.name), encoded))
        if violations:
            raise refused(violations)
        return batch


def _result(
    view: FeatureView, name: str, raw: bytes | None, now_us: int, max_age_us: int
) -> FeatureResult:
    spec = view.feature(name)
    assert spec is not None
    if raw is not None:
        try:
            dtype, value, event_time_us = decode_value(raw)
        except ValueError:
            raw = None
        else:
            if dtype is not spec.dtype:  # retyped by a forced change: the old value is unusable
                raw = None
            elif max_age_us and now_us - event_time_us > max_age_us:
                return FeatureResult(spec.default, FeatureStatus.EXPIRED, event_time_us)
            else:
                return FeatureResult(value, FeatureStatus.PRESENT, event_time_us)
    if spec.default is not None:
        return FeatureResult(spec.default, FeatureStatus.DEFAULTED)
    return FeatureResult(None, FeatureStatus.MISSING)


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())
