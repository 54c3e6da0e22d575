"""What the deploy tests (Kubernetes manifests, the Compose file) check of a container's
environment: each MODELSERVE_* variable names a setting of the service it runs, and the whole
loads as the service would load it."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import get_args, get_origin

import pytest
from pydantic import BaseModel

from modelserve_feature.config import FeatureSettings
from modelserve_inference.config import InferenceSettings
from modelserve_monitor.config import MonitorSettings
from modelserve_registry.config import RegistrySettings
from modelserve_router.config import RouterSettings
from modelserve_runtime.config import ServiceSettings, load_settings

#: The settings of each service's console script.
SETTINGS: dict[str, type[ServiceSettings]] = {
    "modelserve-router": RouterSettings,
    "modelserve-feature": FeatureSettings,
    "modelserve-inference": InferenceSettings,
    "modelserve-registry": RegistrySettings,
    "modelserve-monitor": MonitorSettings,
}


def field_path_exists(model: type[BaseModel], path: list[str]) -> bool:
    """Whether `a__b__c` (split) names a field of `model`, a dict field taking any key."""
    name, rest = path[0], path[1:]
    field = model.model_fields.get(name)
    if field is None:
        return False
    if not rest:
        return True
    annotation = field.annotation
    if get_origin(annotation) is dict:
        return True
    candidates = [annotation, *get_args(annotation)]
    return any(
        isinstance(c, type) and issubclass(c, BaseModel) and field_path_exists(c, rest)
        for c in candidates
    )


def service_settings(
    command: str, env: Mapping[str, str], monkeypatch: pytest.MonkeyPatch
) -> ServiceSettings:
    """The settings `command` would run with under `env` (and nothing else of this process's
    MODELSERVE_* environment), after checking that each of its variables names a setting."""
    settings_cls = SETTINGS[command]
    prefix = str(settings_cls.model_config["env_prefix"])
    with monkeypatch.context() as patch:
        for name in [n for n in os.environ if n.startswith("MODELSERVE_")]:
            patch.delenv(name)
        for name, value in env.items():
            if name.startswith(prefix):
                path = name[len(prefix) :].lower().split("__")
                assert field_path_exists(settings_cls, path), f"{command}: {name}"
            patch.setenv(name, value)
        return load_settings(settings_cls)
