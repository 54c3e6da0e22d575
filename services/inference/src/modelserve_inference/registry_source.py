"""Fetches versions to load from the registry."""

from __future__ import annotations

from modelserve.registry.v1 import registry_service_pb2 as registry_pb
from modelserve.type.v1 import tensor_pb2
from modelserve_inference.models import VersionArtifact
from modelserve_runtime.clients import RegistryClient
from modelserve_runtime.convert import TRITON_NAMES
from modelserve_runtime.errors import FailedPreconditionError
from modelserve_triton.model_config import TensorSpec


def triton_spec(spec: tensor_pb2.TensorSpec) -> TensorSpec:
    """A signature tensor in Triton's terms."""
    return TensorSpec(spec.name, TRITON_NAMES[spec.datatype], tuple(int(d) for d in spec.shape))


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
        )
