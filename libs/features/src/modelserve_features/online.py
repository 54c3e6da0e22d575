"""Online reads and writes of feature views: statuses, defaults, max age, validation, metrics.

The feature service and the router's direct reader both use `OnlineStore`, so a read answers
the same through either path.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from types import TracebackType

import redis.asyncio as redis
from prometheus_client import Counter, Histogram
from redis.exceptions import AuthenticationError, RedisClusterException, ResponseError

from modelserve_features import metrics
from modelserve_features.catalog import ApplyResult, ViewCatalog
from modelserve_features.redis_store import (
    TAG_BYTES,
    VALUE_READERS,
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
    DataLossError,
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


MAX_EVENT_TIME_AHEAD_S = 300.0
"""Default of how far ahead of the writer's clock an event time may be: clocks drift."""


def event_time_problem(event_time_us: int, clock_us: int, max_ahead_us: int) -> str | None:
    """Why a write's event time is refused, or None. Before 1970, or more than
    `max_ahead_us` after the writer's clock (`clock_us`): since an older event time never overwrites a newer one, a
    value from the future would stay, and outrank every true write, until that time came
    (epoch milliseconds read as seconds land tens of thousands of years ahead)."""
    if event_time_us < 0:
        return "must not be before 1970"
    ahead_us = event_time_us - clock_us
    if ahead_us > max_ahead_us:
        return (
            f"is {ahead_us / 1e6:.1f} s after the writer's clock; at most "
            f"{max_ahead_us / 1e6:g} s ahead is taken, since a later event time would outrank "
            "every true write until then (epoch milliseconds read as seconds?)"
        )
    return None


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
    unpack: Callable[[bytes], tuple[int, int, Value]]
    """Reads a stored value as its dtype: (the stored tag, event time, value)."""


#: One value of a read: the feature, its value (None: no value), status, and event time (µs;
#: None when nothing is stored).
ReadValue = tuple[PlannedFeature, Value | None, FeatureStatus, int | None]


@dataclass(frozen=True, slots=True)
class _ViewPart:
    """The features a read wants from one view, and that view's counters: added to once per
    read, not per entity, which cost a ten-entity read about 6% of its work in the process
    (220,000 of 3.8 million instructions)."""

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
    touch, with each feature's dtype, default and reader. Made on the first read of a list
    of refs and reused until the definitions are reloaded."""

    generation: int
    """The catalog's generation it was made under."""
    epoch: str
    """The views epoch of the definitions it was made from."""
    parts: tuple[_ViewPart, ...]
    """By view name: an entity's values are read view by view, in this order."""
    orders: Mapping[str, tuple[int, ...]]
    """By entity type, where the view-by-view order differs from the request's: for each
    position of an entity's row in request order, where that value stands in the row as
    read. Empty for the usual request (one view, or views asked in name order)."""


def _request_orders(parts: Sequence[_ViewPart]) -> dict[str, tuple[int, ...]]:
    """For each entity type whose features, read view by view, come out of request order,
    the permutation that puts them back."""
    read_order: dict[str, list[int]] = {}
    for part in parts:
        read_order.setdefault(part.view.entity_type, []).extend(part.ref_indexes)
    return {
        entity_type: tuple(sorted(range(len(indexes)), key=indexes.__getitem__))
        for entity_type, indexes in read_order.items()
        if indexes != sorted(indexes)
    }


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
            unpack=VALUE_READERS[spec.dtype],
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
    return ReadPlan(generation, epoch, parts, _request_orders(parts))


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


class RedisCall:
    """One Redis call under `OnlineStore.redis_call`: bounded by `limit_s`, timed into
    `latency`, a Redis failure or timeout raised as UnavailableError. A class rather than an
    @asynccontextmanager generator: every read enters one, and with the generator a call cost
    a quarter more (57,000 against 46,000 instructions, most of them asyncio.timeout's)."""

    __slots__ = ("_latency", "_limit_s", "_op", "_started", "_timeout")

    def __init__(self, op: str, limit_s: float, latency: Histogram) -> None:
        self._op = op
        self._limit_s = limit_s
        self._latency = latency
        self._started = 0.0
        self._timeout: asyncio.Timeout | None = None

    async def __aenter__(self) -> None:
        self._started = time.perf_counter()
        self._timeout = asyncio.timeout(self._limit_s)
        await self._timeout.__aenter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        assert self._timeout is not None
        try:
            # Turns the cancellation that ends an expired call into TimeoutError.
            await self._timeout.__aexit__(exc_type, exc, traceback)
        except TimeoutError as expired:
            exc = expired
        finally:
            self._latency.observe(time.perf_counter() - self._started)
        op = self._op
        if isinstance(exc, ResponseError) and str(exc).startswith("WRONGTYPE"):
            # Redis answered: one of the store's keys holds another kind of value than the
            # hash (or stream, or string) the store keeps there. Not a Redis outage: retrying
            # cannot help, and the service stays SERVING for every other key.
            raise DataLossError(
                f"a key of the feature store holds another kind of value ({op}): {exc}; it was"
                " written by something other than the feature service",
                reason="REDIS_WRONG_TYPE",
                metadata={"operation": op},
            ) from exc
        if isinstance(exc, AuthenticationError):
            raise UnavailableError(
                f"redis refused the credentials ({op}): {exc}; check the username and password",
                reason="REDIS_AUTH_FAILED",
                metadata={"operation": op},
            ) from exc
        if isinstance(exc, redis.RedisError | RedisClusterException | TimeoutError | OSError):
            raise UnavailableError(
                f"redis did not answer ({op}): {str(exc) or type(exc).__name__}",
                reason="REDIS_UNAVAILABLE",
                metadata={"operation": op},
            ) from exc


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
        max_ahead_s: float = MAX_EVENT_TIME_AHEAD_S,
    ) -> None:
        """`max_ahead_s`: the latest event time a write may carry, in seconds after this
        process's clock (`event_time_problem`)."""
        self._store = RedisFeatureStore(client)
        self._max_ahead_us = round(max_ahead_s * 1e6)
        self.catalog = ViewCatalog(client, clock_us=clock_us)
        self._timeout_s = timeout_s
        self._clock_us = clock_us
        self._cache = _Cache(cache_ttl_s, cache_max_entries) if cache_ttl_s > 0 else None
        self._plans: dict[tuple[FeatureRef, ...], ReadPlan] = {}
        self._last_plan: tuple[tuple[FeatureRef, ...], ReadPlan] | None = None
        self._reads = _ReadBatcher(self._store.read, timeout_s)
        self._latency = {
            op: metrics.REDIS_LATENCY.labels(op) for op in ("read", "write", "views", "ping")
        }

    def redis_call(self, op: str, timeout_s: float | None = None) -> RedisCall:
        """Bounds a Redis call by the store's timeout and the caller's remaining time (the
        smaller), times it, and turns a Redis failure or timeout into UnavailableError:
        `async with store.redis_call("read", timeout_s): ...`."""
        # A tenth of the caller's time is kept back so that it hears UNAVAILABLE from us
        # rather than DEADLINE_EXCEEDED from its own clock.
        limit = self._timeout_s if timeout_s is None else min(self._timeout_s, 0.9 * timeout_s)
        return RedisCall(op, max(0.0, limit), self._latency[op])

    async def ping(self, timeout_s: float | None = None) -> None:
        """Returns when Redis (in a cluster: every primary) answers PING; UnavailableError
        otherwise."""
        async with self.redis_call("ping", timeout_s):
            await ping(self._store.client)

    async def views(
        self, names: Sequence[str], *, timeout_s: float | None = None
    ) -> dict[str, FeatureView]:
        """The named views (NotFoundError naming the first unknown one); from the cached
        definitions when they hold every name, without a Redis call to time and bound (the
        router asks on every request)."""
        cached = self.catalog.cached_views(names)
        if cached is not None:
            return cached
        async with self.redis_call("views", timeout_s):
            return await self.catalog.views(names)

    async def apply_view(
        self, view: FeatureView, *, force: bool = False, expected_version: int | None = None
    ) -> ApplyResult:
        """Creates or changes a view (see ViewCatalog.apply)."""
        async with self.redis_call("views"):
            return await self.catalog.apply(view, force=force, expected_version=expected_version)

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
        """As `read`, each entity's values as a list in the order of `refs` (those of its
        entity type; a ref repeated in `refs` appears as often), without building a
        FeatureResult per value."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        wanted = tuple(refs)
        for _ in range(2):
            plan = await self._plan_for(wanted, deadline)
            types = {e.entity_type for e in entities}
            missing = [p for p in plan.parts if p.view.entity_type not in types]
            if missing:
                raise refused(_no_entity_violations(missing))
            # Per view, the entities it answers for: (row, Redis key) each.
            per_view = [
                (
                    part,
                    [
                        (i, redis_key(entity, part.view.name))
                        for i, entity in enumerate(entities)
                        if entity.entity_type == part.view.entity_type
                    ],
                )
                for part in plan.parts
            ]
            keys = [key for _, entries in per_view for _, key in entries]
            stored = await self._fetch(keys, plan.epoch, deadline)
            if stored is not None:
                rows = self._resolve(len(entities), per_view, stored)
                if plan.orders:
                    for i, entity in enumerate(entities):
                        order = plan.orders.get(entity.entity_type)
                        if order is not None:
                            row = rows[i]
                            rows[i] = [row[j] for j in order]
                return rows
        raise UnavailableError(
            "feature views kept changing during the read", reason="FEATURE_VIEWS_CHANGING"
        )

    async def _plan_for(self, refs: tuple[FeatureRef, ...], deadline: float | None) -> ReadPlan:
        """The plan of `refs` under the current cached definitions (a cached one when they
        have not been reloaded since it was made)."""
        generation = self.catalog.generation
        # The feature service passes the same tuple for the same feature list (OnlineFeatures
        # keeps them), so the last plan used is found by identity first: looking a plan up by
        # its refs hashes each FeatureRef in Python, about 3 µs for twenty (a one-entity read
        # costs the process about 750,000 instructions with this, 778,000 without).
        last = self._last_plan
        if last is not None and last[0] is refs and last[1].generation == generation:
            return last[1]
        plan = self._plans.get(refs)
        if plan is None or plan.generation != generation:
            views = await self.views(sorted({r.view for r in refs}), timeout_s=_left(deadline))
            if len(self._plans) >= _MAX_PLANS:
                self._plans.clear()
            catalog = self.catalog
            plan = self._plans[refs] = _plan(refs, views, catalog.generation, catalog.epoch or "0")
        self._last_plan = (refs, plan)
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
        per_view: Sequence[tuple[_ViewPart, Sequence[tuple[int, str]]]],
        stored: Mapping[str, dict[bytes, bytes]],
    ) -> list[list[ReadValue]]:
        """Each entity's values from its stored hashes (`per_view`: each view with the rows
        and keys of its entities), and the views' counters.

        The inner loop runs once per value read (200 times in a ten-entity, twenty-feature
        read), so it is written for that: names bound to locals, a stored value read in one
        call that answers its tag, event time and value (see `VALUE_READERS`; with a function
        call per value, then slicing and decoding, a ten-entity read cost the process 10% more
        instructions), statuses counted in integers. A value of another dtype (retyped by a
        forced change) or one that does not decode reads as not stored."""
        now = self._clock_us()
        present, expired, defaulted, missing = (
            FeatureStatus.PRESENT,
            FeatureStatus.EXPIRED,
            FeatureStatus.DEFAULTED,
            FeatureStatus.MISSING,
        )
        rows: list[list[ReadValue]] = [[] for _ in range(count)]
        for part, entries in per_view:
            features = part.features
            max_age_us = part.max_age_us
            expired_n = defaulted_n = missing_n = 0
            for i, key in entries:
                values = stored[key].get
                append = rows[i].append
                for feature in features:
                    raw = values(feature.field)
                    if raw is not None:
                        try:
                            tag, event_time_us, value = feature.unpack(raw)
                        except (ValueError, struct.error):
                            tag = -1
                        if tag == feature.tag:
                            if max_age_us and now - event_time_us > max_age_us:
                                append((feature, feature.default, expired, event_time_us))
                                expired_n += 1
                            else:
                                append((feature, value, present, event_time_us))
                            continue
                    if feature.default is None:
                        append((feature, None, missing, None))
                        missing_n += 1
                    else:
                        append((feature, feature.default, defaulted, None))
                        defaulted_n += 1
            part.reads.inc()
            part.entities.inc(len(entries))
            present_n = len(entries) * len(features) - expired_n - defaulted_n - missing_n
            for status, n in (
                (present, present_n),
                (expired, expired_n),
                (defaulted, defaulted_n),
                (missing, missing_n),
            ):
                if n:
                    part.values[status].inc(n)
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
            problem = event_time_problem(event_time, now, self._max_ahead_us)
            if problem:
                violations.append(FieldViolation(f"writes[{i}].event_time", problem))
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
