"""One /metrics for a service that runs as several processes (`server.workers` > 1).

The first process keeps its metrics in memory as a single process does. The workers it
starts write theirs to files in a directory of its own (prometheus_client's multiprocess
mode: `PROMETHEUS_MULTIPROC_DIR` in their environment, set before they import anything).
The first process's /metrics then answers both together: a counter or histogram series is the
sum over every process, the workers that have exited included, so totals never go back; a
gauge's series carry the worker's `pid` beside its own labels, and go with the worker
(gauges are declared `multiprocess_mode="liveall"`).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

#: Where a worker writes its metrics: prometheus_client reads it when it is imported.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: Kinds whose series from several processes add up.
_SUMMED = frozenset({"counter", "histogram", "summary"})


class WorkerMetrics:
    """The workers' metrics directory, and the registry that answers for every process."""

    def __init__(self, own: CollectorRegistry = REGISTRY) -> None:
        """`own`: where this process's metrics are (prometheus_client's default registry)."""
        self.directory = Path(tempfile.mkdtemp(prefix="modelserve-metrics-"))
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_Merged(own, self.directory))

    def worker_env(self) -> dict[str, str]:
        """What a worker needs in its environment to write its metrics here."""
        return {MULTIPROC_ENV: str(self.directory)}

    def worker_exited(self, pid: int) -> None:
        """Drops the gauges of a worker that has gone (its counters keep counting)."""
        mark_process_dead(pid, str(self.directory))  # type: ignore[no-untyped-call]

    def close(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


class _Merged(Collector):
    """This process's metrics (`own`) with the workers' (files in `directory`) added in."""

    def __init__(self, own: CollectorRegistry, directory: Path) -> None:
        self._own = own
        self._directory = directory

    def collect(self) -> Iterable[Metric]:
        families = {family.name: family for family in self._own.collect()}
        # prometheus_client's multiprocess module has no type hints.
        workers = MultiProcessCollector(None, path=str(self._directory))  # type: ignore[no-untyped-call]
        for theirs in workers.collect():  # type: ignore[no-untyped-call]
            mine = families.get(theirs.name)
            if mine is None:
                families[theirs.name] = theirs
                continue
            if mine.type != theirs.type:
                continue  # not the same metric: this process's stands
            mine.samples = _merge(mine.samples, theirs.samples, summed=mine.type in _SUMMED)
        return families.values()


def _merge(mine: list[Sample], theirs: list[Sample], *, summed: bool) -> list[Sample]:
    """`mine` with `theirs` added: a series both have is summed (for kinds that add up),
    any other is appended."""
    index = {(s.name, tuple(sorted(s.labels.items()))): i for i, s in enumerate(mine)}
    merged = list(mine)
    for sample in theirs:
        at = index.get((sample.name, tuple(sorted(sample.labels.items()))))
        if at is not None and summed:
            merged[at] = merged[at]._replace(value=merged[at].value + sample.value)
        elif at is None:
            index[(sample.name, tuple(sorted(sample.labels.items())))] = len(merged)
            merged.append(sample)
    return merged
