"""Triton's own per-version statistics (requests, queue and compute time, batch sizes) on /metrics.

A background task reads Triton's statistics API every few seconds; a Prometheus collector
exposes the latest reading as counters. Triton's counters restart from zero when Triton
restarts, which Prometheus treats as a counter reset.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import structlog
from prometheus_client import REGISTRY
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

log = structlog.get_logger()

_PHASES = ("input", "infer", "output")


@dataclass(frozen=True, slots=True)
class VersionStatistics:
    """Cumulative counts of one model version inside Triton."""

    model: str
    version: str
    requests: int = 0
    failures: int = 0
    inferences: int = 0
    executions: int = 0
    queue_seconds: float = 0.0
    compute_seconds: dict[str, float] = field(default_factory=dict)
    """Per phase: input (copying in), infer (running the model), output (copying out)."""
    batch_executions: dict[int, int] = field(default_factory=dict)
    """How many executions Triton ran at each batch size its dynamic batcher formed."""


def _int(value: Any) -> int:
    # Triton's JSON writes 64-bit counts as strings and leaves zeros out.
    return int(value or 0)


def parse_statistics(stats: dict[str, Any]) -> list[VersionStatistics]:
    """Triton's statistics response (JSON) as one record per model version."""
    parsed = []
    for model in stats.get("model_stats", []):
        inference = model.get("inference_stats", {})
        parsed.append(
            VersionStatistics(
                model=model.get("name", ""),
                version=model.get("version", ""),
                requests=_int(inference.get("success", {}).get("count")),
                failures=_int(inference.get("fail", {}).get("count")),
                inferences=_int(model.get("inference_count")),
                executions=_int(model.get("execution_count")),
                queue_seconds=_int(inference.get("queue", {}).get("ns")) / 1e9,
                compute_seconds={
                    phase: _int(inference.get(f"compute_{phase}", {}).get("ns")) / 1e9
                    for phase in _PHASES
                },
                batch_executions={
                    _int(batch.get("batch_size")): _int(batch.get("compute_infer", {}).get("count"))
                    for batch in model.get("batch_stats", [])
                },
            )
        )
    return parsed


class TritonStatistics:
    """Keeps the latest reading of Triton's statistics, refreshed every `interval_s`."""

    def __init__(self, read: Callable[[], Awaitable[dict[str, Any]]], *, interval_s: float) -> None:
        self._read = read
        self._interval_s = interval_s
        self.latest: list[VersionStatistics] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Starts polling, and exports the readings through the process's /metrics."""
        _COLLECTOR.sources.add(self)
        _COLLECTOR.register_once()
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="triton-statistics")

    async def close(self) -> None:
        """Stops polling and exporting."""
        _COLLECTOR.sources.discard(self)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def refresh(self) -> None:
        """Reads Triton's statistics once."""
        self.latest = parse_statistics(await self._read())

    async def _run(self) -> None:
        failing = False
        while True:
            try:
                await self.refresh()
                failing = False
            except Exception as exc:  # Triton down or restarting: keep the last reading
                if not failing:
                    log.warning("triton_statistics_unavailable", error=str(exc))
                failing = True
            await asyncio.sleep(self._interval_s)


class _TritonCollector(Collector):
    """Exposes the latest reading of every running TritonStatistics as counters."""

    def __init__(self) -> None:
        self.sources: weakref.WeakSet[TritonStatistics] = weakref.WeakSet()
        self._registered = False

    def register_once(self) -> None:
        if not self._registered:
            REGISTRY.register(self)
            self._registered = True

    def collect(self) -> Iterator[Metric]:
        labels = ["model", "version"]
        requests = CounterMetricFamily(
            "modelserve_triton_requests", "Requests Triton answered, per version.", labels=labels
        )
        failures = CounterMetricFamily(
            "modelserve_triton_request_failures", "Requests Triton failed.", labels=labels
        )
        inferences = CounterMetricFamily(
            "modelserve_triton_inferences",
            "Rows Triton ran (a batch of 4 counts 4).",
            labels=labels,
        )
        executions = CounterMetricFamily(
            "modelserve_triton_executions", "Model executions (batches) Triton ran.", labels=labels
        )
        queue = CounterMetricFamily(
            "modelserve_triton_queue_seconds",
            "Time requests waited in Triton's queue.",
            labels=labels,
        )
        compute = CounterMetricFamily(
            "modelserve_triton_compute_seconds",
            "Time Triton spent on requests, by phase (input, infer, output).",
            labels=[*labels, "phase"],
        )
        batches = CounterMetricFamily(
            "modelserve_triton_batch_executions",
            "Executions at each batch size the dynamic batcher formed.",
            labels=[*labels, "batch_size"],
        )
        for source in list(self.sources):
            for stats in source.latest:
                key = [stats.model, stats.version]
                requests.add_metric(key, stats.requests)
                failures.add_metric(key, stats.failures)
                inferences.add_metric(key, stats.inferences)
                executions.add_metric(key, stats.executions)
                queue.add_metric(key, stats.queue_seconds)
                for phase, seconds in stats.compute_seconds.items():
                    compute.add_metric([*key, phase], seconds)
                for size, count in sorted(stats.batch_executions.items()):
                    batches.add_metric([*key, str(size)], count)
        yield from (requests, failures, inferences, executions, queue, compute, batches)


_COLLECTOR = _TritonCollector()
