"""`modelserve deployments canary ...` and `modelserve models validate|tag|delete`: rollouts,
validation runs and the mutable parts of models and versions."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Annotated, Protocol

import typer
from google.protobuf import duration_pb2, field_mask_pb2
from rich.table import Table

from modelserve.registry.v1 import registry_service_pb2 as pb
from modelserve_cli.output import fail
from modelserve_cli.registry_commands import (
    ApiKey,
    Reason,
    RegistryConnection,
    RegistryTarget,
    _checked,
    _time,
    call_registry,
    console,
    deployment_name,
    model_name,
    models_app,
    run,
    version_name,
)

canary_app = typer.Typer(
    help="Move a deployment's traffic to a new version step by step; status, pause, resume"
    " and abort act on the latest rollout of any kind (canary, blue-green, A/B test)."
)

_DURATION = re.compile(r"(\d+)(ms|s|m|h)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> duration_pb2.Duration:
    """`90s`, `5m`, `1h` or `500ms` as a Duration."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"{text!r}: give a duration like 30s, 5m or 1h")
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int(int(match[1]) * _UNIT_S[match[2]] * 1e9))
    return duration


def parse_steps(text: str) -> list[int]:
    """`10,25,50,100` as percents."""
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"{text!r}: give the steps as rising percents, e.g. 10,50,100") from None


def _state(state: pb.RolloutState.ValueType) -> str:
    return pb.RolloutState.Name(state).removeprefix("ROLLOUT_STATE_").lower()


def rollout_table(rollout: pb.Rollout) -> Table:
    """A rollout as a two-column table."""
    table = Table(title=rollout.name, show_header=False)
    table.add_column("field")
    table.add_column("value")
    kind = rollout.strategy.WhichOneof("kind")
    steps = (
        ",".join(str(s) for s in rollout.strategy.canary.steps)
        if kind == "canary"
        else "blue-green"
        if kind == "blue_green"
        else f"A/B test, {rollout.strategy.ab_test.sample_size} samples per arm"
    )
    rows = [
        ("state", _state(rollout.state)),
        ("stable", rollout.stable_version),
        ("candidate", rollout.candidate_version),
        ("steps", steps),
        ("step", f"{rollout.step} ({rollout.candidate_percent}% to the candidate)"),
        ("step started", _time(rollout.step_start_time)),
        ("reason", rollout.reason),
    ]
    if rollout.HasField("last_gate"):
        verdict = pb.GateVerdict.Name(rollout.last_gate.verdict).removeprefix("GATE_VERDICT_")
        rows.append(("last gate", f"{verdict.lower()}: {rollout.last_gate.reason}"))
    for field, value in rows:
        table.add_row(field, value)
    return table


async def _latest(conn: RegistryConnection, deployment: str) -> pb.Rollout:
    listed = await conn.stub.ListRollouts(
        pb.ListRolloutsRequest(parent=deployment, page_size=1), metadata=conn.metadata
    )
    if not listed.rollouts:
        raise ValueError(f"{deployment} has had no rollout")
    return listed.rollouts[0]


def _start(
    name: str,
    version: str,
    strategy: pb.RolloutStrategy,
    registry: str,
    api_key: str | None,
    reason: str,
) -> None:
    """Starts a rollout of `version` on the endpoint's deployment and shows it."""
    request = pb.StartRolloutRequest(
        deployment=deployment_name(name),
        candidate_version=version,
        strategy=strategy,
        reason=reason,
    )
    response = call_registry(
        registry, api_key, lambda conn: conn.stub.StartRollout(request, metadata=conn.metadata)
    )
    console.print(rollout_table(response.rollout))


@canary_app.command("start")
def canary_start(
    name: Annotated[str, typer.Argument(help="The endpoint, e.g. fraud.")],
    candidate: Annotated[str, typer.Argument(help="MODEL/NUMBER of the new version.")],
    registry: RegistryTarget,
    api_key: ApiKey = None,
    steps: Annotated[str, typer.Option(help="Rising percents ending at 100.")] = "10,50,100",
    interval: Annotated[str, typer.Option(help="How long each step runs: 30s, 5m...")] = "5m",
    blue_green: Annotated[
        bool, typer.Option("--blue-green", help="Flip all traffic at once, then watch it.")
    ] = False,
    max_error_rate: Annotated[float, typer.Option(help="Highest error rate that passes.")] = 0.01,
    max_p99_ms: Annotated[float, typer.Option(help="Highest p99 latency that passes.")] = 200.0,
    min_requests: Annotated[int, typer.Option(help="Requests needed for a verdict.")] = 100,
    judge: Annotated[
        bool, typer.Option("--judge", help="Also require the monitor's statistical judgement.")
    ] = False,
    reason: Reason = "",
) -> None:
    """Start a canary (or blue-green) rollout of a version on a deployment."""
    try:
        period = parse_duration(interval)
        percents = parse_steps(steps)
        version = version_name(candidate)
    except ValueError as exc:
        fail(str(exc))
    gate = pb.RolloutGate(
        max_error_rate=max_error_rate,
        max_p99_latency_ms=max_p99_ms,
        min_requests=min_requests,
        judge=judge,
    )
    strategy = (
        pb.RolloutStrategy(blue_green=pb.BlueGreenStrategy(observe=period), gate=gate)
        if blue_green
        else pb.RolloutStrategy(
            canary=pb.CanaryStrategy(steps=percents, interval=period), gate=gate
        )
    )
    _start(name, version, strategy, registry, api_key, reason)


_METRICS = {
    "error_rate": pb.AB_TEST_METRIC_ERROR_RATE,
    "accuracy": pb.AB_TEST_METRIC_ACCURACY,
    "outcome_mean": pb.AB_TEST_METRIC_OUTCOME_MEAN,
    "absolute_error": pb.AB_TEST_METRIC_ABSOLUTE_ERROR,
}


@canary_app.command("ab-test")
def ab_test_start(
    name: Annotated[str, typer.Argument(help="The endpoint, e.g. fraud.")],
    candidate: Annotated[str, typer.Argument(help="MODEL/NUMBER of the new version.")],
    registry: RegistryTarget,
    api_key: ApiKey = None,
    split: Annotated[int, typer.Option(help="The candidate's percent during the test.")] = 50,
    sample_size: Annotated[int, typer.Option(help="Samples each arm needs.")] = 1000,
    metric: Annotated[
        str, typer.Option(help="error_rate, accuracy, outcome_mean or absolute_error.")
    ] = "error_rate",
    alpha: Annotated[float, typer.Option(help="Significance level.")] = 0.05,
    check_every: Annotated[str, typer.Option(help="How often the report is read.")] = "1m",
    reason: Reason = "",
) -> None:
    """Start a fixed-sample A/B test; the better version keeps the traffic."""
    if metric not in _METRICS:
        fail(f"{metric!r}: the metric is one of {', '.join(_METRICS)}")
    try:
        period = parse_duration(check_every)
        version = version_name(candidate)
    except ValueError as exc:
        fail(str(exc))
    strategy = pb.RolloutStrategy(
        ab_test=pb.AbTestStrategy(
            candidate_percent=split,
            sample_size=sample_size,
            metric=_METRICS[metric],
            alpha=alpha,
            check_interval=period,
        )
    )
    _start(name, version, strategy, registry, api_key, reason)


@canary_app.command("status")
def canary_status(
    name: Annotated[str, typer.Argument(help="The endpoint, e.g. fraud.")],
    registry: RegistryTarget,
    api_key: ApiKey = None,
) -> None:
    """Show the deployment's latest rollout."""

    async def work() -> pb.Rollout:
        async with RegistryConnection(registry, api_key) as conn:
            return await _latest(conn, deployment_name(name))

    console.print(rollout_table(run(work())))


class _RolloutAnswer(Protocol):
    """What PauseRollout, ResumeRollout and AbortRollout answer."""

    @property
    def rollout(self) -> pb.Rollout: ...


#: One of those calls, given the rollout's name and the reason.
_RolloutCall = Callable[[RegistryConnection, str, str], Awaitable[_RolloutAnswer]]


def _rollout_action(verb: str, summary: str, call: _RolloutCall) -> None:
    """Adds the command VERB, which makes `call` on the deployment's latest rollout and shows
    the rollout it answers with."""

    def command(
        name: Annotated[str, typer.Argument(help="The endpoint, e.g. fraud.")],
        registry: RegistryTarget,
        api_key: ApiKey = None,
        reason: Reason = "",
    ) -> None:
        async def on_latest(conn: RegistryConnection) -> _RolloutAnswer:
            latest = await _latest(conn, deployment_name(name))
            return await call(conn, latest.name, reason)

        console.print(rollout_table(call_registry(registry, api_key, on_latest).rollout))

    canary_app.command(verb, help=summary)(command)


_rollout_action(
    "pause",
    "Hold the running rollout at its step.",
    lambda conn, rollout, reason: conn.stub.PauseRollout(
        pb.PauseRolloutRequest(name=rollout, reason=reason), metadata=conn.metadata
    ),
)
_rollout_action(
    "resume",
    "Continue a paused rollout; its step starts over.",
    lambda conn, rollout, reason: conn.stub.ResumeRollout(
        pb.ResumeRolloutRequest(name=rollout, reason=reason), metadata=conn.metadata
    ),
)
_rollout_action(
    "abort",
    "End the rollout and send all traffic back to the stable version.",
    lambda conn, rollout, reason: conn.stub.AbortRollout(
        pb.AbortRolloutRequest(name=rollout, reason=reason), metadata=conn.metadata
    ),
)


@models_app.command("validate")
def validate(
    version: Annotated[str, typer.Argument(help="MODEL/NUMBER or the version's full name.")],
    registry: RegistryTarget,
    api_key: ApiKey = None,
    reason: Reason = "",
) -> None:
    """Run the smoke and regression tests on a version; exit 1 when the run fails."""
    name = _checked(version_name, version)

    async def work() -> pb.ValidationRun:
        async with RegistryConnection(registry, api_key) as conn:
            response = await conn.stub.ValidateModelVersion(
                pb.ValidateModelVersionRequest(name=name, reason=reason),
                metadata=conn.metadata,
                timeout=600,
            )
            return response.validation

    result = run(work())
    if result.state != pb.VALIDATION_STATE_PASSED:
        fail(f"{name} failed validation: {result.reason}")
    console.print(f"{name} passed validation: {result.reason}", highlight=False)


@models_app.command("tag")
def tag(
    version: Annotated[str, typer.Argument(help="MODEL/NUMBER or the version's full name.")],
    tags: Annotated[list[str], typer.Argument(help="KEY=VALUE; they replace the version's tags.")],
    registry: RegistryTarget,
    api_key: ApiKey = None,
    reason: Reason = "",
) -> None:
    """Set a version's tags."""
    name = _checked(version_name, version)
    pairs: dict[str, str] = {}
    for item in tags:
        key, sep, value = item.partition("=")
        if not sep:
            fail(f"{item!r}: give each tag as KEY=VALUE")
        pairs[key] = value

    async def work() -> pb.ModelVersion:
        async with RegistryConnection(registry, api_key) as conn:
            response = await conn.stub.UpdateModelVersion(
                pb.UpdateModelVersionRequest(
                    model_version=pb.ModelVersion(name=name, tags=pairs),
                    update_mask=field_mask_pb2.FieldMask(paths=["tags"]),
                    reason=reason,
                ),
                metadata=conn.metadata,
            )
            return response.model_version

    updated = run(work())
    shown = ", ".join(f"{k}={v}" for k, v in sorted(updated.tags.items()))
    console.print(f"{updated.name} tags: {shown}", highlight=False)


@models_app.command("delete")
def delete(
    model: Annotated[str, typer.Argument(help="The model id or name.")],
    registry: RegistryTarget,
    api_key: ApiKey = None,
    force: Annotated[
        bool, typer.Option("--force", help="Also when a version is in PRODUCTION.")
    ] = False,
    reason: Reason = "",
) -> None:
    """Delete a model, its versions and the artifacts no other version uses (admin only)."""

    async def work() -> None:
        async with RegistryConnection(registry, api_key) as conn:
            await conn.stub.DeleteModel(
                pb.DeleteModelRequest(name=model_name(model), force=force, reason=reason),
                metadata=conn.metadata,
            )

    run(work())
    console.print(f"{model_name(model)} deleted")
