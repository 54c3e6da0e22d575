"""The registry's domain: validated models, versions with their artifacts, and deployments."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import re
from collections.abc import AsyncIterable, AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import structlog

from modelserve.registry.v1 import registry_service_pb2 as pb
from modelserve_registry.artifacts import ArtifactStore, StagedArtifact
from modelserve_registry.metadata import (
    check_hybrid,
    check_inference,
    check_pairs,
    check_strategy,
    check_validation_set,
    check_version_extras,
)
from modelserve_registry.onnx_artifact import check_onnx_artifact
from modelserve_registry.resources import (
    Actor,
    ArtifactFormat,
    AuditEvent,
    Change,
    DataType,
    DefaultOutput,
    Deployment,
    DeploymentRevision,
    Model,
    ModelVersion,
    Page,
    RoutingPolicy,
    Stage,
    TensorSpec,
    TrafficShare,
    TrafficTarget,
    VersionPage,
    VersionRef,
    VersionUpload,
)
from modelserve_registry.store import RegistryStore, concurrent_change
from modelserve_registry.validation import Validator
from modelserve_runtime.errors import (
    FailedPreconditionError,
    FieldViolation,
    InvalidArgumentError,
    ModelServeError,
    NotFoundError,
    ResourceExhaustedError,
)

log = structlog.get_logger()

_ID = "[a-z][a-z0-9-]{0,62}"
_MODEL_ID = re.compile(_ID)
_MODEL_NAME = re.compile(f"models/({_ID})")
_VERSION_NAME = re.compile(f"models/({_ID})/versions/([1-9][0-9]{{0,17}})")
_DEPLOYMENT_NAME = re.compile(f"deployments/({_ID})")
#: `user` or an entity type.
_ROUTING_KEY = re.compile("[a-z][a-z0-9_-]{0,62}")
MAX_SALT_CHARS = 128
MAX_SHADOW_VERSIONS = 8
MAX_DEFAULT_OUTPUTS = 16
MAX_DEFAULT_OUTPUT_VALUES = 4096
_SHA256 = re.compile("[0-9a-f]{64}")
_FEATURE_REF = re.compile("[^:]+:[^:]+")
_PAGE_TOKEN_PREFIX = "v1"

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
#: Writable fields of a Deployment, as update_mask paths; `*` names them all.
DEPLOYMENT_WRITABLE_FIELDS = frozenset(
    {
        "traffic",
        "routing_key",
        "salt",
        "shadow",
        "fallback_version",
        "default_outputs",
        "inference",
        "hybrid",
        "strategy",
    }
)
#: Writable fields of a Model and of a ModelVersion, as update_mask paths.
MODEL_WRITABLE_FIELDS = frozenset({"description", "labels", "validation_set"})
VERSION_WRITABLE_FIELDS = frozenset({"description", "tags"})
_DEPLOYMENT_OUTPUT_ONLY_FIELDS = frozenset({"name", "revision", "update_time"})
#: How many revisions a watcher reads from the store at a time.
WATCH_BATCH = 500
#: The stages a version may move to from each stage: the next one along, or ARCHIVED.
STAGE_TRANSITIONS: dict[Stage, frozenset[Stage]] = {
    Stage.DEVELOPMENT: frozenset({Stage.STAGING, Stage.ARCHIVED}),
    Stage.STAGING: frozenset({Stage.PRODUCTION, Stage.ARCHIVED}),
    Stage.PRODUCTION: frozenset({Stage.ARCHIVED}),
    Stage.ARCHIVED: frozenset(),
}


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _invalid(violations: Sequence[FieldViolation]) -> InvalidArgumentError:
    return InvalidArgumentError.from_violations(violations)


def parse_model_name(name: str, field: str) -> str:
    """The `{model}` of `models/{model}`; InvalidArgumentError naming `field` otherwise."""
    match = _MODEL_NAME.fullmatch(name)
    if match is None:
        raise InvalidArgumentError.for_field(field, f"{name!r} is not models/{{model}}")
    return match.group(1)


def parse_version_name(name: str, field: str) -> tuple[str, int]:
    """The model id and number of `models/{model}/versions/{version}`."""
    match = _VERSION_NAME.fullmatch(name)
    if match is None:
        raise InvalidArgumentError.for_field(
            field, f"{name!r} is not models/{{model}}/versions/{{version}}"
        )
    return match.group(1), int(match.group(2))


def parse_deployment_name(name: str, field: str) -> str:
    """The `{deployment}` of `deployments/{deployment}`."""
    match = _DEPLOYMENT_NAME.fullmatch(name)
    if match is None:
        raise InvalidArgumentError.for_field(field, f"{name!r} is not deployments/{{deployment}}")
    return match.group(1)


def _model_not_found(model_id: str) -> NotFoundError:
    name = f"models/{model_id}"
    return NotFoundError(
        f"model {name} does not exist", reason="MODEL_NOT_FOUND", metadata={"name": name}
    )


def _version_not_found(name: str) -> NotFoundError:
    return NotFoundError(
        f"model version {name} does not exist",
        reason="MODEL_VERSION_NOT_FOUND",
        metadata={"name": name},
    )


def _encode_page_token(model_id: str, last_version: int) -> str:
    raw = f"{_PAGE_TOKEN_PREFIX}/{model_id}/{last_version}".encode()
    return base64.urlsafe_b64encode(raw).decode()


def _decode_page_token(token: str, model_id: str) -> int:
    """The last version of the previous page; the token must come from a call for this model."""
    try:
        prefix, token_model, last = base64.urlsafe_b64decode(token.encode()).decode().split("/")
        last_version = int(last)
    except (binascii.Error, UnicodeError, ValueError):
        last_version = 0
        prefix = token_model = ""
    if prefix != _PAGE_TOKEN_PREFIX or token_model != model_id or last_version < 1:
        raise InvalidArgumentError.for_field(
            "page_token", "not a next_page_token from a previous call for this parent"
        )
    return last_version


def _encode_token(kind: str, scope: str, last: str) -> str:
    raw = json.dumps([_PAGE_TOKEN_PREFIX, kind, scope, last])
    return base64.urlsafe_b64encode(raw.encode()).decode()


def _decode_token(token: str, kind: str, scope: str) -> str:
    """The last item of the previous page; the token must come from the same listing."""
    try:
        prefix, token_kind, token_scope, last = json.loads(base64.urlsafe_b64decode(token))
    except (binascii.Error, UnicodeError, ValueError, TypeError):
        prefix = token_kind = token_scope = last = None
    if [prefix, token_kind, token_scope] != [_PAGE_TOKEN_PREFIX, kind, scope] or not last:
        raise InvalidArgumentError.for_field(
            "page_token", "not a next_page_token from a previous call with the same parameters"
        )
    return str(last)


def _page_limit(page_size: int) -> int:
    if page_size < 0:
        raise InvalidArgumentError.for_field("page_size", "must not be negative")
    return min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def _token_number(token: str, kind: str, scope: str) -> int | None:
    if not token:
        return None
    last = _decode_token(token, kind, scope)
    if not last.isdigit() or int(last) < 1:
        raise InvalidArgumentError.for_field(
            "page_token", "not a next_page_token from a previous call with the same parameters"
        )
    return int(last)


class _ChangeSignal:
    """Wakes every waiting watcher when a deployment revision has been committed."""

    def __init__(self) -> None:
        self._count = 0
        self._condition = asyncio.Condition()
        self.closed = False

    @property
    def count(self) -> int:
        """How many signals have been sent; a watcher remembers it before reading."""
        return self._count

    async def send(self) -> None:
        async with self._condition:
            self._count += 1
            self._condition.notify_all()

    async def wait_past(self, seen: int) -> None:
        """Returns once a signal was sent after the count `seen` was read."""
        async with self._condition:
            await self._condition.wait_for(lambda: self.closed or self._count > seen)

    async def close(self) -> None:
        """Wakes every watcher for the last time; watch streams then end."""
        async with self._condition:
            self.closed = True
            self._condition.notify_all()


def _check_tensors(field: str, tensors: Sequence[TensorSpec]) -> list[FieldViolation]:
    violations: list[FieldViolation] = []
    if not tensors:
        violations.append(FieldViolation(field, "at least one tensor is required"))
    seen: set[str] = set()
    for i, tensor in enumerate(tensors):
        if not tensor.name:
            violations.append(FieldViolation(f"{field}[{i}].name", "must not be empty"))
        elif tensor.name in seen:
            violations.append(
                FieldViolation(f"{field}[{i}].name", f"{tensor.name!r} appears twice")
            )
        seen.add(tensor.name)
        if tensor.datatype is None:
            violations.append(FieldViolation(f"{field}[{i}].datatype", "must be set"))
        if not tensor.shape:
            violations.append(
                FieldViolation(f"{field}[{i}].shape", "at least one dimension is required")
            )
        elif any(d < 1 and d != -1 for d in tensor.shape):
            violations.append(
                FieldViolation(
                    f"{field}[{i}].shape", "each dimension is -1 (variable) or at least 1"
                )
            )
    return violations


@dataclass(frozen=True, slots=True)
class _CheckedUpload:
    model_id: str
    format: ArtifactFormat
    extras: bytes
    tags: tuple[tuple[str, str], ...]
    parent: VersionRef | None


def _masked(
    update_mask: Sequence[str],
    writable: frozenset[str],
    kind: str,
    violations: list[FieldViolation],
) -> set[str]:
    """The fields an update writes: the mask's paths (all writable ones when it is empty)."""
    for path in update_mask:
        if path not in writable:
            violations.append(
                FieldViolation(
                    "update_mask",
                    f"{path!r} is not a writable {kind} field ({', '.join(sorted(writable))})",
                )
            )
    return set(update_mask) & writable if update_mask else set(writable)


def _check_validation_passed(version: ModelVersion) -> None:
    run = pb.ValidationRun.FromString(version.validation)
    if run.state == pb.VALIDATION_STATE_PASSED:
        return
    why = (
        f"its latest validation run failed: {run.reason}"
        if run.state == pb.VALIDATION_STATE_FAILED
        else "it has never been validated (call ValidateModelVersion)"
    )
    raise FailedPreconditionError(
        f"{version.name} cannot enter PRODUCTION: {why}",
        reason="VALIDATION_REQUIRED",
        metadata={
            "name": version.name,
            "unmet_condition": "a passing validation run (smoke and regression tests)",
        },
    )


def _referenced_models(targets: Sequence[TrafficTarget], policy: RoutingPolicy) -> set[str]:
    """The models whose versions a deployment makes inference hold: targets, shadows and the
    fallback."""
    models = {t.model_id for t in targets}
    models |= {v.model_id for v in policy.shadow}
    if policy.fallback is not None:
        models.add(policy.fallback.model_id)
    return models


def _check_upload(upload: VersionUpload) -> _CheckedUpload:
    """The checked metadata of an upload; InvalidArgumentError naming every bad field."""
    violations: list[FieldViolation] = []
    model_id = ""
    try:
        model_id = parse_model_name(upload.parent, "upload.parent")
    except InvalidArgumentError as exc:
        violations.extend(exc.violations)
    if not _SHA256.fullmatch(upload.sha256):
        violations.append(FieldViolation("upload.sha256", "must be 64 lowercase hex digits"))
    if upload.format is None:
        violations.append(
            FieldViolation("upload.model_version.format", "must be ARTIFACT_FORMAT_ONNX")
        )
    signature = upload.signature
    field = "upload.model_version.signature"
    violations += _check_tensors(f"{field}.inputs", signature.inputs)
    violations += _check_tensors(f"{field}.outputs", signature.outputs)
    violations += [
        FieldViolation(
            f"{field}.inputs[{i}].allow_non_finite", "only FP32 and FP64 inputs take NaN or inf"
        )
        for i, tensor in enumerate(signature.inputs)
        if tensor.allow_non_finite and tensor.datatype not in (DataType.FP32, DataType.FP64)
    ]
    violations += [
        FieldViolation(
            f"{field}.outputs[{i}].allow_non_finite", "is for inputs; an output is what it is"
        )
        for i, tensor in enumerate(signature.outputs)
        if tensor.allow_non_finite
    ]
    for i, ref in enumerate(signature.feature_refs):
        if not _FEATURE_REF.fullmatch(ref):
            violations.append(
                FieldViolation(f"{field}.feature_refs[{i}]", f"{ref!r} is not 'entity_type:name'")
            )
    if signature.feature_refs and signature.inputs and signature.inputs[0].shape:
        width = signature.inputs[0].shape[-1]
        if width != -1 and width != len(signature.feature_refs):
            violations.append(
                FieldViolation(
                    f"{field}.feature_refs",
                    f"{len(signature.feature_refs)} features, but the first input's last "
                    f"dimension is {width}",
                )
            )
    raw = pb.ModelVersion.FromString(upload.extras)
    extras, parent_name = check_version_extras(raw, signature, violations)
    tags = check_pairs("upload.model_version.tags", raw.tags, violations)
    if violations or upload.format is None:
        raise _invalid(violations)
    parent = VersionRef(*parse_version_name(parent_name, "parent")) if parent_name else None
    return _CheckedUpload(model_id, upload.format, extras, tags, parent)


class Registry:
    """Models, their versions and artifacts, and deployments, over a store and an artifact store."""

    def __init__(
        self,
        store: RegistryStore,
        artifacts: ArtifactStore,
        *,
        max_artifact_bytes: int,
        read_chunk_bytes: int,
        clock: Callable[[], datetime] = _utc_now,
        production_only: bool = True,
        require_validation: bool = True,
        validator: Validator | None = None,
    ) -> None:
        self._validator = validator
        self._production_only = production_only
        self._require_validation = require_validation
        self._store = store
        self._artifacts = artifacts
        self._max_artifact_bytes = max_artifact_bytes
        self._read_chunk_bytes = read_chunk_bytes
        self._clock = clock
        # Commit-and-record runs one at a time, so removing a file that a failed record
        # created can never pull it from under another upload of the same bytes.
        self._record_lock = asyncio.Lock()
        # Recordings that outlive a cancelled caller, held here until they finish.
        self._recording: set[asyncio.Task[ModelVersion]] = set()
        self._changes = _ChangeSignal()

    def _change(self, actor: Actor, action: str) -> Change:
        return Change(actor.principal, actor.reason, action, self._clock())

    async def create_model(
        self,
        model_id: str,
        description: str,
        actor: Actor,
        *,
        labels: Mapping[str, str] | None = None,
        validation_set: pb.ValidationSet | None = None,
    ) -> Model:
        """Registers a model; ALREADY_EXISTS when the id is taken."""
        violations: list[FieldViolation] = []
        if not _MODEL_ID.fullmatch(model_id):
            violations.append(
                FieldViolation("model_id", "1-63 of [a-z0-9-], starting with a lowercase letter")
            )
        pairs = check_pairs("model.labels", labels or {}, violations)
        stored_set = b""
        if validation_set is not None and validation_set != pb.ValidationSet():
            stored_set = check_validation_set("model.validation_set", validation_set, violations)
        if violations:
            raise _invalid(violations)
        change = self._change(actor, "CreateModel")
        model = Model(
            model_id=model_id,
            description=description,
            create_time=change.time,
            labels=pairs,
            validation_set=stored_set,
        )
        await self._store.create_model(model, change)
        log.info("model_created", model=model.name)
        return model

    async def get_model(self, name: str) -> Model:
        """The model `models/{model}`."""
        model_id = parse_model_name(name, "name")
        model = await self._store.get_model(model_id)
        if model is None:
            raise _model_not_found(model_id)
        return model

    async def update_model(
        self,
        name: str,
        update_mask: Sequence[str],
        actor: Actor,
        *,
        description: str,
        labels: Mapping[str, str],
        validation_set: pb.ValidationSet,
    ) -> Model:
        """Writes the masked fields of a model (all three when the mask is empty)."""
        violations: list[FieldViolation] = []
        model_id = ""
        try:
            model_id = parse_model_name(name, "model.name")
        except InvalidArgumentError as exc:
            violations.extend(exc.violations)
        written = _masked(update_mask, MODEL_WRITABLE_FIELDS, "Model", violations)
        pairs = check_pairs("model.labels", labels, violations) if "labels" in written else None
        stored_set: bytes | None = None
        if "validation_set" in written:
            stored_set = (
                b""
                if validation_set == pb.ValidationSet()
                else check_validation_set("model.validation_set", validation_set, violations)
            )
        if violations:
            raise _invalid(violations)
        model = await self._store.update_model(
            model_id,
            description=description if "description" in written else None,
            labels=pairs,
            validation_set=stored_set,
            change=self._change(actor, "UpdateModel"),
        )
        log.info("model_updated", model=model.name, fields=sorted(written))
        return model

    async def delete_model(self, name: str, force: bool, actor: Actor) -> None:
        """Deletes a model, its versions, and the artifacts no other version uses."""
        model_id = parse_model_name(name, "name")
        unused = await self._store.delete_model(
            model_id, force=force, change=self._change(actor, "DeleteModel")
        )
        async with self._record_lock:
            still_used = await self._store.referenced_artifacts()
            for uri in unused:
                if uri not in still_used:
                    await self._artifacts.remove(uri)
        log.info("model_deleted", model=name, artifacts_removed=len(unused))

    async def sweep_unreferenced_artifacts(self) -> int:
        """Removes stored artifacts that no version uses (left by a crash between a delete's
        commit and its file removal); returns how many went."""
        async with self._record_lock:
            used = await self._store.referenced_artifacts()
            return await self._artifacts.remove_unreferenced(used)

    async def update_model_version(
        self,
        name: str,
        update_mask: Sequence[str],
        actor: Actor,
        *,
        description: str,
        tags: Mapping[str, str],
    ) -> ModelVersion:
        """Writes the masked mutable fields of a version (description and tags; both when
        the mask is empty). Any other path is refused: a version is otherwise immutable."""
        violations: list[FieldViolation] = []
        model_id, number = "", 0
        try:
            model_id, number = parse_version_name(name, "model_version.name")
        except InvalidArgumentError as exc:
            violations.extend(exc.violations)
        written = _masked(update_mask, VERSION_WRITABLE_FIELDS, "ModelVersion", violations)
        pairs = check_pairs("model_version.tags", tags, violations) if "tags" in written else None
        if violations:
            raise _invalid(violations)
        version = await self._store.update_model_version(
            model_id,
            number,
            description=description if "description" in written else None,
            tags=pairs,
            change=self._change(actor, "UpdateModelVersion"),
        )
        log.info("model_version_updated", model_version=name, fields=sorted(written))
        return version

    async def notify_deployment_change(self) -> None:
        """Wakes the deployment watchers: a revision was committed outside update/rollback."""
        await self._changes.send()

    async def validate_model_version(self, name: str, actor: Actor) -> ModelVersion:
        """Runs a validation of the version through inference and records it; a FAILED run
        is recorded and returned like a passing one."""
        version = await self.get_model_version(name)
        if version.stage is Stage.ARCHIVED:
            raise FailedPreconditionError(
                f"{name} is ARCHIVED; an archived version is not validated",
                reason="VERSION_ARCHIVED",
                metadata={"name": name},
            )
        if self._validator is None:
            raise FailedPreconditionError(
                "this registry has no inference service to validate with",
                reason="NO_INFERENCE",
                metadata={"name": name},
            )
        model = await self.get_model(f"models/{version.model_id}")
        versions = await self._store.list_model_versions(
            version.model_id, before=None, limit=MAX_PAGE_SIZE
        )
        production = [v for v in versions if v.stage is Stage.PRODUCTION]
        run = await self._validator.run(version, model, production, actor.principal, self._clock())
        log.info(
            "model_version_validated",
            model_version=name,
            state=pb.ValidationState.Name(run.state),
            reason=run.reason,
        )
        return await self.record_validation(name, run, actor)

    async def record_validation(
        self, name: str, run: pb.ValidationRun, actor: Actor
    ) -> ModelVersion:
        """Stores a finished validation run as the version's latest, audited."""
        model_id, number = parse_version_name(name, "name")
        details = {
            "validation": pb.ValidationState.Name(run.state),
            "smoke_passed": str(run.smoke_passed).lower(),
            "result": run.reason,
        }
        if run.metric != pb.VALIDATION_METRIC_UNSPECIFIED:
            details["metric"] = pb.ValidationMetric.Name(run.metric)
            details["candidate_score"] = f"{run.candidate_score:.6g}"
        if run.baseline_version:
            details["baseline_version"] = run.baseline_version
            details["baseline_score"] = f"{run.baseline_score:.6g}"
        return await self._store.record_validation(
            model_id,
            number,
            run.SerializeToString(deterministic=True),
            details,
            self._change(actor, "ValidateModelVersion"),
        )

    async def list_models(self, page_size: int, page_token: str) -> Page[Model]:
        """One page of the models, by id."""
        limit = _page_limit(page_size)
        after = _decode_token(page_token, "models", "") if page_token else None
        rows = await self._store.list_models(after=after, limit=limit + 1)
        if len(rows) <= limit:
            return Page(rows)
        return Page(rows[:limit], _encode_token("models", "", rows[limit - 1].model_id))

    async def create_model_version(
        self, messages: AsyncIterable[VersionUpload | bytes], principal: str
    ) -> ModelVersion:
        """Records a new version from an upload: the metadata first, then the artifact's bytes.

        Nothing is recorded unless everything checks out: the bytes' sha256 equals the
        declared one, they stay within the size limit, they are a valid ONNX model, and its
        graph matches the signature. Only then is the artifact moved to its content address
        and the version row written.
        """
        iterator = aiter(messages)
        try:
            upload = await anext(iterator, None)
            if not isinstance(upload, VersionUpload):
                raise InvalidArgumentError.for_field(
                    "upload", "the first message must carry the upload metadata"
                )
            checked = _check_upload(upload)
            model_id = checked.model_id
            if await self._store.get_model(model_id) is None:
                raise _model_not_found(model_id)
        except ModelServeError:
            await self._drain(iterator, 0)
            raise
        staged = await self._artifacts.stage()
        try:
            await self._receive(iterator, staged)
            digest = await staged.finish()
            if digest != upload.sha256:
                description = f"the bytes' sha256 is {digest}, the upload declared {upload.sha256}"
                raise InvalidArgumentError(
                    description,
                    reason="SHA256_MISMATCH",
                    metadata={"expected": upload.sha256, "actual": digest},
                    violations=[FieldViolation("upload.sha256", description)],
                )
            await asyncio.to_thread(check_onnx_artifact, await staged.read(), upload.signature)
        except BaseException:
            staged.discard()
            raise
        # Once the bytes are in and valid, recording finishes even if the caller goes away:
        # a cancelled insert could still land after its artifact file had been removed.
        actor = Actor(principal, upload.reason)
        task = asyncio.create_task(self._record(checked, upload, staged, digest, actor))
        self._recording.add(task)
        task.add_done_callback(self._recording.discard)
        version = await asyncio.shield(task)
        log.info(
            "model_version_created",
            model_version=version.name,
            sha256=version.sha256,
            size_bytes=version.size_bytes,
        )
        return version

    async def _receive(
        self, messages: AsyncIterator[VersionUpload | bytes], staged: StagedArtifact
    ) -> None:
        async for message in messages:
            if not isinstance(message, bytes):
                await self._drain(messages, staged.size)
                raise InvalidArgumentError.for_field(
                    "upload", "only the first message may carry the upload metadata"
                )
            if staged.size + len(message) > self._max_artifact_bytes:
                limit = str(self._max_artifact_bytes)
                raise ResourceExhaustedError(
                    f"the artifact is larger than the limit of {limit} bytes",
                    reason="ARTIFACT_TOO_LARGE",
                    metadata={"max_artifact_bytes": limit},
                )
            await staged.write(message)

    async def _drain(self, messages: AsyncIterator[VersionUpload | bytes], received: int) -> None:
        """Reads what the caller still sends of an upload refused for what it said, not for
        its size, up to the size limit, before the refusal is answered: grpcio's asyncio
        client, refused while it is still writing a large message, reports INTERNAL ("Internal
        error from Core") instead of the refusal (grpc/grpc#36066). An upload past the limit
        is answered at once instead (`_receive`)."""
        async for message in messages:
            received += len(message) if isinstance(message, bytes) else 0
            if received > self._max_artifact_bytes:
                return

    async def _record(
        self,
        checked: _CheckedUpload,
        upload: VersionUpload,
        staged: StagedArtifact,
        digest: str,
        actor: Actor,
    ) -> ModelVersion:
        try:
            async with self._record_lock:
                stored = await staged.commit()
                try:
                    return await self._store.create_model_version(
                        model_id=checked.model_id,
                        description=upload.description,
                        format=checked.format,
                        signature=upload.signature,
                        artifact_uri=stored.uri,
                        sha256=digest,
                        size_bytes=staged.size,
                        change=self._change(actor, "CreateModelVersion"),
                        extras=checked.extras,
                        tags=checked.tags,
                        parent=checked.parent,
                    )
                except BaseException:
                    if stored.created:
                        await self._artifacts.remove(stored.uri)
                    raise
        finally:
            staged.discard()

    async def get_model_version(self, name: str) -> ModelVersion:
        """The version `models/{model}/versions/{version}`."""
        model_id, number = parse_version_name(name, "name")
        version = await self._store.get_model_version(model_id, number)
        if version is None:
            raise _version_not_found(name)
        return version

    async def list_model_versions(
        self, parent: str, page_size: int, page_token: str
    ) -> VersionPage:
        """One page of a model's versions, newest first; `page_size` 0 means the default."""
        model_id = parse_model_name(parent, "parent")
        if page_size < 0:
            raise InvalidArgumentError.for_field("page_size", "must not be negative")
        limit = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        before = _decode_page_token(page_token, model_id) if page_token else None
        if await self._store.get_model(model_id) is None:
            raise _model_not_found(model_id)
        rows = await self._store.list_model_versions(model_id, before=before, limit=limit + 1)
        if len(rows) <= limit:
            return VersionPage(versions=rows)
        page = rows[:limit]
        return VersionPage(
            versions=page, next_page_token=_encode_page_token(model_id, page[-1].version)
        )

    async def read_artifact(self, name: str) -> AsyncIterator[bytes]:
        """The version's artifact in chunks; fails at the end if the stored bytes changed."""
        version = await self.get_model_version(name)
        digest = hashlib.sha256()
        size = 0
        async for chunk in self._artifacts.open_chunks(
            version.artifact_uri, self._read_chunk_bytes
        ):
            digest.update(chunk)
            size += len(chunk)
            yield chunk
        if size != version.size_bytes or digest.hexdigest() != version.sha256:
            log.error(
                "artifact_corrupt",
                model_version=name,
                artifact_uri=version.artifact_uri,
                expected_sha256=version.sha256,
                actual_sha256=digest.hexdigest(),
            )
            raise FailedPreconditionError(
                f"the stored artifact of {name} no longer matches its sha256",
                reason="ARTIFACT_CORRUPT",
                metadata={"name": name, "expected": version.sha256, "actual": digest.hexdigest()},
            )

    async def get_deployment(self, name: str) -> Deployment:
        """The deployment `deployments/{deployment}`."""
        deployment_id = parse_deployment_name(name, "name")
        deployment = await self._store.get_deployment(deployment_id)
        if deployment is None:
            raise NotFoundError(
                f"deployment {name} does not exist",
                reason="DEPLOYMENT_NOT_FOUND",
                metadata={"name": name},
            )
        return deployment

    async def update_deployment(
        self,
        name: str,
        traffic: Sequence[TrafficShare],
        update_mask: Sequence[str],
        *,
        allow_missing: bool,
        actor: Actor,
        routing_key: str = "",
        salt: str = "",
        shadow: Sequence[str] = (),
        fallback_version: str = "",
        default_outputs: Sequence[DefaultOutput] = (),
        inference: pb.InferenceConfig | None = None,
        hybrid: pb.HybridLookup | None = None,
        strategy: pb.RolloutStrategy | None = None,
        expected_revision: int | None = None,
    ) -> Deployment:
        """Sets a deployment's traffic and routing policy; creates it only with `allow_missing`.

        The targets' percents are each 0-100 and add up to 100, name one version each, and
        every version must exist. `routing_key` is `user` or an entity type, `salt` at most
        128 characters, and each shadow version exists, once, and is no traffic target. The
        fallback version exists and is no shadow; default outputs are named once each and
        hold as many values as their shape says.
        `update_mask` names the fields written; the others keep their value. When it is
        empty, `traffic` and whichever policy fields are set are written; `*` writes all.
        With `expected_revision`, the deployment must still be at that revision (0: must not
        exist yet), else AbortedError.
        """
        violations: list[FieldViolation] = []
        if expected_revision is not None and expected_revision < 0:
            violations.append(FieldViolation("expected_revision", "must not be negative"))
        deployment_id = ""
        try:
            deployment_id = parse_deployment_name(name, "deployment.name")
        except InvalidArgumentError as exc:
            violations.extend(exc.violations)
        for path in update_mask:
            if path in _DEPLOYMENT_OUTPUT_ONLY_FIELDS:
                violations.append(FieldViolation("update_mask", f"{path!r} cannot be written"))
            elif path != "*" and path not in DEPLOYMENT_WRITABLE_FIELDS:
                violations.append(
                    FieldViolation("update_mask", f"{path!r} is not a Deployment field")
                )
        if "*" in update_mask:
            written = set(DEPLOYMENT_WRITABLE_FIELDS)
        elif update_mask:
            written = set(update_mask) & DEPLOYMENT_WRITABLE_FIELDS
        else:
            given = {
                "routing_key": bool(routing_key),
                "salt": bool(salt),
                "shadow": bool(shadow),
                "fallback_version": bool(fallback_version),
                "default_outputs": bool(default_outputs),
                "inference": inference is not None and inference != pb.InferenceConfig(),
                "hybrid": hybrid is not None and hybrid != pb.HybridLookup(),
                "strategy": strategy is not None and strategy != pb.RolloutStrategy(),
            }
            written = {"traffic", *(f for f, present in given.items() if present)}
        current: Deployment | None = None
        if written != DEPLOYMENT_WRITABLE_FIELDS and deployment_id:
            current = await self._store.get_deployment(deployment_id)
        targets: list[TrafficTarget] = []
        if "traffic" in written:
            targets = self._check_traffic(traffic, violations)
        elif current is not None:
            targets = list(current.traffic)
        elif deployment_id:
            violations.append(
                FieldViolation("deployment.traffic", "required to create the deployment")
            )
        kept = current.policy if current is not None else RoutingPolicy()
        if "routing_key" in written:
            if routing_key and not _ROUTING_KEY.fullmatch(routing_key):
                violations.append(
                    FieldViolation(
                        "deployment.routing_key",
                        "must be `user` or an entity type: 1-63 of [a-z0-9_-], starting with a"
                        " letter",
                    )
                )
        else:
            routing_key = kept.routing_key
        if "salt" in written:
            if len(salt) > MAX_SALT_CHARS:
                violations.append(
                    FieldViolation("deployment.salt", f"at most {MAX_SALT_CHARS} characters")
                )
        else:
            salt = kept.salt
        shadow_refs = (
            self._check_shadow(shadow, targets, violations)
            if "shadow" in written
            else list(kept.shadow)
        )
        fallback = kept.fallback
        if "fallback_version" in written:
            fallback = None
            if fallback_version:
                try:
                    fallback = VersionRef(
                        *parse_version_name(fallback_version, "deployment.fallback_version")
                    )
                except InvalidArgumentError as exc:
                    violations.extend(exc.violations)
        if fallback is not None and fallback in shadow_refs:
            violations.append(
                FieldViolation("deployment.fallback_version", "is a shadow; a fallback must not be")
            )
        outputs = (
            self._check_default_outputs(default_outputs, violations)
            if "default_outputs" in written
            else list(kept.default_outputs)
        )
        inference_bytes = (
            check_inference(inference or pb.InferenceConfig(), violations)
            if "inference" in written
            else kept.inference
        )
        hybrid_bytes = (
            check_hybrid(hybrid or pb.HybridLookup(), violations)
            if "hybrid" in written
            else kept.hybrid
        )
        strategy_bytes = (
            check_strategy("deployment.strategy", strategy or pb.RolloutStrategy(), violations)
            if "strategy" in written
            else kept.strategy
        )
        if violations:
            raise _invalid(violations)
        policy = RoutingPolicy(
            routing_key=routing_key,
            salt=salt,
            shadow=tuple(shadow_refs),
            fallback=fallback,
            default_outputs=tuple(outputs),
            inference=inference_bytes,
            hybrid=hybrid_bytes,
            strategy=strategy_bytes,
        )
        await self._check_shared_inference(deployment_id, targets, policy)
        if expected_revision is None and current is not None:
            # A change merged into the current revision must land on that revision.
            expected_revision = current.revision
        deployment, changed = await self._store.put_deployment(
            deployment_id,
            targets,
            allow_missing=allow_missing,
            change=self._change(actor, "UpdateDeployment"),
            policy=policy,
            expected_revision=expected_revision,
            production_only=self._production_only,
        )
        if changed:
            await self._changes.send()
            log.info(
                "deployment_updated",
                deployment=deployment.name,
                revision=deployment.revision,
                traffic={t.model_version: t.percent for t in deployment.traffic},
                routing_key=deployment.policy.routing_key,
                shadow=[v.model_version for v in deployment.policy.shadow],
            )
        return deployment

    async def _check_shared_inference(
        self, deployment_id: str, targets: Sequence[TrafficTarget], policy: RoutingPolicy
    ) -> None:
        """Deployments that serve versions of one model must agree on its Triton settings:
        Triton holds one config per model, shared by all its versions."""
        mine = _referenced_models(targets, policy)
        others, _ = await self._store.current_revisions(None)
        for other in others:
            deployment = other.deployment
            if deployment.deployment_id == deployment_id:
                continue
            shared = mine & _referenced_models(deployment.traffic, deployment.policy)
            if shared and deployment.policy.inference != policy.inference:
                model = f"models/{sorted(shared)[0]}"
                raise FailedPreconditionError(
                    f"{deployment.name} also serves {model} with other inference settings;"
                    " deployments that serve one model must agree on `inference` (Triton"
                    " holds one config per model)",
                    reason="INFERENCE_CONFIG_CONFLICT",
                    metadata={"deployment": deployment.name, "model": model},
                )

    @staticmethod
    def _check_traffic(
        traffic: Sequence[TrafficShare], violations: list[FieldViolation]
    ) -> list[TrafficTarget]:
        targets: list[TrafficTarget] = []
        first_index: dict[tuple[str, int], int] = {}
        for i, share in enumerate(traffic):
            field = f"deployment.traffic[{i}]"
            if not 0 <= share.percent <= 100:
                violations.append(FieldViolation(f"{field}.percent", "must be 0-100"))
            try:
                model_id, number = parse_version_name(share.model_version, f"{field}.model_version")
            except InvalidArgumentError as exc:
                violations.extend(exc.violations)
                continue
            if (model_id, number) in first_index:
                violations.append(
                    FieldViolation(
                        f"{field}.model_version",
                        f"{share.model_version} is already the target of "
                        f"deployment.traffic[{first_index[model_id, number]}]",
                    )
                )
            first_index.setdefault((model_id, number), i)
            targets.append(TrafficTarget(model_id, number, share.percent))
        total = sum(share.percent for share in traffic)
        if total != 100:
            violations.append(
                FieldViolation("deployment.traffic", f"the percents add up to {total}, not 100")
            )
        return targets

    @staticmethod
    def _check_default_outputs(
        outputs: Sequence[DefaultOutput], violations: list[FieldViolation]
    ) -> list[bytes]:
        if len(outputs) > MAX_DEFAULT_OUTPUTS:
            violations.append(
                FieldViolation("deployment.default_outputs", f"at most {MAX_DEFAULT_OUTPUTS}")
            )
        names: set[str] = set()
        for i, output in enumerate(outputs):
            field = f"deployment.default_outputs[{i}]"
            if not output.name:
                violations.append(FieldViolation(f"{field}.name", "must be set"))
            elif output.name in names:
                violations.append(FieldViolation(f"{field}.name", f"{output.name!r} is repeated"))
            names.add(output.name)
            if not output.has_datatype:
                violations.append(FieldViolation(f"{field}.datatype", "must be set"))
            size = 1
            for dim in output.shape:
                size *= dim
            if any(d < 1 for d in output.shape) or size != output.value_count:
                violations.append(
                    FieldViolation(
                        f"{field}.shape",
                        f"must be positive dimensions holding its {output.value_count} values",
                    )
                )
            elif size > MAX_DEFAULT_OUTPUT_VALUES:
                violations.append(
                    FieldViolation(f"{field}.contents", f"at most {MAX_DEFAULT_OUTPUT_VALUES}")
                )
        return [o.tensor for o in outputs]

    @staticmethod
    def _check_shadow(
        shadow: Sequence[str], targets: Sequence[TrafficTarget], violations: list[FieldViolation]
    ) -> list[VersionRef]:
        if len(shadow) > MAX_SHADOW_VERSIONS:
            violations.append(
                FieldViolation("deployment.shadow", f"at most {MAX_SHADOW_VERSIONS} versions")
            )
        primary = {(t.model_id, t.version) for t in targets}
        refs: list[VersionRef] = []
        for i, name in enumerate(shadow):
            field = f"deployment.shadow[{i}]"
            try:
                model_id, number = parse_version_name(name, field)
            except InvalidArgumentError as exc:
                violations.extend(exc.violations)
                continue
            ref = VersionRef(model_id, number)
            if ref in refs:
                violations.append(FieldViolation(field, f"{name} is listed twice"))
            elif (model_id, number) in primary:
                violations.append(
                    FieldViolation(field, f"{name} is a traffic target; a shadow must not be")
                )
            else:
                refs.append(ref)
        return refs

    async def rollback_deployment(
        self, name: str, revision: int, actor: Actor, *, expected_revision: int | None = None
    ) -> Deployment:
        """Restores the traffic of `revision` (the one before the current when 0) as a new
        revision. Restoring the traffic the deployment already has changes nothing. With
        `expected_revision`, the deployment must still be at that revision, else AbortedError.
        """
        deployment_id = parse_deployment_name(name, "name")
        if revision < 0:
            raise InvalidArgumentError.for_field("revision", "must not be negative")
        if expected_revision is not None and expected_revision < 1:
            raise InvalidArgumentError.for_field(
                "expected_revision", "must be a revision (1 or more) when set"
            )
        current = await self.get_deployment(name)
        if expected_revision is not None and current.revision != expected_revision:
            raise concurrent_change(name, current.revision, expected_revision)
        wanted = revision or current.revision - 1
        if wanted < 1:
            raise FailedPreconditionError(
                f"{name} is at its first revision; there is none before it to roll back to",
                reason="NO_PREVIOUS_REVISION",
                metadata={"name": name, "revision": str(current.revision)},
            )
        target = await self._store.get_deployment_revision(deployment_id, wanted)
        if target is None:
            raise NotFoundError(
                f"{name} has no revision {wanted}",
                reason="DEPLOYMENT_REVISION_NOT_FOUND",
                metadata={"name": name, "revision": str(wanted)},
            )
        deployment, changed = await self._store.put_deployment(
            deployment_id,
            target.deployment.traffic,
            allow_missing=False,
            change=self._change(actor, "RollbackDeployment"),
            restored_revision=wanted,
            policy=target.deployment.policy,
            expected_revision=expected_revision,
        )
        if changed:
            await self._changes.send()
            log.info(
                "deployment_rolled_back",
                deployment=deployment.name,
                revision=deployment.revision,
                restored_revision=wanted,
            )
        return deployment

    async def list_deployment_revisions(
        self, name: str, page_size: int, page_token: str
    ) -> Page[DeploymentRevision]:
        """One page of a deployment's revisions, newest first."""
        deployment_id = parse_deployment_name(name, "name")
        limit = _page_limit(page_size)
        before = _token_number(page_token, "revisions", deployment_id)
        await self.get_deployment(name)
        rows = await self._store.list_deployment_revisions(
            deployment_id, before=before, limit=limit + 1
        )
        if len(rows) <= limit:
            return Page(rows)
        last = str(rows[limit - 1].deployment.revision)
        return Page(rows[:limit], _encode_token("revisions", deployment_id, last))

    async def end_watches(self) -> None:
        """Ends every WatchDeployments stream, so a stopping server need not wait out its
        grace period on streams that never finish; watchers resume elsewhere by sequence."""
        await self._changes.close()

    async def watch_deployments(
        self, name: str, after_sequence: int
    ) -> AsyncIterator[DeploymentRevision]:
        """The current revision of each watched deployment (when `after_sequence` is 0) or
        every revision after `after_sequence`, then each new revision as it is committed.

        Ends only when `end_watches` is called (shutdown). Nothing is skipped: the signal count is read before the
        store, so a revision committed between the read and the wait wakes the watcher.
        """
        deployment_id = parse_deployment_name(name, "name") if name else None
        if after_sequence < 0:
            raise InvalidArgumentError.for_field("after_sequence", "must not be negative")
        last = after_sequence
        if after_sequence == 0:
            current, last = await self._store.current_revisions(deployment_id)
            for revision in current:
                yield revision
        while True:
            seen = self._changes.count
            batch = await self._store.revisions_after(last, deployment_id, limit=WATCH_BATCH)
            for revision in batch:
                last = revision.sequence
                yield revision
            if len(batch) < WATCH_BATCH:
                await self._changes.wait_past(seen)
                if self._changes.closed:
                    return

    async def list_audit_events(
        self, resource: str, page_size: int, page_token: str
    ) -> Page[AuditEvent]:
        """One page of the audit trail on `resource` and below it (all when empty), newest first."""
        limit = _page_limit(page_size)
        before = _token_number(page_token, "audit", resource)
        rows = await self._store.list_audit_events(resource or None, before=before, limit=limit + 1)
        if len(rows) <= limit:
            return Page(rows)
        return Page(rows[:limit], _encode_token("audit", resource, str(rows[limit - 1].event_id)))

    async def transition_stage(self, name: str, stage: Stage | None, actor: Actor) -> ModelVersion:
        """Moves a version to `stage`: the next stage along, or ARCHIVED from any.

        Entering PRODUCTION needs an approval by a principal other than the caller.
        """
        model_id, number = parse_version_name(name, "name")
        if stage is None:
            raise InvalidArgumentError.for_field(
                "stage", "must be STAGING, PRODUCTION, ARCHIVED or DEVELOPMENT"
            )
        version = await self.get_model_version(name)
        if stage not in STAGE_TRANSITIONS[version.stage]:
            allowed = sorted(s.name for s in STAGE_TRANSITIONS[version.stage])
            raise FailedPreconditionError(
                f"{name} is in {version.stage.name} and cannot move to {stage.name}"
                f" (allowed: {', '.join(allowed) or 'none'})",
                reason="INVALID_STAGE_TRANSITION",
                metadata={"name": name, "stage": version.stage.name, "requested": stage.name},
            )
        if stage is Stage.ARCHIVED:
            await self._check_not_serving(version)
        if stage is Stage.PRODUCTION:
            self._check_production_approval(version, actor)
            if self._require_validation:
                _check_validation_passed(version)
        moved = await self._store.set_stage(
            model_id,
            number,
            expected=version.stage,
            stage=stage,
            change=self._change(actor, "TransitionModelVersionStage"),
        )
        log.info("model_version_stage_changed", model_version=name, stage=stage.name)
        return moved

    async def _check_not_serving(self, version: ModelVersion) -> None:
        """A version with a share of some deployment's traffic cannot be archived."""
        current, _ = await self._store.current_revisions(None)
        for revision in current:
            deployment = revision.deployment
            for target in deployment.traffic:
                if target.model_version == version.name and target.percent > 0:
                    raise FailedPreconditionError(
                        f"{version.name} takes {target.percent}% of {deployment.name}'s traffic;"
                        " move the traffic away before archiving it",
                        reason="VERSION_SERVING",
                        metadata={"name": version.name, "deployment": deployment.name},
                    )

    @staticmethod
    def _check_production_approval(version: ModelVersion, actor: Actor) -> None:
        if any(a.principal != actor.principal for a in version.approvals):
            return
        own = any(a.principal == actor.principal for a in version.approvals)
        why = (
            "the only approval is the requester's own, and a requester cannot approve itself"
            if own
            else "it has no approval"
        )
        raise FailedPreconditionError(
            f"{version.name} cannot enter PRODUCTION: {why}; it needs an approval by a "
            f"principal with the approver role other than the requester {actor.principal!r}",
            reason="APPROVAL_REQUIRED",
            metadata={
                "name": version.name,
                "unmet_condition": "approval by an approver other than the requester",
                "requester": actor.principal,
            },
        )

    async def approve_model_version(self, name: str, actor: Actor) -> ModelVersion:
        """Records the caller's approval of a STAGING version for PRODUCTION."""
        model_id, number = parse_version_name(name, "name")
        version = await self.get_model_version(name)
        if version.stage is not Stage.STAGING:
            raise FailedPreconditionError(
                f"{name} is in {version.stage.name}; only a STAGING version can be approved",
                reason="NOT_IN_STAGING",
                metadata={"name": name, "stage": version.stage.name},
            )
        approved = await self._store.add_approval(
            model_id, number, self._change(actor, "ApproveModelVersion")
        )
        log.info("model_version_approved", model_version=name, principal=actor.principal)
        return approved

    async def set_alias(self, name: str, alias: str, actor: Actor) -> ModelVersion:
        """Points the model's `alias` at the version `name`."""
        violations: list[FieldViolation] = []
        model_id, number = "", 0
        try:
            model_id, number = parse_version_name(name, "name")
        except InvalidArgumentError as exc:
            violations.extend(exc.violations)
        if not _MODEL_ID.fullmatch(alias):
            violations.append(
                FieldViolation("alias", "1-63 of [a-z0-9-], starting with a lowercase letter")
            )
        if violations:
            raise _invalid(violations)
        await self._store.set_alias(
            model_id, alias, number, self._change(actor, "SetModelVersionAlias")
        )
        log.info("model_version_alias_set", model_version=name, alias=alias)
        return await self.get_model_version(name)
