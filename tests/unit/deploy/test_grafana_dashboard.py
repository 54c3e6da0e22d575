"""The Grafana dashboard (`deploy/grafana/modelserve.json`) asks Prometheus only for what the
services export: every metric it names is one a service registers, with the suffix its type
gives it; every label it selects or groups by is one that metric carries; and the label
values it matches (services, methods, windows, states) are ones the code writes. No Grafana
or Prometheus runs here, so this is what can be checked of it."""

from __future__ import annotations

import importlib
import json
import pkgutil
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from prometheus_client.metrics import MetricWrapperBase
from tritonclient.grpc import service_pb2 as oip_pb2

from modelserve.router.v1 import router_service_pb2
from modelserve_inference.models import HeldVersion, ModelVersions, VersionState
from modelserve_inference.triton_stats import TritonStatistics
from modelserve_inference.version_metrics import export_version_states, stop_exporting
from modelserve_inference.workers import OwnerLoads
from modelserve_monitor.alerts import AlertState
from modelserve_monitor.metrics import WINDOWS
from modelserve_triton.runner import TritonRunner

ROOT = Path(__file__).resolve().parents[3]
DASHBOARD: dict[str, Any] = json.loads((ROOT / "deploy/grafana/modelserve.json").read_text())
#: Packages whose modules define the services' metrics.
PACKAGES = (
    "modelserve_runtime",
    "modelserve_features",
    "modelserve_router",
    "modelserve_feature",
    "modelserve_inference",
    "modelserve_registry",
    "modelserve_monitor",
)
#: Labels Prometheus adds to every series it scrapes.
TARGET_LABELS = {"job", "instance"}
#: What each wrapped metric type's samples are called.
SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
}
#: The label values the dashboard may match, where the code fixes them.
VALUES = {
    "service": {"router", "feature", "inference", "registry", "monitor"},
    "window": set(WINDOWS.values()),
    "state": {s.value for s in AlertState} | {s.value for s in VersionState},
    "quantile": {"0.5", "0.95", "0.99"},
    "code": {"OK"},
    "result": {"hit", "miss", "fallback"},
    "degraded": {"true", "false"},
}
_METRIC = re.compile(r"\b(modelserve_[a-z0-9_]+)\s*(?:\{([^}]*)\})?")
_MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")


def _panels() -> Iterator[dict[str, Any]]:
    for panel in DASHBOARD["panels"]:
        yield panel
        yield from panel.get("panels", [])


def _exprs() -> Iterator[tuple[str, str]]:
    for panel in _panels():
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]


def _methods() -> set[str]:
    """Every RPC method the services serve, as `Service/Method` and bare `Method`."""
    names: set[str] = set()
    for module in (router_service_pb2, oip_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                names.add(method.name)
    for package in ("feature", "inference", "registry", "monitor"):
        module = importlib.import_module(f"modelserve.{package}.v1.{package}_service_pb2")
        for service in module.DESCRIPTOR.services_by_name.values():
            names.update(method.name for method in service.methods)
    return names


@pytest.fixture(scope="module")
async def exported() -> dict[str, set[str]]:
    """Every sample name the services can export, with its labels: the metrics their modules
    define, and what inference's two collectors yield with a version to report on."""
    catalogue: dict[str, set[str]] = {}
    for package in PACKAGES:
        root = importlib.import_module(package)
        for info in pkgutil.walk_packages(root.__path__, f"{package}."):
            module = importlib.import_module(info.name)
            for value in vars(module).values():
                if isinstance(value, MetricWrapperBase):
                    # The label names are private to prometheus_client; its families without
                    # samples do not carry them.
                    labels = set(value._labelnames)
                    for suffix in SUFFIXES[value._type]:
                        extra = {"le"} if suffix == "_bucket" else set()
                        name = value._name + suffix
                        catalogue[name] = labels | extra

    versions = ModelVersions(
        OwnerLoads(),
        TritonRunner("127.0.0.1:1"),
        triton_endpoint="127.0.0.1:1",
        max_batch_size=8,
        max_queue_delay_us=0,
        infer_timeout_s=1,
        load_timeout_s=1,
    )
    versions.mirror(
        [HeldVersion(name="models/m/versions/1", model="m", version=1, state=VersionState.READY)],
        initial=True,
    )
    export_version_states(versions)

    async def read() -> dict[str, Any]:
        batch = {"batch_size": 4, "compute_infer": {"count": "1"}}
        return {"model_stats": [{"name": "m", "version": "1", "batch_stats": [batch]}]}

    statistics = TritonStatistics(read, interval_s=3600)
    statistics.start()
    await statistics.refresh()
    try:
        for family in REGISTRY.collect():
            for sample in family.samples:
                if sample.name.startswith("modelserve_"):
                    catalogue.setdefault(sample.name, set()).update(sample.labels)
    finally:
        await statistics.close()
        stop_exporting(versions)
    return catalogue


def test_every_metric_and_label_is_one_the_services_export(exported: dict[str, set[str]]) -> None:
    """Each metric a query names is exported under that name; each label it matches is one
    of that metric's; each label it groups or joins by is one of the query's metrics'."""
    named = set()
    for title, expr in _exprs():
        labels_here: set[str] = set(TARGET_LABELS)
        for name, matchers in _METRIC.findall(expr):
            assert name in exported, f"{title}: {name} is not exported"
            named.add(name)
            labels_here |= exported[name]
            for label, _, _ in _MATCHER.findall(matchers):
                assert label in exported[name] | TARGET_LABELS, f"{title}: {name}{{{label}}}"
        for grouping in _GROUPING.findall(expr):
            for label in filter(None, (x.strip() for x in grouping.split(","))):
                assert label in labels_here, f"{title}: by ({label})"
    # The dashboard covers each service's own metrics, not only the shared RPC ones.
    for prefix in ("router", "feature", "triton", "inference", "monitor", "prediction_log"):
        assert any(n.startswith(f"modelserve_{prefix}_") for n in named), prefix


def test_matched_values_are_ones_the_code_writes() -> None:
    """`service`, `window`, `state`, `quantile` and cache `result` values are ones the code
    writes; every method a regex names is an RPC that some service serves."""
    methods = _methods()
    checked = 0
    for title, expr in _exprs():
        for _, matchers in _METRIC.findall(expr):
            for label, op, value in _MATCHER.findall(matchers):
                if label == "method":
                    # `.*/(Predict|ModelInfer)`, `/grpc.health.*`: each method named exists.
                    alternatives = re.findall(r"\(([^)]*)\)", value)
                    for name in "|".join(alternatives).split("|") if alternatives else []:
                        assert name in methods, f"{title}: method {name}"
                        checked += 1
                elif label in VALUES and op in ("=", "!="):
                    assert value in VALUES[label], f"{title}: {label}={value!r}"
                    checked += 1
    assert checked >= 20


def test_the_dashboard_is_one_grafana_imports() -> None:
    """Unique panel ids; every query panel reads the dashboard's Prometheus datasource
    variable; panels lie within the 24-column grid and do not overlap; parentheses and braces
    of every query balance."""
    (variable,) = DASHBOARD["templating"]["list"]
    assert (variable["type"], variable["query"]) == ("datasource", "prometheus")
    panels = list(_panels())
    assert len({p["id"] for p in panels}) == len(panels)
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        mine = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not mine & cells, f"{panel['title']} overlaps another panel"
        cells |= mine
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == f"${{{variable['name']}}}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            expr = target["expr"]
            for opening, closing in ("()", "{}", "[]"):
                assert expr.count(opening) == expr.count(closing), f"{panel['title']}: {expr}"
