"""One endpoint's prediction cache: the answer of a version for an input it has seen, reused
for a while instead of calling the model, and for longer as a fallback when the model fails."""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy.typing as npt
import structlog
from prometheus_client import Counter

log = structlog.get_logger()

CACHE_LOOKUPS = Counter(
    "modelserve_router_prediction_cache_total",
    "Prediction cache lookups by endpoint and result: hit (answered without the model), "
    "miss, and fallback (a stale answer served while the model failed).",
    ["endpoint", "result"],
)

#: (model version, digest of the model's inputs).
CacheKey = tuple[str, bytes]


def cache_key(model_version: str, inputs: Mapping[str, npt.NDArray[Any]]) -> CacheKey:
    """The key of an answer: the version and a digest of every input (name, type, shape and
    bytes), so two requests share an answer exactly when the model would see the same."""
    digest = hashlib.blake2b(digest_size=16)
    for name, array in inputs.items():
        digest.update(name.encode())
        digest.update(array.dtype.str.encode())
        digest.update(repr(array.shape).encode())
        digest.update(array.tobytes())
    return model_version, digest.digest()


@dataclass(frozen=True, slots=True)
class CachedPrediction:
    """A version's answer and when it was made (the cache's clock)."""

    outputs: Mapping[str, npt.NDArray[Any]]
    model_version: str
    stored_at: float


class PredictionCache:
    """Answers by CacheKey, at most `max_entries` (the least recently used go first).

    An answer younger than `ttl_s` answers in place of the model; one younger than
    `ttl_s + stale_s` answers only as a fallback when the model fails. The cache belongs to
    one revision of the endpoint's deployment and is emptied whole when a newer one arrives.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        max_entries: int,
        ttl_s: float,
        stale_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.endpoint = endpoint
        self._max_entries = max_entries
        self._ttl_s = ttl_s
        self._keep_s = ttl_s + stale_s
        self._clock = clock
        self._entries: OrderedDict[CacheKey, CachedPrediction] = OrderedDict()
        self.revision = 0
        """The deployment revision the entries belong to."""
        self._hits = CACHE_LOOKUPS.labels(endpoint, "hit")
        self._misses = CACHE_LOOKUPS.labels(endpoint, "miss")
        self._fallbacks = CACHE_LOOKUPS.labels(endpoint, "fallback")

    def __len__(self) -> int:
        return len(self._entries)

    def follow(self, revision: int) -> bool:
        """Empties the cache when `revision` is newer than its own; whether a request routed
        by `revision` may use it (a request still on an older revision may not)."""
        if revision > self.revision:
            if self._entries:
                log.info(
                    "prediction_cache_dropped",
                    endpoint=self.endpoint,
                    entries=len(self._entries),
                    revision=self.revision,
                    new_revision=revision,
                )
                self._entries.clear()
            self.revision = revision
        return revision == self.revision

    def fresh(self, key: CacheKey) -> CachedPrediction | None:
        """The answer for `key` when younger than the TTL."""
        entry = self._entries.get(key)
        if entry is None or self._clock() - entry.stored_at >= self._ttl_s:
            self._misses.inc()
            return None
        self._entries.move_to_end(key)
        self._hits.inc()
        return entry

    def stale(self, key: CacheKey) -> CachedPrediction | None:
        """The answer for `key` when younger than TTL + stale bound: a fallback's answer."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if self._clock() - entry.stored_at >= self._keep_s:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        self._fallbacks.inc()
        return entry

    def age_s(self, entry: CachedPrediction) -> float:
        """How old an answer is."""
        return self._clock() - entry.stored_at

    def put(self, key: CacheKey, outputs: Mapping[str, npt.NDArray[Any]]) -> None:
        """Keeps the version's answer for `key`, evicting the least recently used beyond
        `max_entries`."""
        self._entries[key] = CachedPrediction(outputs, key[0], self._clock())
        self._entries.move_to_end(key)
        if len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)
