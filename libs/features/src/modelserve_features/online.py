"""Online reads and writes of feature views: statuses, defaults, max age, validation, metrics.

The feature service and the router's direct reader both use `OnlineStore`, so a read answers
the same through either path.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from enum import StrEnum

import redis.asyncio as redis
from prometheus_client import Counter
from redis.exceptions import AuthenticationError, RedisClusterException

from modelserve_features import metrics
from modelserve_features.catalog import ApplyResult, ViewCatalog
from modelserve_features.redis_store import (
    BODY_DECODERS,
    EVENT_TIME,
    HEADER_SIZE,
    TAG_BYTES,
    EntityKey,
    RedisFeatureStore,
    ViewsChangedError,
    encode_value,
    redis_key,
)
from modelserve_features.views import (
    FeatureDtype,
    FeatureRef,
    FeatureView,
    Value,
    value_problem,
)
from modelserve_runtime.errors import (
    FailedPreconditionError,
    FieldViolation,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
)
from modelserve_runtime.redis_connect import RedisClient, ping

_WRITE_ATTEMPTS = 3
#: Most read plans kept (one per distinct list of refs read); all are dropped when full.
_MAX_PLANS = 1024
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


_NO_VALUES = dict.fromkeys(FeatureStatus, 0)


@dataclass(frozen=True, slots=True)
class FeatureResult:
    """One read value, its status and, when stored, its event time."""

    value: Value | None
    status: FeatureStatus
    event_time_us: int | None = None


@dataclass(frozen=True, slots=True)
class PlannedFeature:
    """A requested feature, resolved once against its view's definition (see ReadPlan)."""

    ref: FeatureRef
    key: str
    """The reference as text, `view:feature`."""
    dtype: FeatureDtype
    default: Value | None
    field: bytes
    """The hash field holding its values: the feature name."""
    tag: int
    """The first byte of a stored value of its dtype."""
    decode: Callable[[bytes], Value]
    """Decodes a stored value's body."""


#: One value of a read: the feature, its value (None: no value), status, and event time (µs;
#: None when nothing is stored).
ReadValue = tuple[PlannedFeature, Value | None, FeatureStatus, int | None]


@dataclass(frozen=True, slots=True)
class _ViewPart:
    """The features a read wants from one view, and that view's counters."""

    view: FeatureView
    features: tuple[PlannedFeature, ...]
    ref_indexes: tuple[int, ...]
    """Where its refs stand in the request, for error messages."""
    max_age_us: int
    reads: Counter
    entities: Counter
    values: dict[FeatureStatus, Counter]


@dataclass(frozen=True, slots=True)
class ReadPlan:
    """How to answer one list of refs under the cached view definitions: the views they
    touch, by entity type, with each feature's dtype, default and decoder. Made on the first
    read of a list of refs and reused until the definitions are reloaded."""

    generation: int
    """The catalog's generation it was made under."""
    epoch: str
    """The views epoch of the definitions it was made from."""
    parts: tuple[_ViewPart, ...]
    by_type: dict[str, tuple[_ViewPart, ...]]


def _plan(
    refs: Sequence[FeatureRef], views: Mapping[str, FeatureView], generation: int, epoch: str
) -> ReadPlan:
    """The plan of `refs`; NotFoundError naming the first ref whose view lacks its feature."""
    wanted: dict[str, list[tuple[int, PlannedFeature]]] = {}
    for i, ref in enumerate(refs):
        view = views[ref.view]
        spec = view.feature(ref.name)
        if spec is None:
            raise NotFoundError(
                f"feature {str(ref)!r} does not exist: view {view.name!r} (version "
                f"{view.version}) has no feature {ref.name!r}",
                reason="FEATURE_NOT_FOUND",
                metadata={"feature_view": view.name, "feature": ref.name},
            )
        feature = PlannedFeature(
            ref=ref,
            key=str(ref),
            dtype=spec.dtype,
            default=spec.default,
            field=ref.name.encode(),
            tag=TAG_BYTES[spec.dtype],
            decode=BODY_DECODERS[spec.dtype],
        )
        wanted.setdefault(ref.view, []).append((i, feature))
    parts = tuple(
        _ViewPart(
            view=views[name],
            features=tuple(f for _, f in features),
            ref_indexes=tuple(i for i, _ in features),
            max_age_us=int(views[name].max_age_s * 1e6),
            reads=metrics.READS.labels(name),
            entities=metrics.ENTITIES.labels(name),
            values={s: metrics.VALUES.labels(name, s.value) for s in FeatureStatus},
        )
        for name, features in sorted(wanted.items())
    )
    by_type: dict[str, tuple[_ViewPart, ...]] = {}
    for part in parts:
        by_type[part.view.entity_type] = (*by_type.get(part.view.entity_type, ()), part)
    return ReadPlan(generation, epoch, parts, by_type)


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
        self._hits = metrics.CACHE.labels("hit")
        self._misses = metrics.CACHE.labels("miss")

    def get(self, key: str, now: float) -> dict[bytes, bytes] | None:
        entry = self._entries.get(key)
        if entry is None or entry[0] <= now:
            self._misses.inc()
            return None
        self._entries.move_to_end(key)
        self._hits.inc()
        return entry[1]

    def put(self, key: str, stored: dict[bytes, bytes], now: float) -> None:
        self._entries[key] = (now + self.ttl_s, stored)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    def drop(self, keys: Sequence[str]) -> None:
        for key in keys:
            self._entries.pop(key, None)


#: The views epoch, and the hashes of the keys asked for in their order.
_Hashes = tuple[str, list[dict[bytes, bytes]]]


class _ReadBatcher:
    """Coalesces concurrent reads into shared round trips. A read goes to Redis at once when
    none is on its way; reads that come while one is go together, in one call, as soon as it
    is back. A call costs the client about 30 µs of CPU whatever its size (a one-entity read
    about 40 µs in all); alone, a read waits for nothing. How many reads meet depends on how
    long a round trip takes against the rest of a request: with Redis on the same machine
    few do (about 1 in 20 at concurrency 16), across a network many more."""

    def __init__(self, read: Callable[[Sequence[str]], Awaitable[_Hashes]], timeout_s: float):
        self._read = read
        self._timeout_s = timeout_s
        self._waiting: list[tuple[Sequence[str], asyncio.Future[_Hashes]]] = []
        self._busy = False
        self._tasks: set[asyncio.Task[None]] = set()

    async def read(self, keys: Sequence[str]) -> _Hashes:
        """The epoch and the hashes of `keys`, in their order."""
        if self._busy:
            future: asyncio.Future[_Hashes] = asyncio.get_running_loop().create_future()
            self._waiting.append((keys, future))
            return await future
        self._busy = True
        try:
            return await self._read(keys)
        finally:
            self._next()

    def _next(self) -> None:
        if not self._waiting:
            self._busy = False
            return
        task = asyncio.get_running_loop().create_task(self._send_waiting())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send_waiting(self) -> None:
        """Sends every waiting read in one call, answers each, then goes on with the ones
        that came meanwhile."""
        batch = [(keys, f) for keys, f in self._waiting if not f.done()]
        self._waiting = []
        wanted = list(dict.fromkeys(key for keys, _ in batch for key in keys))
        try:
            # Each waiting caller has its own deadline; this bounds the shared call.
            async with asyncio.timeout(self._timeout_s):
                epoch, hashes = await self._read(wanted)
        except asyncio.CancelledError:
            for _, future in batch:
                future.cancel()
            raise
        except Exception as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
        else:
            found = dict(zip(wanted, hashes, strict=True))
            for keys, future in batch:
                if not future.done():
                    future.set_result((epoch, [found[key] for key in keys]))
        finally:
            self._next()


class OnlineStore:
    """Feature views and their values in Redis; reads and writes are one round trip each
    (plus one to reload the views after they changed), and concurrent reads share theirs."""

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
        self._plans: dict[tuple[FeatureRef, ...], ReadPlan] = {}
        self._reads = _ReadBatcher(self._store.read, timeout_s)
        self._latency = {
            op: metrics.REDIS_LATENCY.labels(op) for op in ("read", "write", "views", "ping")
        }

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
                f"redis did not answer ({op}): {str(exc) or type(exc).__name__}",
                reason="REDIS_UNAVAILABLE",
                metadata={"operation": op},
            ) from exc
        finally:
            self._latency[op].observe(time.perf_counter() - started)

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
        rows = await self.read_values(entities, refs, timeout_s=timeout_s)
        return [
            {feature.ref: FeatureResult(value, status, at) for feature, value, status, at in row}
            for row in rows
        ]

    async def read_values(
        self,
        entities: Sequence[EntityKey],
        refs: Sequence[FeatureRef],
        *,
        timeout_s: float | None = None,
    ) -> list[list[ReadValue]]:
        """As `read`, each entity's values as a list in the order of `refs` (a ref repeated
        in `refs` appears as often), without building a FeatureResult per value."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        wanted = tuple(refs)
        for _ in range(2):
            plan = await self._plan_for(wanted, deadline)
            types = {e.entity_type for e in entities}
            missing = [p for p in plan.parts if p.view.entity_type not in types]
            if missing:
                raise refused(_no_entity_violations(missing))
            by_type = plan.by_type
            pairs = [
                (i, part)
                for i, entity in enumerate(entities)
                for part in by_type.get(entity.entity_type, ())
            ]
            keys = [redis_key(entities[i], part.view.name) for i, part in pairs]
            stored = await self._fetch(keys, plan.epoch, deadline)
            if stored is not None:
                return self._resolve(len(entities), plan, pairs, keys, stored)
        raise UnavailableError(
            "feature views kept changing during the read", reason="FEATURE_VIEWS_CHANGING"
        )

    async def _plan_for(self, refs: tuple[FeatureRef, ...], deadline: float | None) -> ReadPlan:
        """The plan of `refs` under the current cached definitions (a cached one when they
        have not been reloaded since it was made)."""
        plan = self._plans.get(refs)
        if plan is not None and plan.generation == self.catalog.generation:
            return plan
        views = await self.views(sorted({r.view for r in refs}), timeout_s=_left(deadline))
        if len(self._plans) >= _MAX_PLANS:
            self._plans.clear()
        catalog = self.catalog
        plan = self._plans[refs] = _plan(refs, views, catalog.generation, catalog.epoch or "0")
        return plan

    async def _fetch(
        self, keys: Sequence[str], epoch_seen: str, deadline: float | None
    ) -> dict[str, dict[bytes, bytes]] | None:
        """The hashes by key, from the cache or one round trip; None when the views changed
        since `epoch_seen` (the definitions are reloaded then, unless another read did)."""
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
            epoch, hashes = await self._reads.read(wanted)
        if epoch != epoch_seen:
            if epoch != self.catalog.epoch:
                async with self.redis_call("views", _left(deadline)):
                    await self.catalog.load()
            return None
        for key, stored in zip(wanted, hashes, strict=True):
            found[key] = stored
            if self._cache is not None:
                self._cache.put(key, stored, now)
        return found

    def _resolve(
        self,
        count: int,
        plan: ReadPlan,
        pairs: Sequence[tuple[int, _ViewPart]],
        keys: Sequence[str],
        stored: Mapping[str, dict[bytes, bytes]],
    ) -> list[list[ReadValue]]:
        now = self._clock_us()
        rows: list[list[ReadValue]] = [[] for _ in range(count)]
        for (i, part), key in zip(pairs, keys, strict=True):
            values = stored[key]
            row = rows[i]
            max_age_us = part.max_age_us
            tally = _NO_VALUES.copy()
            for feature in part.features:
                read = _read_value(feature, values.get(feature.field), now, max_age_us)
                row.append(read)
                tally[read[2]] += 1
            part.entities.inc()
            for status, n in tally.items():
                if n:
                    part.values[status].inc(n)
        for part in plan.parts:
            part.reads.inc()
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


def _read_value(
    feature: PlannedFeature, raw: bytes | None, now_us: int, max_age_us: int
) -> ReadValue:
    # A value of another dtype (retyped by a forced change) or one that does not decode reads
    # as not stored.
    if raw is not None and len(raw) >= HEADER_SIZE and raw[0] == feature.tag:
        try:
            value = feature.decode(raw[HEADER_SIZE:])
        except (ValueError, struct.error):
            pass
        else:
            event_time_us: int = EVENT_TIME.unpack_from(raw, 1)[0]
            if max_age_us and now_us - event_time_us > max_age_us:
                return feature, feature.default, FeatureStatus.EXPIRED, event_time_us
            return feature, value, FeatureStatus.PRESENT, event_time_us
    if feature.default is not None:
        return feature, feature.default, FeatureStatus.DEFAULTED, None
    return feature, None, FeatureStatus.MISSING, None


def _no_entity_violations(parts: Sequence[_ViewPart]) -> list[FieldViolation]:
    return [
        FieldViolation(
            f"features[{i}]",
            f"view {part.view.name!r} is keyed by {part.view.entity_type!r} entities and "
            "the request has none",
        )
        for i, part in sorted(
            ((i, part) for part in parts for i in part.ref_indexes), key=lambda pair: pair[0]
        )
    ]


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())
