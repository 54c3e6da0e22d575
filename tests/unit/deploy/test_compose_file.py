"""The Docker Compose file (`deploy/compose/compose.yaml`) holds together with the code and
image it runs: every service's environment is settings it accepts, every address names a
service of the file on the port that service listens on, every command is one the image
has, and the router reaches models by a path that works when Triton listens on inference's
loopback. No Docker engine runs here, so this is what can be checked of it."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from deploy_settings import SETTINGS, service_settings

from modelserve_cli.main import app
from modelserve_inference.config import InferenceSettings
from modelserve_router.config import RouterSettings

ROOT = Path(__file__).resolve().parents[3]
COMPOSE = ROOT / "deploy" / "compose" / "compose.yaml"
SERVICES: dict[str, dict[str, Any]] = yaml.safe_load(COMPOSE.read_text())["services"]
#: The variables of the `modelserve` CLI that name a service's address.
CLI_TARGETS = {
    "MODELSERVE_REGISTRY": "registry",
    "MODELSERVE_INFERENCE": "inference",
    "MODELSERVE_FEATURE": "feature",
    "MODELSERVE_ROUTER": "router",
}


def _env(service: dict[str, Any]) -> dict[str, str]:
    return {name: str(value) for name, value in service.get("environment", {}).items()}


def _listening(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Each modelserve service's settings, by Compose service name."""
    return {
        name: service_settings(service["command"][0], _env(service), monkeypatch)
        for name, service in SERVICES.items()
        if service.get("command", [""])[0] in SETTINGS
    }


def _dialled(env: dict[str, str]) -> list[tuple[str, str]]:
    """The (variable, host:port) pairs of the addresses a container dials."""
    return [
        (name, value)
        for name, value in env.items()
        if name.endswith("_TARGET") or name in CLI_TARGETS
    ]


def test_every_service_runs_with_settings_it_accepts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each service's MODELSERVE_* variables name real settings and load without error; it
    listens on every interface of its container, and the image builds from the file named."""
    settings = _listening(monkeypatch)
    assert {SERVICES[name]["command"][0] for name in settings} == set(SETTINGS)
    for name, loaded in settings.items():
        assert loaded.server.host == "0.0.0.0", name
        assert loaded.server.port > 0, name
    for name, service in SERVICES.items():
        if "build" in service:
            build = service["build"]
            assert (COMPOSE.parent / build["context"] / build["dockerfile"]).is_file(), name


def test_addresses_name_services_on_the_ports_they_listen_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every `host:port` a container dials is a service of the file listening on that port,
    and every Redis URL names the Redis service; the router's port is published."""
    ports = {name: s.server.port for name, s in _listening(monkeypatch).items()}
    dialled = 0
    for name, service in SERVICES.items():
        env = _env(service)
        for variable, value in _dialled(env):
            host, _, port = value.rpartition(":")
            assert ports.get(host) == int(port), f"{name}: {variable}={value}"
            if variable in CLI_TARGETS:
                assert host == CLI_TARGETS[variable], f"{name}: {variable}={value}"
            dialled += 1
        for variable, value in env.items():
            if variable.endswith("REDIS_URL"):
                assert value.startswith("redis://redis:6379/"), f"{name}: {variable}"
                assert "redis" in service["depends_on"], name
    assert dialled == 11
    assert f"{ports['router']}:{ports['router']}" in SERVICES["router"]["ports"]


def test_the_router_reaches_models_where_triton_listens(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Triton that inference starts itself (local mode) listens on the inference
    container's loopback, out of the router's reach: the router must then call inference,
    not the Triton address inference publishes."""
    settings = _listening(monkeypatch)
    inference, router = settings["inference"], settings["router"]
    assert isinstance(inference, InferenceSettings) and isinstance(router, RouterSettings)
    if inference.triton_mode == "local":
        assert router.model_runner == "service"
    # Triton's python backend talks to model processes through /dev/shm.
    assert SERVICES["inference"]["shm_size"] == "1gb"


def test_commands_and_options_are_the_images() -> None:
    """Every command is a console script of the package; the one-off `modelserve demo` job
    has every option it requires from its environment, and does not restart."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    cli = typer.main.get_command(app)
    ours = {name: s for name, s in SERVICES.items() if "build" in s}
    assert set(ours) == {"registry", "feature", "inference", "monitor", "router", "demo"}
    for name, service in ours.items():
        command = service["command"]
        assert command[0] in scripts, name
        if command[0] != "modelserve":
            continue
        subcommand = cli.commands[command[1]]  # type: ignore[attr-defined]
        env = _env(service)
        for param in subcommand.params:
            if param.param_type_name == "option" and param.required:
                assert param.envvar in env, f"{name}: {param.name} needs {param.envvar}"
        assert service["restart"] == "no", name
