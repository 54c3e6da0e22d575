"""Windows, drift and outcomes through a real MonitorService on a real Redis, on a test clock."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import redis.asyncio as aioredis
from monitor_testing import TestClock, log_and_count, prediction_record, probabilities
from prometheus_client import REGISTRY

from modelserve.monitor.v1 import monitor_service_pb2 as pb
from modelserve.monitor.v1 import monitor_service_pb2_grpc as pb_grpc
from modelserve.type.v1 import feature_value_pb2 as fv_pb
from modelserve.type.v1 import prediction_record_pb2 as rec_pb
from modelserve_monitor.aggregate import VALUE_LIMIT
from modelserve_monitor.config import MonitorSettings
from modelserve_monitor.metrics import export_windows
from modelserve_monitor.server import MonitorApp
from modelserve_runtime.errors import decode_rpc_error

V1 = "models/fraud/versions/1"


def _record(
    request_id: str,
    *,
    probability: float = 0.8,
    features: dict[str, float | str | None] | None = None,
    latency_us: int = 2000,
    error: bool = False,
) -> rec_pb.PredictionRecord:
    record = prediction_record(
        request_id,
        V1,
        error=error,
        latency_us=latency_us,
        outputs=[probabilities(probability)],
    )
    for name, value in (features or {}).items():
        if value is None:
            record.features[name].CopyFrom(fv_pb.FeatureValue())
        elif isinstance(value, str):
            record.features[name].CopyFrom(fv_pb.FeatureValue(string_value=value))
        else:
            record.features[name].CopyFrom(fv_pb.FeatureValue(double_value=value))
    return record


@pytest.fixture
def monitor_settings(redis_url: str) -> MonitorSettings:
    """A monitor with a 400-record baseline."""
    return MonitorSettings(
        redis_url=redis_url, consumer_name="analysis-test", block_ms=100, baseline_records=400
    )


async def _version(
    stub: pb_grpc.MonitorServiceStub, window: pb.Window.ValueType
) -> pb.VersionStats:
    response = await stub.GetEndpointStats(
        pb.GetEndpointStatsRequest(endpoint="fraud", window=window)
    )
    assert response.window == window
    [version] = response.versions
    return version


class TestWindows:
    async def test_windows_slide_with_the_clock(
        self,
        monitor: tuple[pb_grpc.MonitorServiceStub, MonitorApp],
        redis_client: aioredis.Redis,
        clock: TestClock,
    ) -> None:
        """Records leave the 1 and 5 minute windows as the clock moves; the total keeps them."""
        stub, app = monitor
        await log_and_count(
            redis_client, app, (_record(f"old-{i}", error=i < 2) for i in range(10))
        )
        clock.now += 120
        await log_and_count(redis_client, app, (_record(f"new-{i}") for i in range(5)))
        one_minute = await _version(stub, pb.WINDOW_ONE_MINUTE)
        assert (one_minute.request_count, one_minute.error_count) == (5, 0)
        five_minutes = await _version(stub, pb.WINDOW_FIVE_MINUTES)
        assert (five_minutes.request_count, five_minutes.error_count) == (15, 2)
        clock.now += 600
        assert (await _version(stub, pb.WINDOW_FIVE_MINUTES)).request_count == 0
        assert (await _version(stub, pb.WINDOW_ONE_HOUR)).request_count == 15
        clock.now += 3600
        assert (await _version(stub, pb.WINDOW_ONE_HOUR)).request_count == 0
        assert (await _version(stub, pb.WINDOW_UNSPECIFIED)).request_count == 15

    async def test_window_holds_latency_predictions_and_features(
        self,
        monitor: tuple[pb_grpc.MonitorServiceStub, MonitorApp],
        redis_client: aioredis.Redis,
    ) -> None:
        """A window reports latency percentiles, the prediction distribution and feature stats."""
        stub, app = monitor
        rng = np.random.default_rng(5)
        latencies = rng.integers(1000, 50_000, size=200)
        probabilities = rng.uniform(0, 1, size=200)
        records = [
            _record(
                f"r{i}",
                latency_us=int(latencies[i]),
                probability=float(probabilities[i]),
                features={
                    "amount": None if i % 4 == 0 else float(i),
                    "country": "NL" if i % 2 else "DE",
                },
            )
            for i in range(200)
        ]
        await log_and_count(redis_client, app, records)
        version = await _version(stub, pb.WINDOW_ONE_MINUTE)
        assert version.latency_p99_ms == pytest.approx(
            np.percentile(latencies / 1000, 99), rel=0.04
        )
        assert version.predictions.count == 200
        assert version.predictions.mean == pytest.approx(probabilities.mean(), rel=1e-5)
        assert version.predictions.p50 == pytest.approx(np.median(probabilities), rel=0.05)
        assert sum(b.count for b in version.predictions.buckets) == 200
        amount, country = version.features
        assert (amount.feature, amount.count, amount.missing_rate) == ("amount", 200, 0.25)
        present = [i for i in range(200) if i % 4]
        assert amount.values.mean == pytest.approx(np.mean(present))
        assert [(c.value, c.count) for c in country.categories] == [("DE", 100), ("NL", 100)]

    async def test_huge_values_leave_the_window_readable(
        self,
        monitor: tuple[pb_grpc.MonitorServiceStub, MonitorApp],
        redis_client: aioredis.Redis,
    ) -> None:
        """Finite values near a double's limit add up, in Redis's long doubles, to more than a
        float holds. They are added bounded, so the window still reads back, with every record
        counted, instead of failing each read of it with INTERNAL."""
        stub, app = monitor
        huge = 1.7e308
        records = [_record(f"h{i}", features={"amount": huge, "age": -huge}) for i in range(3)]
        await log_and_count(redis_client, app, records)
        version = await _version(stub, pb.WINDOW_ONE_MINUTE)
        assert version.request_count == 3
        age, amount = version.features
        assert (amount.count, amount.missing_rate) == (3, 0.0)
        assert amount.values.mean == pytest.approx(VALUE_LIMIT)
        assert age.values.mean == pytest.approx(-VALUE_LIMIT)
        stats = await stub.GetEndpointStats(
            pb.GetEndpointStatsRequest(endpoint="fraud", window=pb.WINDOW_ONE_HOUR)
        )
        assert stats.versions[0].request_count == 3

    async def test_metrics_export_the_windows(
        self,
        monitor: tuple[pb_grpc.MonitorServiceStub, MonitorApp],
        redis_client: aioredis.Redis,
    ) -> None:
        """/metrics gauges carry each window's requests and errors per endpoint and version."""
        _, app = monitor
        await log_and_count(redis_client, app, (_record(f"m{i}", error=i == 0) for i in range(7)))
        await export_windows(app.monitor, await app.monitor.endpoints())
        labels = {"endpoint": "fraud", "version": V1, "window": "5m"}
        assert REGISTRY.get_sample_value("modelserve_monitor_requests", labels) == 7
        assert REGISTRY.get_sample_value("modelserve_monitor_errors", labels) == 1

    async def test_unknown_window_is_invalid_argument(
        self, monitor: tuple[pb_grpc.MonitorServiceStub, MonitorApp]
    ) -> None:
        """A window value the monitor does not know is refused with a violation on `window`."""
        stub, _ = monitor
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.GetEndpointStats(
                pb.GetEndpointStatsRequest(endpoint="fraud", window=99)  # type: ignore[arg-type]
            )
        error = decode_rpc_error(info.value)
        assert error.code is grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in error.violations] == ["window"]


class TestDrift:
    async def test_shifted_feature_is_flagged_and_unshifted_one_is_not(
        self,
        monitor: tuple[pb_grpc.MonitorServiceStub, MonitorApp],
        redis_client: aioredis.Redis,
        clock: TestClock,
    ) -> None:
        """After the baseline, `shifted` moves by one sd and is flagged; `steady` is not."""
        stub, app = monitor
        rng = np.random.default_rng(2026)

        def records(prefix: str, n: int, shift: float) -> list[rec_pb.PredictionRecord]:
            return [
                _record(
                    f"{prefix}-{i}",
                    probability=float(rng.beta(2, 5)),
                    features={
                        "shifted": float(rng.normal(10 + shift * 2, 2)),
                        "steady": float(rng.normal(-3, 1)),
                        "channel": str(rng.choice(["web", "app", "pos"])),
                    },
                )
                for i in range(n)
            ]

        await log_and_count(redis_client, app, records("base", 400, 0.0))
        clock.now += 2 * 3600
        await log_and_count(redis_client, app, records("now", 800, 1.0))
        report = await stub.GetDriftReport(
            pb.GetDriftReportRequest(endpoint="fraud", model_version=V1, window=pb.WINDOW_ONE_HOUR)
        )
        assert (report.baseline_source, report.baseline_count, report.window_count) == (
            "first_records",
            400,
            800,
        )
        results = {r.feature: r for r in report.results}
        assert [r.feature for r in report.results] == ["prediction", "channel", "shifted", "steady"]
        assert results["shifted"].drifted
        assert not results["steady"].drifted
        assert not results["channel"].drifted
        assert not results["prediction"].drifted
        psi, ks = results["shifted"].statistics
        assert (psi.test, psi.threshold, psi.drifted) == (pb.DRIFT_TEST_PSI, 0.2, True)
        assert (ks.test, ks.threshold, ks.drifted) == (pb.DRIFT_TEST_KOLMOGOROV_SMIRNOV, 0.01, True)
        assert ks.p_value < 0.01
        [chi] = results["channel"].statistics
        assert chi.test == pb.DRIFT_TEST_CHI_SQUARE
        assert chi.p_value > 0.01

    async def test_incomplete_baseline_is_failed_precondition(
        self,
        monitor: tuple[pb_grpc.MonitorServiceStub, MonitorApp],
        redis_client: aioredis.Redis,
    ) -> None:
        """Before the version's first 400 records are in, there is no baseline to compare with."""
        stub, app = monitor
        await log_and_count(redis_client, app, (_record(f"r{i}") for i in range(10)))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.GetDriftReport(pb.GetDriftReportRequest(endpoint="fraud", model_version=V1))
        error = decode_rpc_error(info.value)
        assert error.code is grpc.StatusCode.FAILED_PRECONDITION
        assert (error.reason, error.metadata["baseline_count"]) == ("BASELINE_NOT_READY", "10")

    async def test_unknown_version_is_not_found(
        self, monitor: tuple[pb_grpc.MonitorServiceStub, MonitorApp]
    ) -> None:
        """A version with no records is NOT_FOUND."""
        stub, _ = monitor
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.GetDriftReport(pb.GetDriftReportRequest(endpoint="fraud", model_version=V1))
        error = decode_rpc_error(info.value)
        assert (error.code, error.reason) == (grpc.StatusCode.NOT_FOUND, "VERSION_NOT_FOUND")

    async def test_missing_names_are_invalid_argument(
        self, monitor: tuple[pb_grpc.MonitorServiceStub, MonitorApp]
    ) -> None:
        """Without endpoint and version the request is refused with a violation for each."""
        stub, _ = monitor
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.GetDriftReport(pb.GetDriftReportRequest())
        error = decode_rpc_error(info.value)
        assert error.code is grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in error.violations] == ["endpoint", "model_version"]


class TestOutcomes:
    async def test_labels_and_values_join_the_logged_predictions(
        self,
        monitor: tuple[pb_grpc.MonitorServiceStub, MonitorApp],
        redis_client: aioredis.Redis,
    ) -> None:
        """Labels give accuracy, values the mean absolute error, in the version's window."""
        stub, app = monitor
        await log_and_count(
            redis_client, app, (_record(f"r{i}", probability=0.8) for i in range(10))
        )
        for i in range(8):
            response = await stub.RecordOutcome(
                pb.RecordOutcomeRequest(request_id=f"r{i}", label=1)
            )
            assert (response.model_version, response.counted) == (V1, True)
            assert response.prediction == pytest.approx(0.8)
        await stub.RecordOutcome(pb.RecordOutcomeRequest(request_id="r8", label=0))
        await stub.RecordOutcome(pb.RecordOutcomeRequest(request_id="r9", value=0.5))
        outcomes = (await _version(stub, pb.WINDOW_ONE_MINUTE)).outcomes
        assert (outcomes.count, outcomes.label_count, outcomes.value_count) == (10, 9, 1)
        assert outcomes.accuracy == pytest.approx(8 / 9)
        assert outcomes.mean_absolute_error == pytest.approx(0.3)

    async def test_repeated_outcome_counts_once(
        self,
        monitor: tuple[pb_grpc.MonitorServiceStub, MonitorApp],
        redis_client: aioredis.Redis,
    ) -> None:
        """A second outcome for the same request is answered but not counted."""
        stub, app = monitor
        await log_and_count(redis_client, app, [_record("r1")])
        first = await stub.RecordOutcome(pb.RecordOutcomeRequest(request_id="r1", label=1))
        again = await stub.RecordOutcome(pb.RecordOutcomeRequest(request_id="r1", label=0))
        assert (first.counted, again.counted) == (True, False)
        outcomes = (await _version(stub, pb.WINDOW_UNSPECIFIED)).outcomes
        assert (outcomes.count, outcomes.accuracy) == (1, 1.0)

    async def test_unknown_request_is_not_found(
        self, monitor: tuple[pb_grpc.MonitorServiceStub, MonitorApp]
    ) -> None:
        """An outcome for a request the log never held is NOT_FOUND, naming the request."""
        stub, _ = monitor
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.RecordOutcome(pb.RecordOutcomeRequest(request_id="nobody", label=1))
        error = decode_rpc_error(info.value)
        assert (error.code, error.reason) == (grpc.StatusCode.NOT_FOUND, "PREDICTION_NOT_FOUND")
        assert error.metadata == {"request_id": "nobody"}

    async def test_bad_outcome_is_invalid_argument_and_changes_nothing(
        self,
        monitor: tuple[pb_grpc.MonitorServiceStub, MonitorApp],
        redis_client: aioredis.Redis,
    ) -> None:
        """No request id and no outcome are refused field by field; nothing is counted."""
        stub, app = monitor
        await log_and_count(redis_client, app, [_record("r1")])
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.RecordOutcome(pb.RecordOutcomeRequest())
        error = decode_rpc_error(info.value)
        assert error.code is grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in error.violations] == ["request_id", "outcome"]
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.RecordOutcome(pb.RecordOutcomeRequest(request_id="r1", value=float("nan")))
        assert [v.field for v in decode_rpc_error(info.value).violations] == ["value"]
        assert (await _version(stub, pb.WINDOW_UNSPECIFIED)).outcomes.count == 0
        response = await stub.RecordOutcome(pb.RecordOutcomeRequest(request_id="r1", label=1))
        assert response.counted
