"""Warmup before READY, and Triton's own per-version statistics on /metrics."""

from __future__ import annotations

import pytest
from inference_testing import MODEL_ID, V1, RunningInference, infer, infer_request, load
from prometheus_client import REGISTRY, generate_latest
from structlog.testing import capture_logs
from support import eventually

from modelserve.inference.v1 import inference_service_pb2 as pb
from modelserve_triton.runner import TritonRunner

pytestmark = pytest.mark.triton


class TestWarmup:
    async def test_version_is_warmed_at_each_batch_size_before_ready(
        self, inference_service: RunningInference
    ) -> None:
        """LoadModelVersion answers READY only after Triton has run the version at batch sizes
        1, 8 and 64 on synthesized inputs."""
        with capture_logs() as logs:
            loaded = await load(inference_service.stub, V1)

        events = [(e["event"], e.get("version")) for e in logs if e.get("version") == V1]
        assert events[-2:] == [("model_version_warmed", V1), ("model_version_ready", V1)]
        triton = TritonRunner(loaded.triton_endpoint)
        batch_sizes: set[int] = set()

        async def warmed_at_every_size() -> bool:
            # Triton records a batch in its statistics a moment after answering it.
            stats = await triton.statistics(timeout_s=5)
            (version,) = [
                m for m in stats["model_stats"] if (m["name"], m["version"]) == (MODEL_ID, "1")
            ]
            batch_sizes.update(int(b["batch_size"]) for b in version["batch_stats"])
            return batch_sizes >= {1, 8, 64}

        try:
            await eventually(
                warmed_at_every_size, "batches of 1, 8 and 64 in Triton's statistics", within_s=5
            )
        finally:
            await triton.close()


def _sample(name: str, **labels: str) -> float | None:
    """The value of one sample in the process's /metrics text, or None when absent."""
    for family in REGISTRY.collect():
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None


class TestTritonStatistics:
    async def test_per_version_counts_times_and_batch_sizes_reach_metrics(
        self, inference_service: RunningInference
    ) -> None:
        """After requests to a version, /metrics carries Triton's request count, queue and
        compute time and batch sizes for it, refreshed by the poller."""
        stub = inference_service.stub
        await load(stub, V1)
        await inference_service.app.statistics.refresh()
        before = _sample("modelserve_triton_requests_total", model=MODEL_ID, version="1") or 0.0

        for _ in range(3):
            await infer(stub, infer_request(V1))

        await eventually(
            lambda: (
                (_sample("modelserve_triton_requests_total", model=MODEL_ID, version="1") or 0.0)
                >= before + 3
            ),
            "the statistics poller picking up the requests",
        )
        labels = {"model": MODEL_ID, "version": "1"}
        text = generate_latest(REGISTRY).decode()
        assert (_sample("modelserve_triton_executions_total", **labels) or 0) >= 3
        assert (_sample("modelserve_triton_inferences_total", **labels) or 0) >= 12
        assert _sample("modelserve_triton_queue_seconds_total", **labels) is not None
        assert (
            _sample("modelserve_triton_compute_seconds_total", phase="infer", **labels) or 0
        ) > 0
        assert (
            _sample("modelserve_triton_batch_executions_total", batch_size="4", **labels) or 0
        ) >= 3
        assert "# TYPE modelserve_triton_requests_total counter" in text


def _states(model: str, version: str) -> dict[str, float]:
    """The version's modelserve_inference_version_state series, by state."""
    return {
        sample.labels["state"]: float(sample.value)
        for family in REGISTRY.collect()
        for sample in family.samples
        if sample.name == "modelserve_inference_version_state"
        and (sample.labels["model"], sample.labels["version"]) == (model, version)
    }


class TestVersionStates:
    async def test_each_held_version_and_triton_are_on_metrics(
        self, inference_service: RunningInference
    ) -> None:
        """A loaded version has one state series, READY on the CPU, and Triton is up; once
        unloaded, the version has none."""
        stub = inference_service.stub
        await load(stub, V1)
        assert _states(MODEL_ID, "1") == {"READY": 1.0}
        (ready,) = [
            s
            for f in REGISTRY.collect()
            for s in f.samples
            if s.name == "modelserve_inference_version_state" and s.labels["version"] == "1"
        ]
        assert ready.labels["device"] == "cpu"
        assert _sample("modelserve_inference_triton_up") == 1.0

        await stub.UnloadModelVersion(pb.UnloadModelVersionRequest(name=V1))
        assert _states(MODEL_ID, "1") == {}
        assert (
            "# TYPE modelserve_inference_version_state gauge" in generate_latest(REGISTRY).decode()
        )
