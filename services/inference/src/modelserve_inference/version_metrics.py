"""The versions inference holds, on /metrics: one series per version and the state it is in,
and whether Triton is up, so that a dashboard or an alert sees a FAILED load or a Triton
restart without calling `ListModelVersions`."""

from __future__ import annotations

import weakref
from collections.abc import Iterator

from prometheus_client import REGISTRY
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from modelserve_inference.models import ModelVersions


class _VersionStates(Collector):
    """Reads every exporting ModelVersions at each scrape."""

    def __init__(self) -> None:
        self.sources: weakref.WeakSet[ModelVersions] = weakref.WeakSet()
        self._registered = False

    def export(self, versions: ModelVersions) -> None:
        self.sources.add(versions)
        if not self._registered:
            REGISTRY.register(self)
            self._registered = True

    def collect(self) -> Iterator[Metric]:
        states = GaugeMetricFamily(
            "modelserve_inference_version_state",
            "Model versions inference holds: 1 in the state each is in (LOADING, WARMING, "
            "READY, FAILED, UNLOADING), with the device its instances run on.",
            labels=["model", "version", "state", "device"],
        )
        up = GaugeMetricFamily(
            "modelserve_inference_triton_up",
            "1 while Triton answers and holds every version it should; 0 from the moment it "
            "is found down until every version is loaded again.",
        )
        for versions in list(self.sources):
            for held in versions.list():
                states.add_metric([held.model, str(held.version), held.state.value, held.device], 1)
            up.add_metric([], 1 if versions.triton_up else 0)
        yield states
        yield up


_STATES = _VersionStates()


def export_version_states(versions: ModelVersions) -> None:
    """Puts `versions` on this process's /metrics, until `stop_exporting` (or it is gone)."""
    _STATES.export(versions)


def stop_exporting(versions: ModelVersions) -> None:
    """Takes `versions` off /metrics."""
    _STATES.sources.discard(versions)
