"""Conversions between the registry's resources and their protobuf messages."""

from __future__ import annotations

from datetime import datetime

from google.protobuf import timestamp_pb2

from modelserve.registry.v1 import registry_service_pb2 as pb
from modelserve.type.v1 import tensor_pb2
from modelserve_registry.resources import (
    ArtifactFormat,
    AuditEvent,
    DataType,
    DefaultOutput,
    Deployment,
    DeploymentRevision,
    Model,
    ModelVersion,
    Signature,
    Stage,
    TensorSpec,
)

_DATATYPES: dict[tensor_pb2.DataType.ValueType, DataType] = {
    tensor_pb2.DATA_TYPE_BOOL: DataType.BOOL,
    tensor_pb2.DATA_TYPE_INT32: DataType.INT32,
    tensor_pb2.DATA_TYPE_INT64: DataType.INT64,
    tensor_pb2.DATA_TYPE_FP32: DataType.FP32,
    tensor_pb2.DATA_TYPE_FP64: DataType.FP64,
    tensor_pb2.DATA_TYPE_BYTES: DataType.BYTES,
}
_DATATYPE_VALUES = {datatype: value for value, datatype in _DATATYPES.items()}
_FORMATS: dict[pb.ArtifactFormat.ValueType, ArtifactFormat] = {
    pb.ARTIFACT_FORMAT_ONNX: ArtifactFormat.ONNX
}
_FORMAT_VALUES = {fmt: value for value, fmt in _FORMATS.items()}
_STAGES: dict[pb.Stage.ValueType, Stage] = {
    pb.STAGE_DEVELOPMENT: Stage.DEVELOPMENT,
    pb.STAGE_STAGING: Stage.STAGING,
    pb.STAGE_PRODUCTION: Stage.PRODUCTION,
    pb.STAGE_ARCHIVED: Stage.ARCHIVED,
}
_STAGE_VALUES = {stage: value for value, stage in _STAGES.items()}


def timestamp(moment: datetime) -> timestamp_pb2.Timestamp:
    """A timezone-aware datetime as a Timestamp."""
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def format_from_proto(value: pb.ArtifactFormat.ValueType) -> ArtifactFormat | None:
    """The artifact format, or None for UNSPECIFIED and values this build does not know."""
    return _FORMATS.get(value)


def signature_from_proto(message: pb.Signature) -> Signature:
    """A Signature message as a value; unset or unknown data types become None."""

    def spec(tensor: tensor_pb2.TensorSpec) -> TensorSpec:
        return TensorSpec(
            tensor.name,
            _DATATYPES.get(tensor.datatype),
            tuple(tensor.shape),
            allow_non_finite=tensor.allow_non_finite,
        )

    return Signature(
        inputs=tuple(spec(t) for t in message.inputs),
        outputs=tuple(spec(t) for t in message.outputs),
        feature_refs=tuple(message.feature_refs),
    )


def signature_to_proto(signature: Signature) -> pb.Signature:
    """A Signature value as its message; a stored signature always has its data types set."""

    def spec(tensor: TensorSpec) -> tensor_pb2.TensorSpec:
        datatype = (
            tensor_pb2.DATA_TYPE_UNSPECIFIED
            if tensor.datatype is None
            else _DATATYPE_VALUES[tensor.datatype]
        )
        return tensor_pb2.TensorSpec(
            name=tensor.name,
            datatype=datatype,
            shape=tensor.shape,
            allow_non_finite=tensor.allow_non_finite,
        )

    return pb.Signature(
        inputs=[spec(t) for t in signature.inputs],
        outputs=[spec(t) for t in signature.outputs],
        feature_refs=signature.feature_refs,
    )


def signature_from_bytes(data: bytes) -> Signature:
    """A signature stored as a serialized Signature message."""
    return signature_from_proto(pb.Signature.FromString(data))


def signature_to_bytes(signature: Signature) -> bytes:
    """A signature as a serialized Signature message, the form it is stored in."""
    return signature_to_proto(signature).SerializeToString(deterministic=True)


def model_to_proto(model: Model) -> pb.Model:
    """A Model value as its message."""
    message = pb.Model(
        name=model.name,
        description=model.description,
        create_time=timestamp(model.create_time),
        labels=dict(model.labels),
    )
    if model.validation_set:
        message.validation_set.ParseFromString(model.validation_set)
    return message


def model_version_to_proto(version: ModelVersion) -> pb.ModelVersion:
    """A ModelVersion value as its message."""
    message = pb.ModelVersion.FromString(version.extras) if version.extras else pb.ModelVersion()
    if version.validation:
        message.validation.ParseFromString(version.validation)
    message.tags.update(dict(version.tags))
    message.MergeFrom(_version_core(version))
    return message


def _version_core(version: ModelVersion) -> pb.ModelVersion:
    return pb.ModelVersion(
        name=version.name,
        description=version.description,
        format=_FORMAT_VALUES[version.format],
        signature=signature_to_proto(version.signature),
        artifact_uri=version.artifact_uri,
        sha256=version.sha256,
        size_bytes=version.size_bytes,
        create_time=timestamp(version.create_time),
        stage=_STAGE_VALUES[version.stage],
        aliases=version.aliases,
        approvals=[
            pb.Approval(
                principal=a.principal, reason=a.reason, create_time=timestamp(a.create_time)
            )
            for a in version.approvals
        ],
    )


def deployment_to_proto(deployment: Deployment) -> pb.Deployment:
    """A Deployment value as its message."""
    message = _deployment_core(deployment)
    policy = deployment.policy
    if policy.inference:
        message.inference.ParseFromString(policy.inference)
    if policy.hybrid:
        message.hybrid.ParseFromString(policy.hybrid)
    if policy.strategy:
        message.strategy.ParseFromString(policy.strategy)
    return message


def _deployment_core(deployment: Deployment) -> pb.Deployment:
    return pb.Deployment(
        name=deployment.name,
        traffic=[
            pb.TrafficTarget(model_version=t.model_version, percent=t.percent)
            for t in deployment.traffic
        ],
        revision=deployment.revision,
        update_time=timestamp(deployment.update_time),
        routing_key=deployment.policy.routing_key,
        salt=deployment.policy.salt,
        shadow=[v.model_version for v in deployment.policy.shadow],
        fallback_version=(
            deployment.policy.fallback.model_version if deployment.policy.fallback else ""
        ),
        default_outputs=[
            tensor_pb2.Tensor.FromString(t) for t in deployment.policy.default_outputs
        ],
    )


def default_output_from_proto(tensor: tensor_pb2.Tensor) -> DefaultOutput:
    """A declared default output, with the facts its validation needs."""
    contents = tensor.contents
    values = {
        tensor_pb2.DATA_TYPE_BOOL: len(contents.bool_contents),
        tensor_pb2.DATA_TYPE_INT32: len(contents.int_contents),
        tensor_pb2.DATA_TYPE_INT64: len(contents.int_contents),
        tensor_pb2.DATA_TYPE_FP32: len(contents.fp32_contents),
        tensor_pb2.DATA_TYPE_FP64: len(contents.fp64_contents),
        tensor_pb2.DATA_TYPE_BYTES: len(contents.bytes_contents),
    }
    # Only the values of the tensor's own data type count, as the router reads them.
    count = values.get(tensor.datatype, 0)
    return DefaultOutput(
        name=tensor.name,
        has_datatype=tensor.datatype != tensor_pb2.DATA_TYPE_UNSPECIFIED,
        shape=tuple(tensor.shape),
        value_count=count,
        tensor=tensor.SerializeToString(),
    )


def stage_from_proto(value: pb.Stage.ValueType) -> Stage | None:
    """The stage, or None for UNSPECIFIED and values this build does not know."""
    return _STAGES.get(value)


def revision_to_proto(revision: DeploymentRevision) -> pb.DeploymentRevision:
    """A DeploymentRevision value as its message."""
    return pb.DeploymentRevision(
        deployment=deployment_to_proto(revision.deployment),
        sequence=revision.sequence,
        principal=revision.principal,
        reason=revision.reason,
        restored_revision=revision.restored_revision,
    )


def audit_event_to_proto(event: AuditEvent) -> pb.AuditEvent:
    """An AuditEvent value as its message."""
    return pb.AuditEvent(
        name=event.name,
        create_time=timestamp(event.create_time),
        principal=event.principal,
        action=event.action,
        resource=event.resource,
        reason=event.reason,
        details=event.details,
    )
