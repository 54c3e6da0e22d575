"""GetExperimentReport and StartExperiment through a real MonitorService on a real Redis:
seeded A/B simulations, and experiments that leave out the traffic from before they started."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import redis.asyncio as aioredis
from monitor_testing import T0, TestClock, log_and_count, prediction_record
from scipy import stats  # type: ignore[import-untyped]  # scipy ships no stubs

from modelserve.monitor.v1 import monitor_service_pb2 as pb
from modelserve.monitor.v1 import monitor_service_pb2_grpc as pb_grpc
from modelserve.type.v1 import prediction_record_pb2 as rec_pb
from modelserve.type.v1 import tensor_pb2
from modelserve_monitor.config import MonitorSettings
from modelserve_monitor.server import MonitorApp
from modelserve_runtime.errors import decode_rpc_error

A = "models/fraud/versions/1"
B = "models/fraud/versions/2"
C = "models/fraud/versions/3"


def _record(
    request_id: str, version: str, *, error: bool = False, probability: float = 0.3
) -> rec_pb.PredictionRecord:
    score = tensor_pb2.Tensor(
        name="score",
        datatype=tensor_pb2.DATA_TYPE_FP64,
        shape=[1, 1],
        contents=tensor_pb2.TensorContents(fp64_contents=[probability]),
    )
    return prediction_record(request_id, version, error=error, outputs=[score])


def _requests(
    version: str, start: int, n: int, *, error_rate: float = 0.0, mean: float = 0.3, seed: int
) -> list[rec_pb.PredictionRecord]:
    """Requests start..start+n of an arm: Bernoulli errors, normal(mean, 0.1) predictions."""
    rng = np.random.default_rng(seed)
    errors = rng.random(n) < error_rate
    predictions = rng.normal(mean, 0.1, n)
    return [
        _record(
            f"{version}-{start + i}",
            version,
            error=bool(errors[i]),
            probability=float(predictions[i]),
        )
        for i in range(n)
    ]


@pytest.fixture
def monitor_settings(redis_url: str) -> MonitorSettings:
    """A monitor with the default experiment settings."""
    return MonitorSettings(redis_url=redis_url, consumer_name="experiment-test", block_ms=100)


def _report_request(
    metric: pb.ExperimentMetric.ValueType, sample_size: int, *arms: str, experiment_id: str = ""
) -> pb.GetExperimentReportRequest:
    return pb.GetExperimentReportRequest(
        endpoint="fraud",
        arms=list(arms),
        metric=metric,
        sample_size=sample_size,
        experiment_id=experiment_id,
    )


class TestExperimentReport:
    async def test_real_error_rate_difference_is_significant_only_after_the_sample_size(
        self, monitor: tuple[pb_grpc.MonitorServiceStub, MonitorApp], redis_client: aioredis.Redis
    ) -> None:
        """2 % against 5 % errors: COLLECTING (no comparison shown) at half the planned 2000
        requests per arm, SIGNIFICANT once both arms have them, with an interval that holds
        the true difference."""
        stub, app = monitor
        request = _report_request(pb.EXPERIMENT_METRIC_ERROR_RATE, 2000, A, B)
        await log_and_count(redis_client, app, _requests(A, 0, 1000, error_rate=0.02, seed=1))
        await log_and_count(redis_client, app, _requests(B, 0, 2000, error_rate=0.05, seed=2))
        halfway = await stub.GetExperimentReport(request)
        assert halfway.verdict == pb.EXPERIMENT_VERDICT_COLLECTING
        assert halfway.progress == 0.5
        assert [(a.model_version, a.sample_count, a.progress) for a in halfway.arms] == [
            (A, 1000, 0.5),
            (B, 2000, 1.0),
        ]
        assert not any(a.HasField("comparison") for a in halfway.arms)
        assert halfway.reason.startswith("COLLECTING: 50 % of the 2000 requests per arm")
        await log_and_count(redis_client, app, _requests(A, 1000, 1000, error_rate=0.02, seed=3))
        report = await stub.GetExperimentReport(request)
        assert report.verdict == pb.EXPERIMENT_VERDICT_SIGNIFICANT, report.reason
        assert (report.progress, report.alpha, report.sample_size) == (1.0, 0.05, 2000)
        control, treatment = report.arms
        assert not control.HasField("comparison")
        comparison = treatment.comparison
        assert comparison.test == pb.COMPARISON_TEST_TWO_PROPORTION_Z
        assert comparison.difference == pytest.approx(treatment.value - control.value)
        assert comparison.relative_difference == pytest.approx(
            comparison.difference / control.value
        )
        assert comparison.ci_lower < 0.03 < comparison.ci_upper
        assert comparison.ci_lower > 0
        # The Wald interval at 95 %: the difference +- 1.96 standard errors.
        se = np.sqrt(sum(a.value * (1 - a.value) / 2000 for a in report.arms))
        half_width = (comparison.ci_upper - comparison.ci_lower) / 2
        assert half_width == pytest.approx(stats.norm.ppf(0.975) * se)
        assert comparison.p_value < 0.05
        assert (comparison.alpha, comparison.significant) == (0.05, True)
        assert report.reason.startswith(f"SIGNIFICANT: {B} error rate")

    async def test_no_difference_is_not_significant(
        self, monitor: tuple[pb_grpc.MonitorServiceStub, MonitorApp], redis_client: aioredis.Redis
    ) -> None:
        """Two arms with the same 3 % error rate: NOT_SIGNIFICANT, the interval holding 0."""
        stub, app = monitor
        await log_and_count(redis_client, app, _requests(A, 0, 2000, error_rate=0.03, seed=4))
        await log_and_count(redis_client, app, _requests(B, 0, 2000, error_rate=0.03, seed=5))
        report = await stub.GetExperimentReport(
            _report_request(pb.EXPERIMENT_METRIC_ERROR_RATE, 2000, A, B)
        )
        assert report.verdict == pb.EXPERIMENT_VERDICT_NOT_SIGNIFICANT, report.reason
        comparison = report.arms[1].comparison
        assert comparison.ci_lower < 0 < comparison.ci_upper
        assert comparison.p_value > 0.05
        assert not comparison.significant

    async def test_three_arms_on_the_mean_prediction_split_alpha(
        self, monitor: tuple[pb_grpc.MonitorServiceStub, MonitorApp], redis_client: aioredis.Redis
    ) -> None:
        """With two arms against the control each comparison uses alpha / 2: the arm whose
        mean prediction moved by 0.02 is significant, the unchanged one is not."""
        stub, app = monitor
        await log_and_count(redis_client, app, _requests(A, 0, 1500, mean=0.30, seed=6))
        await log_and_count(redis_client, app, _requests(B, 0, 1500, mean=0.30, seed=7))
        await log_and_count(redis_client, app, _requests(C, 0, 1500, mean=0.32, seed=8))
        report = await stub.GetExperimentReport(
            _report_request(pb.EXPERIMENT_METRIC_PREDICTION_MEAN, 1500, A, B, C)
        )
        assert report.verdict == pb.EXPERIMENT_VERDICT_SIGNIFICANT, report.reason
        _, same, moved = report.arms
        assert (same.comparison.alpha, moved.comparison.alpha) == (0.025, 0.025)
        assert same.comparison.test == pb.COMPARISON_TEST_WELCH_T
        assert not same.comparison.significant
        assert moved.comparison.significant
        assert moved.comparison.difference == pytest.approx(0.02, abs=0.01)
        assert moved.comparison.ci_lower < 0.02 < moved.comparison.ci_upper
        assert C in report.reason
        assert f"{B} " not in report.reason

    async def test_outcome_values_are_compared_once_recorded(
        self, monitor: tuple[pb_grpc.MonitorServiceStub, MonitorApp], redis_client: aioredis.Redis
    ) -> None:
        """Outcome values, recorded with RecordOutcome, count as samples of OUTCOME_MEAN:
        normal(10, 2) against normal(10.8, 2) over 300 values per arm is significant, with
        scipy's Welch statistic, p-value and interval on the values themselves."""
        stub, app = monitor
        await log_and_count(redis_client, app, _requests(A, 0, 300, seed=9))
        await log_and_count(redis_client, app, _requests(B, 0, 300, seed=10))
        rng = np.random.default_rng(11)
        request = _report_request(pb.EXPERIMENT_METRIC_OUTCOME_MEAN, 300, A, B)
        values = {A: rng.normal(10.0, 2.0, 300), B: rng.normal(10.8, 2.0, 300)}
        for version in (A, B):
            for i, value in enumerate(values[version]):
                await stub.RecordOutcome(
                    pb.RecordOutcomeRequest(request_id=f"{version}-{i}", value=float(value))
                )
            if version == A:
                before = await stub.GetExperimentReport(request)
                assert before.verdict == pb.EXPERIMENT_VERDICT_COLLECTING
                assert [a.sample_count for a in before.arms] == [300, 0]
        report = await stub.GetExperimentReport(request)
        assert report.verdict == pb.EXPERIMENT_VERDICT_SIGNIFICANT, report.reason
        control, treatment = report.arms
        assert control.value == pytest.approx(values[A].mean())
        comparison = treatment.comparison
        assert comparison.difference == pytest.approx(values[B].mean() - values[A].mean())
        reference = stats.ttest_ind(values[B], values[A], equal_var=False)
        assert comparison.statistic == pytest.approx(reference.statistic, rel=1e-6)
        assert comparison.p_value == pytest.approx(reference.pvalue, rel=1e-6)
        interval = reference.confidence_interval(0.95)
        assert (comparison.ci_lower, comparison.ci_upper) == (
            pytest.approx(interval.low, rel=1e-6),
            pytest.approx(interval.high, rel=1e-6),
        )

    async def test_bad_requests_are_invalid_argument(
        self, monitor: tuple[pb_grpc.MonitorServiceStub, MonitorApp]
    ) -> None:
        """One arm, no metric, no sample size and alpha above 1 are refused field by field."""
        stub, _ = monitor
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.GetExperimentReport(
                pb.GetExperimentReportRequest(endpoint="fraud", arms=[A], alpha=2)
            )
        error = decode_rpc_error(info.value)
        assert error.code is grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in error.violations] == ["arms", "metric", "sample_size", "alpha"]
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.GetExperimentReport(
                _report_request(pb.EXPERIMENT_METRIC_ERROR_RATE, 100, A, A)
            )
        assert [v.field for v in decode_rpc_error(info.value).violations] == ["arms"]


EXPERIMENT = "deployments/fraud/rollouts/1"


def _start(*arms: str, experiment_id: str = EXPERIMENT) -> pb.StartExperimentRequest:
    return pb.StartExperimentRequest(endpoint="fraud", arms=list(arms), experiment_id=experiment_id)


async def _experiment_keys(redis_client: aioredis.Redis) -> list[bytes]:
    return sorted(await redis_client.keys("modelserve:monitor:*experiment*"))


class TestStartedExperiment:
    async def test_traffic_from_before_the_start_does_not_count(
        self,
        monitor: tuple[pb_grpc.MonitorServiceStub, MonitorApp],
        redis_client: aioredis.Redis,
        clock: TestClock,
    ) -> None:
        """The control served 5000 requests at 20 % errors and mean prediction 0.5 before the
        experiment; after StartExperiment both arms serve 2000 at 3 % and 0.3: the experiment
        counts the 2000 only and finds no difference, while the totals (no experiment_id)
        still count everything and call the control worse."""
        stub, app = monitor
        await log_and_count(
            redis_client, app, _requests(A, 0, 5000, error_rate=0.2, mean=0.5, seed=12)
        )
        started = await stub.StartExperiment(_start(A, B))
        assert (started.endpoint, started.experiment_id, list(started.arms)) == (
            "fraud",
            EXPERIMENT,
            [A, B],
        )
        assert started.started
        assert started.start_time.ToNanoseconds() == T0 * 1e9
        after = {
            A: _requests(A, 5000, 2000, error_rate=0.03, mean=0.3, seed=13),
            B: _requests(B, 0, 2000, error_rate=0.03, mean=0.3, seed=14),
        }
        await log_and_count(redis_client, app, after[A] + after[B])
        errors = _report_request(
            pb.EXPERIMENT_METRIC_ERROR_RATE, 2000, A, B, experiment_id=EXPERIMENT
        )
        report = await stub.GetExperimentReport(errors)
        assert report.verdict == pb.EXPERIMENT_VERDICT_NOT_SIGNIFICANT, report.reason
        assert [(a.sample_count, a.progress) for a in report.arms] == [(2000, 1.0), (2000, 1.0)]
        for arm in report.arms:
            failed = [
                r for r in after[arm.model_version] if r.status == rec_pb.PREDICTION_STATUS_ERROR
            ]
            assert arm.value == pytest.approx(len(failed) / 2000)
        means = await stub.GetExperimentReport(
            _report_request(
                pb.EXPERIMENT_METRIC_PREDICTION_MEAN, 2000, A, B, experiment_id=EXPERIMENT
            )
        )
        assert means.verdict == pb.EXPERIMENT_VERDICT_NOT_SIGNIFICANT, means.reason
        control_predictions = [r.outputs[0].contents.fp64_contents[0] for r in after[A]]
        assert means.arms[0].sample_count == 2000
        assert means.arms[0].value == pytest.approx(np.mean(control_predictions))
        totals = await stub.GetExperimentReport(
            _report_request(pb.EXPERIMENT_METRIC_ERROR_RATE, 2000, A, B)
        )
        assert [a.sample_count for a in totals.arms] == [7000, 2000]
        assert totals.verdict == pb.EXPERIMENT_VERDICT_SIGNIFICANT, totals.reason

    async def test_outcomes_recorded_before_the_start_do_not_count(
        self,
        monitor: tuple[pb_grpc.MonitorServiceStub, MonitorApp],
        redis_client: aioredis.Redis,
    ) -> None:
        """Outcome values recorded before the start (value 100) are left out of OUTCOME_MEAN;
        the ones recorded after are its samples, with their exact mean."""
        stub, app = monitor
        await log_and_count(redis_client, app, _requests(A, 0, 60, seed=15))
        await log_and_count(redis_client, app, _requests(B, 0, 30, seed=16))
        for i in range(30):
            await stub.RecordOutcome(pb.RecordOutcomeRequest(request_id=f"{A}-{i}", value=100.0))
        await stub.StartExperiment(_start(A, B))
        rng = np.random.default_rng(17)
        values = {A: rng.normal(10.0, 2.0, 30), B: rng.normal(10.0, 2.0, 30)}
        for version, offset in ((A, 30), (B, 0)):
            for i, value in enumerate(values[version]):
                await stub.RecordOutcome(
                    pb.RecordOutcomeRequest(
                        request_id=f"{version}-{offset + i}", value=float(value)
                    )
                )
        report = await stub.GetExperimentReport(
            _report_request(pb.EXPERIMENT_METRIC_OUTCOME_MEAN, 30, A, B, experiment_id=EXPERIMENT)
        )
        assert [a.sample_count for a in report.arms] == [30, 30]
        assert report.arms[0].value == pytest.approx(values[A].mean())
        assert report.arms[1].value == pytest.approx(values[B].mean())

    async def test_starting_again_keeps_the_first_start(
        self,
        monitor: tuple[pb_grpc.MonitorServiceStub, MonitorApp],
        redis_client: aioredis.Redis,
        clock: TestClock,
    ) -> None:
        """A second StartExperiment with the same id says it was started before and keeps the
        first zero point and time; one with other arms is FAILED_PRECONDITION and changes
        nothing."""
        stub, app = monitor
        await log_and_count(redis_client, app, _requests(A, 0, 50, seed=18))
        first = await stub.StartExperiment(_start(A, B))
        await log_and_count(redis_client, app, _requests(A, 50, 40, seed=19))
        await log_and_count(redis_client, app, _requests(B, 0, 30, seed=20))
        clock.now += 60
        again = await stub.StartExperiment(_start(B, A))
        assert not again.started
        assert list(again.arms) == [A, B]
        assert again.start_time == first.start_time
        keys = await _experiment_keys(redis_client)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.StartExperiment(_start(A, C))
        error = decode_rpc_error(info.value)
        assert (error.code, error.reason) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "EXPERIMENT_ARMS_DIFFER",
        )
        assert EXPERIMENT in error.message
        assert await _experiment_keys(redis_client) == keys
        report = await stub.GetExperimentReport(
            _report_request(pb.EXPERIMENT_METRIC_ERROR_RATE, 100, A, B, experiment_id=EXPERIMENT)
        )
        assert [a.sample_count for a in report.arms] == [40, 30]

    async def test_an_experiment_not_started_is_not_found(
        self, monitor: tuple[pb_grpc.MonitorServiceStub, MonitorApp]
    ) -> None:
        """A report for an experiment never started, started on another endpoint, or without
        one of the arms asked is NOT_FOUND naming the experiment; a window with an
        experiment is INVALID_ARGUMENT."""
        stub, _ = monitor
        await stub.StartExperiment(_start(A, B))
        request = _report_request(pb.EXPERIMENT_METRIC_ERROR_RATE, 100, A, B)
        cases = [
            (request.endpoint, [A, B], "rollouts/9", "EXPERIMENT_NOT_FOUND"),
            ("other", [A, B], EXPERIMENT, "EXPERIMENT_NOT_FOUND"),
            ("fraud", [A, C], EXPERIMENT, "EXPERIMENT_ARM_NOT_FOUND"),
        ]
        for endpoint, arms, experiment_id, reason in cases:
            request.endpoint, request.experiment_id = endpoint, experiment_id
            request.ClearField("arms")
            request.arms.extend(arms)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.GetExperimentReport(request)
            error = decode_rpc_error(info.value)
            assert (error.code, error.reason) == (grpc.StatusCode.NOT_FOUND, reason)
            assert experiment_id in error.message
            assert error.metadata["experiment_id"] == experiment_id
        windowed = _report_request(
            pb.EXPERIMENT_METRIC_ERROR_RATE, 100, A, B, experiment_id=EXPERIMENT
        )
        windowed.window = pb.WINDOW_ONE_HOUR
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.GetExperimentReport(windowed)
        assert [v.field for v in decode_rpc_error(info.value).violations] == ["window"]

    async def test_bad_starts_are_invalid_argument_and_write_nothing(
        self,
        monitor: tuple[pb_grpc.MonitorServiceStub, MonitorApp],
        redis_client: aioredis.Redis,
    ) -> None:
        """No endpoint, too few, repeated or malformed arms and a missing or malformed id are
        refused, naming the field, and leave no experiment behind."""
        stub, app = monitor
        await log_and_count(redis_client, app, _requests(A, 0, 10, seed=21))
        cases = [
            (pb.StartExperimentRequest(arms=[A, B], experiment_id="x"), ["endpoint"]),
            (_start(), ["arms"]),
            (_start(A), ["arms"]),
            (_start(A, A), ["arms"]),
            (_start(A, "models/fraud/versions/two"), ["arms"]),
            (_start(A, "fraud:2"), ["arms"]),
            (_start(A, B, experiment_id=""), ["experiment_id"]),
            (_start(A, B, experiment_id="/rollouts/1"), ["experiment_id"]),
            (_start(A, B, experiment_id="rollout 1"), ["experiment_id"]),
            (_start(A, B, experiment_id="r" * 129), ["experiment_id"]),
            (pb.StartExperimentRequest(), ["endpoint", "arms", "experiment_id"]),
        ]
        for request, fields in cases:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.StartExperiment(request)
            error = decode_rpc_error(info.value)
            assert error.code is grpc.StatusCode.INVALID_ARGUMENT, request
            assert [v.field for v in error.violations] == fields, request
        assert await _experiment_keys(redis_client) == []
