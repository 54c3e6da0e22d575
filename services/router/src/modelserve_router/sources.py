"""The router's feature readers and model runners: through the services, or straight to Redis/Triton."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy.typing as npt

from modelserve.feature.v1 import feature_service_pb2 as feature_pb
from modelserve.inference.v1 import inference_service_pb2 as inference_pb
from modelserve_features.redis_store import EntityKey, FeatureRef, RedisFeatureStore, Value
from modelserve_runtime.clients import FeatureClient, InferenceClient
from modelserve_runtime.convert import numpy_to_tensor, tensor_to_numpy, value_from_proto
from modelserve_runtime.errors import FailedPreconditionError, UnavailableError
from modelserve_triton.runner import TritonError, TritonRunner

Arrays = dict[str, npt.NDArray[Any]]


class FeatureReader(Protocol):
    """Reads stored features of a request's entities in one call."""

    async def read(
        self, entities: Mapping[str, str], refs: Sequence[FeatureRef]
    ) -> dict[FeatureRef, Value | None]:
        """The value of each ref for the entity of its type (None when missing)."""
        ...


class ModelRunner(Protocol):
    """Runs a model version."""

    async def run(
        self,
        model_version: str,
        inputs: Mapping[str, npt.NDArray[Any]],
        output_names: Sequence[str],
    ) -> Arrays:
        """The named outputs of the version on `inputs`."""
        ...


class ServiceFeatureReader:
    """Features through the feature service."""

    def __init__(self, client: FeatureClient) -> None:
        self._client = client

    async def read(
        self, entities: Mapping[str, str], refs: Sequence[FeatureRef]
    ) -> dict[FeatureRef, Value | None]:
        request = feature_pb.GetOnlineFeaturesRequest(
            entities=[
                feature_pb.EntityKey(entity_type=t, entity_id=i) for t, i in entities.items()
            ],
            features=[str(r) for r in refs],
        )
        response = await self._client.get_online_features(request)
        by_ref = {str(r): r for r in refs}
        values: dict[FeatureRef, Value | None] = {}
        for result in response.results:
            for key, value in result.values.items():
                if key in by_ref:
                    values[by_ref[key]] = value_from_proto(value)
        return values


class RedisFeatureReader:
    """Features straight from Redis (one pipeline), with the same layout the feature service uses."""

    def __init__(self, store: RedisFeatureStore) -> None:
        self._store = store

    async def read(
        self, entities: Mapping[str, str], refs: Sequence[FeatureRef]
    ) -> dict[FeatureRef, Value | None]:
        keys = [EntityKey(t, i) for t, i in entities.items()]
        values: dict[FeatureRef, Value | None] = {}
        for row in await self._store.read(keys, refs):
            values.update(row)
        return values


class ServiceModelRunner:
    """Inference through the inference service."""

    def __init__(self, client: InferenceClient) -> None:
        self._client = client

    async def run(
        self,
        model_version: str,
        inputs: Mapping[str, npt.NDArray[Any]],
        output_names: Sequence[str],
    ) -> Arrays:
        response = await self._client.infer(
            inference_pb.InferRequest(
                name=model_version,
                inputs=[numpy_to_tensor(name, array) for name, array in inputs.items()],
                output_names=list(output_names),
            )
        )
        return {t.name: tensor_to_numpy(t) for t in response.outputs}


class TritonModelRunner:
    """Inference straight to the Triton endpoint that inference publishes for a READY version."""

    def __init__(self, inference: InferenceClient, *, timeout_s: float) -> None:
        self._inference = inference
        self._timeout_s = timeout_s
        self._routes: dict[str, tuple[str, str, int]] = {}
        self._runners: dict[str, TritonRunner] = {}

    async def _route(self, model_version: str) -> tuple[TritonRunner, str, int]:
        route = self._routes.get(model_version)
        if route is None:
            for held in await self._inference.list_model_versions():
                if held.state == inference_pb.MODEL_VERSION_STATE_READY and held.triton_endpoint:
                    self._routes[held.name] = (
                        held.triton_endpoint,
                        held.triton_model_name,
                        held.triton_model_version,
                    )
            route = self._routes.get(model_version)
        if route is None:
            raise FailedPreconditionError(
                f"model version {model_version} is not READY in inference",
                reason="VERSION_NOT_READY",
                metadata={"model_version": model_version},
            )
        endpoint, model, version = route
        runner = self._runners.get(endpoint)
        if runner is None:
            runner = self._runners[endpoint] = TritonRunner(endpoint)
        return runner, model, version

    async def run(
        self,
        model_version: str,
        inputs: Mapping[str, npt.NDArray[Any]],
        output_names: Sequence[str],
    ) -> Arrays:
        runner, model, version = await self._route(model_version)
        try:
            return await runner.infer(
                model, version, inputs, output_names, timeout_s=self._timeout_s
            )
        except TritonError as exc:
            self._routes.pop(model_version, None)
            raise UnavailableError(
                f"triton failed to run {model_version}: {exc}", reason="TRITON_UNAVAILABLE"
            ) from exc

    async def close(self) -> None:
        """Closes the Triton clients."""
        for runner in self._runners.values():
            await runner.close()


def as_float(value: Value) -> float:
    """A numeric feature value as float; ValueError for strings."""
    if isinstance(value, str):
        raise ValueError(f"{value!r} is not numeric")
    return float(value)
