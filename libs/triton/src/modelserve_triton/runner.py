"""Calls Triton over gRPC: inference that carries our trace into Triton, and model control."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import grpc
import numpy.typing as npt
import structlog
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.grpc.aio import InferenceServerClient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype, triton_to_np_dtype

from modelserve_triton.errors import TritonError as TritonError
from modelserve_triton.oip import decode_output, encode_raw

log = structlog.get_logger()

#: Channel options: tritonclient's defaults, plus short reconnect backoff so that a client
#: finds a restarted Triton within a second rather than after gRPC's backoff of up to 2 min.
_CHANNEL_ARGS = [
    ("grpc.max_send_message_length", 2**31 - 1),
    ("grpc.max_receive_message_length", 2**31 - 1),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


def _triton_error(exc: InferenceServerException) -> TritonError:
    status = exc.status()
    return TritonError(str(exc.message() or exc), None if status is None else str(status))


def encode_request(
    model_name: str,
    version: int | str,
    inputs: Mapping[str, npt.NDArray[Any]],
    output_names: Sequence[str],
) -> Any:
    """An `inference.ModelInferRequest` carrying `inputs` as raw tensor bytes (BYTES tensors
    length-prefixed, as Triton expects) and asking for `output_names`."""
    request = service_pb2.ModelInferRequest(model_name=model_name, model_version=str(version))
    for name, array in inputs.items():
        datatype = np_to_triton_dtype(array.dtype)
        if datatype is None:
            raise TritonError(f"input {name!r}: numpy dtype {array.dtype} has no Triton type")
        tensor = request.inputs.add()
        tensor.name = name
        tensor.datatype = datatype
        tensor.shape.extend(array.shape)
        request.raw_input_contents.append(encode_raw(array))
    for name in output_names:
        request.outputs.add().name = name
    return request


def decode_outputs(
    response: Any, output_names: Sequence[str], model_name: str
) -> dict[str, npt.NDArray[Any]]:
    """The named outputs of a `ModelInferResponse` whose tensors came as raw bytes."""
    raws = response.raw_output_contents
    found: dict[str, npt.NDArray[Any]] = {}
    for index, output in enumerate(response.outputs):
        if output.name not in output_names:
            continue
        if index >= len(raws):
            raise TritonError(f"model {model_name!r} returned output {output.name!r} without data")
        if triton_to_np_dtype(output.datatype) is None:
            raise TritonError(
                f"model {model_name!r} returned output {output.name!r} of unknown type "
                f"{output.datatype}"
            )
        shape = tuple(int(d) for d in output.shape)
        found[output.name] = decode_output(
            model_name, output.name, output.datatype, shape, raws[index]
        )
    missing = [name for name in output_names if name not in found]
    if missing:
        raise TritonError(f"model {model_name!r} returned no output {missing[0]!r}")
    return {name: found[name] for name in output_names}


class TritonRunner:
    """A gRPC client of one Triton server; open it inside the event loop that uses it."""

    def __init__(
        self,
        url: str,
        *,
        tracer: trace.Tracer | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        server_name: str | None = None,
    ) -> None:
        """`credentials`: TLS to a Triton started with `--grpc-use-ssl` (its CA, and a client
        certificate when it asks for one); `server_name`: the name its certificate carries,
        when not the host of `url`. None: plaintext."""
        self._url = url
        self._credentials = credentials
        self._channel_args: list[tuple[str, str | int]] = list(_CHANNEL_ARGS)
        if server_name is not None:
            self._channel_args.append(("grpc.ssl_target_name_override", server_name))
        self._client = InferenceServerClient(
            url, creds=credentials, channel_args=self._channel_args
        )
        self._tracer = tracer or trace.get_tracer(__name__)
        # The raw ModelInfer stub of `infer_request`, on a channel of its own that connects
        # on first use (tritonclient keeps its stub private).
        self._raw_channel: grpc.aio.Channel | None = None
        self._raw_infer: Any = None

    @property
    def url(self) -> str:
        """The ``host:port`` of Triton's gRPC endpoint."""
        return self._url

    async def infer(
        self,
        model_name: str,
        version: int,
        inputs: Mapping[str, npt.NDArray[Any]],
        output_names: Sequence[str],
        *,
        timeout_s: float,
        links: Sequence[trace.Link] = (),
    ) -> dict[str, npt.NDArray[Any]]:
        """Runs one version of a model on a batch; the current trace continues inside Triton.

        The arrays travel as raw tensor bytes in one `ModelInferRequest` through
        `infer_request`, so there is one path to Triton (and one span shape) for every caller.
        """
        request = encode_request(model_name, version, inputs, output_names)
        response = await self.infer_request(request, timeout_s=timeout_s, links=links)
        return decode_outputs(response, output_names, model_name)

    async def infer_request(
        self,
        request: Any,
        *,
        timeout_s: float,
        context: otel_context.Context | None = None,
        links: Sequence[trace.Link] = (),
    ) -> Any:
        """Sends a ready-made `inference.ModelInferRequest` as it is and answers Triton's
        `ModelInferResponse` as it came: raw tensors go through without being decoded, so a
        caller that already holds them serialized (the Open Inference Protocol facade) pays
        for no conversion. The call is a "triton.infer" CLIENT span, as `infer`'s, under the
        current span (or the one in `context`), linked to `links` (the other requests a
        coalesced call carries); Triton continues its trace.
        """
        attributes: dict[str, Any] = {
            "rpc.system": "grpc",
            "server.address": self._url,
            "model.name": request.model_name,
        }
        if request.model_version.isdigit():
            attributes["model.version"] = int(request.model_version)
        span = self._tracer.start_span(
            "triton.infer",
            context=context,
            kind=trace.SpanKind.CLIENT,
            attributes=attributes,
            links=links,
        )
        carrier: dict[str, str] = {}
        # Writes the W3C traceparent of the span above, which Triton continues.
        propagate.inject(carrier, context=trace.set_span_in_context(span))
        if self._raw_infer is None:
            self._raw_channel = (
                grpc.aio.insecure_channel(self._url, options=self._channel_args)
                if self._credentials is None
                else grpc.aio.secure_channel(
                    self._url, self._credentials, options=self._channel_args
                )
            )
            self._raw_infer = service_pb2_grpc.GRPCInferenceServiceStub(
                self._raw_channel
            ).ModelInfer
        try:
            return await self._raw_infer(
                request, timeout=timeout_s, metadata=tuple(carrier.items())
            )
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            span.set_status(trace.Status(trace.StatusCode.ERROR, code.name))
            raise TritonError(exc.details() or code.name, str(code)) from exc
        finally:
            span.end()

    async def load(
        self,
        model_name: str,
        config: Mapping[str, Any],
        files: Mapping[str, bytes],
        *,
        timeout_s: float | None = None,
    ) -> None:
        """Loads (or reloads) a model from a config and the files of all its versions."""
        try:
            await self._client.load_model(
                model_name,
                config=json.dumps(config),
                files=dict(files),
                client_timeout=timeout_s,
            )
        except InferenceServerException as exc:
            raise _triton_error(exc) from exc
        log.info("triton_model_loaded", model=model_name, url=self._url)

    async def unload(self, model_name: str, *, timeout_s: float | None = None) -> None:
        """Unloads every version of a model."""
        try:
            await self._client.unload_model(model_name, client_timeout=timeout_s)
        except InferenceServerException as exc:
            raise _triton_error(exc) from exc
        log.info("triton_model_unloaded", model=model_name, url=self._url)

    async def model_config(
        self, model_name: str, *, timeout_s: float | None = None
    ) -> dict[str, Any]:
        """The config Triton runs the model with (its model config API), as JSON; 64-bit
        numbers come as strings and zero values are left out, as Triton writes them."""
        try:
            answer = await self._client.get_model_config(
                model_name, as_json=True, client_timeout=timeout_s
            )
        except InferenceServerException as exc:
            raise _triton_error(exc) from exc
        return dict(answer.get("config", {}))

    async def is_model_ready(
        self, model_name: str, version: int, *, timeout_s: float | None = None
    ) -> bool:
        """Whether Triton can run this version of the model now."""
        try:
            ready = await self._client.is_model_ready(
                model_name, str(version), client_timeout=timeout_s
            )
        except InferenceServerException as exc:
            raise _triton_error(exc) from exc
        return bool(ready)

    async def is_server_live(self, *, timeout_s: float | None = None) -> bool:
        """Whether Triton answers at all (ready or not: it may be loading a model)."""
        try:
            live = await self._client.is_server_live(client_timeout=timeout_s)
        except InferenceServerException as exc:
            raise _triton_error(exc) from exc
        return bool(live)

    async def statistics(self, *, timeout_s: float | None = None) -> dict[str, Any]:
        """Triton's cumulative inference statistics of every loaded model version, as JSON."""
        try:
            stats = await self._client.get_inference_statistics(
                as_json=True, client_timeout=timeout_s
            )
        except InferenceServerException as exc:
            raise _triton_error(exc) from exc
        return dict(stats)

    async def config_response(
        self, model_name: str, version: str = "", *, timeout_s: float | None = None
    ) -> Any:
        """Triton's `ModelConfigResponse` for the model, as its gRPC API answers it."""
        try:
            return await self._client.get_model_config(
                model_name, version, client_timeout=timeout_s
            )
        except InferenceServerException as exc:
            raise _triton_error(exc) from exc

    async def statistics_response(
        self, model_name: str = "", version: str = "", *, timeout_s: float | None = None
    ) -> Any:
        """Triton's `ModelStatisticsResponse` for the model and version (empty: all of
        them), as its gRPC API answers it."""
        try:
            return await self._client.get_inference_statistics(
                model_name, version, client_timeout=timeout_s
            )
        except InferenceServerException as exc:
            raise _triton_error(exc) from exc

    async def is_server_ready(self, *, timeout_s: float | None = None) -> bool:
        """Whether Triton reports itself ready for inference."""
        try:
            ready = await self._client.is_server_ready(client_timeout=timeout_s)
        except InferenceServerException as exc:
            raise _triton_error(exc) from exc
        return bool(ready)

    async def close(self) -> None:
        """Closes the gRPC channels."""
        await self._client.close()
        if self._raw_channel is not None:
            await self._raw_channel.close()
