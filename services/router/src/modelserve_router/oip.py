"""The Open Inference Protocol (KServe v2 `inference.GRPCInferenceService`) on the router.

Triton and KServe clients (`tritonclient.grpc`) name an endpoint as the model and get what
Predict gets: the traffic split, sticky routing, shadow copies, fallbacks, circuit breakers,
the prediction cache, limits, API keys and a PredictionRecord, all through the one
`Predictor`. The caller's input tensors reach the version as they are (checked against its
signature): an OIP caller sends tensors, so no features are read. Built from the generated
code that tritonclient ships. ModelStreamInfer answers each request of a stream as
ModelInfer would (`oip_stream`). Model control, shared memory, statistics and model config
are not offered: they stay UNIMPLEMENTED.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import np_to_triton_dtype

from modelserve.registry.v1 import registry_service_pb2 as registry_pb
from modelserve.type.v1 import tensor_pb2
from modelserve_features.views import Value
from modelserve_router.access import PREDICT_ROLES
from modelserve_router.predict import (
    PredictionInput,
    PredictionResult,
    Predictor,
    check_request_id,
    pin,
    request_budget,
)
from modelserve_router.routing import Route, RoutingTable
from modelserve_runtime.auth import Role, current_principal
from modelserve_runtime.convert import TRITON_NAMES
from modelserve_runtime.errors import (
    DeadlineExceededError,
    FailedPreconditionError,
    FieldViolation,
    InvalidArgumentError,
    NotFoundError,
)
from modelserve_triton.oip import (
    CONTENTS_FIELD,
    InputTensor,
    encode_raw,
    read_inputs,
    refuse_classification,
    server_metadata,
    signature_violations,
)
from modelserve_triton.oip_stream import ModelInferCalls

SERVICE_NAME = "inference.GRPCInferenceService"
#: The name ServerMetadata answers with.
SERVER_NAME = "modelserve-router"
#: The request parameter that carries the sticky routing key's value.
ROUTING_KEY_PARAMETER = "routing_key"
#: The request parameter (bool) that asks for raw output contents (true) or typed (false),
#: as Triton's HTTP protocol names it; without it the answer takes the inputs' form.
BINARY_OUTPUT_PARAMETER = "binary_data_output"

_METHOD = f"/{SERVICE_NAME}/"
#: Liveness and readiness answer without an API key: load balancers and orchestrators ask.
PUBLIC_OIP_METHODS = frozenset({_METHOD + "ServerLive", _METHOD + "ServerReady"})
#: Every role that may call Predict may call these: a Triton client asks for metadata and
#: readiness before it infers. The rest of the protocol (model control, shared memory,
#: statistics) is in no role's table: with auth on it is PERMISSION_DENIED to every key.
OIP_POLICY: dict[str, frozenset[Role]] = {
    _METHOD + name: PREDICT_ROLES
    for name in ("ServerMetadata", "ModelReady", "ModelMetadata", "ModelInfer", "ModelStreamInfer")
}


@dataclass(frozen=True, slots=True)
class RequestTensors:
    """The tensors of a ModelInferRequest and the outputs it asks for (all when empty)."""

    inputs: Mapping[str, InputTensor]
    outputs: tuple[str, ...] = ()

    @classmethod
    def from_request(cls, request: Any) -> RequestTensors:
        """Reads raw_input_contents (as tritonclient sends them) or typed contents;
        InvalidArgumentError naming what is malformed."""
        inputs = read_inputs(request)
        refuse_classification(request)
        return cls(inputs, tuple(o.name for o in request.outputs))

    @property
    def batch_size(self) -> int:
        """Rows in the first input (1 for a scalar)."""
        first = next(iter(self.inputs.values()))
        return first.shape[0] if first.shape else 1

    def for_version(
        self, model_version: str, signature: registry_pb.Signature
    ) -> tuple[dict[str, npt.NDArray[Any]], dict[str, Value | None]]:
        """The tensors as they came, once every one fits the version's signature by name,
        datatype (no casting, as Triton) and shape, holds no NaN or infinity, and all share
        one batch size; and, for a one-row input of the version's `feature_refs`, the value
        of each feature (the record logs them as Predict's). Requested outputs must be the
        version's."""
        violations = signature_violations(
            self.inputs,
            (
                (s.name, TRITON_NAMES.get(s.datatype), s.shape, s.allow_non_finite)
                for s in signature.inputs
            ),
            version=model_version,
            missing=f"required by {model_version}",
            reject_non_finite=True,
        )
        sizes = sorted({t.shape[0] for t in self.inputs.values() if t.shape})
        if len(sizes) > 1 or sizes == [0]:
            violations.append(
                FieldViolation("inputs", f"every input needs the same batch size >= 1; got {sizes}")
            )
        known = {spec.name for spec in signature.outputs}
        violations.extend(
            FieldViolation(f"outputs[{name}]", f"not an output of {model_version}")
            for name in self.outputs
            if name not in known
        )
        if violations:
            raise InvalidArgumentError.from_violations(violations)
        arrays = {name: tensor.array() for name, tensor in self.inputs.items()}
        return arrays, _feature_values(arrays, signature)


def _feature_values(
    arrays: Mapping[str, npt.NDArray[Any]], signature: registry_pb.Signature
) -> dict[str, Value | None]:
    refs = list(signature.feature_refs)
    if not refs or not signature.inputs:
        return {}
    first = arrays[signature.inputs[0].name]
    if first.shape != (1, len(refs)) or first.dtype.kind not in "fiub":
        return {}
    return dict(zip(refs, (float(v) for v in first[0]), strict=True))


def _version_parts(model_version: str) -> tuple[str, str]:
    """`models/fraud/versions/2` as the OIP names it: ("fraud", "2")."""
    parts = model_version.split("/")
    if len(parts) == 4 and parts[0] == "models" and parts[2] == "versions":
        return parts[1], parts[3]
    return model_version, ""


def _answer(request: Any, tensors: RequestTensors, result: PredictionResult, endpoint: str) -> Any:
    """The ModelInferResponse: the answering version as model name and version, the asked
    outputs (all when none were asked) raw or typed, and how the answer was made as
    parameters."""
    # A declared default output was made by no version: it names the endpoint.
    model_name, version = (
        _version_parts(result.model_version) if result.model_version else (endpoint, "")
    )
    response = service_pb2.ModelInferResponse(
        model_name=model_name, model_version=version, id=result.request_id
    )
    response.parameters["route_reason"].string_param = result.route_reason
    response.parameters["degraded"].bool_param = result.degraded
    if result.degraded:
        response.parameters["degraded_reason"].string_param = result.degraded_reason
    if result.trace_id:
        response.parameters["trace_id"].string_param = result.trace_id
    binary = request.parameters.get(BINARY_OUTPUT_PARAMETER)
    raw = bool(request.raw_input_contents) if binary is None else binary.bool_param
    rows = tensors.batch_size
    # A declared default output is one row's answer; each row of a batch gets it.
    tile = result.route_reason == "default_output" and rows > 1
    for name in tensors.outputs or tuple(result.outputs):
        array = result.outputs.get(name)
        if array is None:
            # A default-output answer declares only some outputs: the rest are left out.
            continue
        if tile and array.ndim and array.shape[0] == 1:
            array = np.repeat(array, rows, axis=0)
        datatype = np_to_triton_dtype(array.dtype)
        tensor = response.outputs.add(name=name, datatype=datatype, shape=list(array.shape))
        if raw:
            response.raw_output_contents.append(encode_raw(array))
        else:
            getattr(tensor.contents, CONTENTS_FIELD[datatype]).extend(array.reshape(-1).tolist())
    return response


def _routing_key(request: Any) -> str:
    parameter = request.parameters.get(ROUTING_KEY_PARAMETER)
    if parameter is None:
        return ""
    kind = parameter.WhichOneof("parameter_choice")
    if kind == "string_param":
        return str(parameter.string_param)
    if kind in ("int64_param", "uint64_param"):
        return str(getattr(parameter, kind))
    raise InvalidArgumentError.for_field(
        f"parameters[{ROUTING_KEY_PARAMETER}]", "must be a string or an integer"
    )


def _stable(route: Route) -> str:
    """The version with the largest share of the endpoint's traffic (the first on a tie): the
    stable one of a canary, whose signature the endpoint's metadata shows."""
    if not route.traffic:
        raise FailedPreconditionError(
            f"endpoint {route.endpoint} has no traffic target",
            reason="NO_TRAFFIC_TARGET",
            metadata={"endpoint": route.endpoint},
        )
    return max(route.traffic, key=lambda t: t.percent).model_version


def _tensor_metadata(specs: Sequence[tensor_pb2.TensorSpec]) -> list[Any]:
    return [
        service_pb2.ModelMetadataResponse.TensorMetadata(
            name=s.name, datatype=TRITON_NAMES.get(s.datatype, ""), shape=list(s.shape)
        )
        for s in specs
    ]


# The generated servicer is untyped (tritonclient ships no stubs), hence the ignore.
class OpenInferenceServicer(
    ModelInferCalls,
    service_pb2_grpc.GRPCInferenceServiceServicer,  # type: ignore[misc]
):
    """Answers the Open Inference Protocol on the router: a model is an endpoint."""

    def __init__(
        self, predictor: Predictor, routes: RoutingTable, *, default_timeout_s: float
    ) -> None:
        self._predictor = predictor
        self._routes = routes
        self._default_timeout_s = default_timeout_s

    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        return service_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        # Ready once the deployment watch has delivered a deployment to route by.
        return service_pb2.ServerReadyResponse(ready=bool(self._routes.snapshot.routes))

    async def ServerMetadata(
        self, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Any:
        # Parameters: `routing_key` in a request; `route_reason` and `degraded` in an answer.
        return server_metadata(SERVER_NAME, ("parameters",))

    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if not request.name:
            raise InvalidArgumentError.for_field("name", "must name an endpoint")
        try:
            snapshot, route = await self._routes.resolve(request.name)
            if request.version:
                ready = pin(route, request.version).model_version in snapshot.ready
            else:
                ready = any(
                    t.percent > 0 and t.model_version in snapshot.ready for t in route.traffic
                )
        except (NotFoundError, InvalidArgumentError):
            # As Triton answers: a model or version it does not serve is simply not ready.
            ready = False
        return service_pb2.ModelReadyResponse(ready=ready)

    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if not request.name:
            raise InvalidArgumentError.for_field("name", "must name an endpoint")
        snapshot, route = await self._routes.resolve(request.name)
        version = pin(route, request.version).model_version if request.version else _stable(route)
        signature = snapshot.versions[version].signature
        shares = [t.model_version for t in route.traffic if t.percent > 0]
        numbers = [_version_parts(v)[1] for v in shares]
        return service_pb2.ModelMetadataResponse(
            name=route.endpoint,
            # What `model_version` of a ModelInfer may pin: numbers, unless two models share one.
            versions=numbers if len(set(numbers)) == len(numbers) else shares,
            inputs=_tensor_metadata(signature.inputs),
            outputs=_tensor_metadata(signature.outputs),
        )

    async def _infer(
        self, request: Any, context: grpc.aio.ServicerContext[Any, Any], streamed: bool
    ) -> Any:
        """One ModelInfer, routed as Predict is, within its budget (`request_budget`)."""
        if not request.model_name:
            raise InvalidArgumentError.for_field("model_name", "must name an endpoint")
        check_request_id(request.id, "id")
        tensors = RequestTensors.from_request(request)
        prediction = PredictionInput(
            endpoint=request.model_name,
            entities={},
            features={},
            request_id=request.id,
            principal=current_principal(),
            routing_key=_routing_key(request),
            model_version=request.model_version,
            tensors=tensors,
        )
        budget = request_budget(
            context.time_remaining(), self._default_timeout_s, streamed=streamed
        )
        try:
            async with asyncio.timeout(budget):
                result = await self._predictor.predict(prediction)
        except TimeoutError:
            raise DeadlineExceededError(
                f"prediction did not finish within {budget:.3f}s",
                metadata={"budget_s": f"{budget:.3f}"},
            ) from None
        return _answer(request, tensors, result, request.model_name)
