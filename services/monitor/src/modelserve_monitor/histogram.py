"""A mergeable log-linear histogram: fixed buckets, so windows merge by adding counts."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TypeVar

#: Sub-buckets per power of two: a bucket is at most 1/16 of its lower bound wide (~3 % error).
SUB_BUCKETS = 16
#: Magnitudes below 2**MIN_EXPONENT fall in the zero bucket; above 2**MAX_EXPONENT in the last.
MIN_EXPONENT = -30
MAX_EXPONENT = 62


def bucket_of(value: float) -> int:
    """The bucket index of a value: 0 holds (near) zero, negative indexes negative values."""
    magnitude = abs(value)
    if not math.isfinite(magnitude) or magnitude >= 2.0**MAX_EXPONENT:
        magnitude = 2.0**MAX_EXPONENT - 1
    if magnitude < 2.0**MIN_EXPONENT:
        return 0
    mantissa, exponent = math.frexp(magnitude)  # magnitude = mantissa * 2**exponent, 0.5 <= m < 1
    sub = min(int((mantissa * 2.0 - 1.0) * SUB_BUCKETS), SUB_BUCKETS - 1)
    index = (exponent - 1 - MIN_EXPONENT) * SUB_BUCKETS + sub + 1
    return index if value > 0 else -index


def bucket_bounds(index: int) -> tuple[float, float]:
    """The bounds of bucket `index`: [lower, upper), or (lower, upper] for a negative index."""
    if index == 0:
        return -(2.0**MIN_EXPONENT), 2.0**MIN_EXPONENT
    k = abs(index) - 1
    base = 2.0 ** (k // SUB_BUCKETS + MIN_EXPONENT)
    sub = k % SUB_BUCKETS
    lower, upper = base * (1 + sub / SUB_BUCKETS), base * (1 + (sub + 1) / SUB_BUCKETS)
    return (lower, upper) if index > 0 else (-upper, -lower)


def bucket_mid(index: int) -> float:
    """A value that represents bucket `index`: its midpoint."""
    lower, upper = bucket_bounds(index)
    return (lower + upper) / 2


K = TypeVar("K")


def subtract_counts(counts: dict[K, int], other: Mapping[K, int]) -> None:
    """Takes `other`'s counts away from `counts`, dropping the keys left at zero, so what was
    merged and taken away again leaves no trace."""
    for key, count in other.items():
        left = counts.get(key, 0) - count
        if left:
            counts[key] = left
        else:
            counts.pop(key, None)


@dataclass(slots=True)
class Histogram:
    """Counts per bucket, with the exact count and sum of the values."""

    counts: dict[int, int]
    total: int = 0
    sum: float = 0.0

    @classmethod
    def empty(cls) -> Histogram:
        return cls(counts={})

    @classmethod
    def of(cls, values: Iterable[float]) -> Histogram:
        """The histogram of some values."""
        histogram = cls.empty()
        for value in values:
            histogram.add(value)
        return histogram

    def add(self, value: float, count: int = 1) -> None:
        index = bucket_of(value)
        self.counts[index] = self.counts.get(index, 0) + count
        self.total += count
        self.sum += value * count

    def merge(self, counts: Mapping[int, int], total: int, value_sum: float) -> None:
        """Adds another histogram's buckets, count and sum."""
        for index, count in counts.items():
            self.counts[index] = self.counts.get(index, 0) + count
        self.total += total
        self.sum += value_sum

    def subtract(self, other: Histogram) -> None:
        """Takes away a histogram that was merged into this one: the inverse of `merge`.

        Buckets left empty are dropped, as if they had never been counted.
        """
        subtract_counts(self.counts, other.counts)
        self.total -= other.total
        self.sum -= other.sum

    @property
    def mean(self) -> float:
        return self.sum / self.total if self.total else 0.0

    def quantile(self, q: float) -> float:
        """The value below which a share `q` of the values lie (bucket midpoint); 0 when empty."""
        if not self.counts:
            return 0.0
        target = q * sum(self.counts.values())
        seen = 0
        ordered = sorted(self.counts)
        for index in ordered:
            seen += self.counts[index]
            if seen >= target:
                return bucket_mid(index)
        return bucket_mid(ordered[-1])

    def interpolated_quantile(self, q: float) -> float:
        """Like `quantile`, but placed within its bucket as if the bucket's values were spread
        evenly: finer than a bucket's width for smooth distributions; 0 when empty."""
        if not self.counts:
            return 0.0
        target = q * sum(self.counts.values())
        seen = 0
        for index in sorted(self.counts):
            count = self.counts[index]
            if seen + count >= target:
                lower, upper = bucket_bounds(index)
                return lower + (upper - lower) * (target - seen) / count
            seen += count
        return bucket_bounds(max(self.counts))[1]
