"""Alert rules through a real MonitorService on a real Redis: pending, firing, resolved."""

from __future__ import annotations

from collections.abc import Iterable

import grpc
import numpy as np
import pytest
import redis.asyncio as aioredis
from monitor_testing import T0, TestClock, log_and_count, prediction_record, probabilities

from modelserve.monitor.v1 import monitor_service_pb2 as pb
from modelserve.monitor.v1 import monitor_service_pb2_grpc as pb_grpc
from modelserve.type.v1 import feature_value_pb2 as fv_pb
from modelserve.type.v1 import prediction_record_pb2 as rec_pb
from modelserve_monitor.config import AlertSettings, MonitorSettings
from modelserve_monitor.server import MonitorApp
from modelserve_runtime.errors import decode_rpc_error

V1 = "models/fraud/versions/1"


def _record(
    request_id: str, *, error: bool = False, latency_us: int = 2000, probability: float = 0.2
) -> rec_pb.PredictionRecord:
    return prediction_record(
        request_id,
        V1,
        error=error,
        latency_us=latency_us,
        outputs=[probabilities(probability)],
    )


def _scored(
    prefix: str, count: int, *, mean: float, rng: np.random.Generator
) -> Iterable[rec_pb.PredictionRecord]:
    """Records whose feature `request:x` comes from N(mean, 1) and whose prediction is the
    sigmoid of it; `request:y` comes from N(0, 1) whatever the mean."""
    for i in range(count):
        x = float(rng.normal(mean, 1.0))
        record = _record(f"{prefix}{i}", probability=1.0 / (1.0 + np.exp(-x)))
        record.features["request:x"].CopyFrom(fv_pb.FeatureValue(double_value=x))
        y = float(rng.normal(0.0, 1.0))
        record.features["request:y"].CopyFrom(fv_pb.FeatureValue(double_value=y))
        yield record


@pytest.fixture
def monitor_settings(redis_url: str) -> MonitorSettings:
    """A monitor whose alerts are evaluated only when the test asks."""
    return MonitorSettings(
        redis_url=redis_url,
        consumer_name="alerts-test",
        block_ms=100,
        baseline_records=100,
        alerts=AlertSettings(interval_s=3600),
    )


async def _alerts(
    stub: pb_grpc.MonitorServiceStub, state: pb.AlertState.ValueType = pb.ALERT_STATE_UNSPECIFIED
) -> dict[str, pb.Alert]:
    response = await stub.ListAlerts(pb.ListAlertsRequest(endpoint="fraud", state=state))
    return {a.rule: a for a in response.alerts}


class TestAlerts:
    async def test_error_rate_goes_pending_firing_resolved(
        self,
        monitor: tuple[pb_grpc.MonitorServiceStub, MonitorApp],
        redis_client: aioredis.Redis,
        clock: TestClock,
    ) -> None:
        """5 % errors: pending at once, firing after the 120 s for-duration, resolved once gone."""
        stub, app = monitor
        await log_and_count(
            redis_client, app, (_record(f"r{i}", error=i % 20 == 0) for i in range(100))
        )
        await app.alerts.evaluate()
        pending = (await _alerts(stub))["error_rate_high"]
        assert (pending.state, pending.severity) == (
            pb.ALERT_STATE_PENDING,
            pb.ALERT_SEVERITY_CRITICAL,
        )
        assert (pending.value, pending.threshold) == (pytest.approx(0.05), 0.01)
        assert not pending.HasField("fire_time")
        clock.now += 119
        await app.alerts.evaluate()
        assert (await _alerts(stub))["error_rate_high"].state == pb.ALERT_STATE_PENDING
        clock.now += 1
        await app.alerts.evaluate()
        firing = (await _alerts(stub, pb.ALERT_STATE_FIRING))["error_rate_high"]
        assert firing.fire_time.ToSeconds() == int(T0 + 120)
        assert firing.active_since.ToSeconds() == int(T0)
        clock.now += 600
        await app.alerts.evaluate()
        resolved = (await _alerts(stub))["error_rate_high"]
        assert resolved.state == pb.ALERT_STATE_RESOLVED
        assert resolved.resolve_time.ToSeconds() == int(T0 + 720)
        assert await _alerts(stub, pb.ALERT_STATE_FIRING) == {}

    async def test_pending_alert_that_stops_holding_is_dropped(
        self,
        monitor: tuple[pb_grpc.MonitorServiceStub, MonitorApp],
        redis_client: aioredis.Redis,
        clock: TestClock,
    ) -> None:
        """An error spike shorter than the for-duration never fires and leaves no alert."""
        stub, app = monitor
        await log_and_count(redis_client, app, (_record(f"r{i}", error=i < 5) for i in range(100)))
        await app.alerts.evaluate()
        assert (await _alerts(stub))["error_rate_high"].state == pb.ALERT_STATE_PENDING
        clock.now += 400
        await log_and_count(redis_client, app, (_record(f"ok{i}") for i in range(100)))
        await app.alerts.evaluate()
        assert "error_rate_high" not in await _alerts(stub)

    async def test_answers_from_the_fallbacks_count_as_errors(
        self,
        monitor: tuple[pb_grpc.MonitorServiceStub, MonitorApp],
        redis_client: aioredis.Redis,
    ) -> None:
        """5 of 100 requests routed to v1 answered by the declared default outputs (the
        router logs them degraded, with no answering version): no caller saw an error, and
        the error rate rule goes pending for v1 all the same."""
        stub, app = monitor
        records = [_record(f"r{i}") for i in range(100)]
        for record in records[:5]:
            record.routed_version = V1
            record.model_version = ""
            record.degraded = True
        await log_and_count(redis_client, app, records)
        await app.alerts.evaluate()
        alert = (await _alerts(stub))["error_rate_high"]
        assert (alert.state, alert.model_version) == (pb.ALERT_STATE_PENDING, V1)

    async def test_latency_and_prediction_drift_rules(
        self,
        monitor: tuple[pb_grpc.MonitorServiceStub, MonitorApp],
        redis_client: aioredis.Redis,
        clock: TestClock,
    ) -> None:
        """p99 over 200 ms is a warning; a mean prediction 0.3 above the baseline's is critical."""
        stub, app = monitor
        await log_and_count(
            redis_client, app, (_record(f"base{i}", probability=0.2) for i in range(100))
        )
        await app.alerts.evaluate()
        assert await _alerts(stub) == {}
        clock.now += 3600
        slow = (_record(f"s{i}", latency_us=300_000, probability=0.5) for i in range(50))
        await log_and_count(redis_client, app, slow)
        await app.alerts.evaluate()
        alerts = await _alerts(stub)
        assert sorted(alerts) == ["model_latency_high", "prediction_drift"]
        latency = alerts["model_latency_high"]
        assert latency.severity == pb.ALERT_SEVERITY_WARNING
        assert latency.value == pytest.approx(300.0, rel=0.04)
        drift = alerts["prediction_drift"]
        assert drift.severity == pb.ALERT_SEVERITY_CRITICAL
        assert drift.value == pytest.approx(0.3, abs=1e-6)

    async def test_a_feature_shifted_by_one_standard_deviation_fires_the_drift_rules(
        self,
        monitor: tuple[pb_grpc.MonitorServiceStub, MonitorApp],
        redis_client: aioredis.Redis,
        clock: TestClock,
    ) -> None:
        """A feature moved from N(0, 1) to N(1, 1), which moves the prediction (its sigmoid)
        by about 0.2: `feature_drift` (its PSI) and `prediction_drift` go pending at once and
        fire when their 300 s have passed with the shift still in the 5 minute window."""
        stub, app = monitor
        rng = np.random.default_rng(5)
        await log_and_count(redis_client, app, _scored("base", 100, mean=0.0, rng=rng))
        await app.alerts.evaluate()
        assert await _alerts(stub) == {}
        clock.now += 3600
        await log_and_count(redis_client, app, _scored("a", 250, mean=1.0, rng=rng))
        await app.alerts.evaluate()
        pending = await _alerts(stub)
        assert sorted(pending) == ["feature_drift", "prediction_drift"]
        assert {a.state for a in pending.values()} == {pb.ALERT_STATE_PENDING}
        feature = pending["feature_drift"]
        assert (feature.severity, feature.threshold) == (pb.ALERT_SEVERITY_WARNING, 0.2)
        report = await stub.GetDriftReport(
            pb.GetDriftReportRequest(
                endpoint="fraud", model_version=V1, window=pb.WINDOW_FIVE_MINUTES
            )
        )
        [x] = [r for r in report.results if r.feature == "request:x"]
        [x_psi] = [s.statistic for s in x.statistics if s.test == pb.DRIFT_TEST_PSI]
        assert feature.value == pytest.approx(x_psi)
        assert feature.value > 0.5
        assert pending["prediction_drift"].value == pytest.approx(0.2, abs=0.05)
        clock.now += 300
        await log_and_count(redis_client, app, _scored("b", 250, mean=1.0, rng=rng))
        await app.alerts.evaluate()
        firing = await _alerts(stub, pb.ALERT_STATE_FIRING)
        assert sorted(firing) == ["feature_drift", "prediction_drift"]
        assert {a.fire_time.ToSeconds() for a in firing.values()} == {int(T0 + 3900)}

    async def test_list_alerts_pages_and_refuses_bad_tokens(
        self,
        monitor: tuple[pb_grpc.MonitorServiceStub, MonitorApp],
        redis_client: aioredis.Redis,
        clock: TestClock,
    ) -> None:
        """Alerts come a page at a time; a token the service never gave is INVALID_ARGUMENT."""
        stub, app = monitor
        await log_and_count(redis_client, app, (_record(f"b{i}") for i in range(100)))
        clock.now += 3600
        bad = (_record(f"x{i}", error=True, latency_us=500_000, probability=0.9) for i in range(30))
        await log_and_count(redis_client, app, bad)
        await app.alerts.evaluate()
        first = await stub.ListAlerts(pb.ListAlertsRequest(page_size=2))
        second = await stub.ListAlerts(
            pb.ListAlertsRequest(page_size=2, page_token=first.next_page_token)
        )
        assert [a.rule for a in (*first.alerts, *second.alerts)] == [
            "error_rate_high",
            "model_latency_high",
            "prediction_drift",
        ]
        assert second.next_page_token == ""
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ListAlerts(pb.ListAlertsRequest(page_token="not-mine", page_size=-1))
        error = decode_rpc_error(info.value)
        assert error.code is grpc.StatusCode.INVALID_ARGUMENT
        assert sorted(v.field for v in error.violations) == ["page_size", "page_token"]
