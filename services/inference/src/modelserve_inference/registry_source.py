"""The registry as inference reads it: versions to load, and deployments to follow."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import numpy.typing as npt
import structlog

from modelserve.registry.v1 import registry_service_pb2 as registry_pb
from modelserve.type.v1 import tensor_pb2
from modelserve_inference.models import ServingConfig, VersionArtifact, parse_version_name
from modelserve_inference.reconcile import DeploymentNeeds
from modelserve_runtime.clients import RegistryClient
from modelserve_runtime.convert import TRITON_NAMES, tensor_to_numpy
from modelserve_runtime.errors import FailedPreconditionError, InvalidArgumentError
from modelserve_triton.model_config import CPU, GPU, ONNXRUNTIME_BACKEND, PYTHON_BACKEND, TensorSpec

log = structlog.get_logger()

_BACKENDS = {
    registry_pb.BACKEND_PYTHON_ONNXRUNTIME: PYTHON_BACKEND,
    registry_pb.BACKEND_ONNXRUNTIME: ONNXRUNTIME_BACKEND,
}
_DEVICES = {registry_pb.DEVICE_CPU: CPU, registry_pb.DEVICE_GPU: GPU}


def triton_spec(spec: tensor_pb2.TensorSpec) -> TensorSpec:
    """A signature tensor in Triton's terms."""
    return TensorSpec(
        spec.name,
        TRITON_NAMES[spec.datatype],
        tuple(int(d) for d in spec.shape),
        allow_non_finite=spec.allow_non_finite,
    )


def sample_arrays(version: registry_pb.ModelVersion) -> dict[str, npt.NDArray[Any]]:
    """The version's sample inputs by name; none (with a warning) when one cannot be read,
    since warmup can do without them."""
    try:
        return {
            tensor.name: tensor_to_numpy(tensor, f"sample_inputs[{i}]")
            for i, tensor in enumerate(version.sample_inputs)
        }
    except InvalidArgumentError as exc:
        log.warning("sample_inputs_unreadable", version=version.name, error=exc.message)
        return {}


class RegistryArtifactSource:
    """An ArtifactSource over the registry's GetModelVersion and ReadModelVersionArtifact."""

    def __init__(self, registry: RegistryClient) -> None:
        self._registry = registry

    async def fetch(self, name: str) -> VersionArtifact:
        version = await self._registry.get_model_version(name)
        if version.format != registry_pb.ARTIFACT_FORMAT_ONNX:
            raise FailedPreconditionError(
                f"{name} is not an ONNX artifact", reason="UNSUPPORTED_FORMAT"
            )
        onnx = await self._registry.read_artifact(name)
        return VersionArtifact(
            name=name,
            inputs=tuple(triton_spec(s) for s in version.signature.inputs),
            outputs=tuple(triton_spec(s) for s in version.signature.outputs),
            onnx=onnx,
            sample_inputs=sample_arrays(version),
        )


def serving_config(config: registry_pb.InferenceConfig, defaults: ServingConfig) -> ServingConfig:
    """A deployment's InferenceConfig over the service's defaults: zero fields keep them."""
    return dataclasses.replace(
        defaults,
        backend=_BACKENDS.get(config.backend, defaults.backend),
        max_batch_size=config.max_batch_size or defaults.max_batch_size,
        preferred_batch_sizes=tuple(config.preferred_batch_sizes) or defaults.preferred_batch_sizes,
        max_queue_delay_us=(
            config.max_queue_delay_us
            if config.HasField("max_queue_delay_us")
            else defaults.max_queue_delay_us
        ),
        instance_count=config.instance_count or defaults.instance_count,
        device=_DEVICES.get(config.device, defaults.device),
        gpus=tuple(config.gpus) if config.device else defaults.gpus,
    )


def deployment_needs(
    deployment: registry_pb.Deployment, defaults: ServingConfig
) -> DeploymentNeeds:
    """What a deployment asks of inference: its traffic targets, shadow and fallback versions
    (a malformed name is left out with a warning) and its serving config."""
    referenced = [t.model_version for t in deployment.traffic]
    referenced += list(deployment.shadow)
    if deployment.fallback_version:
        referenced.append(deployment.fallback_version)
    versions = []
    for name in dict.fromkeys(referenced):
        try:
            parse_version_name(name)
        except InvalidArgumentError:
            log.warning("deployment_version_malformed", deployment=deployment.name, version=name)
            continue
        versions.append(name)
    config = (
        serving_config(deployment.inference, defaults)
        if deployment.HasField("inference")
        else defaults
    )
    return DeploymentNeeds(deployment.name, deployment.revision, tuple(versions), config)


class RegistryDeploymentFeed:
    """A DeploymentFeed over the registry's WatchDeployments stream."""

    def __init__(
        self, registry: RegistryClient, defaults: ServingConfig, *, timeout_s: float
    ) -> None:
        self._registry = registry
        self._defaults = defaults
        self._timeout_s = timeout_s

    async def watch(self, after_sequence: int) -> AsyncIterator[tuple[int, DeploymentNeeds]]:
        # An explicit deadline: the channel's default (5 s) would end the stream at once.
        async for revision in self._registry.watch_deployments(
            after_sequence, timeout_s=self._timeout_s
        ):
            yield revision.sequence, deployment_needs(revision.deployment, self._defaults)
