"""The prediction cache: keys, TTL, the stale bound, LRU eviction and revision changes."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from modelserve_router.cache import PredictionCache, cache_key

V1, V2 = "models/fraud/versions/1", "models/fraud/versions/2"


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 10.0

    def __call__(self) -> float:
        return self.now


def row(*values: float) -> dict[str, npt.NDArray[np.float32]]:
    return {"features": np.asarray([values], dtype=np.float32)}


def answer(p: float) -> dict[str, npt.NDArray[np.float32]]:
    return {"probabilities": np.asarray([[1 - p, p]], dtype=np.float32)}


def cache(clock: Clock, max_entries: int = 10) -> PredictionCache:
    return PredictionCache("fraud", max_entries=max_entries, ttl_s=5, stale_s=20, clock=clock)


class TestCacheKey:
    def test_same_version_and_input_only(self) -> None:
        """Equal inputs of one version share a key; another version, value, type or shape
        does not."""
        key = cache_key(V1, row(1, 2))
        assert cache_key(V1, row(1, 2)) == key
        assert cache_key(V2, row(1, 2)) != key
        assert cache_key(V1, row(1, 3)) != key
        assert cache_key(V1, {"features": np.asarray([[1, 2]], dtype=np.float64)}) != key
        assert cache_key(V1, {"features": np.asarray([1, 2], dtype=np.float32)}) != key


class TestPredictionCache:
    def test_fresh_within_ttl_then_stale_within_bound(self) -> None:
        """An answer answers fresh until the TTL, then only as a fallback until TTL + stale
        bound, then not at all."""
        clock = Clock()
        c = cache(clock)
        key = cache_key(V1, row(1))
        assert c.fresh(key) is None
        c.put(key, answer(0.1))
        clock.now += 4.9
        hit = c.fresh(key)
        assert hit is not None and hit.model_version == V1
        clock.now += 0.1
        assert c.fresh(key) is None
        stale = c.stale(key)
        assert stale is not None and c.age_s(stale) == 5.0
        clock.now += 19.9
        assert c.stale(key) is not None
        clock.now += 0.1
        assert c.stale(key) is None
        assert len(c) == 0

    def test_least_recently_used_goes_first(self) -> None:
        """Beyond max entries the answer used longest ago is dropped."""
        clock = Clock()
        c = cache(clock, max_entries=2)
        a, b, d = (cache_key(V1, row(v)) for v in (1, 2, 3))
        c.put(a, answer(0.1))
        c.put(b, answer(0.2))
        assert c.fresh(a) is not None
        c.put(d, answer(0.3))
        assert (c.fresh(a) is not None, c.fresh(b), c.fresh(d) is not None) == (True, None, True)

    def test_newer_revision_empties_it(self) -> None:
        """A newer deployment revision drops every answer; a request still routed by an older
        revision may not use the cache."""
        c = cache(Clock())
        assert c.follow(3)
        key = cache_key(V1, row(1))
        c.put(key, answer(0.1))
        assert c.follow(3) and c.fresh(key) is not None
        assert c.follow(4)
        assert c.fresh(key) is None and len(c) == 0
        assert not c.follow(3)
