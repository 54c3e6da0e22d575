"""EndpointStats: counts, once-only counting, bounded samples and percentiles, lookup errors."""

from __future__ import annotations

import numpy as np
import pytest

from modelserve.type.v1 import prediction_record_pb2 as rec_pb
from modelserve_monitor.stats import EndpointStats
from modelserve_runtime.errors import InvalidArgumentError, NotFoundError

V1 = "models/fraud/versions/1"
V2 = "models/fraud/versions/2"


def _record(
    request_id: str,
    latency_us: int,
    *,
    version: str = V1,
    endpoint: str = "fraud",
    error: bool = False,
    degraded: bool = False,
) -> rec_pb.PredictionRecord:
    return rec_pb.PredictionRecord(
        request_id=request_id,
        endpoint=endpoint,
        model_version=version,
        latency_us=latency_us,
        status=rec_pb.PREDICTION_STATUS_ERROR if error else rec_pb.PREDICTION_STATUS_OK,
        degraded=degraded,
    )


def _stats(*, samples: int = 1000, remembered: int = 1000) -> EndpointStats:
    return EndpointStats(max_latency_samples=samples, max_remembered_records=remembered)


class TestEndpointStats:
    def test_counts_per_version_ordered_by_name(self) -> None:
        """Requests, errors and degraded answers are counted per version, versions sorted by name."""
        stats = _stats()
        stats.add(_record("a", 1000, version=V2), entry_id="1-0")
        stats.add(_record("b", 2000, error=True), entry_id="2-0")
        stats.add(_record("c", 3000, degraded=True), entry_id="3-0")
        stats.add(_record("d", 4000), entry_id="4-0")
        summary = stats.summary("fraud")
        assert summary.request_count == 4
        assert [v.model_version for v in summary.versions] == [V1, V2]
        v1, v2 = summary.versions
        assert (v1.request_count, v1.error_count, v1.degraded_count) == (3, 1, 1)
        assert (v2.request_count, v2.error_count, v2.degraded_count) == (1, 0, 0)

    def test_percentiles_match_numpy_in_milliseconds(self) -> None:
        """p50/p95/p99 are numpy's percentiles of the records' latencies, in milliseconds."""
        latencies = np.random.default_rng(7).integers(200, 90_000, size=321)
        stats = _stats()
        for i, latency in enumerate(latencies):
            stats.add(_record(f"r{i}", int(latency)), entry_id=f"{i}-0")
        (version,) = stats.summary("fraud").versions
        expected = np.percentile(latencies / 1000.0, [50, 95, 99])
        assert [version.latency_p50_ms, version.latency_p95_ms, version.latency_p99_ms] == (
            pytest.approx(expected.tolist())
        )

    def test_percentiles_cover_only_the_most_recent_samples(self) -> None:
        """Only the last max_latency_samples latencies of a version shape its percentiles."""
        stats = _stats(samples=10)
        for i in range(100):
            stats.add(_record(f"old{i}", 1_000_000), entry_id=f"{i}-0")
        for i in range(10):
            stats.add(_record(f"new{i}", 1000 * (i + 1)), entry_id=f"{100 + i}-0")
        (version,) = stats.summary("fraud").versions
        assert version.request_count == 110
        assert version.latency_p99_ms == pytest.approx(np.percentile(np.arange(1, 11), 99))

    def test_same_record_twice_is_counted_once(self) -> None:
        """A record with a request id already counted for that endpoint and version is a duplicate."""
        stats = _stats()
        assert stats.add(_record("a", 1000), entry_id="1-0") is True
        assert stats.add(_record("a", 1000), entry_id="2-0") is False
        assert stats.summary("fraud").request_count == 1
        assert stats.duplicates == 1

    def test_shadow_record_of_the_same_request_is_counted(self) -> None:
        """A record of the same request from another version (a shadow copy) is not a duplicate."""
        stats = _stats()
        stats.add(_record("a", 1000), entry_id="1-0")
        assert stats.add(_record("a", 1500, version=V2), entry_id="2-0") is True
        assert stats.summary("fraud").request_count == 2

    def test_record_without_request_id_is_known_by_its_entry_id(self) -> None:
        """Without a request id, the same stream entry delivered again is counted once."""
        stats = _stats()
        assert stats.add(_record("", 1000), entry_id="5-0") is True
        assert stats.add(_record("", 1000), entry_id="5-0") is False
        assert stats.add(_record("", 1000), entry_id="6-0") is True
        assert stats.summary("fraud").request_count == 2

    def test_remembered_records_are_bounded(self) -> None:
        """Only the last max_remembered_records identities are kept, so memory stays bounded."""
        stats = _stats(remembered=3)
        for request_id in ("a", "b", "c", "d"):
            stats.add(_record(request_id, 1000), entry_id="0-1")
        assert stats.add(_record("d", 1000), entry_id="0-1") is False
        assert stats.add(_record("a", 1000), entry_id="0-1") is True

    def test_record_without_endpoint_is_refused(self) -> None:
        """A record that names no endpoint cannot be counted and raises ValueError."""
        with pytest.raises(ValueError, match="endpoint"):
            _stats().add(_record("a", 1000, endpoint=""), entry_id="1-0")

    def test_empty_endpoint_is_invalid_argument(self) -> None:
        """Asking without an endpoint names the `endpoint` field."""
        with pytest.raises(InvalidArgumentError) as info:
            _stats().summary("")
        assert [v.field for v in info.value.violations] == ["endpoint"]

    def test_unknown_endpoint_is_not_found(self) -> None:
        """An endpoint with no records is NOT_FOUND, with the endpoint in the metadata."""
        stats = _stats()
        stats.add(_record("a", 1000), entry_id="1-0")
        with pytest.raises(NotFoundError) as info:
            stats.summary("churn")
        assert info.value.reason == "ENDPOINT_NOT_FOUND"
        assert info.value.metadata == {"endpoint": "churn"}
