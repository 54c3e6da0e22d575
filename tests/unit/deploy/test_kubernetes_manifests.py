"""The Kubernetes manifests (`deploy/kubernetes`) hold together with the code they run: every
service's environment is settings the service accepts, its ports are what its probes and
Services use, every target names a Service and port that exist, and every command and
option is one the image has. No cluster runs here, so this is what can be checked of them."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from deploy_settings import SETTINGS, service_settings

from modelserve_cli.main import app

ROOT = Path(__file__).resolve().parents[3]
K8S = ROOT / "deploy" / "kubernetes"
WORKLOADS = ("Deployment", "StatefulSet", "Job")
#: What a `fieldRef` stands for here, to fill `$(VAR)` references.
FIELD_VALUES = {"metadata.name": "inference-0"}
_REFERENCE = re.compile(r"\$\((\w+)\)")


def _manifests(under: Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in sorted(under.rglob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                yield path, doc


ALL = list(_manifests(K8S))
BASE = [(p, d) for p, d in ALL if p.parent == K8S]


def _workloads(docs: list[tuple[Path, dict[str, Any]]]) -> list[dict[str, Any]]:
    return [d for _, d in docs if d["kind"] in WORKLOADS]


def _containers() -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for workload in _workloads(ALL):
        for container in workload["spec"]["template"]["spec"]["containers"]:
            yield workload, container


def _env(container: dict[str, Any]) -> dict[str, str]:
    """The container's environment as Kubernetes would give it: fieldRefs filled, `$(VAR)`
    references to earlier variables expanded."""
    env: dict[str, str] = {}
    for item in container.get("env", []):
        if "valueFrom" in item:
            env[item["name"]] = FIELD_VALUES[item["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            env[item["name"]] = _REFERENCE.sub(lambda m: env[m.group(1)], item["value"])
    return env


def _services() -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for _, d in BASE if d["kind"] == "Service"}


def _port(container: dict[str, Any], name: str) -> int:
    return next(p["containerPort"] for p in container["ports"] if p["name"] == name)


def test_the_kustomization_lists_every_base_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    on_disk = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(kustomization["resources"]) == on_disk


def test_every_service_runs_with_settings_it_accepts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each service container's MODELSERVE_* variables name real settings and load without
    error; the gRPC port is the one its ports, probes and Service use, the metrics and HTTP
    ports the ones it exposes."""
    seen = set()
    for _, container in _containers():
        command = container.get("command", [""])[0]
        if command not in SETTINGS:
            continue
        seen.add(command)
        settings = service_settings(command, _env(container), monkeypatch)
        grpc_port = _port(container, "grpc")
        assert settings.server.port == grpc_port, command
        assert settings.server.host == "0.0.0.0", command
        assert container["readinessProbe"]["grpc"]["port"] == grpc_port
        assert container["livenessProbe"]["grpc"]["port"] == grpc_port
        assert settings.telemetry.metrics_port == _port(container, "metrics"), command
        # Every service serves HTTP too (Connect; the router and inference also the Open
        # Inference Protocol's REST binding), on the port its pods name `http`.
        assert settings.server.http_port == _port(container, "http"), command
    assert seen == set(SETTINGS)


def test_targets_name_services_on_their_ports() -> None:
    """Every `host:port` a container dials is a Service of the manifests with that port; one
    that spreads its calls (`dns:///`) is a headless Service."""
    services = _services()
    targets = 0
    for _, container in _containers():
        for name, value in _env(container).items():
            if not (
                name.endswith("_TARGET") or name in ("MODELSERVE_REGISTRY", "MODELSERVE_INFERENCE")
            ):
                continue
            targets += 1
            spread = value.startswith("dns:///")
            host, _, port = value.removeprefix("dns:///").rpartition(":")
            service = services.get(host)
            assert service is not None, f"{name}={value}: no Service {host!r}"
            assert int(port) in [p["port"] for p in service["spec"]["ports"]], f"{name}={value}"
            if spread:
                assert service["spec"].get("clusterIP") == "None", f"{name}={value}"
        for name, value in _env(container).items():
            if name.endswith("REDIS_URL"):
                host_port = value.removeprefix("redis://").split("/")[0]
                host, _, port = host_port.partition(":")
                assert int(port) in [p["port"] for p in services[host]["spec"]["ports"]]
    assert targets >= 8


def test_services_select_pods_with_their_ports() -> None:
    """Each Service selects a workload's pods, and each of its target ports is a named port
    of those pods."""
    workloads = _workloads(BASE)
    for name, service in _services().items():
        selector = service["spec"]["selector"]
        pods = [
            w["spec"]["template"]
            for w in workloads
            if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert pods, f"Service {name} selects no pods"
        named = {p["name"] for pod in pods for c in pod["spec"]["containers"] for p in c["ports"]}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in named, f"Service {name}: {port['targetPort']}"
    for workload in workloads:
        if workload["kind"] == "StatefulSet":
            assert workload["spec"]["serviceName"] in _services()
        assert (
            workload["spec"]["selector"]["matchLabels"].items()
            <= workload["spec"]["template"]["metadata"]["labels"].items()
        )


def test_inference_publishes_its_own_pods_triton() -> None:
    """Inference reaches, and publishes to the router, the Triton in its own pod: its pod's
    name under the StatefulSet's headless Service, on the Triton container's ports."""
    (inference,) = [w for w in _workloads(BASE) if w["metadata"]["name"] == "inference"]
    containers = {c["name"]: c for c in inference["spec"]["template"]["spec"]["containers"]}
    env = _env(containers["inference"])
    pod = f"{FIELD_VALUES['metadata.name']}.{inference['spec']['serviceName']}"
    triton = containers["triton"]
    assert env["MODELSERVE_INFERENCE_TRITON_MODE"] == "remote"
    assert env["MODELSERVE_INFERENCE_TRITON_URL"] == f"{pod}:{_port(triton, 'triton-grpc')}"
    assert env["MODELSERVE_INFERENCE_TRITON_HTTP_URL"] == f"{pod}:{_port(triton, 'triton-http')}"
    assert "--model-control-mode=explicit" in triton["args"]
    assert f"--grpc-port={_port(triton, 'triton-grpc')}" in triton["args"]
    assert f"--http-port={_port(triton, 'triton-http')}" in triton["args"]


def test_a_pod_given_a_gpu_runs_its_models_on_it() -> None:
    """The Triton container that asks for a GPU gets models whose instances run on the GPU:
    with instances left on the CPU, the GPU would sit idle."""
    (inference,) = [w for w in _workloads(BASE) if w["metadata"]["name"] == "inference"]
    containers = {c["name"]: c for c in inference["spec"]["template"]["spec"]["containers"]}
    env = _env(containers["inference"])
    assert containers["triton"]["resources"]["limits"]["nvidia.com/gpu"] >= 1
    assert env["MODELSERVE_INFERENCE_DEVICE"] == "gpu"


def test_commands_and_options_are_the_images() -> None:
    """Every command is a console script of the package; a `modelserve` one runs a real
    subcommand with options it has, each required one given as an argument or in its
    environment; the batch Job runs one shard per completion."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    cli = typer.main.get_command(app)
    for workload, container in _containers():
        command = container.get("command")
        if command is None:
            continue
        assert command[0] in scripts, command
        if command[0] != "modelserve":
            continue
        args = container["args"]
        subcommand = cli.commands[args[0]]  # type: ignore[attr-defined]
        options = {opt for param in subcommand.params for opt in param.opts}
        given = [a for a in args if a.startswith("--")]
        assert set(given) <= options, f"{args[0]}: {set(given) - options}"
        env = _env(container)
        for param in subcommand.params:
            if (
                param.param_type_name == "option"
                and param.required
                and not set(param.opts) & set(given)
            ):
                assert param.envvar in env, f"{args[0]}: {param.name} needs {param.envvar}"
        if "--shards" in args:
            assert workload["spec"]["completionMode"] == "Indexed"
            shards = args[args.index("--shards") + 1]
            assert int(shards) == workload["spec"]["completions"]
            assert "{shard}" in args[args.index("--output") + 1]
