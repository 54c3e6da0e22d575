"""Feature view definitions in Redis, cached in-process and kept current by an epoch stamp."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from redis.exceptions import WatchError

from modelserve_features.redis_store import (
    VIEWS_EPOCH_KEY,
    VIEWS_KEY,
    _epoch,
    view_history_key,
)
from modelserve_features.views import (
    FeatureView,
    breaking_changes,
    stamped,
    view_from_json,
    view_to_json,
)
from modelserve_runtime.errors import AbortedError, FailedPreconditionError, NotFoundError
from modelserve_runtime.redis_connect import RedisClient

_APPLY_ATTEMPTS = 10


def _now_us() -> int:
    return time.time_ns() // 1000


def _concurrent_change(name: str, version: int, expected_version: int) -> AbortedError:
    now = f"is at version {version}" if version else "does not exist"
    against = f"version {expected_version}" if expected_version else "its absence"
    return AbortedError(
        f"feature view {name!r} {now}; the change was made against {against}: read it again"
        " and retry",
        reason="CONCURRENT_CHANGE",
        metadata={
            "feature_view": name,
            "version": str(version),
            "expected_version": str(expected_version),
        },
    )


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """The view after ApplyFeatureView, and whether the call made a new version."""

    view: FeatureView
    changed: bool


class ViewCatalog:
    """Reads and changes view definitions. Each change increments the epoch in Redis; the
    cached definitions are replaced when a read sees another epoch (the read calls `load`)."""

    def __init__(self, client: RedisClient, *, clock_us: Callable[[], int] = _now_us) -> None:
        self._redis = client
        self._clock_us = clock_us
        self._views: dict[str, FeatureView] = {}
        self._epoch: str | None = None
        self._generation = 0

    @property
    def epoch(self) -> str | None:
        """The epoch of the cached definitions; None before the first load."""
        return self._epoch

    @property
    def generation(self) -> int:
        """How many times the cache was loaded: what was derived from the cached definitions
        is current while this has not changed."""
        return self._generation

    def cached(self, name: str) -> FeatureView | None:
        """The cached definition of a view, or None."""
        return self._views.get(name)

    async def load(self) -> None:
        """Replaces the cache with the definitions in Redis (one round trip)."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.get(VIEWS_EPOCH_KEY)
            pipe.hgetall(VIEWS_KEY)
            epoch, stored = await pipe.execute()
        self._views = {k.decode(): view_from_json(v) for k, v in stored.items()}
        self._epoch = _epoch(epoch)
        self._generation += 1

    def cached_views(self, names: Sequence[str]) -> dict[str, FeatureView] | None:
        """The named views as cached, or None when one is not cached (or nothing is loaded
        yet): then `views` has to read Redis."""
        if self._epoch is None:
            return None
        found: dict[str, FeatureView] = {}
        for name in names:
            view = self._views.get(name)
            if view is None:
                return None
            found[name] = view
        return found

    async def views(self, names: Sequence[str]) -> dict[str, FeatureView]:
        """The named views; reloads once for a name not cached; NotFoundError naming the first
        view that does not exist."""
        cached = self.cached_views(names)
        if cached is not None:
            return cached
        await self.load()
        found: dict[str, FeatureView] = {}
        for name in names:
            view = self._views.get(name)
            if view is None:
                raise NotFoundError(
                    f"feature view {name!r} does not exist",
                    reason="FEATURE_VIEW_NOT_FOUND",
                    metadata={"feature_view": name},
                )
            found[name] = view
        return found

    async def get(self, name: str, version: int = 0) -> FeatureView:
        """The current definition of a view (read from Redis), or an earlier version."""
        if version:
            raw = await self._redis.hget(view_history_key(name), str(version))
        else:
            raw = await self._redis.hget(VIEWS_KEY, name)
        if raw is None:
            what = f"feature view {name!r}" + (f" version {version}" if version else "")
            raise NotFoundError(
                f"{what} does not exist",
                reason="FEATURE_VIEW_NOT_FOUND",
                metadata={"feature_view": name, "version": str(version)},
            )
        return view_from_json(raw)

    async def list(self) -> list[FeatureView]:
        """Every view, by name."""
        stored = await self._redis.hgetall(VIEWS_KEY)
        return sorted((view_from_json(v) for v in stored.values()), key=lambda v: v.name)

    async def apply(
        self, view: FeatureView, *, force: bool = False, expected_version: int | None = None
    ) -> ApplyResult:
        """Creates or changes a view; a change that breaks readers needs `force`.

        Raises FailedPreconditionError listing the breaking changes when not forced, and
        AbortedError when `expected_version` is given and the view is not at it (0: exists).
        """
        for _ in range(_APPLY_ATTEMPTS):
            async with self._redis.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(VIEWS_KEY)
                    raw = await pipe.hget(VIEWS_KEY, view.name)
                    current = None if raw is None else view_from_json(raw)
                    version = 0 if current is None else current.version
                    if expected_version is not None and version != expected_version:
                        raise _concurrent_change(view.name, version, expected_version)
                    if current is not None and current.same_definition(view):
                        return ApplyResult(current, changed=False)
                    now = self._clock_us()
                    if current is None:
                        new = stamped(view, version=1, create_time_us=now, now_us=now)
                    else:
                        changes = breaking_changes(current, view)
                        if changes and not force:
                            raise FailedPreconditionError(
                                f"feature view {view.name!r} version {current.version}: "
                                + "; ".join(changes)
                                + "; apply with force to change it anyway",
                                reason="BREAKING_CHANGE",
                                metadata={"feature_view": view.name, "changes": "; ".join(changes)},
                            )
                        new = stamped(
                            view,
                            version=current.version + 1,
                            create_time_us=current.create_time_us,
                            now_us=now,
                        )
                    document = view_to_json(new)
                    pipe.multi()  # type: ignore[no-untyped-call]
                    pipe.hset(VIEWS_KEY, view.name, document)
                    pipe.hset(view_history_key(view.name), str(new.version), document)
                    pipe.incr(VIEWS_EPOCH_KEY)
                    await pipe.execute()
                except WatchError:
                    continue
            await self.load()
            return ApplyResult(new, changed=True)
        raise AbortedError(
            f"feature view {view.name!r} kept changing while it was applied; try again",
            reason="CONCURRENT_CHANGE",
            metadata={"feature_view": view.name},
        )

    async def delete(self, name: str) -> None:
        """Removes a view's definition and history; its stored values stay until overwritten."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hdel(VIEWS_KEY, name)
            pipe.delete(view_history_key(name))
            pipe.incr(VIEWS_EPOCH_KEY)
            removed, _, _ = await pipe.execute()
        if not removed:
            raise NotFoundError(
                f"feature view {name!r} does not exist",
                reason="FEATURE_VIEW_NOT_FOUND",
                metadata={"feature_view": name},
            )
        await self.load()
