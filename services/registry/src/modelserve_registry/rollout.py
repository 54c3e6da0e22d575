"""The rollout controller: moves a deployment's traffic to a candidate step by step, reading
a gate after each step, and aborts back to the stable version when the gate fails.

State lives in the store (a `rollouts` row per rollout), and every traffic change is a
deployment revision written in the same transaction as the rollout's new state, so a
registry that restarts picks each RUNNING rollout up where it was. Every automatic action
(advance, success, abort) is in the audit trail with the gate reading behind it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Protocol

import grpc
import structlog

from modelserve.monitor.v1 import monitor_service_pb2 as monitor_pb
from modelserve.monitor.v1 import monitor_service_pb2_grpc as monitor_grpc
from modelserve.registry.v1 import registry_service_pb2 as pb
from modelserve_registry.convert import timestamp
from modelserve_registry.metadata import (
    AB_TEST_HIGHER_IS_BETTER,
    check_strategy,
    interval_s,
    max_wait_s,
    steps_of,
)
from modelserve_registry.resources import (
    Actor,
    Change,
    Deployment,
    Page,
    Rollout,
    RolloutState,
    TrafficTarget,
    VersionRef,
)
from modelserve_registry.store import RegistryStore
from modelserve_runtime.errors import (
    AbortedError,
    FailedPreconditionError,
    FieldViolation,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
)
from modelserve_runtime.waiting import wait_until_set

log = structlog.get_logger()

#: The principal the controller's own actions are recorded under.
CONTROLLER = "rollout-controller"
DEFAULT_MAX_ERROR_RATE = 0.01
DEFAULT_MAX_P99_MS = 200.0
DEFAULT_MIN_REQUESTS = 100
_EXPERIMENT_METRICS = {
    pb.AB_TEST_METRIC_ERROR_RATE: monitor_pb.EXPERIMENT_METRIC_ERROR_RATE,
    pb.AB_TEST_METRIC_ACCURACY: monitor_pb.EXPERIMENT_METRIC_ACCURACY,
    pb.AB_TEST_METRIC_OUTCOME_MEAN: monitor_pb.EXPERIMENT_METRIC_OUTCOME_MEAN,
    pb.AB_TEST_METRIC_ABSOLUTE_ERROR: monitor_pb.EXPERIMENT_METRIC_ABSOLUTE_ERROR,
}


class Gate(Protocol):
    """Says whether a rollout's candidate is healthy enough to move on."""

    async def read(
        self, rollout: Rollout, strategy: pb.RolloutStrategy, now: datetime
    ) -> pb.GateResult:
        """One reading: PASS, FAIL or INCONCLUSIVE, with the figures and why."""
        ...

    async def experiment(
        self, rollout: Rollout, strategy: pb.RolloutStrategy, now: datetime
    ) -> pb.GateResult:
        """An A/B test's reading: PASS when the candidate is significantly better, FAIL when
        it is worse or no different (the stable version stays), INCONCLUSIVE while the arms
        are collecting, or while the test's start could not be recorded."""
        ...

    async def start_experiment(self, rollout: Rollout) -> str:
        """Records an A/B test's start, so its readings count only traffic from then on;
        empty once recorded (now or before), else why not (the next reading tries again)."""
        ...


def experiment_id(rollout: Rollout) -> str:
    """The id of an A/B rollout's experiment in the monitor: the rollout's name, the same
    after a registry restart, so a restarted controller finds the experiment it started."""
    return rollout.name


def _result(
    verdict: pb.GateVerdict.ValueType, reason: str, now: datetime, **figures: float
) -> pb.GateResult:
    return pb.GateResult(
        verdict=verdict, reason=reason, figures=figures, create_time=timestamp(now)
    )


class MonitorGate:
    """Reads the candidate's error rate and p99 latency from the monitor's GetEndpointStats
    (the last minute, or five minutes for intervals over a minute); with `gate.judge`, also
    asks the monitor's JudgeCanary (candidate against stable on the same window).

    A request answered by a fallback counts as an error of the candidate. The monitor being
    unreachable is INCONCLUSIVE: the step waits, up to the gate's max_wait.

    An A/B test reads the monitor's experiment report for the rollout's experiment (started
    with StartExperiment), so traffic the stable version answered before the test does not
    count; until the monitor has recorded the start, the test's readings are INCONCLUSIVE.
    """

    def __init__(
        self, channel: Callable[[], Awaitable[grpc.aio.Channel]], *, timeout_s: float
    ) -> None:
        self._channel = channel
        self._timeout_s = timeout_s
        # Rollouts whose experiment the monitor has recorded; after a restart each is asked
        # for once more, which the monitor answers with the start it already has.
        self._started: set[str] = set()

    async def _monitor(self) -> monitor_grpc.MonitorServiceAsyncStub:
        """A stub on the channel to the monitor (UnavailableError when none is found)."""
        stub: monitor_grpc.MonitorServiceAsyncStub = monitor_grpc.MonitorServiceStub(
            await self._channel()
        )
        return stub

    async def start_experiment(self, rollout: Rollout) -> str:
        if rollout.name in self._started:
            return ""
        arms = [rollout.stable.model_version, rollout.candidate.model_version]
        try:
            stub = await self._monitor()
            response = await stub.StartExperiment(
                monitor_pb.StartExperimentRequest(
                    endpoint=rollout.deployment_id,
                    arms=arms,
                    experiment_id=experiment_id(rollout),
                ),
                timeout=self._timeout_s,
            )
        except grpc.aio.AioRpcError as exc:
            why = f"the monitor did not start the experiment ({exc.code().name}: {exc.details()})"
            log.warning("experiment_not_started", rollout=rollout.name, why=why)
            return why
        except UnavailableError as exc:
            why = f"no monitor to start the experiment: {exc}"
            log.warning("experiment_not_started", rollout=rollout.name, why=why)
            return why
        self._started.add(rollout.name)
        log.info(
            "experiment_started",
            rollout=rollout.name,
            experiment_id=response.experiment_id,
            started=response.started,
            start_time=response.start_time.ToJsonString(),
        )
        return ""

    async def experiment(
        self, rollout: Rollout, strategy: pb.RolloutStrategy, now: datetime
    ) -> pb.GateResult:
        test = strategy.ab_test
        candidate = rollout.candidate.model_version
        why = await self.start_experiment(rollout)
        if why:
            # Reading the totals instead would count the stable version's traffic from before
            # the test: wait for the start, up to the test's max_duration.
            return _result(
                pb.GATE_VERDICT_INCONCLUSIVE, f"the experiment has not started: {why}", now
            )
        try:
            stub = await self._monitor()
            report = await stub.GetExperimentReport(
                monitor_pb.GetExperimentReportRequest(
                    endpoint=rollout.deployment_id,
                    arms=[rollout.stable.model_version, candidate],
                    metric=_EXPERIMENT_METRICS[test.metric],
                    sample_size=test.sample_size,
                    alpha=test.alpha,
                    experiment_id=experiment_id(rollout),
                ),
                timeout=self._timeout_s,
            )
        except grpc.aio.AioRpcError as exc:
            return _result(
                pb.GATE_VERDICT_INCONCLUSIVE,
                f"the monitor's experiment report did not answer ({exc.code().name}:"
                f" {exc.details()})",
                now,
            )
        except UnavailableError as exc:
            return _result(pb.GATE_VERDICT_INCONCLUSIVE, f"no monitor to read: {exc}", now)
        figures = {"progress": report.progress}
        if report.verdict == monitor_pb.EXPERIMENT_VERDICT_COLLECTING:
            return _result(
                pb.GATE_VERDICT_INCONCLUSIVE, f"collecting: {report.reason}", now, **figures
            )
        arm = next((a for a in report.arms if a.model_version == candidate), None)
        if arm is None:
            return _result(pb.GATE_VERDICT_INCONCLUSIVE, f"the report has no arm {candidate}", now)
        figures |= {
            "candidate_value": arm.value,
            "difference": arm.comparison.difference,
            "p_value": arm.comparison.p_value,
        }
        if report.verdict != monitor_pb.EXPERIMENT_VERDICT_SIGNIFICANT:
            return _result(
                pb.GATE_VERDICT_FAIL,
                f"no significant difference, the stable version stays: {report.reason}",
                now,
                **figures,
            )
        better = (arm.comparison.difference > 0) == AB_TEST_HIGHER_IS_BETTER[test.metric]
        if better:
            return _result(
                pb.GATE_VERDICT_PASS, f"the candidate is better: {report.reason}", now, **figures
            )
        return _result(
            pb.GATE_VERDICT_FAIL, f"the candidate is worse: {report.reason}", now, **figures
        )

    async def read(
        self, rollout: Rollout, strategy: pb.RolloutStrategy, now: datetime
    ) -> pb.GateResult:
        gate = strategy.gate
        max_error_rate = (
            gate.max_error_rate if gate.HasField("max_error_rate") else DEFAULT_MAX_ERROR_RATE
        )
        max_p99 = gate.max_p99_latency_ms or DEFAULT_MAX_P99_MS
        min_requests = gate.min_requests or DEFAULT_MIN_REQUESTS
        window = (
            monitor_pb.WINDOW_ONE_MINUTE
            if interval_s(strategy) <= 60
            else monitor_pb.WINDOW_FIVE_MINUTES
        )
        candidate = rollout.candidate.model_version
        try:
            stub = await self._monitor()
            stats = await stub.GetEndpointStats(
                monitor_pb.GetEndpointStatsRequest(endpoint=rollout.deployment_id, window=window),
                timeout=self._timeout_s,
            )
        except grpc.aio.AioRpcError as exc:
            return _result(
                pb.GATE_VERDICT_INCONCLUSIVE,
                f"the monitor did not answer ({exc.code().name}: {exc.details()})",
                now,
            )
        except UnavailableError as exc:
            return _result(pb.GATE_VERDICT_INCONCLUSIVE, f"no monitor to read: {exc}", now)
        figures = next((v for v in stats.versions if v.model_version == candidate), None)
        requests = figures.request_count if figures is not None else 0
        if figures is None or requests < min_requests:
            return _result(
                pb.GATE_VERDICT_INCONCLUSIVE,
                f"{candidate} answered {requests} requests, fewer than the {min_requests}"
                " needed for a verdict",
                now,
                requests=float(requests),
            )
        failed = figures.error_count + figures.degraded_count
        error_rate = failed / requests
        p99 = figures.latency_p99_ms
        measured = {"requests": float(requests), "error_rate": error_rate, "p99_ms": p99}
        if error_rate > max_error_rate:
            return _result(
                pb.GATE_VERDICT_FAIL,
                f"error rate {error_rate:.2%} of {candidate} over {requests} requests is above"
                f" {max_error_rate:.2%}",
                now,
                **measured,
            )
        if p99 > max_p99:
            return _result(
                pb.GATE_VERDICT_FAIL,
                f"p99 latency {p99:.1f} ms of {candidate} is above {max_p99:.1f} ms",
                now,
                **measured,
            )
        passed = (
            f"error rate {error_rate:.2%} <= {max_error_rate:.2%} and p99 {p99:.1f} ms <="
            f" {max_p99:.1f} ms over {requests} requests"
        )
        if gate.judge:
            return await self._judge(stub, rollout, window, now, passed, measured, min_requests)
        return _result(pb.GATE_VERDICT_PASS, passed, now, **measured)

    async def _judge(
        self,
        stub: monitor_grpc.MonitorServiceAsyncStub,
        rollout: Rollout,
        window: monitor_pb.Window.ValueType,
        now: datetime,
        passed: str,
        measured: dict[str, float],
        min_requests: int,
    ) -> pb.GateResult:
        try:
            judgement = await stub.JudgeCanary(
                monitor_pb.JudgeCanaryRequest(
                    endpoint=rollout.deployment_id,
                    canary_version=rollout.candidate.model_version,
                    stable_version=rollout.stable.model_version,
                    window=window,
                    # The gate's minimum also decides when the judgement may speak.
                    thresholds=monitor_pb.CanaryThresholds(min_requests=min_requests),
                ),
                timeout=self._timeout_s,
            )
        except grpc.aio.AioRpcError as exc:
            return _result(
                pb.GATE_VERDICT_INCONCLUSIVE,
                f"the monitor's canary judgement did not answer ({exc.code().name})",
                now,
                **measured,
            )
        verdicts = {
            monitor_pb.CANARY_VERDICT_PASS: pb.GATE_VERDICT_PASS,
            monitor_pb.CANARY_VERDICT_FAIL: pb.GATE_VERDICT_FAIL,
        }
        verdict = verdicts.get(judgement.verdict, pb.GATE_VERDICT_INCONCLUSIVE)
        reason = judgement.reason or monitor_pb.CanaryVerdict.Name(judgement.verdict)
        return _result(verdict, f"{passed}; canary judgement: {reason}", now, **measured)


def _name_parts(name: str) -> tuple[str, int]:
    parts = name.split("/")
    if (
        len(parts) == 4
        and parts[0] == "deployments"
        and parts[2] == "rollouts"
        and parts[1]
        and parts[3].isdigit()
        and int(parts[3]) >= 1
    ):
        return parts[1], int(parts[3])
    raise InvalidArgumentError.for_field("name", "must be deployments/{deployment}/rollouts/{n}")


def _traffic(stable: VersionRef, candidate: VersionRef, percent: int) -> list[TrafficTarget]:
    """The split at a step; the stable version keeps a 0 % target so it stays loaded in
    inference and an abort is instant."""
    return [
        TrafficTarget(stable.model_id, stable.version, 100 - percent),
        TrafficTarget(candidate.model_id, candidate.version, percent),
    ]


class RolloutController:
    """Starts, steps, pauses, resumes and aborts rollouts, and runs the loop that reads gates."""

    def __init__(
        self,
        store: RegistryStore,
        gate: Gate,
        *,
        notify: Callable[[], Awaitable[None]],
        get_deployment: Callable[[str], Awaitable[Deployment]],
        parse_version: Callable[[str, str], tuple[str, int]],
        production_only: bool,
        tick_s: float,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._store = store
        self._gate = gate
        self._notify = notify
        self._get_deployment = get_deployment
        self._parse_version = parse_version
        self._production_only = production_only
        self._tick_s = tick_s
        self._clock = clock
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    def _change(self, principal: str, reason: str, action: str) -> Change:
        return Change(principal, reason, action, self._clock())

    async def start(
        self,
        deployment_name: str,
        candidate_version: str,
        strategy: pb.RolloutStrategy | None,
        actor: Actor,
    ) -> Rollout:
        """Starts a rollout: the deployment's only version with traffic is the stable one."""
        violations: list[FieldViolation] = []
        candidate: VersionRef | None = None
        try:
            candidate = VersionRef(*self._parse_version(candidate_version, "candidate_version"))
        except InvalidArgumentError as exc:
            violations.extend(exc.violations)
        given = strategy is not None and strategy != pb.RolloutStrategy()
        stored = check_strategy("strategy", strategy, violations) if given and strategy else b""
        if violations:
            raise InvalidArgumentError("the rollout is invalid", violations=violations)
        assert candidate is not None
        deployment = await self._get_deployment(deployment_name)
        if not stored:
            stored = deployment.policy.strategy
        if not stored:
            raise FailedPreconditionError(
                f"{deployment.name} declares no strategy and the request gives none",
                reason="NO_STRATEGY",
                metadata={"name": deployment.name},
            )
        latest = await self._store.list_rollouts(deployment.deployment_id, before=None, limit=1)
        if latest and latest[0].state.active:
            raise FailedPreconditionError(
                f"{deployment.name} already has {latest[0].name} in progress"
                f" ({latest[0].state.name}); abort it or let it finish first",
                reason="ROLLOUT_IN_PROGRESS",
                metadata={"name": deployment.name, "rollout": latest[0].name},
            )
        with_traffic = [t for t in deployment.traffic if t.percent > 0]
        if len(with_traffic) != 1:
            raise FailedPreconditionError(
                f"{deployment.name} splits its traffic over {len(with_traffic)} versions; a"
                " rollout starts from one stable version taking all of it",
                reason="NO_SINGLE_STABLE_VERSION",
                metadata={"name": deployment.name},
            )
        stable_target = with_traffic[0]
        stable = VersionRef(stable_target.model_id, stable_target.version)
        if candidate == stable:
            raise InvalidArgumentError.for_field(
                "candidate_version", f"{candidate_version} is already the stable version"
            )
        if candidate.model_id != stable.model_id:
            raise InvalidArgumentError.for_field(
                "candidate_version",
                f"must be a version of {stable.model_id}, the stable version's model",
            )
        parsed = pb.RolloutStrategy.FromString(stored)
        if parsed.WhichOneof("kind") == "ab_test" and not deployment.policy.routing_key:
            raise FailedPreconditionError(
                f"{deployment.name} has no routing_key: an A/B test needs sticky assignment so"
                " each caller stays on one arm",
                reason="NO_ROUTING_KEY",
                metadata={"name": deployment.name},
            )
        first = steps_of(parsed)[0]
        now = self._clock()
        rollout = Rollout(
            deployment_id=deployment.deployment_id,
            rollout_id=0,
            stable=stable,
            candidate=candidate,
            strategy=stored,
            state=RolloutState.RUNNING,
            step=0,
            candidate_percent=first,
            step_start_time=now,
            create_time=now,
            update_time=now,
            reason=actor.reason,
        )
        started, revision = await self._store.start_rollout(
            rollout,
            _traffic(stable, candidate, first),
            stable_revision=deployment.revision,
            production_only=self._production_only,
            change=Change(actor.principal, actor.reason, "StartRollout", now),
        )
        await self._notify()
        if parsed.WhichOneof("kind") == "ab_test":
            # Its start is recorded once the split is out: from here on, both arms count.
            # When the monitor cannot record it now, the first reading tries again.
            await self._gate.start_experiment(started)
        self._wake.set()
        log.info(
            "rollout_started",
            rollout=started.name,
            candidate=candidate.model_version,
            stable=stable.model_version,
            candidate_percent=first,
            revision=revision.revision,
        )
        return started

    async def get(self, name: str) -> Rollout:
        """The rollout `deployments/{deployment}/rollouts/{n}`."""
        deployment_id, number = _name_parts(name)
        rollout = await self._store.get_rollout(deployment_id, number)
        if rollout is None:
            raise NotFoundError(
                f"rollout {name} does not exist",
                reason="ROLLOUT_NOT_FOUND",
                metadata={"name": name},
            )
        return rollout

    async def list(self, parent: str, page_size: int, page_token: str) -> Page[Rollout]:
        """A deployment's rollouts, newest first."""
        deployment = await self._get_deployment(parent)
        if page_size < 0:
            raise InvalidArgumentError.for_field("page_size", "must not be negative")
        limit = min(page_size or 50, 1000)
        before: int | None = None
        if page_token:
            if not page_token.isdigit():
                raise InvalidArgumentError.for_field("page_token", "is not a token of this list")
            before = int(page_token)
        rows = await self._store.list_rollouts(
            deployment.deployment_id, before=before, limit=limit + 1
        )
        if len(rows) <= limit:
            return Page(rows)
        return Page(rows[:limit], str(rows[limit - 1].rollout_id))

    async def pause(self, name: str, actor: Actor) -> Rollout:
        """Holds a RUNNING rollout at its step."""
        rollout = await self.get(name)
        if rollout.state is not RolloutState.RUNNING:
            raise _wrong_state(rollout, "pause", "RUNNING")
        paused = dataclasses.replace(
            rollout,
            state=RolloutState.PAUSED,
            reason=actor.reason or "paused",
            update_time=self._clock(),
        )
        saved, _ = await self._store.save_rollout(
            paused,
            expected=rollout,
            change=self._change(actor.principal, actor.reason, "PauseRollout"),
        )
        log.info("rollout_paused", rollout=name)
        return saved

    async def resume(self, name: str, actor: Actor) -> Rollout:
        """Continues a PAUSED rollout; its current step starts over."""
        rollout = await self.get(name)
        if rollout.state is not RolloutState.PAUSED:
            raise _wrong_state(rollout, "resume", "PAUSED")
        now = self._clock()
        resumed = dataclasses.replace(
            rollout,
            state=RolloutState.RUNNING,
            step_start_time=now,
            waiting_since=None,
            reason=actor.reason or "resumed",
            update_time=now,
        )
        saved, _ = await self._store.save_rollout(
            resumed,
            expected=rollout,
            change=self._change(actor.principal, actor.reason, "ResumeRollout"),
        )
        self._wake.set()
        log.info("rollout_resumed", rollout=name)
        return saved

    async def abort(self, name: str, actor: Actor) -> Rollout:
        """Ends an active rollout; all traffic goes back to the stable version."""
        rollout = await self.get(name)
        if not rollout.state.active:
            raise _wrong_state(rollout, "abort", "RUNNING or PAUSED")
        return await self._abort(
            rollout, actor.reason or "aborted by hand", actor.principal, "AbortRollout"
        )

    async def _abort(self, rollout: Rollout, why: str, principal: str, action: str) -> Rollout:
        aborted = dataclasses.replace(
            rollout, state=RolloutState.ABORTED, reason=why, update_time=self._clock()
        )
        stable = rollout.stable
        saved, revision = await self._store.save_rollout(
            aborted,
            expected=rollout,
            change=self._change(principal, f"rollout {rollout.name} aborted: {why}", action),
            traffic=[TrafficTarget(stable.model_id, stable.version, 100)],
        )
        await self._notify()
        log.warning(
            "rollout_aborted",
            rollout=rollout.name,
            why=why,
            revision=revision.revision if revision else None,
        )
        return saved

    async def tick(self) -> None:
        """Reads the gate of every RUNNING rollout whose step has run its interval, and acts."""
        for rollout in await self._store.running_rollouts():
            try:
                await self._step(rollout)
            except AbortedError:
                # Someone paused, resumed or aborted it meanwhile; the next tick sees that.
                continue
            except Exception:  # one broken rollout must not stop the others
                log.exception("rollout_step_failed", rollout=rollout.name)

    async def _step(self, rollout: Rollout) -> None:
        strategy = pb.RolloutStrategy.FromString(rollout.strategy)
        now = self._clock()
        if now < rollout.step_start_time + timedelta(seconds=interval_s(strategy)):
            return
        ab_test = strategy.WhichOneof("kind") == "ab_test"
        if ab_test:
            reading = await self._gate.experiment(rollout, strategy, now)
        else:
            reading = await self._gate.read(rollout, strategy, now)
        gate_bytes = reading.SerializeToString(deterministic=True)
        # The state, step and update time identify the version of the rollout this reading
        # acts on; the gate bytes ride along into whatever is saved next.
        read = dataclasses.replace(rollout, last_gate=gate_bytes)
        if reading.verdict == pb.GATE_VERDICT_FAIL:
            await self._abort(
                read,
                f"gate failed at step {rollout.step}: {reading.reason}",
                CONTROLLER,
                "RolloutGate",
            )
            return
        if reading.verdict != pb.GATE_VERDICT_PASS:
            # An A/B test's limit runs from its start; a step's from its first wait.
            waiting_since = rollout.create_time if ab_test else (rollout.waiting_since or now)
            if (now - waiting_since).total_seconds() > max_wait_s(strategy):
                await self._abort(
                    read,
                    f"gate inconclusive for longer than {max_wait_s(strategy):g} s at step"
                    f" {rollout.step}: {reading.reason}",
                    CONTROLLER,
                    "RolloutGate",
                )
                return
            await self._store.save_rollout(
                dataclasses.replace(
                    rollout, last_gate=gate_bytes, waiting_since=waiting_since, update_time=now
                ),
                expected=rollout,
                change=self._change(CONTROLLER, reading.reason, "RolloutGate"),
                audit=False,
            )
            return
        steps = steps_of(strategy)
        if rollout.step + 1 >= len(steps):
            done = dataclasses.replace(
                rollout,
                state=RolloutState.SUCCEEDED,
                last_gate=gate_bytes,
                waiting_since=None,
                reason=f"the last gate passed: {reading.reason}",
                update_time=now,
            )
            candidate = rollout.candidate
            await self._store.save_rollout(
                done,
                expected=rollout,
                change=self._change(
                    CONTROLLER, f"rollout {rollout.name} succeeded: {reading.reason}", "RolloutGate"
                ),
                traffic=[TrafficTarget(candidate.model_id, candidate.version, 100)],
            )
            await self._notify()
            log.info("rollout_succeeded", rollout=rollout.name, gate=reading.reason)
            return
        percent = steps[rollout.step + 1]
        advanced = dataclasses.replace(
            rollout,
            step=rollout.step + 1,
            candidate_percent=percent,
            step_start_time=now,
            last_gate=gate_bytes,
            waiting_since=None,
            reason=f"step {rollout.step} passed its gate: {reading.reason}",
            update_time=now,
        )
        await self._store.save_rollout(
            advanced,
            expected=rollout,
            change=self._change(
                CONTROLLER,
                f"rollout {rollout.name} to {percent}%: step {rollout.step} passed: {reading.reason}",
                "RolloutGate",
            ),
            traffic=_traffic(rollout.stable, rollout.candidate, percent),
        )
        await self._notify()
        log.info("rollout_advanced", rollout=rollout.name, step=rollout.step + 1, percent=percent)

    def start_background(self) -> None:
        """Starts the loop that ticks every `tick_s` (sooner after a start or a resume)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="rollout-controller")

    async def _run(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception:  # the store being away must not end the loop
                log.exception("rollout_tick_failed")
            self._wake.clear()
            await wait_until_set(self._wake, self._tick_s)

    async def stop(self) -> None:
        """Stops the loop."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


def _wrong_state(rollout: Rollout, action: str, needed: str) -> FailedPreconditionError:
    return FailedPreconditionError(
        f"cannot {action} {rollout.name}: it is {rollout.state.name}, not {needed}",
        reason="ROLLOUT_STATE",
        metadata={"name": rollout.name, "state": rollout.state.name},
    )


def rollout_to_proto(rollout: Rollout) -> pb.Rollout:
    """A Rollout value as its message."""
    message = pb.Rollout(
        name=rollout.name,
        stable_version=rollout.stable.model_version,
        candidate_version=rollout.candidate.model_version,
        strategy=pb.RolloutStrategy.FromString(rollout.strategy),
        state=pb.RolloutState.Value(f"ROLLOUT_STATE_{rollout.state.name}"),
        step=rollout.step,
        candidate_percent=rollout.candidate_percent,
        step_start_time=timestamp(rollout.step_start_time),
        reason=rollout.reason,
        create_time=timestamp(rollout.create_time),
        update_time=timestamp(rollout.update_time),
    )
    if rollout.last_gate:
        message.last_gate.CopyFrom(pb.GateResult.FromString(rollout.last_gate))
    return message
