"""Integration tests against a real tritonserver: lifecycle, model control, inference, traces."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import psutil
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, SpanContext, SpanKind
from otlp_receiver import OtlpReceiver
from support import eventually
from tritonclient.grpc.aio import InferenceServerClient

from modelserve_demo.fraud import TrainedModel, make_dataset
from modelserve_triton.http import TritonHttpRunner
from modelserve_triton.model_config import build_model_config, model_files
from modelserve_triton.process import TritonOptions, TritonServer, TritonStartError
from modelserve_triton.runner import TritonError, TritonRunner

FRAUD = "fraud"
OUTPUTS = ("label", "probabilities")

pytestmark = pytest.mark.triton


def _onnxruntime(model: TrainedModel, features: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.onnx_bytes, providers=["CPUExecutionProvider"])
    probabilities: np.ndarray = session.run(["probabilities"], {"features": features})[0]
    return probabilities


class TestTritonServer:
    async def test_started_server_is_ready(
        self, triton_server: TritonServer, triton_runner: TritonRunner
    ) -> None:
        """start() returns only once Triton answers ready, on the endpoints it reports."""
        assert await triton_runner.is_server_ready()
        assert triton_server.grpc_endpoint.startswith("127.0.0.1:")
        assert triton_server.pid is not None and psutil.pid_exists(triton_server.pid)

    async def test_start_fails_fast_with_the_log_when_triton_exits(self, tmp_path: Path) -> None:
        """A tritonserver that exits at once fails start() at once, with its log in the error."""
        server = TritonServer(TritonOptions(work_dir=tmp_path, extra_args=("--rate-limit=bogus",)))
        started = time.monotonic()

        with pytest.raises(TritonStartError, match="invalid argument for --rate-limit"):
            await server.start(timeout=60)

        assert time.monotonic() - started < 15

    def test_flags_it_sets_itself_cannot_be_given_again(self, tmp_path: Path) -> None:
        """extra_args may add flags, not override the repository, model control, ports or
        TLS that the server and its supervisor rely on."""
        with pytest.raises(ValueError, match="--model-control-mode is set by modelserve"):
            TritonOptions(work_dir=tmp_path, extra_args=("--model-control-mode=poll",))
        with pytest.raises(ValueError, match="'grpc-port=1' is not a tritonserver flag"):
            TritonOptions(work_dir=tmp_path, extra_args=("grpc-port=1",))

    async def test_a_failed_restart_can_be_tried_again(self, tmp_path: Path) -> None:
        """A restart whose new process is not ready in time fails, and leaves the server able
        to restart again: a supervisor retrying after one bad start recovers."""
        server = TritonServer(TritonOptions(work_dir=tmp_path))
        await server.start()
        try:
            assert server.pid is not None
            psutil.Process(server.pid).kill()
            await server.wait_exited()
            # Given no time to get ready, the next tritonserver fails the restart (and is
            # killed), as one that crashes at once does.
            with pytest.raises(TritonStartError, match="not ready after"):
                await server.restart(timeout=0.01)
            await server.restart(timeout=60)
            runner = TritonRunner(server.grpc_endpoint)
            try:
                assert await runner.is_server_ready()
            finally:
                await runner.close()
        finally:
            await server.stop()

    async def test_stop_ends_the_server_and_its_stubs(
        self, tmp_path: Path, fraud_models: dict[int, TrainedModel]
    ) -> None:
        """stop() leaves neither tritonserver nor the python-backend stubs it started."""
        server = TritonServer(TritonOptions(work_dir=tmp_path))
        await server.start()
        runner = TritonRunner(server.grpc_endpoint)
        try:
            model = fraud_models[1]
            config = build_model_config(FRAUD, model.inputs, model.outputs)
            await runner.load(FRAUD, config, model_files({1: model.onnx_bytes}))
        finally:
            await runner.close()
        assert server.pid is not None
        process = psutil.Process(server.pid)
        children = process.children(recursive=True)
        assert any(child.name() == "triton_python_backend_stub" for child in children)

        await server.stop()

        _, alive = psutil.wait_procs([process, *children], timeout=0)
        assert alive == []

    async def test_the_server_and_its_stubs_end_with_the_process_that_started_it(
        self, tmp_path: Path
    ) -> None:
        """A service killed with SIGKILL (no chance to stop Triton) leaves neither
        tritonserver nor its python-backend stubs behind: Linux ends the server with its
        parent, and the server its stubs."""
        script = tmp_path / "owner.py"
        script.write_text(_OWNER)
        owner = await asyncio.create_subprocess_exec(
            sys.executable, str(script), str(tmp_path / "work"), stdout=asyncio.subprocess.PIPE
        )
        try:
            assert owner.stdout is not None
            async with asyncio.timeout(120):
                line = b""
                while not line.startswith(b"PID "):  # after the owner's own log lines
                    line = await owner.stdout.readline()
                    assert line, "the owner exited before Triton was up"
            server = psutil.Process(int(line.split()[1]))
            assert server.name() == "tritonserver"
            stubs = server.children(recursive=True)
            assert [stub.name() for stub in stubs] == ["triton_python_backend_stub"]
        finally:
            owner.kill()
            await owner.wait()
        _, alive = await asyncio.to_thread(psutil.wait_procs, [server, *stubs], timeout=60)
        for process in alive:  # a failing run leaves nothing behind either
            process.kill()
        assert alive == []


#: A service's part in the test above: start Triton, load a model (its stub), say Triton's pid.
_OWNER = """
import asyncio, sys
from pathlib import Path
from modelserve_demo.fraud import train
from modelserve_triton.model_config import build_model_config, model_files
from modelserve_triton.process import TritonOptions, TritonServer
from modelserve_triton.runner import TritonRunner

async def main() -> None:
    server = TritonServer(TritonOptions(work_dir=Path(sys.argv[1])))
    await server.start()
    model = train(seed=0)
    runner = TritonRunner(server.grpc_endpoint)
    config = build_model_config("fraud", model.inputs, model.outputs)
    await runner.load("fraud", config, model_files({1: model.onnx_bytes}))
    print("PID", server.pid, flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


class TestTritonRunner:
    async def test_each_version_answers_as_onnxruntime_does(
        self, infer_runner: TritonRunner | TritonHttpRunner, fraud_model: dict[int, TrainedModel]
    ) -> None:
        """Both loaded versions answer a 5-row batch with their own model's probabilities."""
        features, _ = make_dataset(5, seed=11)
        answers = {}
        for version, model in fraud_model.items():
            outputs = await infer_runner.infer(
                FRAUD, version, {"features": features}, OUTPUTS, timeout_s=10
            )
            expected = _onnxruntime(model, features)
            np.testing.assert_allclose(outputs["probabilities"], expected, rtol=0, atol=1e-5)
            # A batch-only output is served as [N, 1]: Triton's dims [1] + reshape [].
            assert outputs["label"].shape == (5, 1)
            np.testing.assert_array_equal(outputs["label"][:, 0], expected.argmax(axis=1))
            answers[version] = outputs["probabilities"]
        assert not np.allclose(answers[1], answers[2])

    async def test_concurrent_rows_are_batched_and_split_back(
        self,
        triton_server: TritonServer,
        triton_runner: TritonRunner,
        infer_runner: TritonRunner | TritonHttpRunner,
        fraud_model: dict[int, TrainedModel],
    ) -> None:
        """32 concurrent single-row calls run in shared batches, and each gets its own row."""
        # A 20 ms queue delay lets the batcher gather the calls however busy the machine is;
        # with the default delay of 0, batching depends on calls arriving while one runs.
        model = fraud_model[1]
        config = build_model_config(
            "fraud_batched", model.inputs, model.outputs, max_queue_delay_us=20_000
        )
        await triton_runner.load("fraud_batched", config, model_files({1: model.onnx_bytes}))
        features, _ = make_dataset(32, seed=12)
        expected = [_onnxruntime(model, features[i : i + 1]) for i in range(32)]
        stats = InferenceServerClient(triton_server.grpc_endpoint)
        try:
            before = await _counts(stats, "fraud_batched")

            answers = await asyncio.gather(
                *(
                    infer_runner.infer(
                        "fraud_batched", 1, {"features": features[i : i + 1]}, OUTPUTS, timeout_s=10
                    )
                    for i in range(32)
                )
            )

            # Triton may answer a request before it adds it to its statistics.
            async def all_counted() -> bool:
                counts = np.subtract(await _counts(stats, "fraud_batched"), before)
                return bool(counts[0] >= 32)

            await eventually(all_counted, "all 32 inferences in Triton's statistics")
            inferences, executions = np.subtract(await _counts(stats, "fraud_batched"), before)
        finally:
            await stats.close()
        for answer, row in zip(answers, expected, strict=True):
            assert answer["probabilities"].shape == (1, 2)
            np.testing.assert_allclose(answer["probabilities"], row, rtol=0, atol=1e-5)
        assert inferences == 32
        assert executions < inferences, "Triton never batched requests together"

    async def test_unload_makes_the_model_unready(
        self, triton_runner: TritonRunner, fraud_models: dict[int, TrainedModel]
    ) -> None:
        """After unload, Triton no longer reports the version ready."""
        model = fraud_models[1]
        config = build_model_config("fraud_unload", model.inputs, model.outputs)
        await triton_runner.load("fraud_unload", config, model_files({1: model.onnx_bytes}))
        assert await triton_runner.is_model_ready("fraud_unload", 1)

        await triton_runner.unload("fraud_unload")

        assert not await triton_runner.is_model_ready("fraud_unload", 1)

    async def test_unknown_model_raises_triton_error(
        self, infer_runner: TritonRunner | TritonHttpRunner
    ) -> None:
        """Inference on a model Triton does not know raises TritonError with NOT_FOUND."""
        features, _ = make_dataset(1, seed=13)

        with pytest.raises(TritonError) as raised:
            await infer_runner.infer(
                "no_such_model", 1, {"features": features}, OUTPUTS, timeout_s=5
            )

        assert raised.value.status == "StatusCode.NOT_FOUND"

    async def test_infer_records_a_client_span(
        self,
        infer_runner: TritonRunner | TritonHttpRunner,
        fraud_model: dict[int, TrainedModel],
        client_spans: InMemorySpanExporter,
    ) -> None:
        """Each call is a CLIENT span "triton.infer" naming the model and version, linked to
        the spans it is given (the other requests of a coalesced call)."""
        client_spans.clear()
        features, _ = make_dataset(1, seed=14)
        other = SpanContext(trace_id=7, span_id=9, is_remote=True)

        await infer_runner.infer(
            FRAUD, 2, {"features": features}, OUTPUTS, timeout_s=10, links=[Link(other)]
        )

        (span,) = client_spans.get_finished_spans()
        assert [link.context for link in span.links] == [other]
        assert span.name == "triton.infer"
        assert span.kind is SpanKind.CLIENT
        assert span.attributes is not None
        assert span.attributes["model.name"] == FRAUD
        assert span.attributes["model.version"] == 2

    async def test_triton_continues_the_callers_trace(
        self,
        infer_runner: TritonRunner | TritonHttpRunner,
        fraud_model: dict[int, TrainedModel],
        client_spans: InMemorySpanExporter,
        triton_otlp: OtlpReceiver,
        triton_server: TritonServer,
    ) -> None:
        """Triton's spans for a call join our trace, under our triton.infer span."""
        client_spans.clear()
        features, _ = make_dataset(1, seed=15)

        # (trace id, span id) of each call's triton.infer span: this call's and those sent
        # while waiting. Triton was seen leaving an odd request's spans unexported while it
        # exported later ones, so the first call whose spans arrive is checked.
        calls: list[tuple[str, str]] = []

        async def call() -> None:
            await infer_runner.infer(FRAUD, 1, {"features": features}, OUTPUTS, timeout_s=10)
            span = client_spans.get_finished_spans()[-1]
            assert span.name == "triton.infer"
            calls.append(
                (format(span.context.trace_id, "032x"), format(span.context.span_id, "016x"))
            )

        def joined() -> tuple[str, str] | None:
            return next(
                (
                    (trace_id, span_id)
                    for trace_id, span_id in calls
                    if any(s.parent_span_id == span_id for s in triton_otlp.trace(trace_id))
                ),
                None,
            )

        await call()
        await eventually(
            lambda: joined() is not None,
            "a Triton span whose parent is our triton.infer span",
            nudge=call,
            explain=lambda: (
                f"our spans {calls}\n" + triton_otlp.describe(calls[0][0], triton_server.log_path)
            ),
        )
        found = joined()
        assert found is not None
        assert {s.service for s in triton_otlp.trace(found[0])} == {"triton"}


async def _counts(client: InferenceServerClient, model_name: str = FRAUD) -> tuple[int, int]:
    """(inference count, execution count) of version 1 of a model so far."""
    stats = await client.get_inference_statistics(model_name, "1", as_json=True)
    (model,) = stats["model_stats"]
    return int(model.get("inference_count", 0)), int(model.get("execution_count", 0))
