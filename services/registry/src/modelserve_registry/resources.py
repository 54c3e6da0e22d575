"""The registry's resources as plain values: models, versions, signatures, deployments."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime
from typing import Generic, TypeVar

T = TypeVar("T")


class ArtifactFormat(enum.Enum):
    """The file format of a version's artifact."""

    ONNX = "onnx"


class Stage(enum.Enum):
    """Where a version is in its lifecycle."""

    DEVELOPMENT = "development"
    STAGING = "staging"
    PRODUCTION = "production"
    ARCHIVED = "archived"


class DataType(enum.Enum):
    """The element type of a tensor, named as in the Open Inference Protocol."""

    BOOL = "BOOL"
    INT32 = "INT32"
    INT64 = "INT64"
    FP32 = "FP32"
    FP64 = "FP64"
    BYTES = "BYTES"


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One declared input or output; `datatype` is None when the caller left it unset."""

    name: str
    datatype: DataType | None
    shape: tuple[int, ...]
    allow_non_finite: bool = False
    """Float inputs only: NaN and infinity are valid values (a model that reads NaN as a
    missing value)."""


@dataclass(frozen=True, slots=True)
class Signature:
    """A version's inputs and outputs, and the features that fill the first input."""

    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    feature_refs: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Model:
    """A named family of versions."""

    model_id: str
    description: str
    create_time: datetime
    labels: tuple[tuple[str, str], ...] = ()
    """Sorted by key."""
    validation_set: bytes = b""
    """A serialized `ValidationSet` message; empty when the model has none."""

    @property
    def name(self) -> str:
        """`models/{model}`."""
        return f"models/{self.model_id}"


@dataclass(frozen=True, slots=True)
class Approval:
    """One approver's consent to a version entering PRODUCTION."""

    principal: str
    reason: str
    create_time: datetime


@dataclass(frozen=True, slots=True)
class ModelVersion:
    """One immutable, uploaded artifact of a model."""

    model_id: str
    version: int
    description: str
    format: ArtifactFormat
    signature: Signature
    artifact_uri: str
    sha256: str
    size_bytes: int
    create_time: datetime
    stage: Stage = Stage.DEVELOPMENT
    aliases: tuple[str, ...] = ()
    approvals: tuple[Approval, ...] = ()
    extras: bytes = b""
    """The immutable metadata given at upload (sample inputs, metrics, lineage), as a
    serialized `ModelVersion` message holding only those fields."""
    tags: tuple[tuple[str, str], ...] = ()
    """Sorted by key."""
    validation: bytes = b""
    """The latest validation run, a serialized `ValidationRun`; empty when never validated."""

    @property
    def name(self) -> str:
        """`models/{model}/versions/{version}`."""
        return f"models/{self.model_id}/versions/{self.version}"


@dataclass(frozen=True, slots=True)
class VersionUpload:
    """The metadata that opens an upload; `format` is None when the caller left it unset."""

    parent: str
    description: str
    format: ArtifactFormat | None
    signature: Signature
    sha256: str
    reason: str = ""
    extras: bytes = b""
    """Sample inputs, metrics, lineage and tags as sent: a serialized `ModelVersion` message
    holding only those fields, not yet checked."""


@dataclass(frozen=True, slots=True)
class VersionPage:
    """One page of a model's versions, newest first."""

    versions: list[ModelVersion]
    next_page_token: str = ""


@dataclass(frozen=True, slots=True)
class TrafficTarget:
    """A share (0-100) of an endpoint's traffic sent to one version."""

    model_id: str
    version: int
    percent: int

    @property
    def model_version(self) -> str:
        """The version's name, `models/{model}/versions/{version}`."""
        return f"models/{self.model_id}/versions/{self.version}"


@dataclass(frozen=True, slots=True)
class VersionRef:
    """One model version, by model id and number."""

    model_id: str
    version: int

    @property
    def model_version(self) -> str:
        """The version's name, `models/{model}/versions/{version}`."""
        return f"models/{self.model_id}/versions/{self.version}"


@dataclass(frozen=True, slots=True)
class DefaultOutput:
    """A declared output a deployment answers with when its versions fail: the serialized
    `modelserve.type.v1.Tensor`, with what validation needs to know of it."""

    name: str
    has_datatype: bool
    shape: tuple[int, ...]
    value_count: int
    tensor: bytes


@dataclass(frozen=True, slots=True)
class RoutingPolicy:
    """How the router spreads an endpoint's traffic besides the weights: what sticky
    assignment hashes (`user`, an entity type, or nothing), its salt, shadow versions, and
    the fallback chain (a fallback version, then declared default outputs)."""

    routing_key: str = ""
    salt: str = ""
    shadow: tuple[VersionRef, ...] = ()
    fallback: VersionRef | None = None
    default_outputs: tuple[bytes, ...] = ()
    """Serialized `modelserve.type.v1.Tensor` messages."""
    inference: bytes = b""
    """A serialized `InferenceConfig`; empty: inference's defaults."""
    hybrid: bytes = b""
    """A serialized `HybridLookup`; empty: off."""
    strategy: bytes = b""
    """A serialized `RolloutStrategy`; empty: none declared."""


@dataclass(frozen=True, slots=True)
class Deployment:
    """The desired traffic state of one endpoint."""

    deployment_id: str
    traffic: tuple[TrafficTarget, ...]
    revision: int
    update_time: datetime
    policy: RoutingPolicy = RoutingPolicy()

    @property
    def name(self) -> str:
        """`deployments/{deployment}`."""
        return f"deployments/{self.deployment_id}"


@dataclass(frozen=True, slots=True)
class TrafficShare:
    """A share of traffic as a caller asks for it: a version's name, not yet checked."""

    model_version: str
    percent: int


@dataclass(frozen=True, slots=True)
class Actor:
    """Who asks for a change and why: the authenticated principal and the caller's reason."""

    principal: str
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Change:
    """Who makes a change, why, when, and as which action; every change is audited."""

    principal: str
    reason: str
    action: str
    time: datetime


@dataclass(frozen=True, slots=True)
class DeploymentRevision:
    """One immutable state of a deployment and how it came to be."""

    deployment: Deployment
    sequence: int
    principal: str
    reason: str
    restored_revision: int = 0


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One recorded change: who, when, what, on which resource, and why."""

    event_id: int
    create_time: datetime
    principal: str
    action: str
    resource: str
    reason: str
    details: dict[str, str]

    @property
    def name(self) -> str:
        """`auditEvents/{event}`."""
        return f"auditEvents/{self.event_id}"


class RolloutState(enum.Enum):
    """Where a rollout is."""

    RUNNING = "running"
    PAUSED = "paused"
    SUCCEEDED = "succeeded"
    ABORTED = "aborted"

    @property
    def active(self) -> bool:
        """Running or paused: the deployment's traffic belongs to the rollout."""
        return self in (RolloutState.RUNNING, RolloutState.PAUSED)


@dataclass(frozen=True, slots=True)
class Rollout:
    """A move of a deployment's traffic from its stable version to a candidate."""

    deployment_id: str
    rollout_id: int
    stable: VersionRef
    candidate: VersionRef
    strategy: bytes
    """The serialized `RolloutStrategy` as it was at the start."""
    state: RolloutState
    step: int
    candidate_percent: int
    step_start_time: datetime
    create_time: datetime
    update_time: datetime
    last_gate: bytes = b""
    """The latest serialized `GateResult`; empty before the first reading."""
    reason: str = ""
    waiting_since: datetime | None = None
    """Since when the current step's gate has been INCONCLUSIVE; None otherwise."""

    @property
    def name(self) -> str:
        """`deployments/{deployment}/rollouts/{rollout}`."""
        return f"deployments/{self.deployment_id}/rollouts/{self.rollout_id}"


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    """One page of a listing and the token for the next one (empty on the last page)."""

    items: list[T]
    next_page_token: str = ""
