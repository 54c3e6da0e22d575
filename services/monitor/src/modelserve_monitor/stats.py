"""Per endpoint and model version: request, error and degraded counts, and latency percentiles."""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass

import numpy as np

from modelserve.type.v1 import prediction_record_pb2
from modelserve_runtime.errors import InvalidArgumentError, NotFoundError

#: Percentiles reported for each version, in this order.
PERCENTILES = (50.0, 95.0, 99.0)


@dataclass(frozen=True, slots=True)
class VersionSummary:
    """What the records of one model version of an endpoint add up to."""

    model_version: str
    request_count: int
    error_count: int
    degraded_count: int
    latency_p50_ms: float
    latency_p95_ms: float
    latency_p99_ms: float


@dataclass(frozen=True, slots=True)
class EndpointSummary:
    """An endpoint's total and its versions, ordered by version name."""

    endpoint: str
    request_count: int
    versions: list[VersionSummary]


class _VersionCounts:
    """Counters of one version and its most recent latencies."""

    __slots__ = ("degraded", "errors", "latencies_us", "requests")

    def __init__(self, max_samples: int) -> None:
        self.requests = 0
        self.errors = 0
        self.degraded = 0
        self.latencies_us: deque[int] = deque(maxlen=max_samples)

    def summary(self, model_version: str) -> VersionSummary:
        samples_ms = np.fromiter(self.latencies_us, dtype=np.float64, count=len(self.latencies_us))
        p50, p95, p99 = (float(p) for p in np.percentile(samples_ms / 1000.0, PERCENTILES))
        return VersionSummary(
            model_version=model_version,
            request_count=self.requests,
            error_count=self.errors,
            degraded_count=self.degraded,
            latency_p50_ms=p50,
            latency_p95_ms=p95,
            latency_p99_ms=p99,
        )


class EndpointStats:
    """Aggregates prediction records, counting each record once however often it arrives.

    A record is identified by endpoint, model version and request id (shadow copies of a
    request share its id but not its version); a record without a request id by its stream
    entry id. The most recent `max_remembered_records` identities are remembered, so a
    duplicate that arrives later than that is counted again.
    """

    def __init__(self, *, max_latency_samples: int, max_remembered_records: int) -> None:
        self._max_latency_samples = max_latency_samples
        self._max_remembered = max_remembered_records
        self._endpoints: dict[str, dict[str, _VersionCounts]] = {}
        self._seen: OrderedDict[tuple[str, str, str], None] = OrderedDict()
        self.duplicates = 0

    def add(self, record: prediction_record_pb2.PredictionRecord, *, entry_id: str) -> bool:
        """Counts the record; False if it was counted before; ValueError if it has no endpoint."""
        if not record.endpoint:
            raise ValueError("prediction record has no endpoint")
        key = (record.endpoint, record.model_version, record.request_id or f"entry:{entry_id}")
        if key in self._seen:
            self.duplicates += 1
            return False
        self._seen[key] = None
        if len(self._seen) > self._max_remembered:
            self._seen.popitem(last=False)
        versions = self._endpoints.setdefault(record.endpoint, {})
        counts = versions.get(record.model_version)
        if counts is None:
            counts = versions[record.model_version] = _VersionCounts(self._max_latency_samples)
        counts.requests += 1
        if record.status == prediction_record_pb2.PREDICTION_STATUS_ERROR:
            counts.errors += 1
        if record.degraded:
            counts.degraded += 1
        counts.latencies_us.append(record.latency_us)
        return True

    def summary(self, endpoint: str) -> EndpointSummary:
        """The endpoint's figures; InvalidArgumentError when unnamed, NotFoundError when unseen."""
        if not endpoint:
            raise InvalidArgumentError.for_field("endpoint", "is required")
        versions = self._endpoints.get(endpoint)
        if versions is None:
            raise NotFoundError(
                f"no prediction records for endpoint {endpoint!r}",
                reason="ENDPOINT_NOT_FOUND",
                metadata={"endpoint": endpoint},
            )
        summaries = [versions[name].summary(name) for name in sorted(versions)]
        return EndpointSummary(
            endpoint=endpoint,
            request_count=sum(v.request_count for v in summaries),
            versions=summaries,
        )
