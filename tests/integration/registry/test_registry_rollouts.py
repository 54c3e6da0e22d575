"""The rollout controller against a real monitor on a real Redis: canary steps advance when
the gate passes, a failing candidate is rolled back by itself with the reason audited, and
pause, resume, abort and a registry restart behave."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import redis.asyncio as aioredis
from google.protobuf import duration_pb2, field_mask_pb2
from registry_testing import create_model, failure, tiny_onnx, upload_version
from structlog.testing import capture_logs
from support import eventually, running

from modelserve.monitor.v1 import monitor_service_pb2 as monitor_pb
from modelserve.monitor.v1 import monitor_service_pb2_grpc as monitor_grpc
from modelserve.registry.v1 import registry_service_pb2 as pb
from modelserve.registry.v1 import registry_service_pb2_grpc as pb_grpc
from modelserve.type.v1 import prediction_record_pb2 as rec_pb
from modelserve_monitor.config import MonitorSettings
from modelserve_monitor.server import build_server as build_monitor
from modelserve_registry.config import RegistrySettings
from modelserve_registry.rollout import CONTROLLER
from modelserve_registry.server import RegistryApp
from modelserve_registry.server import build_server as build_registry
from modelserve_runtime.prediction_log import PredictionLogWriter

V1, V2 = "models/fraud/versions/1", "models/fraud/versions/2"
WAIT_S = 20.0


def canary(
    *steps: int, interval_s: int = 1, min_requests: int = 20, max_wait_s: int = 0
) -> pb.RolloutStrategy:
    """A canary strategy with a gate that needs `min_requests` and allows 1 % errors."""
    gate = pb.RolloutGate(max_error_rate=0.01, max_p99_latency_ms=200, min_requests=min_requests)
    if max_wait_s:
        gate.max_wait.CopyFrom(duration_pb2.Duration(seconds=max_wait_s))
    return pb.RolloutStrategy(
        canary=pb.CanaryStrategy(steps=steps, interval=duration_pb2.Duration(seconds=interval_s)),
        gate=gate,
    )


@dataclass
class Rollouts:
    """A registry whose gate reads a real monitor, and a writer of that monitor's stream."""

    stub: pb_grpc.RegistryServiceAsyncStub
    app: RegistryApp
    writer: PredictionLogWriter
    deployment: str
    settings: RegistrySettings
    restart: Callable[[], AbstractAsyncContextManager[tuple[object, grpc.aio.Channel, object]]]
    monitor: monitor_grpc.MonitorServiceAsyncStub

    @property
    def endpoint(self) -> str:
        return self.deployment.removeprefix("deployments/")

    def answer(
        self,
        version: str,
        count: int,
        *,
        errors: int = 0,
        latency_us: int = 2000,
        degraded: int = 0,
        fallback: str = "",
    ) -> None:
        """Logs `count` requests routed to `version`, the first `errors` of them failed, and
        of the rest `degraded` answered by its fallback chain (by `fallback`, else by the
        declared default outputs), as the router logs them."""
        for i in range(count):
            fell_back = errors <= i < errors + degraded
            self.writer.append(
                rec_pb.PredictionRecord(
                    request_id=uuid.uuid4().hex,
                    endpoint=self.endpoint,
                    model_version=fallback if fell_back else version,
                    routed_version=version,
                    latency_us=latency_us,
                    status=(
                        rec_pb.PREDICTION_STATUS_ERROR
                        if i < errors
                        else rec_pb.PREDICTION_STATUS_OK
                    ),
                    degraded=fell_back,
                    degraded_reason=(
                        f"{version} failed: UPSTREAM_TIMEOUT; answered by ..." if fell_back else ""
                    ),
                )
            )

    async def start(self, strategy: pb.RolloutStrategy, reason: str = "ship v2") -> pb.Rollout:
        response = await self.stub.StartRollout(
            pb.StartRolloutRequest(
                deployment=self.deployment, candidate_version=V2, strategy=strategy, reason=reason
            )
        )
        return response.rollout

    async def rollout(self, name: str) -> pb.Rollout:
        return (await self.stub.GetRollout(pb.GetRolloutRequest(name=name))).rollout

    async def traffic(self) -> dict[str, int]:
        response = await self.stub.GetDeployment(pb.GetDeploymentRequest(name=self.deployment))
        return {t.model_version: t.percent for t in response.deployment.traffic}

    async def reaches(self, name: str, state: pb.RolloutState.ValueType) -> pb.Rollout:
        seen: list[pb.Rollout] = []

        async def check() -> bool:
            seen.append(await self.rollout(name))
            return seen[-1].state == state

        await eventually(check, f"{name} {pb.RolloutState.Name(state)}", within_s=WAIT_S)
        return seen[-1]


@pytest.fixture
async def rollouts(
    tmp_path: Path, redis_url: str, redis_client: aioredis.Redis
) -> AsyncIterator[Rollouts]:
    """A monitor on its own stream, a registry reading it with a fast controller tick, and
    `deployments/<unique>` serving v1 with v2 uploaded."""
    stream = f"test:rollouts:{uuid.uuid4().hex}"
    monitor_settings = MonitorSettings(
        redis_url=redis_url,
        stream=stream,
        consumer_name="rollout-test",
        block_ms=50,
    )
    async with running(build_monitor, monitor_settings) as (monitor, monitor_channel, _):
        settings = RegistrySettings(
            production_traffic_only=False,
            data_dir=tmp_path / "registry",
            monitor_target=f"127.0.0.1:{monitor.port}",
            rollout_tick_s=0.05,
        )

        def restart() -> AbstractAsyncContextManager[tuple[object, grpc.aio.Channel, object]]:
            return running(build_registry, settings)

        async with restart() as (_, channel, app):
            assert isinstance(app, RegistryApp)
            stub = pb_grpc.RegistryServiceStub(channel)
            await create_model(stub)
            await upload_version(stub, tiny_onnx(weight=1.0))
            await upload_version(stub, tiny_onnx(weight=2.0))
            deployment = f"deployments/d-{uuid.uuid4().hex[:8]}"
            await stub.UpdateDeployment(
                pb.UpdateDeploymentRequest(
                    deployment=pb.Deployment(
                        name=deployment, traffic=[pb.TrafficTarget(model_version=V1, percent=100)]
                    ),
                    allow_missing=True,
                )
            )
            writer = PredictionLogWriter(redis_client, stream=stream)
            monitor_stub = monitor_grpc.MonitorServiceStub(monitor_channel)
            yield Rollouts(stub, app, writer, deployment, settings, restart, monitor_stub)
            await writer.flush()


class TestCanary:
    async def test_healthy_candidate_takes_all_traffic_step_by_step(
        self, rollouts: Rollouts
    ) -> None:
        """Each step holds its interval, passes its gate, and the next revision moves traffic;
        the last step leaves the candidate alone at 100 % and every move is audited."""
        started = await rollouts.start(canary(50, 100))
        assert (started.state, started.step, started.candidate_percent) == (
            pb.ROLLOUT_STATE_RUNNING,
            0,
            50,
        )
        assert started.stable_version == V1 and started.candidate_version == V2
        assert await rollouts.traffic() == {V1: 50, V2: 50}
        rollouts.answer(V2, 40)
        done = await rollouts.reaches(started.name, pb.ROLLOUT_STATE_SUCCEEDED)
        assert done.last_gate.verdict == pb.GATE_VERDICT_PASS
        assert done.last_gate.figures["requests"] >= 20
        assert await rollouts.traffic() == {V2: 100}

        revisions = await rollouts.stub.ListDeploymentRevisions(
            pb.ListDeploymentRevisionsRequest(name=rollouts.deployment)
        )
        moves = [
            ({t.model_version: t.percent for t in r.deployment.traffic}, r.principal)
            for r in reversed(revisions.revisions)
        ]
        assert moves == [
            ({V1: 100}, "anonymous"),
            ({V1: 50, V2: 50}, "anonymous"),
            ({V1: 0, V2: 100}, CONTROLLER),
            ({V2: 100}, CONTROLLER),
        ]
        audit = await rollouts.stub.ListAuditEvents(
            pb.ListAuditEventsRequest(resource=started.name)
        )
        actions = [(e.action, e.principal, e.details["state"]) for e in audit.audit_events]
        assert actions == [
            ("RolloutGate", CONTROLLER, "SUCCEEDED"),
            ("RolloutGate", CONTROLLER, "RUNNING"),
            ("StartRollout", "anonymous", "RUNNING"),
        ]
        assert "succeeded: error rate 0.00%" in audit.audit_events[0].reason

    async def test_failing_candidate_is_rolled_back_and_the_audit_says_why(
        self, rollouts: Rollouts
    ) -> None:
        """A candidate that errors 5 % of the time fails a 1 % gate: all traffic returns to the
        stable version by itself and the audit trail records the error rate behind it."""
        started = await rollouts.start(canary(10, 50, 100))
        rollouts.answer(V2, 100, errors=5)
        aborted = await rollouts.reaches(started.name, pb.ROLLOUT_STATE_ABORTED)
        assert aborted.last_gate.verdict == pb.GATE_VERDICT_FAIL
        assert "error rate" in aborted.reason and "above 1.00%" in aborted.reason
        assert aborted.last_gate.figures["error_rate"] > 0.01
        assert aborted.step == 0
        assert await rollouts.traffic() == {V1: 100}
        events = await rollouts.stub.ListAuditEvents(
            pb.ListAuditEventsRequest(resource=rollouts.deployment)
        )
        rollback = events.audit_events[0]
        assert (rollback.principal, rollback.action) == (CONTROLLER, "RolloutGate")
        assert "aborted" in rollback.reason and "error rate" in rollback.reason

    @pytest.mark.parametrize("fallback", ["", V1], ids=["default-outputs", "fallback-version"])
    async def test_a_candidate_the_fallbacks_answer_for_is_rolled_back(
        self, rollouts: Rollouts, fallback: str
    ) -> None:
        """A candidate that times out on 5 % of its requests, each answered by the fallback
        chain (the declared default outputs, or the stable version as fallback), so that no
        caller sees an error: the router logs them for the candidate, degraded, and the gate
        fails it on them."""
        started = await rollouts.start(canary(10, 50, 100))
        rollouts.answer(V2, 100, degraded=5, fallback=fallback)
        aborted = await rollouts.reaches(started.name, pb.ROLLOUT_STATE_ABORTED)
        assert aborted.last_gate.verdict == pb.GATE_VERDICT_FAIL
        assert aborted.last_gate.figures["error_rate"] == pytest.approx(0.05)
        assert aborted.last_gate.figures["requests"] == 100
        assert await rollouts.traffic() == {V1: 100}

    async def test_the_statistical_judge_catches_what_thresholds_let_through(
        self, rollouts: Rollouts
    ) -> None:
        """With `judge`, a candidate inside a lenient 10 % error bound but significantly worse
        than the stable version on the same window (5 % against 0 %) is rolled back, and the
        reason quotes the monitor's judgement."""
        strategy = canary(50, 100, min_requests=500)
        strategy.gate.max_error_rate = 0.10
        strategy.gate.judge = True
        started = await rollouts.start(strategy)
        rollouts.answer(V1, 600)
        rollouts.answer(V2, 600, errors=30)
        aborted = await rollouts.reaches(started.name, pb.ROLLOUT_STATE_ABORTED)
        assert "canary judgement" in aborted.reason
        assert aborted.last_gate.verdict == pb.GATE_VERDICT_FAIL
        assert await rollouts.traffic() == {V1: 100}

    async def test_slow_candidate_fails_the_latency_gate(self, rollouts: Rollouts) -> None:
        """A p99 above the gate's bound aborts the rollout, naming the latency."""
        started = await rollouts.start(canary(25, 100))
        rollouts.answer(V2, 30, latency_us=450_000)
        aborted = await rollouts.reaches(started.name, pb.ROLLOUT_STATE_ABORTED)
        assert "p99 latency" in aborted.reason
        assert await rollouts.traffic() == {V1: 100}

    async def test_a_step_without_enough_requests_waits_then_gives_up(
        self, rollouts: Rollouts
    ) -> None:
        """Too few requests are INCONCLUSIVE: the step waits, and past max_wait the rollout is
        aborted rather than left hanging."""
        started = await rollouts.start(canary(50, 100, min_requests=1000, max_wait_s=2))
        rollouts.answer(V2, 5)
        waiting = await rollouts.reaches(started.name, pb.ROLLOUT_STATE_RUNNING)
        await eventually(
            lambda: _gate_read(rollouts, started.name), "the first gate reading", within_s=WAIT_S
        )
        waiting = await rollouts.rollout(started.name)
        assert waiting.last_gate.verdict == pb.GATE_VERDICT_INCONCLUSIVE
        assert await rollouts.traffic() == {V1: 50, V2: 50}
        aborted = await rollouts.reaches(started.name, pb.ROLLOUT_STATE_ABORTED)
        assert "inconclusive for longer than 2 s" in aborted.reason
        assert await rollouts.traffic() == {V1: 100}


async def _gate_read(rollouts: Rollouts, name: str) -> bool:
    return (await rollouts.rollout(name)).HasField("last_gate")


class TestControl:
    async def test_pause_holds_the_step_and_resume_continues(self, rollouts: Rollouts) -> None:
        """A paused rollout is not stepped even with a passing gate; resumed, it finishes."""
        started = await rollouts.start(canary(50, 100))
        paused = (
            await rollouts.stub.PauseRollout(
                pb.PauseRolloutRequest(name=started.name, reason="investigate a ticket")
            )
        ).rollout
        assert (paused.state, paused.reason) == (pb.ROLLOUT_STATE_PAUSED, "investigate a ticket")
        rollouts.answer(V2, 40)
        step_end = paused.step_start_time.ToSeconds() + 1.0
        await eventually(lambda: time.time() > step_end + 0.2, "the step's interval to pass")
        await rollouts.app.rollouts.tick()
        assert (await rollouts.rollout(started.name)).state == pb.ROLLOUT_STATE_PAUSED
        assert await rollouts.traffic() == {V1: 50, V2: 50}

        resumed = await rollouts.stub.ResumeRollout(pb.ResumeRolloutRequest(name=started.name))
        assert resumed.rollout.state == pb.ROLLOUT_STATE_RUNNING
        assert resumed.rollout.step_start_time.ToSeconds() >= paused.step_start_time.ToSeconds()
        await rollouts.reaches(started.name, pb.ROLLOUT_STATE_SUCCEEDED)
        assert await rollouts.traffic() == {V2: 100}

    async def test_abort_by_hand_restores_the_stable_version(self, rollouts: Rollouts) -> None:
        """AbortRollout returns all traffic to the stable version at once, as a new revision."""
        started = await rollouts.start(canary(50, 100, interval_s=60))
        aborted = (
            await rollouts.stub.AbortRollout(
                pb.AbortRolloutRequest(name=started.name, reason="customer complaints")
            )
        ).rollout
        assert (aborted.state, aborted.reason) == (pb.ROLLOUT_STATE_ABORTED, "customer complaints")
        assert await rollouts.traffic() == {V1: 100}
        again = await failure(rollouts.stub.AbortRollout(pb.AbortRolloutRequest(name=started.name)))
        assert (again.code, again.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "ROLLOUT_STATE")

    async def test_refusals_change_nothing(self, rollouts: Rollouts) -> None:
        """A second rollout, a hand edit during one, a bad strategy, the stable version as
        candidate and a missing strategy are each refused with the condition named."""
        bad = await failure(rollouts.start(canary(50, 20)))
        assert bad.code is grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in bad.violations] == ["strategy.canary.steps"]
        missing = await failure(
            rollouts.stub.StartRollout(
                pb.StartRolloutRequest(deployment=rollouts.deployment, candidate_version=V2)
            )
        )
        assert (missing.code, missing.reason) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "NO_STRATEGY",
        )
        same = await failure(
            rollouts.stub.StartRollout(
                pb.StartRolloutRequest(
                    deployment=rollouts.deployment, candidate_version=V1, strategy=canary(100)
                )
            )
        )
        assert [v.field for v in same.violations] == ["candidate_version"]
        listed = await rollouts.stub.ListRollouts(
            pb.ListRolloutsRequest(parent=rollouts.deployment)
        )
        assert list(listed.rollouts) == []

        started = await rollouts.start(canary(50, 100, interval_s=60))
        second = await failure(rollouts.start(canary(100)))
        assert (second.code, second.reason) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "ROLLOUT_IN_PROGRESS",
        )
        edit = await failure(
            rollouts.stub.UpdateDeployment(
                pb.UpdateDeploymentRequest(
                    deployment=pb.Deployment(
                        name=rollouts.deployment,
                        traffic=[pb.TrafficTarget(model_version=V2, percent=100)],
                    )
                )
            )
        )
        assert edit.reason == "ROLLOUT_IN_PROGRESS"
        resume = await failure(
            rollouts.stub.ResumeRollout(pb.ResumeRolloutRequest(name=started.name))
        )
        assert resume.reason == "ROLLOUT_STATE"
        assert await rollouts.traffic() == {V1: 50, V2: 50}
        listed = await rollouts.stub.ListRollouts(
            pb.ListRolloutsRequest(parent=rollouts.deployment)
        )
        assert [r.name for r in listed.rollouts] == [started.name]

    async def test_split_traffic_has_no_stable_version(self, rollouts: Rollouts) -> None:
        """A deployment already split between versions cannot start a rollout."""
        await rollouts.stub.UpdateDeployment(
            pb.UpdateDeploymentRequest(
                deployment=pb.Deployment(
                    name=rollouts.deployment,
                    traffic=[
                        pb.TrafficTarget(model_version=V1, percent=90),
                        pb.TrafficTarget(model_version=V2, percent=10),
                    ],
                )
            )
        )
        error = await failure(rollouts.start(canary(100)))
        assert error.reason == "NO_SINGLE_STABLE_VERSION"

    async def test_the_deployment_strategy_is_the_default(self, rollouts: Rollouts) -> None:
        """A rollout started without a strategy takes the one the deployment declares."""
        await rollouts.stub.UpdateDeployment(
            pb.UpdateDeploymentRequest(
                deployment=pb.Deployment(name=rollouts.deployment, strategy=canary(20, 100)),
                update_mask=field_mask_pb2.FieldMask(paths=["strategy"]),
            )
        )
        response = await rollouts.stub.StartRollout(
            pb.StartRolloutRequest(deployment=rollouts.deployment, candidate_version=V2)
        )
        assert response.rollout.candidate_percent == 20
        assert list(response.rollout.strategy.canary.steps) == [20, 100]


def ab_test(sample_size: int = 200) -> pb.RolloutStrategy:
    """An A/B test on error rate, read every second."""
    return pb.RolloutStrategy(
        ab_test=pb.AbTestStrategy(
            candidate_percent=50,
            sample_size=sample_size,
            metric=pb.AB_TEST_METRIC_ERROR_RATE,
            check_interval=duration_pb2.Duration(seconds=1),
        )
    )


async def sticky(rollouts: Rollouts) -> None:
    await rollouts.stub.UpdateDeployment(
        pb.UpdateDeploymentRequest(
            deployment=pb.Deployment(name=rollouts.deployment, routing_key="customer"),
            update_mask=field_mask_pb2.FieldMask(paths=["routing_key"]),
        )
    )


async def _counted(rollouts: Rollouts, count: int) -> None:
    """Waits until the monitor has counted `count` requests of the endpoint."""

    async def check() -> bool:
        try:
            stats = await rollouts.monitor.GetEndpointStats(
                monitor_pb.GetEndpointStatsRequest(endpoint=rollouts.endpoint)
            )
        except grpc.aio.AioRpcError:
            return False
        return stats.request_count == count

    await eventually(check, f"the monitor to count {count} requests", within_s=WAIT_S)


def _experiment_report(
    rollouts: Rollouts, experiment_id: str = ""
) -> monitor_pb.GetExperimentReportRequest:
    """The error-rate report the A/B rollout asks for, with or without its experiment."""
    return monitor_pb.GetExperimentReportRequest(
        endpoint=rollouts.endpoint,
        arms=[V1, V2],
        metric=monitor_pb.EXPERIMENT_METRIC_ERROR_RATE,
        sample_size=200,
        experiment_id=experiment_id,
    )


class TestAbTest:
    async def test_a_better_candidate_wins_once_the_samples_are_in(
        self, rollouts: Rollouts
    ) -> None:
        """The test splits traffic, waits (COLLECTING) until both arms have their samples, and
        hands all traffic to the candidate when its error rate is significantly lower."""
        await sticky(rollouts)
        started = await rollouts.start(ab_test())
        assert started.candidate_percent == 50
        assert await rollouts.traffic() == {V1: 50, V2: 50}
        rollouts.answer(V1, 100, errors=20)
        rollouts.answer(V2, 100)
        await eventually(lambda: _gate_read(rollouts, started.name), "a reading while collecting")
        collecting = await rollouts.rollout(started.name)
        assert collecting.state == pb.ROLLOUT_STATE_RUNNING
        assert collecting.last_gate.verdict == pb.GATE_VERDICT_INCONCLUSIVE
        assert collecting.last_gate.reason.startswith("collecting")
        rollouts.answer(V1, 100, errors=20)
        rollouts.answer(V2, 100)
        done = await rollouts.reaches(started.name, pb.ROLLOUT_STATE_SUCCEEDED)
        assert "the candidate is better" in done.reason
        assert await rollouts.traffic() == {V2: 100}

    async def test_a_worse_or_equal_candidate_leaves_the_stable_version(
        self, rollouts: Rollouts
    ) -> None:
        """Significantly worse, the candidate is rolled back; the reason says so."""
        await sticky(rollouts)
        started = await rollouts.start(ab_test())
        rollouts.answer(V1, 200)
        rollouts.answer(V2, 200, errors=40)
        aborted = await rollouts.reaches(started.name, pb.ROLLOUT_STATE_ABORTED)
        assert "the candidate is worse" in aborted.reason
        assert await rollouts.traffic() == {V1: 100}

    async def test_no_difference_keeps_the_stable_version(self, rollouts: Rollouts) -> None:
        await sticky(rollouts)
        started = await rollouts.start(ab_test())
        rollouts.answer(V1, 200, errors=10)
        rollouts.answer(V2, 200, errors=10)
        aborted = await rollouts.reaches(started.name, pb.ROLLOUT_STATE_ABORTED)
        assert "no significant difference" in aborted.reason
        assert await rollouts.traffic() == {V1: 100}

    async def test_traffic_from_before_the_test_does_not_count(self, rollouts: Rollouts) -> None:
        """The stable version answered 1000 requests at 30 % errors before the test; the
        rollout has the monitor start its experiment once, and the test reads only what came
        after: 200 requests per arm at 5 % errors, no difference, the stable version stays
        (counted with the 1000, the candidate would have looked better and won)."""
        await sticky(rollouts)
        rollouts.answer(V1, 1000, errors=300)
        await _counted(rollouts, 1000)
        with capture_logs() as logs:
            started = await rollouts.start(ab_test())
            rollouts.answer(V1, 200, errors=10)
            rollouts.answer(V2, 200, errors=10)
            aborted = await rollouts.reaches(started.name, pb.ROLLOUT_STATE_ABORTED)
        assert "no significant difference" in aborted.reason
        assert await rollouts.traffic() == {V1: 100}
        starts = [entry for entry in logs if entry["event"] == "experiment_started"]
        assert [(e["rollout"], e["experiment_id"], e["started"]) for e in starts] == [
            (started.name, started.name, True)
        ]
        report = await rollouts.monitor.GetExperimentReport(
            _experiment_report(rollouts, experiment_id=started.name)
        )
        assert [(a.model_version, a.sample_count) for a in report.arms] == [(V1, 200), (V2, 200)]
        totals = await rollouts.monitor.GetExperimentReport(_experiment_report(rollouts))
        assert [a.sample_count for a in totals.arms] == [1200, 200]

    async def test_no_reading_before_the_monitor_records_the_start(
        self, rollouts: Rollouts
    ) -> None:
        """With the monitor unreachable the test cannot start: its readings are INCONCLUSIVE
        and say why, traffic stays split, nothing is decided on the totals; a registry
        restarted with the monitor back starts the experiment under the same id and reads
        only what came after."""
        await sticky(rollouts)
        rollouts.answer(V1, 1000, errors=300)
        await _counted(rollouts, 1000)
        await rollouts.app.rollouts.stop()
        await rollouts.app.close()
        dead = rollouts.settings.model_copy(update={"monitor_target": "127.0.0.1:1"})
        async with running(build_registry, dead) as (_, channel, _app):
            stub = pb_grpc.RegistryServiceStub(channel)
            started = (
                await stub.StartRollout(
                    pb.StartRolloutRequest(
                        deployment=rollouts.deployment, candidate_version=V2, strategy=ab_test()
                    )
                )
            ).rollout
            rollouts.answer(V1, 200, errors=10)
            rollouts.answer(V2, 200, errors=10)
            await _counted(rollouts, 1400)
            seen: list[pb.Rollout] = []

            async def refused() -> bool:
                seen.append(
                    (await stub.GetRollout(pb.GetRolloutRequest(name=started.name))).rollout
                )
                return seen[-1].last_gate.reason.startswith("the experiment has not started")

            await eventually(refused, "a reading that waits for the start", within_s=WAIT_S)
            assert seen[-1].state == pb.ROLLOUT_STATE_RUNNING
            assert seen[-1].last_gate.verdict == pb.GATE_VERDICT_INCONCLUSIVE
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await rollouts.monitor.GetExperimentReport(
                _experiment_report(rollouts, experiment_id=started.name)
            )
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        async with rollouts.restart() as (_, channel, _app):
            stub = pb_grpc.RegistryServiceStub(channel)

            async def experiment_started() -> bool:
                response = await stub.GetRollout(pb.GetRolloutRequest(name=started.name))
                return response.rollout.last_gate.reason.startswith("collecting")

            await eventually(experiment_started, "the experiment to start", within_s=WAIT_S)
            rollouts.answer(V1, 200, errors=100)
            rollouts.answer(V2, 200, errors=10)

            async def finished() -> bool:
                response = await stub.GetRollout(pb.GetRolloutRequest(name=started.name))
                seen.append(response.rollout)
                return seen[-1].state == pb.ROLLOUT_STATE_SUCCEEDED

            await eventually(finished, "the candidate to win", within_s=WAIT_S)
        assert "the candidate is better" in seen[-1].reason
        report = await rollouts.monitor.GetExperimentReport(
            _experiment_report(rollouts, experiment_id=started.name)
        )
        assert [a.sample_count for a in report.arms] == [200, 200]

    async def test_an_ab_test_needs_a_routing_key(self, rollouts: Rollouts) -> None:
        """Without sticky assignment a caller would flip between arms: refused."""
        error = await failure(rollouts.start(ab_test()))
        assert (error.code, error.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "NO_ROUTING_KEY")
        bad = await failure(
            rollouts.start(
                pb.RolloutStrategy(ab_test=pb.AbTestStrategy(candidate_percent=100, sample_size=5))
            )
        )
        assert sorted(v.field for v in bad.violations) == [
            "strategy.ab_test.candidate_percent",
            "strategy.ab_test.metric",
            "strategy.ab_test.sample_size",
        ]


class TestRestart:
    async def test_a_restarted_registry_carries_on(self, rollouts: Rollouts) -> None:
        """A rollout survives a registry restart: the new process reads it from the store and
        finishes it."""
        started = await rollouts.start(canary(50, 100))
        await rollouts.app.rollouts.stop()
        await rollouts.app.close()
        rollouts.answer(V2, 40)
        async with rollouts.restart() as (_, channel, _app):
            stub = pb_grpc.RegistryServiceStub(channel)
            seen: list[pb.Rollout] = []

            async def finished() -> bool:
                seen.append(
                    (await stub.GetRollout(pb.GetRolloutRequest(name=started.name))).rollout
                )
                return seen[-1].state == pb.ROLLOUT_STATE_SUCCEEDED

            await eventually(finished, "the rollout to finish after the restart", within_s=WAIT_S)
            deployment = await stub.GetDeployment(pb.GetDeploymentRequest(name=rollouts.deployment))
            assert {t.model_version: t.percent for t in deployment.deployment.traffic} == {V2: 100}
