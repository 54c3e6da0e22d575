"""Endpoint -> deployment -> model version: the router's view of the desired traffic state."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from typing import Protocol

from modelserve.registry.v1 import registry_service_pb2 as registry_pb
from modelserve_runtime.errors import FailedPreconditionError


@dataclass(frozen=True, slots=True)
class RouteChoice:
    """The version picked for a request and why."""

    model_version: str
    reason: str


class DeploymentSource(Protocol):
    """Where deployments and versions are read (the registry)."""

    async def get_deployment(self, name: str) -> registry_pb.Deployment: ...

    async def get_model_version(self, name: str) -> registry_pb.ModelVersion: ...


class DeploymentTable:
    """Deployments read from the registry, each reused for `refresh_s` seconds."""

    def __init__(self, source: DeploymentSource, *, refresh_s: float) -> None:
        self._source = source
        self._refresh_s = refresh_s
        self._deployments: dict[str, tuple[float, registry_pb.Deployment]] = {}
        self._versions: dict[str, registry_pb.ModelVersion] = {}
        self._lock = asyncio.Lock()

    async def deployment(self, endpoint: str) -> registry_pb.Deployment:
        """The endpoint's deployment; NotFoundError (from the registry) when there is none."""
        now = time.monotonic()
        cached = self._deployments.get(endpoint)
        if cached is not None and now - cached[0] < self._refresh_s:
            return cached[1]
        deployment = await self._source.get_deployment(f"deployments/{endpoint}")
        self._deployments[endpoint] = (now, deployment)
        return deployment

    async def version(self, name: str) -> registry_pb.ModelVersion:
        """A model version; versions are immutable, so each is read once."""
        version = self._versions.get(name)
        if version is None:
            version = await self._source.get_model_version(name)
            self._versions[name] = version
        return version

    async def choose(self, endpoint: str, rng: random.Random | None = None) -> RouteChoice:
        """Picks a version by the deployment's traffic weights."""
        deployment = await self.deployment(endpoint)
        targets = [t for t in deployment.traffic if t.percent > 0]
        if not targets:
            raise FailedPreconditionError(
                f"endpoint {endpoint} has no traffic target",
                reason="NO_TRAFFIC_TARGET",
                metadata={"endpoint": endpoint},
            )
        if len(targets) == 1:
            return RouteChoice(targets[0].model_version, "single_target")
        pick = (rng or random).uniform(0, sum(t.percent for t in targets))
        for target in targets:
            pick -= target.percent
            if pick <= 0:
                return RouteChoice(target.model_version, "weighted")
        return RouteChoice(targets[-1].model_version, "weighted")
