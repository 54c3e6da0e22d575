"""The registry's domain: validated models, versions with their artifacts, and deployments."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import re
from collections.abc import AsyncIterable, AsyncIterator, Callable, Sequence
from datetime import UTC, datetime

import structlog

from modelserve_registry.artifacts import ArtifactStore, StagedArtifact
from modelserve_registry.onnx_artifact import check_onnx_artifact
from modelserve_registry.resources import (
    ArtifactFormat,
    Deployment,
    Model,
    ModelVersion,
    TensorSpec,
    TrafficShare,
    TrafficTarget,
    VersionPage,
    VersionUpload,
)
from modelserve_registry.store import RegistryStore
from modelserve_runtime.errors import (
    FailedPreconditionError,
    FieldViolation,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
)

log = structlog.get_logger()

_ID = "[a-z][a-z0-9-]{0,62}"
_MODEL_ID = re.compile(_ID)
_MODEL_NAME = re.compile(f"models/({_ID})")
_VERSION_NAME = re.compile(f"models/({_ID})/versions/([1-9][0-9]{{0,17}})")
_DEPLOYMENT_NAME = re.compile(f"deployments/({_ID})")
_SHA256 = re.compile("[0-9a-f]{64}")
_FEATURE_REF = re.compile("[^:]+:[^:]+")
_PAGE_TOKEN_PREFIX = "v1"

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
#: Writable fields of a Deployment, as update_mask paths; `*` names them all.
DEPLOYMENT_WRITABLE_FIELDS = frozenset({"traffic"})
_DEPLOYMENT_OUTPUT_ONLY_FIELDS = frozenset({"name", "revision", "update_time"})


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


def _check_upload(upload: VersionUpload) -> tuple[str, ArtifactFormat]:
    """The model id and format of an upload; InvalidArgumentError naming every bad field."""
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
    if violations or upload.format is None:
        raise _invalid(violations)
    return model_id, upload.format


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
    ) -> None:
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

    async def create_model(self, model_id: str, description: str) -> Model:
        """Registers a model; ALREADY_EXISTS when the id is taken."""
        if not _MODEL_ID.fullmatch(model_id):
            raise InvalidArgumentError.for_field(
                "model_id", "1-63 of [a-z0-9-], starting with a lowercase letter"
            )
        model = Model(model_id=model_id, description=description, create_time=self._clock())
        await self._store.create_model(model)
        log.info("model_created", model=model.name)
        return model

    async def create_model_version(
        self, messages: AsyncIterable[VersionUpload | bytes]
    ) -> ModelVersion:
        """Records a new version from an upload: the metadata first, then the artifact's bytes.

        Nothing is recorded unless everything checks out: the bytes' sha256 equals the
        declared one, they stay within the size limit, they are a valid ONNX model, and its
        graph matches the signature. Only then is the artifact moved to its content address
        and the version row written.
        """
        iterator = aiter(messages)
        upload = await anext(iterator, None)
        if not isinstance(upload, VersionUpload):
            raise InvalidArgumentError.for_field(
                "upload", "the first message must carry the upload metadata"
            )
        model_id, artifact_format = _check_upload(upload)
        if await self._store.get_model(model_id) is None:
            raise _model_not_found(model_id)
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
        task = asyncio.create_task(self._record(model_id, artifact_format, upload, staged, digest))
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

    async def _record(
        self,
        model_id: str,
        artifact_format: ArtifactFormat,
        upload: VersionUpload,
        staged: StagedArtifact,
        digest: str,
    ) -> ModelVersion:
        try:
            async with self._record_lock:
                stored = await staged.commit()
                try:
                    return await self._store.create_model_version(
                        model_id=model_id,
                        description=upload.description,
                        format=artifact_format,
                        signature=upload.signature,
                        artifact_uri=stored.uri,
                        sha256=digest,
                        size_bytes=staged.size,
                        create_time=self._clock(),
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
    ) -> Deployment:
        """Sets a deployment's traffic; creates it only with `allow_missing`.

        The targets' percents are each 0-100 and add up to 100, name one version each, and
        every version must exist. An empty `update_mask` means every writable field.
        """
        violations: list[FieldViolation] = []
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
        if violations:
            raise _invalid(violations)
        deployment, changed = await self._store.put_deployment(
            deployment_id, targets, allow_missing=allow_missing, update_time=self._clock()
        )
        if changed:
            log.info(
                "deployment_updated",
                deployment=deployment.name,
                revision=deployment.revision,
                traffic={t.model_version: t.percent for t in deployment.traffic},
            )
        return deployment
