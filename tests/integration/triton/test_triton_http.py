"""TritonHttpRunner against a real tritonserver: the same errors as the gRPC runner, deadlines,
a Triton that cannot be reached, its pool of kept-alive connections, and what it does when a
connection is dropped under a request (through a fault-injecting proxy in front of Triton).

What both runners share (answers, batching, NOT_FOUND, spans, the trace inside Triton) is
tested for each in test_triton_server.py."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable
from typing import Literal

import numpy as np
import pytest

from modelserve_demo.fraud import TrainedModel, make_dataset
from modelserve_triton.http import MAX_IDLE, TritonHttpRunner
from modelserve_triton.model_config import build_model_config, model_files
from modelserve_triton.oip import decode_raw
from modelserve_triton.process import TritonServer
from modelserve_triton.runner import TritonError, TritonRunner
from modelserve_triton.runner import encode_request as encode_request_message

FRAUD = "fraud"
OUTPUTS = ("label", "probabilities")
#: How long Triton holds a lone request of the slow model (its batcher's queue delay).
SLOW_DELAY_S = 2.0

pytestmark = pytest.mark.triton


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class TestTritonHttpRunner:
    @pytest.mark.parametrize(
        "inputs",
        [
            {"features": np.zeros((2, 5), np.float32)},
            {"features": np.zeros((2, 8), np.float64)},
            {"amount": np.zeros((2, 8), np.float32)},
        ],
        ids=["shape", "datatype", "name"],
    )
    async def test_a_refused_input_is_the_same_error_as_over_grpc(
        self,
        triton_runner: TritonRunner,
        triton_http_runner: TritonHttpRunner,
        fraud_model: dict[int, TrainedModel],
        inputs: dict[str, np.ndarray],
    ) -> None:
        """Triton's refusal of a bad tensor comes back with the gRPC endpoint's code
        (INVALID_ARGUMENT) and the same message."""
        errors = []
        for runner in (triton_runner, triton_http_runner):
            with pytest.raises(TritonError) as raised:
                await runner.infer(FRAUD, 1, inputs, OUTPUTS, timeout_s=10)
            errors.append((raised.value.status, raised.value.message))

        assert errors[0][0] == "StatusCode.INVALID_ARGUMENT"
        assert errors[1] == errors[0]

    async def test_an_unreachable_triton_is_unavailable(self) -> None:
        """A Triton that does not listen is UNAVAILABLE at once, naming the address."""
        address = f"127.0.0.1:{_free_port()}"
        runner = TritonHttpRunner(address)
        features, _ = make_dataset(1, seed=21)

        with pytest.raises(TritonError) as raised:
            await runner.infer(FRAUD, 1, {"features": features}, OUTPUTS, timeout_s=5)

        assert raised.value.status == "StatusCode.UNAVAILABLE"
        assert address in raised.value.message
        await runner.close()

    async def test_a_late_answer_is_deadline_exceeded_and_reaches_no_one_else(
        self,
        triton_runner: TritonRunner,
        triton_http_runner: TritonHttpRunner,
        fraud_model: dict[int, TrainedModel],
    ) -> None:
        """A call Triton holds past its timeout raises DEADLINE_EXCEEDED, and its connection is
        not reused: the next call, on the same runner, gets its own rows, not the late ones."""
        model = fraud_model[1]
        config = build_model_config(
            "fraud_slow_http",
            model.inputs,
            model.outputs,
            max_queue_delay_us=int(SLOW_DELAY_S * 1e6),
            preferred_batch_sizes=(64,),
        )
        await triton_runner.load("fraud_slow_http", config, model_files({1: model.onnx_bytes}))
        late, _ = make_dataset(1, seed=22)
        mine, _ = make_dataset(3, seed=23)
        runner = TritonHttpRunner(triton_http_runner.url)
        try:
            with pytest.raises(TritonError) as raised:
                await runner.infer("fraud_slow_http", 1, {"features": late}, OUTPUTS, timeout_s=0.2)
            answer = await runner.infer(FRAUD, 1, {"features": mine}, OUTPUTS, timeout_s=10)
            expected = await triton_runner.infer(
                FRAUD, 1, {"features": mine}, OUTPUTS, timeout_s=10
            )
        finally:
            await runner.close()

        assert raised.value.status == "StatusCode.DEADLINE_EXCEEDED"
        assert answer["probabilities"].shape == (3, 2)
        np.testing.assert_array_equal(answer["probabilities"], expected["probabilities"])

    async def test_concurrent_calls_share_a_bounded_pool(
        self,
        triton_runner: TritonRunner,
        triton_server: TritonServer,
        fraud_model: dict[int, TrainedModel],
    ) -> None:
        """Concurrent calls each get their own answer over connections of their own; then at
        most MAX_IDLE are kept, and sequential calls reuse one."""
        runner = TritonHttpRunner(triton_server.http_endpoint, max_idle=4)
        features, _ = make_dataset(16, seed=24)
        try:
            answers = await asyncio.gather(
                *(
                    runner.infer(FRAUD, 2, {"features": features[i : i + 1]}, OUTPUTS, timeout_s=10)
                    for i in range(16)
                )
            )
            expected = await triton_runner.infer(
                FRAUD, 2, {"features": features}, OUTPUTS, timeout_s=10
            )
            kept_after_burst = len(runner._idle)
            for i in range(5):
                await runner.infer(
                    FRAUD, 2, {"features": features[i : i + 1]}, OUTPUTS, timeout_s=10
                )
            kept_after_sequence = len(runner._idle)
        finally:
            await runner.close()

        for i, answer in enumerate(answers):
            np.testing.assert_allclose(
                answer["probabilities"][0], expected["probabilities"][i], rtol=0, atol=1e-6
            )
        assert kept_after_burst == 4
        assert kept_after_sequence == 4
        assert MAX_IDLE >= 16

    async def test_a_connection_closed_while_idle_is_not_used(
        self,
        triton_server: TritonServer,
        fraud_model: dict[int, TrainedModel],
    ) -> None:
        """A kept connection that ended while idle (Triton restarted, a proxy timed it out)
        is dropped, and the call goes out on a new one."""
        runner = TritonHttpRunner(triton_server.http_endpoint)
        features, _ = make_dataset(1, seed=25)
        try:
            await runner.infer(FRAUD, 1, {"features": features}, OUTPUTS, timeout_s=10)
            (idle,) = runner._idle
            idle.transport.get_extra_info("socket").shutdown(socket.SHUT_RDWR)

            async def noticed() -> None:
                while not idle.closed:
                    await asyncio.sleep(0)

            await asyncio.wait_for(noticed(), 5)
            answer = await runner.infer(FRAUD, 1, {"features": features}, OUTPUTS, timeout_s=10)
            (kept,) = runner._idle
        finally:
            await runner.close()

        assert answer["probabilities"].shape == (1, 2)
        assert kept is not idle


Action = Literal["forward", "drop", "half"]


class _FaultyProxy:
    """A TCP proxy in front of Triton's HTTP endpoint that misbehaves on cue.

    It relays each request and its answer whole; `fault(connection, request)` (both counted
    from 0 in arrival order) picks what happens to a request: `forward`; `drop`, the proxy
    closes the connection the moment the request arrives, as a server that closed a kept
    connection just as the request went out; `half`, it relays the request but only half of
    Triton's answer, then closes. `seen` logs every request with what was done to it."""

    def __init__(self, upstream: str, fault: Callable[[int, int], Action]) -> None:
        self._upstream = upstream
        self._fault = fault
        self._connections = 0
        self._server: asyncio.Server | None = None
        self.seen: list[tuple[int, int, Action]] = []

    @property
    def address(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"127.0.0.1:{port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = self._connections
        self._connections += 1
        host, _, port = self._upstream.rpartition(":")
        up_reader, up_writer = await asyncio.open_connection(host, int(port))
        try:
            for index in range(1_000):
                try:
                    request = await _http_message(reader)
                except asyncio.IncompleteReadError:
                    return  # the client closed the connection
                action = self._fault(connection, index)
                self.seen.append((connection, index, action))
                if action == "drop":
                    return
                up_writer.write(request)
                answer = await _http_message(up_reader)
                if action == "half":
                    writer.write(answer[: len(answer) // 2])
                    await writer.drain()
                    return
                writer.write(answer)
                await writer.drain()
        finally:
            for w in (writer, up_writer):
                w.close()
                with contextlib.suppress(ConnectionError):
                    await w.wait_closed()


async def _http_message(reader: asyncio.StreamReader) -> bytes:
    """One HTTP/1.1 request or response with a Content-Length, as the bytes it came in."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return head + await reader.readexactly(length)


@contextlib.asynccontextmanager
async def _through_proxy(
    triton_server: TritonServer, fault: Callable[[int, int], Action]
) -> AsyncIterator[tuple[_FaultyProxy, TritonHttpRunner]]:
    proxy = _FaultyProxy(triton_server.http_endpoint, fault)
    await proxy.start()
    runner = TritonHttpRunner(proxy.address)
    try:
        yield proxy, runner
    finally:
        await runner.close()
        await proxy.close()


class TestDroppedConnections:
    """A kept connection can die at the very moment a request goes out on it: the server (or a
    proxy, or a load balancer) closed it as idle while the request was on the wire. The
    request never reached Triton, so it is sent once more on a new connection. Anything
    else (a new connection dropped, a second drop, a half-given answer) is UNAVAILABLE and
    the request is not sent again. A retry happens inside the call, so once a call has
    failed, the proxy's log holds every attempt it made."""

    async def test_a_kept_connection_dropped_as_the_request_went_out_is_retried_once(
        self,
        triton_runner: TritonRunner,
        triton_server: TritonServer,
        fraud_model: dict[int, TrainedModel],
    ) -> None:
        features, _ = make_dataset(1, seed=28)
        expected = await triton_runner.infer(
            FRAUD, 1, {"features": features}, OUTPUTS, timeout_s=10
        )

        def fault(connection: int, request: int) -> Action:
            return "drop" if (connection, request) == (0, 1) else "forward"

        async with _through_proxy(triton_server, fault) as (proxy, runner):
            await runner.infer(FRAUD, 1, {"features": features}, OUTPUTS, timeout_s=10)
            answer = await runner.infer(FRAUD, 1, {"features": features}, OUTPUTS, timeout_s=10)

        assert proxy.seen == [(0, 0, "forward"), (0, 1, "drop"), (1, 0, "forward")]
        np.testing.assert_allclose(
            answer["probabilities"], expected["probabilities"], rtol=0, atol=1e-6
        )

    async def test_a_second_drop_is_unavailable_and_not_tried_again(
        self,
        triton_runner: TritonRunner,
        triton_server: TritonServer,
        fraud_model: dict[int, TrainedModel],
    ) -> None:
        features, _ = make_dataset(1, seed=29)

        def fault(connection: int, request: int) -> Action:
            return "forward" if (connection, request) == (0, 0) else "drop"

        async with _through_proxy(triton_server, fault) as (proxy, runner):
            await runner.infer(FRAUD, 1, {"features": features}, OUTPUTS, timeout_s=10)
            with pytest.raises(TritonError) as raised:
                await runner.infer(FRAUD, 1, {"features": features}, OUTPUTS, timeout_s=10)

        assert raised.value.status == "StatusCode.UNAVAILABLE"
        assert "closed the connection" in raised.value.message
        assert proxy.seen == [(0, 0, "forward"), (0, 1, "drop"), (1, 0, "drop")]

    async def test_a_new_connection_dropped_is_not_tried_again(
        self,
        triton_runner: TritonRunner,
        triton_server: TritonServer,
        fraud_model: dict[int, TrainedModel],
    ) -> None:
        """A connection that never answered before gives no sign the request was lost to an
        idle timeout: the request is not sent twice."""
        features, _ = make_dataset(1, seed=30)

        def fault(connection: int, request: int) -> Action:
            return "drop"

        async with _through_proxy(triton_server, fault) as (proxy, runner):
            with pytest.raises(TritonError) as raised:
                await runner.infer(FRAUD, 1, {"features": features}, OUTPUTS, timeout_s=10)

        assert raised.value.status == "StatusCode.UNAVAILABLE"
        assert proxy.seen == [(0, 0, "drop")]

    async def test_a_half_given_answer_is_unavailable_and_not_sent_again(
        self,
        triton_runner: TritonRunner,
        triton_server: TritonServer,
        fraud_model: dict[int, TrainedModel],
    ) -> None:
        """Triton saw the request and began to answer: sending it again could run it twice."""
        features, _ = make_dataset(1, seed=31)

        def fault(connection: int, request: int) -> Action:
            return "half" if (connection, request) == (0, 1) else "forward"

        async with _through_proxy(triton_server, fault) as (proxy, runner):
            await runner.infer(FRAUD, 1, {"features": features}, OUTPUTS, timeout_s=10)
            with pytest.raises(TritonError) as raised:
                await runner.infer(FRAUD, 1, {"features": features}, OUTPUTS, timeout_s=10)
            # The runner is still good for the next call, on a new connection.
            answer = await runner.infer(FRAUD, 1, {"features": features}, OUTPUTS, timeout_s=10)

        assert raised.value.status == "StatusCode.UNAVAILABLE"
        assert proxy.seen == [(0, 0, "forward"), (0, 1, "half"), (1, 0, "forward")]
        assert answer["probabilities"].shape == (1, 2)


class TestModelInferRequestOverHttp:
    @pytest.mark.parametrize("outputs", [OUTPUTS, ()], ids=["named-outputs", "all-outputs"])
    async def test_the_answer_is_the_grpc_endpoints_answer(
        self,
        triton_runner: TritonRunner,
        triton_http_runner: TritonHttpRunner,
        fraud_model: dict[int, TrainedModel],
        outputs: tuple[str, ...],
    ) -> None:
        """A ModelInferRequest (raw tensors, a request id, named outputs or none) sent over
        HTTP comes back as the ModelInferResponse Triton's gRPC endpoint answers: the same
        model, version, id, outputs, shapes and bytes."""
        features, _ = make_dataset(4, seed=26)
        request = encode_request_message(FRAUD, 2, {"features": features}, outputs)
        request.id = "req-26"

        over_grpc = await triton_runner.infer_request(request, timeout_s=10)
        over_http = await triton_http_runner.infer_request(request, timeout_s=10)

        assert (over_http.model_name, over_http.model_version, over_http.id) == (
            over_grpc.model_name,
            over_grpc.model_version,
            "req-26",
        )
        assert [(o.name, o.datatype, list(o.shape)) for o in over_http.outputs] == [
            (o.name, o.datatype, list(o.shape)) for o in over_grpc.outputs
        ]
        assert {o.name for o in over_http.outputs} == set(OUTPUTS)
        for index, output in enumerate(over_grpc.outputs):
            raw_http = over_http.raw_output_contents[index]
            np.testing.assert_allclose(
                decode_raw(output.datatype, tuple(output.shape), raw_http),
                decode_raw(
                    output.datatype, tuple(output.shape), over_grpc.raw_output_contents[index]
                ),
                rtol=0,
                atol=1e-6,
            )

    async def test_a_refused_request_is_the_same_error(
        self,
        triton_runner: TritonRunner,
        triton_http_runner: TritonHttpRunner,
        fraud_model: dict[int, TrainedModel],
    ) -> None:
        """A request for a version Triton does not hold fails with the gRPC endpoint's code
        and message."""
        features, _ = make_dataset(1, seed=27)
        request = encode_request_message(FRAUD, 9, {"features": features}, OUTPUTS)
        errors = []
        for runner in (triton_runner, triton_http_runner):
            with pytest.raises(TritonError) as raised:
                await runner.infer_request(request, timeout_s=10)
            errors.append((raised.value.status, raised.value.message))

        assert errors[0][0] == "StatusCode.NOT_FOUND"
        assert errors[1] == errors[0]
