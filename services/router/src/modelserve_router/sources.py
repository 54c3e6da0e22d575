"""The router's feature readers and model runners: through the services, or straight to Redis/Triton."""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextvars import ContextVar
from typing import Any, Protocol

import grpc
import numpy.typing as npt
from opentelemetry import trace

from modelserve.feature.v1 import feature_service_pb2 as feature_pb
from modelserve.inference.v1 import inference_service_pb2 as inference_pb
from modelserve.inference.v1 import inference_service_pb2_grpc as inference_grpc
from modelserve_features.convert import timestamp_us, value_from_proto
from modelserve_features.online import FeatureResult, FeatureStatus, OnlineStore
from modelserve_features.redis_store import EntityKey
from modelserve_features.views import FeatureRef, Value
from modelserve_router.routing import ServedVersion, ServingChange
from modelserve_runtime.channels import channel_credentials
from modelserve_runtime.clients import FeatureClient, InferenceClient
from modelserve_runtime.config import ClientTlsSettings
from modelserve_runtime.convert import numpy_to_tensor, tensor_to_numpy
from modelserve_runtime.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    UnavailableError,
)
from modelserve_triton.http import TritonHttpRunner
from modelserve_triton.runner import TritonError, TritonRunner

Arrays = dict[str, npt.NDArray[Any]]

BATCH_LINKS: ContextVar[tuple[trace.Link, ...]] = ContextVar("modelserve_batch_links", default=())
"""The spans of the other requests a coalesced model call carries (set by the coalescer):
the direct runner links its Triton call's span to them."""


class FeatureReader(Protocol):
    """Reads stored features of a request's entities in one call."""

    async def entity_types(self, views: Sequence[str]) -> dict[str, str]:
        """The entity type of each view; NotFoundError naming an unknown view."""
        ...

    async def read(
        self, entities: Mapping[str, str], refs: Sequence[FeatureRef]
    ) -> dict[FeatureRef, FeatureResult]:
        """Each ref for the entity of its view's type: value (the default where none is
        stored or it expired), status and event time."""
        ...


class ModelRunner(Protocol):
    """Runs a model version."""

    async def run(
        self,
        version: ServedVersion,
        inputs: Mapping[str, npt.NDArray[Any]],
        output_names: Sequence[str],
    ) -> Arrays:
        """The named outputs of the version on `inputs`."""
        ...


_STATUSES = {
    feature_pb.FEATURE_STATUS_PRESENT: FeatureStatus.PRESENT,
    feature_pb.FEATURE_STATUS_MISSING: FeatureStatus.MISSING,
    feature_pb.FEATURE_STATUS_EXPIRED: FeatureStatus.EXPIRED,
    feature_pb.FEATURE_STATUS_DEFAULTED: FeatureStatus.DEFAULTED,
}


class ServiceFeatureReader:
    """Features through the feature service; view definitions are reused for `refresh_s`."""

    def __init__(self, client: FeatureClient, *, refresh_s: float = 2.0) -> None:
        self._client = client
        self._refresh_s = refresh_s
        self._entity_types: dict[str, tuple[float, str]] = {}

    async def entity_types(self, views: Sequence[str]) -> dict[str, str]:
        now = time.monotonic()
        types: dict[str, str] = {}
        for view in views:
            cached = self._entity_types.get(view)
            if cached is None or cached[0] <= now:
                definition = await self._client.get_feature_view(f"featureViews/{view}")
                cached = (now + self._refresh_s, definition.entity_type)
                self._entity_types[view] = cached
            types[view] = cached[1]
        return types

    async def read(
        self, entities: Mapping[str, str], refs: Sequence[FeatureRef]
    ) -> dict[FeatureRef, FeatureResult]:
        """One GetOnlineFeatures call answered as lists (FEATURE_LAYOUT_LISTS): each entity's
        entries are the refs of its type in request order, mapped back with the view
        definitions `entity_types` keeps (the predictor has just asked for them). Should an
        answer not line up with them, a view having changed its entity type in between, the
        read is made again answered as maps, which name each value's feature."""
        types = await self.entity_types(list(dict.fromkeys(r.view for r in refs)))
        response = await self._client.get_online_features(
            self._request(entities, refs, feature_pb.FEATURE_LAYOUT_LISTS)
        )
        values: dict[FeatureRef, FeatureResult] = {}
        missing = FeatureStatus.MISSING
        for result in response.results:
            entity_type = result.entity.entity_type
            mine = [r for r in refs if types[r.view] == entity_type]
            if len(mine) != len(result.ordered_values):
                return await self._read_maps(entities, refs)
            for ref, value, status, event_time_us in zip(
                mine,
                result.ordered_values,
                result.ordered_statuses,
                result.ordered_event_times_us,
                strict=True,
            ):
                values[ref] = FeatureResult(
                    value_from_proto(value),
                    _STATUSES.get(status, missing),
                    event_time_us or None,
                )
        return values

    async def _read_maps(
        self, entities: Mapping[str, str], refs: Sequence[FeatureRef]
    ) -> dict[FeatureRef, FeatureResult]:
        self._entity_types.clear()
        response = await self._client.get_online_features(
            self._request(entities, refs, feature_pb.FEATURE_LAYOUT_MAPS)
        )
        by_ref = {str(r): r for r in refs}
        values: dict[FeatureRef, FeatureResult] = {}
        for result in response.results:
            for key, value in result.values.items():
                if key in by_ref:
                    event_time = result.event_times.get(key)
                    values[by_ref[key]] = FeatureResult(
                        value_from_proto(value),
                        _STATUSES.get(result.statuses[key], FeatureStatus.MISSING),
                        None if event_time is None else timestamp_us(event_time),
                    )
        return values

    @staticmethod
    def _request(
        entities: Mapping[str, str],
        refs: Sequence[FeatureRef],
        layout: feature_pb.FeatureLayout.ValueType,
    ) -> feature_pb.GetOnlineFeaturesRequest:
        return feature_pb.GetOnlineFeaturesRequest(
            entities=[
                feature_pb.EntityKey(entity_type=t, entity_id=i) for t, i in entities.items()
            ],
            features=[str(r) for r in refs],
            layout=layout,
        )


class RedisFeatureReader:
    """Features straight from Redis (one pipeline), through the same OnlineStore (layout,
    views, statuses) that the feature service uses."""

    def __init__(self, store: OnlineStore) -> None:
        self._store = store

    async def entity_types(self, views: Sequence[str]) -> dict[str, str]:
        return {name: view.entity_type for name, view in (await self._store.views(views)).items()}

    async def read(
        self, entities: Mapping[str, str], refs: Sequence[FeatureRef]
    ) -> dict[FeatureRef, FeatureResult]:
        keys = [EntityKey(t, i) for t, i in entities.items()]
        values: dict[FeatureRef, FeatureResult] = {}
        for row in await self._store.read(keys, refs):
            values.update(row)
        return values


def _served(held: inference_pb.LoadedModelVersion) -> ServedVersion:
    return ServedVersion(
        model_version=held.name,
        triton_endpoint=held.triton_endpoint,
        triton_model_name=held.triton_model_name,
        triton_model_version=held.triton_model_version,
        triton_http_endpoint=held.triton_http_endpoint,
    )


def serving_change(message: inference_pb.WatchModelStatesResponse) -> ServingChange:
    """A WatchModelStates message in the router's terms: READY versions are routable, every
    other state and every removed version is not."""
    versions: list[tuple[str, ServedVersion | None]] = [
        (v.name, _served(v) if v.state == inference_pb.MODEL_VERSION_STATE_READY else None)
        for v in message.model_versions
    ]
    versions += [(name, None) for name in message.removed_names]
    return ServingChange(tuple(versions), initial=message.initial)


class InferenceServing:
    """The versions inference holds READY: followed through its WatchModelStates stream, or
    read once with ListModelVersions."""

    def __init__(self, client: InferenceClient, channel: grpc.aio.Channel) -> None:
        self._client = client
        self._stub = inference_grpc.InferenceServiceStub(channel)

    async def watch_states(self, *, timeout_s: float) -> AsyncIterator[ServingChange]:
        # The deadline is explicit: the channel's default one is meant for unary calls.
        call = self._stub.WatchModelStates(
            inference_pb.WatchModelStatesRequest(), timeout=timeout_s
        )
        try:
            async for message in call:
                yield serving_change(message)
        except grpc.aio.AioRpcError as exc:
            raise UnavailableError(
                f"model state watch: inference answered {exc.code().name}: {exc.details()}",
                reason="UPSTREAM_UNAVAILABLE",
                metadata={"upstream_code": exc.code().name},
            ) from exc
        finally:
            call.cancel()
        raise UnavailableError(
            "inference ended the model state watch", reason="UPSTREAM_UNAVAILABLE"
        )

    async def ready_versions(self) -> list[ServedVersion]:
        return [
            _served(held)
            for held in await self._client.list_model_versions()
            if held.state == inference_pb.MODEL_VERSION_STATE_READY
        ]


class ServiceModelRunner:
    """Inference through the inference service."""

    def __init__(self, client: InferenceClient) -> None:
        self._client = client

    async def run(
        self,
        version: ServedVersion,
        inputs: Mapping[str, npt.NDArray[Any]],
        output_names: Sequence[str],
    ) -> Arrays:
        response = await self._client.infer(
            inference_pb.InferRequest(
                name=version.model_version,
                inputs=[numpy_to_tensor(name, array) for name, array in inputs.items()],
                output_names=list(output_names),
            )
        )
        return {t.name: tensor_to_numpy(t) for t in response.outputs}


class TritonModelRunner:
    """Inference straight to the Triton endpoint that inference publishes for a READY version:
    its HTTP endpoint when `protocol` is "http" and one is published, else its gRPC one. With
    `tls` enabled, always its gRPC endpoint over TLS (Triton's HTTP endpoint has none)."""

    def __init__(
        self, *, timeout_s: float, protocol: str = "http", tls: ClientTlsSettings | None = None
    ) -> None:
        self._timeout_s = timeout_s
        self._tls = tls if tls is not None and tls.enabled else None
        self._http = protocol == "http" and self._tls is None
        self._credentials = None if self._tls is None else channel_credentials(self._tls)
        self._runners: dict[str, TritonRunner | TritonHttpRunner] = {}

    def _runner(self, version: ServedVersion) -> TritonRunner | TritonHttpRunner:
        if self._http and version.triton_http_endpoint:
            runner = self._runners.get(version.triton_http_endpoint)
            if runner is None:
                runner = TritonHttpRunner(version.triton_http_endpoint)
                self._runners[version.triton_http_endpoint] = runner
            return runner
        runner = self._runners.get(version.triton_endpoint)
        if runner is None:
            runner = self._runners[version.triton_endpoint] = TritonRunner(
                version.triton_endpoint,
                credentials=self._credentials,
                server_name=None if self._tls is None else self._tls.server_name,
            )
        return runner

    async def run(
        self,
        version: ServedVersion,
        inputs: Mapping[str, npt.NDArray[Any]],
        output_names: Sequence[str],
    ) -> Arrays:
        if not version.triton_endpoint:
            raise FailedPreconditionError(
                f"inference publishes no Triton endpoint for {version.model_version}",
                reason="NO_TRITON_ENDPOINT",
                metadata={"model_version": version.model_version},
            )
        try:
            return await self._runner(version).infer(
                version.triton_model_name,
                version.triton_model_version,
                inputs,
                output_names,
                timeout_s=self._timeout_s,
                links=BATCH_LINKS.get(),
            )
        except TritonError as exc:
            code = (exc.status or "UNKNOWN").removeprefix("StatusCode.")
            if code == "INVALID_ARGUMENT":
                # The caller's input (a batch over max_batch_size, ...), not the version: no
                # fallback answers it and the circuit breaker does not count it.
                raise InvalidArgumentError(
                    f"triton refused the input of {version.model_version}: {exc}",
                    reason="TRITON_REFUSED_INPUT",
                    metadata={"model_version": version.model_version, "upstream_code": code},
                ) from exc
            # Triton's own code rides along for the logs and the circuit breaker.
            raise UnavailableError(
                f"triton failed to run {version.model_version}: {exc}",
                reason="TRITON_UNAVAILABLE",
                metadata={
                    "model_version": version.model_version,
                    "upstream_code": code,
                },
            ) from exc

    async def close(self) -> None:
        """Closes the Triton clients."""
        for runner in self._runners.values():
            await runner.close()


def as_float(value: Value, *, allow_non_finite: bool = False) -> float:
    """A numeric feature value as float; ValueError for strings, vectors and, unless
    `allow_non_finite` (the model's input takes them), NaN and infinities (a model fed NaN
    answers NaN, and Triton's direct path would not refuse it)."""
    if isinstance(value, str | tuple):
        raise ValueError(f"{value!r} is not numeric")
    number = float(value)
    if not allow_non_finite and not math.isfinite(number):
        raise ValueError(f"{value!r} is not finite")
    return number
