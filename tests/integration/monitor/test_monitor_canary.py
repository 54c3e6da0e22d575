"""JudgeCanary through a real MonitorService on a real Redis: seeded traffic, known verdicts."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import redis.asyncio as aioredis
from monitor_testing import T0, log_and_count, prediction_record, probabilities
from scipy import stats  # type: ignore[import-untyped]  # scipy ships no stubs

from modelserve.monitor.v1 import monitor_service_pb2 as pb
from modelserve.monitor.v1 import monitor_service_pb2_grpc as pb_grpc
from modelserve.type.v1 import prediction_record_pb2 as rec_pb
from modelserve_monitor.config import MonitorSettings
from modelserve_monitor.server import MonitorApp
from modelserve_runtime.errors import decode_rpc_error

STABLE = "models/fraud/versions/1"
CANARY = "models/fraud/versions/2"


def _record(
    request_id: str,
    version: str,
    *,
    error: bool = False,
    latency_ms: float = 20.0,
    probability: float = 0.3,
) -> rec_pb.PredictionRecord:
    return prediction_record(
        request_id,
        version,
        error=error,
        latency_us=round(latency_ms * 1000),
        outputs=[] if error else [probabilities(probability)],
    )


def _traffic(
    version: str,
    n: int,
    *,
    seed: int,
    error_every: int = 0,
    latency_scale: float = 1.0,
    probability_shift: float = 0.0,
) -> list[rec_pb.PredictionRecord]:
    """n requests: log-normal latency around 20 ms, beta(2, 5) probabilities, seeded."""
    rng = np.random.default_rng(seed)
    latencies = rng.lognormal(np.log(20.0), 0.3, n) * latency_scale
    probabilities = np.clip(rng.beta(2, 5, n) + probability_shift, 0, 1)
    return [
        _record(
            f"{version}-{i}",
            version,
            error=bool(error_every) and i % error_every == 0,
            latency_ms=float(latencies[i]),
            probability=float(probabilities[i]),
        )
        for i in range(n)
    ]


@pytest.fixture
def monitor_settings(redis_url: str) -> MonitorSettings:
    """A monitor with the default canary thresholds (500 requests per version, alpha 0.01)."""
    return MonitorSettings(redis_url=redis_url, consumer_name="canary-test", block_ms=100)


async def _judge(
    stub: pb_grpc.MonitorServiceStub, thresholds: pb.CanaryThresholds | None = None
) -> pb.JudgeCanaryResponse:
    return await stub.JudgeCanary(
        pb.JudgeCanaryRequest(
            endpoint="fraud",
            canary_version=CANARY,
            stable_version=STABLE,
            window=pb.WINDOW_FIVE_MINUTES,
            thresholds=thresholds,
        )
    )


def _checks(response: pb.JudgeCanaryResponse) -> dict[str, pb.CanaryCheck]:
    return {c.name: c for c in response.checks}


class TestCanaryJudgement:
    async def test_five_percent_errors_against_none_fails(
        self, monitor: tuple[pb_grpc.MonitorServiceStub, MonitorApp], redis_client: aioredis.Redis
    ) -> None:
        """2000 requests each, 5 % errors against 0 %: FAIL on the error rate, with the
        figures, the test and the threshold in the check and the reason."""
        stub, app = monitor
        await log_and_count(redis_client, app, _traffic(STABLE, 2000, seed=1))
        await log_and_count(redis_client, app, _traffic(CANARY, 2000, seed=2, error_every=20))
        response = await _judge(stub)
        assert response.verdict == pb.CANARY_VERDICT_FAIL
        assert response.reason.startswith("FAIL: error_rate: error rate 5.00 % vs 0.00 %")
        checks = _checks(response)
        assert list(checks) == [
            "error_rate",
            "latency",
            "prediction_distribution",
            "accuracy",
            "absolute_error",
        ]
        errors = checks["error_rate"]
        assert (errors.verdict, errors.test) == (
            pb.CANARY_CHECK_VERDICT_FAIL,
            pb.COMPARISON_TEST_TWO_PROPORTION_Z,
        )
        assert (errors.canary_value, errors.stable_value) == (0.05, 0.0)
        assert errors.effect == pytest.approx(0.05)
        assert (errors.canary_count, errors.stable_count, errors.min_count) == (2000, 2000, 500)
        # Three checks ran (no outcomes were recorded): alpha 0.01 is split three ways.
        assert errors.alpha == pytest.approx(0.01 / 3)
        assert errors.statistic > 7
        assert errors.p_value < 1e-12
        assert checks["latency"].verdict == pb.CANARY_CHECK_VERDICT_PASS
        assert checks["prediction_distribution"].verdict == pb.CANARY_CHECK_VERDICT_PASS
        assert checks["accuracy"].verdict == pb.CANARY_CHECK_VERDICT_NOT_APPLICABLE
        assert checks["absolute_error"].verdict == pb.CANARY_CHECK_VERDICT_NOT_APPLICABLE
        assert response.thresholds.min_requests == 500
        assert response.window == pb.WINDOW_FIVE_MINUTES
        assert response.judge_time.ToSeconds() == int(T0)

    async def test_failures_the_fallbacks_answered_count_against_the_canary(
        self, monitor: tuple[pb_grpc.MonitorServiceStub, MonitorApp], redis_client: aioredis.Redis
    ) -> None:
        """5 % of the canary's requests answered by the fallback chain (the stable version
        as fallback, as the router logs them: routed to the canary, answered by the stable
        one, degraded) and no error at all: FAIL on the error rate all the same, and the
        stable version is not charged with them."""
        stub, app = monitor
        canary = _traffic(CANARY, 2000, seed=2)
        for record in canary[::20]:
            record.routed_version = CANARY
            record.model_version = STABLE
            record.degraded = True
            record.degraded_reason = f"{CANARY} failed: UPSTREAM_TIMEOUT; answered by fallback"
        await log_and_count(redis_client, app, _traffic(STABLE, 2000, seed=1))
        await log_and_count(redis_client, app, canary)
        response = await _judge(stub)
        errors = _checks(response)["error_rate"]
        assert errors.verdict == pb.CANARY_CHECK_VERDICT_FAIL
        assert (errors.canary_value, errors.stable_value) == (0.05, 0.0)
        assert (errors.canary_count, errors.stable_count) == (2000, 2000)
        assert response.verdict == pb.CANARY_VERDICT_FAIL

    async def test_equal_versions_pass(
        self, monitor: tuple[pb_grpc.MonitorServiceStub, MonitorApp], redis_client: aioredis.Redis
    ) -> None:
        """Two versions drawn from the same distributions, 1 % errors each, PASS every check."""
        stub, app = monitor
        await log_and_count(redis_client, app, _traffic(STABLE, 2000, seed=3, error_every=100))
        await log_and_count(redis_client, app, _traffic(CANARY, 2000, seed=4, error_every=100))
        response = await _judge(stub)
        assert response.verdict == pb.CANARY_VERDICT_PASS, response.reason
        assert response.reason.startswith(f"PASS: 3 checks found {CANARY} no worse than {STABLE}")
        checks = _checks(response)
        for name in ("error_rate", "latency", "prediction_distribution"):
            assert checks[name].verdict == pb.CANARY_CHECK_VERDICT_PASS
            assert checks[name].p_value > checks[name].alpha
        assert checks["prediction_distribution"].effect < 0.1

    async def test_few_samples_are_inconclusive_until_the_minimum(
        self, monitor: tuple[pb_grpc.MonitorServiceStub, MonitorApp], redis_client: aioredis.Redis
    ) -> None:
        """With 100 requests per version nothing is judged (INCONCLUSIVE, saying how many are
        needed) until the request lowers the minimum."""
        stub, app = monitor
        await log_and_count(redis_client, app, _traffic(STABLE, 100, seed=5))
        await log_and_count(redis_client, app, _traffic(CANARY, 100, seed=6, error_every=20))
        response = await _judge(stub)
        assert response.verdict == pb.CANARY_VERDICT_INCONCLUSIVE
        assert "too few requests: canary 100, stable 100, 500 each needed" in response.reason
        errors = _checks(response)["error_rate"]
        assert errors.verdict == pb.CANARY_CHECK_VERDICT_INCONCLUSIVE
        assert errors.canary_value == pytest.approx(0.05)
        lowered = await _judge(stub, pb.CanaryThresholds(min_requests=50))
        assert lowered.verdict != pb.CANARY_VERDICT_INCONCLUSIVE
        assert lowered.thresholds.min_requests == 50
        assert lowered.thresholds.alpha == 0.01

    async def test_latency_shift_is_found_by_mann_whitney(
        self, monitor: tuple[pb_grpc.MonitorServiceStub, MonitorApp], redis_client: aioredis.Redis
    ) -> None:
        """A canary 30 % slower FAILs the latency check, with its median and the effect."""
        stub, app = monitor
        await log_and_count(redis_client, app, _traffic(STABLE, 3000, seed=7))
        await log_and_count(redis_client, app, _traffic(CANARY, 3000, seed=8, latency_scale=1.3))
        response = await _judge(stub)
        assert response.verdict == pb.CANARY_VERDICT_FAIL
        latency = _checks(response)["latency"]
        assert (latency.verdict, latency.test) == (
            pb.CANARY_CHECK_VERDICT_FAIL,
            pb.COMPARISON_TEST_MANN_WHITNEY_U,
        )
        assert latency.effect == pytest.approx(0.3, abs=0.06)
        assert latency.canary_value == pytest.approx(26.0, rel=0.05)
        assert latency.p_value < 1e-20
        assert "P(canary slower)" in latency.reason
        assert _checks(response)["error_rate"].verdict == pb.CANARY_CHECK_VERDICT_PASS

    async def test_small_latency_shift_within_tolerance_passes(
        self, monitor: tuple[pb_grpc.MonitorServiceStub, MonitorApp], redis_client: aioredis.Redis
    ) -> None:
        """6 % slower over 6000 requests each: significant, but within the 10 % tolerance;
        with no tolerance the same figures fail."""
        stub, app = monitor
        await log_and_count(redis_client, app, _traffic(STABLE, 6000, seed=9))
        await log_and_count(redis_client, app, _traffic(CANARY, 6000, seed=10, latency_scale=1.06))
        latency = _checks(await _judge(stub))["latency"]
        assert latency.p_value < latency.alpha
        assert latency.verdict == pb.CANARY_CHECK_VERDICT_PASS
        assert "within" in latency.reason
        strict = _checks(await _judge(stub, pb.CanaryThresholds(max_latency_increase=0.0)))
        assert strict["latency"].verdict == pb.CANARY_CHECK_VERDICT_FAIL

    async def test_shifted_predictions_and_worse_accuracy_fail(
        self, monitor: tuple[pb_grpc.MonitorServiceStub, MonitorApp], redis_client: aioredis.Redis
    ) -> None:
        """Predictions moved by 0.2 fail the KS check; labels right 70 % of the time against
        90 % fail the accuracy check once each version has 100 labels."""
        stub, app = monitor
        stable, canary = _traffic(STABLE, 1000, seed=11), _traffic(CANARY, 1000, seed=12)
        for record in canary:
            record.outputs[0].contents.fp32_contents[1] += 0.2
        await log_and_count(redis_client, app, [*stable, *canary])
        for records, right in ((stable, 0.9), (canary, 0.7)):
            for i, record in enumerate(records[:200]):
                predicted = int(record.outputs[0].contents.fp32_contents[1] >= 0.5)
                label = predicted if i < right * 200 else 1 - predicted
                await stub.RecordOutcome(
                    pb.RecordOutcomeRequest(request_id=record.request_id, label=label)
                )
        response = await _judge(stub)
        checks = _checks(response)
        shift = checks["prediction_distribution"]
        assert (shift.verdict, shift.test) == (
            pb.CANARY_CHECK_VERDICT_FAIL,
            pb.COMPARISON_TEST_KOLMOGOROV_SMIRNOV,
        )
        assert shift.effect == shift.statistic > 0.3
        accuracy = checks["accuracy"]
        assert accuracy.verdict == pb.CANARY_CHECK_VERDICT_FAIL
        assert (accuracy.canary_value, accuracy.stable_value) == (0.7, 0.9)
        assert accuracy.effect == pytest.approx(0.2)
        assert accuracy.alpha == pytest.approx(0.01 / 4)
        assert response.verdict == pb.CANARY_VERDICT_FAIL
        assert "prediction_distribution:" in response.reason
        assert "accuracy:" in response.reason

    async def test_larger_absolute_errors_fail_by_welch(
        self, monitor: tuple[pb_grpc.MonitorServiceStub, MonitorApp], redis_client: aioredis.Redis
    ) -> None:
        """Value outcomes about 0.64 away from the canary's predictions on average, against
        0.4 from the stable one's: the absolute-error check fails, with scipy's one-sided Welch
        t on the errors themselves."""
        stub, app = monitor
        stable, canary = _traffic(STABLE, 600, seed=13), _traffic(CANARY, 600, seed=14)
        await log_and_count(redis_client, app, [*stable, *canary])
        rng = np.random.default_rng(15)
        errors = {}
        for records, spread in ((stable, 0.5), (canary, 0.8)):
            predictions = np.array(
                [r.outputs[0].contents.fp32_contents[1] for r in records[:300]], dtype=np.float32
            ).astype(np.float64)
            values = predictions + rng.normal(0.0, spread, 300)
            errors[records[0].model_version] = np.abs(values - predictions)
            for record, value in zip(records, values, strict=False):
                await stub.RecordOutcome(
                    pb.RecordOutcomeRequest(request_id=record.request_id, value=float(value))
                )
        check = _checks(await _judge(stub, pb.CanaryThresholds(min_outcomes=300)))["absolute_error"]
        assert (check.verdict, check.test) == (
            pb.CANARY_CHECK_VERDICT_FAIL,
            pb.COMPARISON_TEST_WELCH_T,
        )
        reference = stats.ttest_ind(
            errors[CANARY], errors[STABLE], equal_var=False, alternative="greater"
        )
        assert check.statistic == pytest.approx(reference.statistic, rel=1e-6)
        assert check.p_value == pytest.approx(reference.pvalue, rel=1e-6)
        assert (check.canary_value, check.stable_value) == (
            pytest.approx(errors[CANARY].mean()),
            pytest.approx(errors[STABLE].mean()),
        )
        assert (check.canary_count, check.min_count) == (300, 300)

    async def test_bad_requests_are_invalid_argument(
        self, monitor: tuple[pb_grpc.MonitorServiceStub, MonitorApp]
    ) -> None:
        """Missing names, one version twice and thresholds out of range are refused field by
        field."""
        stub, _ = monitor
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.JudgeCanary(pb.JudgeCanaryRequest(endpoint="fraud"))
        error = decode_rpc_error(info.value)
        assert error.code is grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in error.violations] == ["canary_version", "stable_version"]
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.JudgeCanary(
                pb.JudgeCanaryRequest(
                    endpoint="fraud",
                    canary_version=STABLE,
                    stable_version=STABLE,
                    thresholds=pb.CanaryThresholds(alpha=1.5, min_requests=0),
                )
            )
        assert [v.field for v in decode_rpc_error(info.value).violations] == [
            "canary_version",
            "thresholds.alpha",
            "thresholds.min_requests",
        ]
