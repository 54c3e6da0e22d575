"""The first process's /metrics over its own metrics and its workers' (`WorkerMetrics`): a
real worker process writes its metrics in prometheus_client's multiprocess mode."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from modelserve_runtime.worker_metrics import MULTIPROC_ENV, WorkerMetrics

WORKER = """
from prometheus_client import Counter, Gauge
calls = Counter("demo_calls", "Calls.", ["method"])
calls.labels("a").inc(3)
calls.labels("b").inc(1)
Gauge("demo_buffered", "Buffered.", multiprocess_mode="liveall").set(7)
"""


@pytest.fixture
def own() -> CollectorRegistry:
    """This process's metrics, as the first process keeps them."""
    return CollectorRegistry()


@pytest.fixture
def metrics(own: CollectorRegistry) -> Iterator[WorkerMetrics]:
    created = WorkerMetrics(own)
    yield created
    created.close()


def _worker(metrics: WorkerMetrics) -> int:
    env = {**os.environ, **metrics.worker_env()}
    done = subprocess.run([sys.executable, "-c", WORKER], env=env, check=True, timeout=60)
    assert done.returncode == 0
    return _pid_of(metrics)


def _pid_of(metrics: WorkerMetrics) -> int:
    (gauge,) = [p for p in metrics.directory.iterdir() if p.name.startswith("gauge_liveall")]
    return int(gauge.stem.rsplit("_", 1)[1])


def _samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if not s.name.endswith("_created")
    }


class TestWorkerMetrics:
    def test_counters_add_up_and_gauges_carry_the_workers_pid(
        self, metrics: WorkerMetrics, own: CollectorRegistry
    ) -> None:
        Counter("demo_calls", "Calls.", ["method"], registry=own).labels("a").inc(2)
        Gauge("demo_buffered", "Buffered.", registry=own).set(1)
        pid = _worker(metrics)

        samples = _samples(metrics.registry)

        assert metrics.worker_env() == {MULTIPROC_ENV: str(metrics.directory)}
        assert samples[("demo_calls_total", (("method", "a"),))] == 5.0
        assert samples[("demo_calls_total", (("method", "b"),))] == 1.0
        assert samples[("demo_buffered", ())] == 1.0
        assert samples[("demo_buffered", (("pid", str(pid)),))] == 7.0

    def test_a_worker_gone_keeps_its_counts_and_drops_its_gauges(
        self, metrics: WorkerMetrics
    ) -> None:
        pid = _worker(metrics)

        metrics.worker_exited(pid)
        samples = _samples(metrics.registry)

        assert samples[("demo_calls_total", (("method", "a"),))] == 3.0
        assert not [key for key in samples if key[0] == "demo_buffered"]

    def test_close_removes_the_directory(self, own: CollectorRegistry) -> None:
        metrics = WorkerMetrics(own)
        assert metrics.directory.is_dir()
        metrics.close()
        assert not metrics.directory.exists()
