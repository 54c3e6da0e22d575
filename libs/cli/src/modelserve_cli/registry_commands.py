"""`modelserve models|deployments|audit|keys`: the registry from the command line.

Every command that talks to the registry takes `--registry HOST:PORT` (or
MODELSERVE_REGISTRY) and `--api-key KEY` (or MODELSERVE_API_KEY, sent as
`authorization: Bearer`). Any failure prints one line, `error: ...`, and exits 1.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import grpc
import typer
from google.protobuf import field_mask_pb2, timestamp_pb2
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn
from rich.table import Table

from modelserve.registry.v1 import registry_service_pb2 as pb
from modelserve.registry.v1 import registry_service_pb2_grpc as pb_grpc
from modelserve_cli.artifacts import ArtifactError, onnx_signature, sklearn_to_onnx
from modelserve_cli.output import errors, fail
from modelserve_cli.tls import cli_tls
from modelserve_runtime.auth import Role, new_api_key
from modelserve_runtime.channels import create_channel
from modelserve_runtime.errors import decode_rpc_error

T = TypeVar("T")

console = Console()
UPLOAD_CHUNK_BYTES = 1024 * 1024

models_app = typer.Typer(help="Register models and move their versions through stages.")
deployments_app = typer.Typer(help="Show, change and roll back deployments.")
keys_app = typer.Typer(help="Make API keys for the registry.")

RegistryTarget = Annotated[
    str,
    typer.Option(
        "--registry", envvar="MODELSERVE_REGISTRY", help="The registry's host:port.", metavar="ADDR"
    ),
]
ApiKey = Annotated[
    str | None,
    typer.Option(
        "--api-key",
        envvar="MODELSERVE_API_KEY",
        help="API key, when the registry has auth on.",
        show_default=False,
    ),
]
Reason = Annotated[str, typer.Option(help="Why; kept in the audit trail.")]


class StageName(StrEnum):
    """Stages as the command line spells them."""

    DEVELOPMENT = "development"
    STAGING = "staging"
    PRODUCTION = "production"
    ARCHIVED = "archived"


_STAGES = {
    StageName.DEVELOPMENT: pb.STAGE_DEVELOPMENT,
    StageName.STAGING: pb.STAGE_STAGING,
    StageName.PRODUCTION: pb.STAGE_PRODUCTION,
    StageName.ARCHIVED: pb.STAGE_ARCHIVED,
}


def run(work: Coroutine[Any, Any, T]) -> T:
    """Runs one command's calls; any failure becomes a one-line error and exit code 1."""
    try:
        return asyncio.run(work)
    except grpc.aio.AioRpcError as exc:
        error = decode_rpc_error(exc)
        fields = "; ".join(f"{v.field}: {v.description}" for v in error.violations)
        reason = f" {error.reason}" if error.reason else ""
        fail(f"{error.code.name}{reason}: {fields or error.message}")
    except (ArtifactError, OSError, ValueError) as exc:
        fail(str(exc))


class RegistryConnection:
    """A channel to the registry (TLS as `cli_tls` says) and the key every call carries."""

    def __init__(self, target: str, api_key: str | None) -> None:
        self._channel = create_channel(
            target,
            default_timeout_s=60,
            max_message_bytes=64 * 1024 * 1024,
            tls=cli_tls(),
        )
        self.stub = pb_grpc.RegistryServiceStub(self._channel)
        self.metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {api_key}"),) if api_key else ()
        )

    async def __aenter__(self) -> RegistryConnection:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._channel.close()


def call_registry(
    registry: str, api_key: str | None, call: Callable[[RegistryConnection], Awaitable[T]]
) -> T:
    """Makes `call` on a new connection to the registry and returns its answer; a failure ends
    the command as `run` says."""

    async def work() -> T:
        async with RegistryConnection(registry, api_key) as conn:
            return await call(conn)

    return run(work())


def model_name(model: str) -> str:
    """`fraud` or `models/fraud` as `models/fraud`."""
    return model if model.startswith("models/") else f"models/{model}"


def version_name(version: str) -> str:
    """`fraud/2` or `models/fraud/versions/2` as `models/fraud/versions/2`."""
    if version.startswith("models/"):
        return version
    model, _, number = version.partition("/")
    if not model or not number:
        raise ValueError(f"{version!r}: give a version as MODEL/NUMBER or its full name")
    return f"models/{model}/versions/{number}"


def deployment_name(name: str) -> str:
    """`fraud` or `deployments/fraud` as `deployments/fraud`."""
    return name if name.startswith("deployments/") else f"deployments/{name}"


def _time(stamp: timestamp_pb2.Timestamp) -> str:
    moment: datetime = stamp.ToDatetime()
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def _stage(stage: pb.Stage.ValueType) -> str:
    return pb.Stage.Name(stage).removeprefix("STAGE_").lower()


def _traffic(deployment: pb.Deployment) -> str:
    return ", ".join(f"{t.model_version} {t.percent}%" for t in deployment.traffic)


def _version_table(title: str, versions: list[pb.ModelVersion]) -> Table:
    table = Table(title=title)
    for column in ("version", "stage", "aliases", "approved by", "sha256", "bytes", "created"):
        table.add_column(column)
    for v in versions:
        table.add_row(
            v.name,
            _stage(v.stage),
            ", ".join(v.aliases),
            ", ".join(a.principal for a in v.approvals),
            v.sha256[:12],
            str(v.size_bytes),
            _time(v.create_time),
        )
    return table


@models_app.command("register")
def register(
    model: Annotated[str, typer.Argument(help="The model id, e.g. fraud.")],
    registry: RegistryTarget,
    api_key: ApiKey = None,
    onnx_file: Annotated[
        Path | None, typer.Option("--onnx", help="An ONNX model file.", exists=True)
    ] = None,
    sklearn_file: Annotated[
        Path | None,
        typer.Option(
            "--sklearn",
            help="A fitted scikit-learn model saved with joblib; converted to ONNX here.",
            exists=True,
        ),
    ] = None,
    description: Annotated[str, typer.Option(help="What this version is.")] = "",
    feature_ref: Annotated[
        list[str] | None,
        typer.Option(help="A feature of the input vector, in order (entity:name); repeat."),
    ] = None,
    input_name: Annotated[
        str, typer.Option(help="Input tensor name of a converted scikit-learn model.")
    ] = "features",
    allow_non_finite: Annotated[
        list[str] | None,
        typer.Option(
            "--allow-non-finite",
            help="A float input that takes NaN and infinity (a model that reads NaN as a"
            " missing value); repeat for each.",
        ),
    ] = None,
    reason: Reason = "",
) -> None:
    """Upload a model file as a new version (creating the model the first time)."""
    if (onnx_file is None) == (sklearn_file is None):
        fail("give exactly one of --onnx and --sklearn")
    try:
        if onnx_file is not None:
            data = onnx_file.read_bytes()
        else:
            assert sklearn_file is not None
            with console.status(f"converting {sklearn_file} to ONNX"):
                data = sklearn_to_onnx(sklearn_file, input_name)
        signature = onnx_signature(data, list(feature_ref or []))
    except (ArtifactError, OSError) as exc:
        fail(str(exc))
    inputs = {spec.name: spec for spec in signature.inputs}
    for name in allow_non_finite or []:
        if name not in inputs:
            fail(f"--allow-non-finite {name}: the model's inputs are {', '.join(sorted(inputs))}")
        inputs[name].allow_non_finite = True
    version = run(
        _register(registry, api_key, model, data, signature, description=description, reason=reason)
    )
    console.print(_version_table(f"registered {version.name}", [version]))


async def _register(
    target: str,
    api_key: str | None,
    model: str,
    data: bytes,
    signature: pb.Signature,
    *,
    description: str,
    reason: str,
) -> pb.ModelVersion:
    async with RegistryConnection(target, api_key) as conn:
        try:
            await conn.stub.CreateModel(
                pb.CreateModelRequest(model_id=model, reason=reason), metadata=conn.metadata
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() is not grpc.StatusCode.ALREADY_EXISTS:
                raise
        with Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            console=console,
            transient=True,
        ) as progress:
            task = progress.add_task("uploading", total=len(data))

            async def messages() -> AsyncIterator[pb.CreateModelVersionRequest]:
                yield pb.CreateModelVersionRequest(
                    upload=pb.ModelVersionUpload(
                        parent=model_name(model),
                        model_version=pb.ModelVersion(
                            description=description,
                            format=pb.ARTIFACT_FORMAT_ONNX,
                            signature=signature,
                        ),
                        sha256=hashlib.sha256(data).hexdigest(),
                        reason=reason,
                    )
                )
                for start in range(0, len(data), UPLOAD_CHUNK_BYTES):
                    chunk = data[start : start + UPLOAD_CHUNK_BYTES]
                    yield pb.CreateModelVersionRequest(chunk=chunk)
                    progress.advance(task, len(chunk))

            response = await conn.stub.CreateModelVersion(messages(), metadata=conn.metadata)
        return response.model_version


@models_app.command("list")
def list_models(registry: RegistryTarget, api_key: ApiKey = None) -> None:
    """List the models."""

    async def work() -> list[pb.Model]:
        async with RegistryConnection(registry, api_key) as conn:
            found: list[pb.Model] = []
            token = ""
            while True:
                page = await conn.stub.ListModels(
                    pb.ListModelsRequest(page_token=token), metadata=conn.metadata
                )
                found += page.models
                token = page.next_page_token
                if not token:
                    return found

    table = Table(title="models")
    for column in ("model", "description", "created"):
        table.add_column(column)
    for m in run(work()):
        table.add_row(m.name, m.description, _time(m.create_time))
    console.print(table)


@models_app.command("show")
def show_model(
    model: Annotated[str, typer.Argument(help="The model id or name.")],
    registry: RegistryTarget,
    api_key: ApiKey = None,
    limit: Annotated[int, typer.Option(help="How many of the newest versions.")] = 20,
) -> None:
    """Show a model and its newest versions."""

    async def work() -> tuple[pb.Model, list[pb.ModelVersion]]:
        async with RegistryConnection(registry, api_key) as conn:
            got = await conn.stub.GetModel(
                pb.GetModelRequest(name=model_name(model)), metadata=conn.metadata
            )
            versions = await conn.stub.ListModelVersions(
                pb.ListModelVersionsRequest(parent=model_name(model), page_size=limit),
                metadata=conn.metadata,
            )
            return got.model, list(versions.model_versions)

    found, versions = run(work())
    console.print(f"[bold]{found.name}[/bold] {found.description}", highlight=False)
    console.print(_version_table("versions, newest first", versions))


def _version_call(
    registry: str,
    api_key: str | None,
    call: Any,
) -> pb.ModelVersion:
    version: pb.ModelVersion = call_registry(registry, api_key, call).model_version
    return version


@models_app.command("promote")
def promote(
    version: Annotated[str, typer.Argument(help="MODEL/NUMBER or the version's full name.")],
    stage: Annotated[StageName, typer.Argument(help="The stage to enter.")],
    registry: RegistryTarget,
    api_key: ApiKey = None,
    reason: Reason = "",
) -> None:
    """Move a version to a stage (production needs another approver's approval)."""
    name = _checked(version_name, version)
    moved = _version_call(
        registry,
        api_key,
        lambda conn: conn.stub.TransitionModelVersionStage(
            pb.TransitionModelVersionStageRequest(name=name, stage=_STAGES[stage], reason=reason),
            metadata=conn.metadata,
        ),
    )
    console.print(f"{moved.name} is now in [bold]{_stage(moved.stage)}[/bold]")


@models_app.command("approve")
def approve(
    version: Annotated[str, typer.Argument(help="MODEL/NUMBER or the version's full name.")],
    registry: RegistryTarget,
    api_key: ApiKey = None,
    reason: Reason = "",
) -> None:
    """Approve a STAGING version for production."""
    name = _checked(version_name, version)
    approved = _version_call(
        registry,
        api_key,
        lambda conn: conn.stub.ApproveModelVersion(
            pb.ApproveModelVersionRequest(name=name, reason=reason), metadata=conn.metadata
        ),
    )
    by = ", ".join(a.principal for a in approved.approvals)
    console.print(f"{approved.name} approved (approvals: {by})", highlight=False)


@models_app.command("alias")
def alias(
    version: Annotated[str, typer.Argument(help="MODEL/NUMBER or the version's full name.")],
    name: Annotated[str, typer.Argument(help="The alias, e.g. champion.")],
    registry: RegistryTarget,
    api_key: ApiKey = None,
    reason: Reason = "",
) -> None:
    """Point an alias at a version."""
    full = _checked(version_name, version)
    pointed = _version_call(
        registry,
        api_key,
        lambda conn: conn.stub.SetModelVersionAlias(
            pb.SetModelVersionAliasRequest(name=full, alias=name, reason=reason),
            metadata=conn.metadata,
        ),
    )
    console.print(f"{name} -> {pointed.name}", highlight=False)


def _checked(parse: Any, value: str) -> str:
    try:
        result: str = parse(value)
    except ValueError as exc:
        fail(str(exc))
    return result


def _show_deployment(deployment: pb.Deployment) -> None:
    """Prints the deployment's split and, when it has any, its inference settings."""
    table = Table(title=f"{deployment.name} at revision {deployment.revision}")
    table.add_column("model version")
    table.add_column("percent", justify="right")
    for t in deployment.traffic:
        table.add_row(t.model_version, str(t.percent))
    console.print(table)
    inference = inference_summary(deployment.inference)
    if inference:
        console.print(f"inference: {inference}", highlight=False, soft_wrap=True)


_DEVICE_NAMES = {pb.DEVICE_CPU: "cpu", pb.DEVICE_GPU: "gpu"}
_BACKEND_NAMES = {pb.BACKEND_PYTHON_ONNXRUNTIME: "python", pb.BACKEND_ONNXRUNTIME: "onnxruntime"}


def inference_summary(config: pb.InferenceConfig) -> str:
    """The deployment's inference settings that are set, as `name=value` words; "" for none
    (inference's defaults)."""
    words = []
    if config.device:
        words.append(f"device={_DEVICE_NAMES.get(config.device, str(config.device))}")
    if config.gpus:
        words.append(f"gpus={','.join(str(g) for g in config.gpus)}")
    if config.instance_count:
        words.append(f"instances={config.instance_count}")
    if config.backend:
        words.append(f"backend={_BACKEND_NAMES.get(config.backend, str(config.backend))}")
    if config.max_batch_size:
        words.append(f"max-batch-size={config.max_batch_size}")
    if config.preferred_batch_sizes:
        sizes = ",".join(str(b) for b in config.preferred_batch_sizes)
        words.append(f"preferred-batch-sizes={sizes}")
    if config.HasField("max_queue_delay_us"):
        words.append(f"queue-delay-us={config.max_queue_delay_us}")
    return " ".join(words)


@deployments_app.command("show")
def show_deployment(
    name: Annotated[str, typer.Argument(help="The endpoint, e.g. fraud.")],
    registry: RegistryTarget,
    api_key: ApiKey = None,
) -> None:
    """Show where a deployment sends its traffic."""

    async def work() -> pb.Deployment:
        async with RegistryConnection(registry, api_key) as conn:
            response = await conn.stub.GetDeployment(
                pb.GetDeploymentRequest(name=deployment_name(name)), metadata=conn.metadata
            )
            return response.deployment

    _show_deployment(run(work()))


def parse_split(targets: list[str]) -> list[pb.TrafficTarget]:
    """`MODEL/NUMBER=PERCENT` arguments as traffic targets."""
    split = []
    for target in targets:
        version, sep, percent = target.rpartition("=")
        if not sep or not percent.strip().lstrip("-").isdigit():
            raise ValueError(f"{target!r}: give each target as MODEL/NUMBER=PERCENT")
        split.append(pb.TrafficTarget(model_version=version_name(version), percent=int(percent)))
    return split


ExpectedRevision = Annotated[
    int | None,
    typer.Option(
        help="Change it only if it is still at this revision (as `show` prints it; with `set`,"
        " 0: only if it does not exist yet); else ABORTED, and nothing changes."
    ),
]


@deployments_app.command("set")
def set_deployment(
    name: Annotated[str, typer.Argument(help="The endpoint, e.g. fraud.")],
    targets: Annotated[list[str], typer.Argument(help="MODEL/NUMBER=PERCENT, adding up to 100.")],
    registry: RegistryTarget,
    api_key: ApiKey = None,
    reason: Reason = "",
    expected_revision: ExpectedRevision = None,
) -> None:
    """Set a deployment's traffic split as a new revision (creating the deployment)."""
    split = _split(targets)
    request = pb.UpdateDeploymentRequest(
        deployment=pb.Deployment(name=deployment_name(name), traffic=split),
        # Only the split: shadow, fallback, inference settings and the rest stay.
        update_mask=field_mask_pb2.FieldMask(paths=["traffic"]),
        allow_missing=True,
        reason=reason,
    )
    if expected_revision is not None:
        request.expected_revision = expected_revision

    async def work() -> pb.Deployment:
        async with RegistryConnection(registry, api_key) as conn:
            response = await conn.stub.UpdateDeployment(request, metadata=conn.metadata)
            return response.deployment

    _show_deployment(run(work()))


class DeviceName(StrEnum):
    """Devices as the command line spells them."""

    CPU = "cpu"
    GPU = "gpu"


class BackendName(StrEnum):
    """Backends as the command line spells them."""

    PYTHON = "python"
    ONNXRUNTIME = "onnxruntime"


def parse_ids(text: str, what: str) -> list[int]:
    """`0,1,3` as integers; ValueError naming `what` otherwise."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(
            f"--{what}: give comma-separated integers, e.g. 0,1; got {text!r}"
        ) from None


@deployments_app.command("configure")
def configure_deployment(
    name: Annotated[str, typer.Argument(help="The endpoint, e.g. fraud.")],
    registry: RegistryTarget,
    api_key: ApiKey = None,
    reason: Reason = "",
    device: Annotated[
        DeviceName | None, typer.Option(help="Where Triton runs the model's instances.")
    ] = None,
    gpus: Annotated[
        str | None, typer.Option(help="With --device gpu: the GPUs, e.g. 0,1 (empty: all).")
    ] = None,
    instances: Annotated[
        int | None, typer.Option(help="Model instances (on each GPU with --device gpu).")
    ] = None,
    backend: Annotated[BackendName | None, typer.Option(help="Triton's backend.")] = None,
    max_batch_size: Annotated[
        int | None, typer.Option(help="The largest batch Triton forms.")
    ] = None,
    preferred_batch_sizes: Annotated[
        str | None, typer.Option(help="Batch sizes the batcher prefers, e.g. 8,32.")
    ] = None,
    queue_delay_us: Annotated[
        int | None, typer.Option(help="How long the batcher may hold a request, in µs.")
    ] = None,
    reset: Annotated[
        bool, typer.Option(help="Start from inference's defaults instead of the current ones.")
    ] = False,
) -> None:
    """Change how inference serves a deployment's versions, as a new revision; settings not
    given keep their current values (or, with --reset, inference's defaults)."""
    given = (device, gpus, instances, backend, max_batch_size, preferred_batch_sizes)
    if all(v is None for v in given) and queue_delay_us is None and not reset:
        fail("give at least one setting to change (see --help)")
    try:
        gpu_ids = None if gpus is None else parse_ids(gpus, "gpus")
        preferred = (
            None
            if preferred_batch_sizes is None
            else parse_ids(preferred_batch_sizes, "preferred-batch-sizes")
        )
    except ValueError as exc:
        fail(str(exc))

    async def work() -> pb.Deployment:
        async with RegistryConnection(registry, api_key) as conn:
            config = pb.InferenceConfig()
            request = pb.UpdateDeploymentRequest(
                update_mask=field_mask_pb2.FieldMask(paths=["inference"]), reason=reason
            )
            if not reset:
                current = await conn.stub.GetDeployment(
                    pb.GetDeploymentRequest(name=deployment_name(name)), metadata=conn.metadata
                )
                config.CopyFrom(current.deployment.inference)
                # Read, change, write: a change made by someone else in between is not lost
                # under this one, the write is ABORTED instead.
                request.expected_revision = current.deployment.revision
            if device is not None:
                config.device = pb.DEVICE_GPU if device is DeviceName.GPU else pb.DEVICE_CPU
                if device is DeviceName.CPU and gpu_ids is None:
                    del config.gpus[:]
            if gpu_ids is not None:
                config.gpus[:] = gpu_ids
            if instances is not None:
                config.instance_count = instances
            if backend is not None:
                config.backend = (
                    pb.BACKEND_ONNXRUNTIME
                    if backend is BackendName.ONNXRUNTIME
                    else pb.BACKEND_PYTHON_ONNXRUNTIME
                )
            if max_batch_size is not None:
                config.max_batch_size = max_batch_size
            if preferred is not None:
                config.preferred_batch_sizes[:] = preferred
            if queue_delay_us is not None:
                config.max_queue_delay_us = queue_delay_us
            request.deployment.CopyFrom(pb.Deployment(name=deployment_name(name), inference=config))
            response = await conn.stub.UpdateDeployment(request, metadata=conn.metadata)
            return response.deployment

    _show_deployment(run(work()))


def _split(targets: list[str]) -> list[pb.TrafficTarget]:
    try:
        return parse_split(targets)
    except ValueError as exc:
        fail(str(exc))


@deployments_app.command("rollback")
def rollback(
    name: Annotated[str, typer.Argument(help="The endpoint, e.g. fraud.")],
    registry: RegistryTarget,
    api_key: ApiKey = None,
    revision: Annotated[
        int, typer.Option(help="The revision to restore; the previous one when 0.")
    ] = 0,
    reason: Reason = "",
    expected_revision: ExpectedRevision = None,
) -> None:
    """Restore an earlier revision's traffic as a new revision."""
    request = pb.RollbackDeploymentRequest(
        name=deployment_name(name), revision=revision, reason=reason
    )
    if expected_revision is not None:
        request.expected_revision = expected_revision
    response = call_registry(
        registry,
        api_key,
        lambda conn: conn.stub.RollbackDeployment(request, metadata=conn.metadata),
    )
    _show_deployment(response.deployment)


@deployments_app.command("history")
def history(
    name: Annotated[str, typer.Argument(help="The endpoint, e.g. fraud.")],
    registry: RegistryTarget,
    api_key: ApiKey = None,
    limit: Annotated[int, typer.Option(help="How many of the newest revisions.")] = 20,
) -> None:
    """List a deployment's revisions, newest first."""

    async def work() -> list[pb.DeploymentRevision]:
        async with RegistryConnection(registry, api_key) as conn:
            response = await conn.stub.ListDeploymentRevisions(
                pb.ListDeploymentRevisionsRequest(name=deployment_name(name), page_size=limit),
                metadata=conn.metadata,
            )
            return list(response.revisions)

    table = Table(title=f"{deployment_name(name)} revisions, newest first")
    for column in ("revision", "time", "principal", "traffic", "reason", "restored"):
        table.add_column(column)
    for r in run(work()):
        table.add_row(
            str(r.deployment.revision),
            _time(r.deployment.update_time),
            r.principal,
            _traffic(r.deployment),
            r.reason,
            str(r.restored_revision or ""),
        )
    console.print(table)


def audit(
    registry: RegistryTarget,
    api_key: ApiKey = None,
    resource: Annotated[
        str, typer.Option(help="Only this resource and those below it, e.g. models/fraud.")
    ] = "",
    limit: Annotated[int, typer.Option(help="How many of the newest events.")] = 50,
) -> None:
    """List the audit trail, newest first."""

    async def work() -> list[pb.AuditEvent]:
        async with RegistryConnection(registry, api_key) as conn:
            response = await conn.stub.ListAuditEvents(
                pb.ListAuditEventsRequest(resource=resource, page_size=limit),
                metadata=conn.metadata,
            )
            return list(response.audit_events)

    table = Table(title="audit trail, newest first")
    for column in ("event", "time", "principal", "action", "resource", "reason", "details"):
        table.add_column(column)
    for e in run(work()):
        details = ", ".join(f"{k}={v}" for k, v in sorted(e.details.items()))
        table.add_row(
            e.name, _time(e.create_time), e.principal, e.action, e.resource, e.reason, details
        )
    console.print(table)


@keys_app.command("create")
def create_key(
    principal: Annotated[str, typer.Option(help="Who will hold the key.")],
    role: Annotated[list[Role], typer.Option(help="A role of the key; repeat for more.")],
) -> None:
    """Make a new API key: prints the key once, and the record (no key in it) for the registry's
    keys file (MODELSERVE_REGISTRY_AUTH__KEYS_FILE)."""
    key, record = new_api_key(principal, role)
    errors.print("key (shown once; give it to its holder):", highlight=False)
    console.print(key, highlight=False, markup=False)
    errors.print("record for the keys file (a JSON list of these):", highlight=False)
    console.print(json.dumps(record.model_dump(mode="json"), sort_keys=True), markup=False)
