"""Endpoint -> deployment -> model version: the router's snapshot of the desired traffic state
(followed from the registry's WatchDeployments) and of the versions inference serves READY
(followed from inference's WatchModelStates)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Protocol

import structlog

from modelserve.registry.v1 import registry_service_pb2 as registry_pb
from modelserve.type.v1 import tensor_pb2
from modelserve_runtime.errors import FailedPreconditionError, ModelServeError

log = structlog.get_logger()

#: `Route.routing_key` value that makes the caller's user id the sticky key.
USER_KEY = "user"


@dataclass(frozen=True, slots=True)
class Target:
    """A share of an endpoint's traffic (0-100) sent to one version."""

    model_version: str
    percent: int


@dataclass(frozen=True, slots=True)
class HybridLookup:
    """A deployment's hybrid lookup: answer from a batch job's precomputed prediction for the
    request's entity of `entity_type` while it is at most `max_age_s` old."""

    entity_type: str
    max_age_s: float


@dataclass(frozen=True, slots=True)
class Route:
    """One deployment as the router follows it."""

    endpoint: str
    revision: int
    traffic: tuple[Target, ...]
    routing_key: str = ""
    """`user`, an entity type, or empty (a random split by weight)."""
    salt: str = ""
    shadow: tuple[str, ...] = ()
    fallback_version: str = ""
    """Answers, degraded, when the chosen version fails in inference."""
    default_outputs: tuple[tensor_pb2.Tensor, ...] = ()
    """Answer, degraded, when the fallback version fails too (or there is none)."""
    hybrid: HybridLookup | None = None
    """Precomputed predictions answer first; None when the deployment's lookup is off."""

    @classmethod
    def from_proto(cls, deployment: registry_pb.Deployment) -> Route:
        """The route of a registry Deployment."""
        hybrid = deployment.hybrid
        return cls(
            endpoint=deployment.name.removeprefix("deployments/"),
            revision=deployment.revision,
            traffic=tuple(Target(t.model_version, t.percent) for t in deployment.traffic),
            routing_key=deployment.routing_key,
            salt=deployment.salt,
            shadow=tuple(deployment.shadow),
            fallback_version=deployment.fallback_version,
            default_outputs=tuple(deployment.default_outputs),
            hybrid=(
                HybridLookup(hybrid.entity_type, hybrid.max_age.ToTimedelta().total_seconds())
                if hybrid.enabled
                else None
            ),
        )

    @property
    def versions(self) -> tuple[str, ...]:
        """Every version the route may call: traffic targets, shadows, the fallback."""
        fallback = (self.fallback_version,) if self.fallback_version else ()
        return (*(t.model_version for t in self.traffic), *self.shadow, *fallback)


@dataclass(frozen=True, slots=True)
class ServedVersion:
    """A version inference reports READY, and where its Triton serves it."""

    model_version: str
    triton_endpoint: str = ""
    triton_model_name: str = ""
    triton_model_version: int = 0
    triton_http_endpoint: str = ""
    """Triton's HTTP endpoint for the version; empty when inference publishes none."""


@dataclass(frozen=True, slots=True)
class ServingChange:
    """One message of inference's state stream, in the router's terms."""

    versions: tuple[tuple[str, ServedVersion | None], ...] = ()
    """Each version the message names, in its order: where its Triton serves it when it is
    READY now; None when it is in any other state (LOADING, WARMING, FAILED, UNLOADING) or
    no longer held."""
    initial: bool = False
    """The whole state (the first message of a stream): it replaces what the router knew."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything a request needs to be routed, swapped as a whole: a request that reads it
    once sees either all of a change or none of it."""

    routes: Mapping[str, Route] = field(default_factory=dict)
    versions: Mapping[str, registry_pb.ModelVersion] = field(default_factory=dict)
    """Registry metadata (signatures) of every version a route names."""
    ready: Mapping[str, ServedVersion] = field(default_factory=dict)
    sequence: int = 0
    """The registry sequence of the last revision applied; a reconnect resumes after it."""


@dataclass(frozen=True, slots=True)
class RouteChoice:
    """The version picked for a request and why."""

    model_version: str
    reason: str


class DeploymentSource(Protocol):
    """The registry, as the router reads it."""

    def watch_deployments(
        self, after_sequence: int, *, timeout_s: float
    ) -> AsyncIterator[registry_pb.DeploymentRevision]:
        """Every deployment revision after `after_sequence` (the current ones when 0), then
        live changes, for at most `timeout_s`; UnavailableError when the registry cannot be
        reached."""
        ...

    async def get_deployment(self, name: str) -> registry_pb.Deployment:
        """One deployment; NotFoundError when there is none."""
        ...

    async def get_model_version(self, name: str) -> registry_pb.ModelVersion:
        """One model version."""
        ...


class ServingSource(Protocol):
    """Inference, as the router reads it."""

    def watch_states(self, *, timeout_s: float) -> AsyncIterator[ServingChange]:
        """The state of every held version (one `initial` change), then each change as it
        happens, for at most `timeout_s`; UnavailableError when inference cannot be reached
        or ends the stream."""
        ...

    async def ready_versions(self) -> list[ServedVersion]:
        """The versions inference holds READY now (one call)."""
        ...


def apply_serving_change(
    ready: Mapping[str, ServedVersion], change: ServingChange
) -> dict[str, ServedVersion]:
    """The READY versions after `change`: the whole state replaces them; a later change is
    merged into them (READY versions in, with their Triton endpoint; every other one out)."""
    merged = {} if change.initial else dict(ready)
    for name, served in change.versions:
        if served is None:
            merged.pop(name, None)
        else:
            merged[name] = served
    return merged


def sticky_point(salt: str, key: str) -> float:
    """Where `key` falls in [0, 1): stable across processes, restarts and replicas
    (blake2b, unlike Python's randomized `hash`)."""
    digest = hashlib.blake2b(f"{salt}\x1f{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def choose(
    route: Route,
    ready: Mapping[str, ServedVersion],
    keys: Mapping[str, str],
    rng: random.Random | None = None,
) -> RouteChoice:
    """Picks a READY traffic target: the only one (`single_target`), by a stable hash of the
    route's routing key in `keys` (`sticky`), or at random by weight (`weighted`).

    The weights of targets that are not READY go to the others. FailedPreconditionError
    when no target has traffic or none with traffic is READY.
    """
    targets = [t for t in route.traffic if t.percent > 0]
    if not targets:
        raise FailedPreconditionError(
            f"endpoint {route.endpoint} has no traffic target",
            reason="NO_TRAFFIC_TARGET",
            metadata={"endpoint": route.endpoint},
        )
    live = [t for t in targets if t.model_version in ready]
    if not live:
        raise FailedPreconditionError(
            f"no traffic target of endpoint {route.endpoint} is READY in inference",
            reason="VERSION_NOT_READY",
            metadata={
                "endpoint": route.endpoint,
                "model_version": ",".join(t.model_version for t in targets),
            },
        )
    if len(live) == 1:
        return RouteChoice(live[0].model_version, "single_target")
    total = sum(t.percent for t in live)
    key = keys.get(route.routing_key) if route.routing_key else None
    if key:
        pick = sticky_point(route.salt or route.endpoint, key) * total
        reason = "sticky"
    else:
        pick = (rng or random).random() * total
        reason = "weighted"
    for target in live:
        pick -= target.percent
        if pick < 0:
            return RouteChoice(target.model_version, reason)
    return RouteChoice(live[-1].model_version, reason)


class RoutingTable:
    """The current Snapshot, kept fresh in the background: deployments from the registry's
    WatchDeployments (reconnecting with backoff, resuming after the last sequence applied)
    and READY versions from inference's WatchModelStates (reconnecting with backoff, starting
    over from the whole state). When either cannot be reached, the last good snapshot keeps
    serving."""

    def __init__(
        self,
        deployments: DeploymentSource,
        serving: ServingSource,
        *,
        watch_timeout_s: float = 3600.0,
        backoff_initial_s: float = 0.05,
        backoff_max_s: float = 5.0,
    ) -> None:
        self._deployments = deployments
        self._serving = serving
        self._watch_timeout_s = watch_timeout_s
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self.snapshot = Snapshot()
        self._tasks: list[asyncio.Task[None]] = []
        self._ready_refresh: asyncio.Task[None] | None = None
        self._states_live = False
        """Whether the state stream has delivered its whole state and not broken since."""
        self._states_applied = 0
        """State messages applied so far: a ListModelVersions answer that is older than one of
        them is dropped."""

    def start(self) -> None:
        """Starts following the registry's deployments and inference's version states."""
        self._tasks = [
            asyncio.create_task(self._follow_deployments(), name="router-watch-deployments"),
            asyncio.create_task(self._follow_states(), name="router-watch-model-states"),
        ]

    async def close(self) -> None:
        """Stops the background work."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    async def resolve(self, endpoint: str) -> tuple[Snapshot, Route]:
        """The snapshot to serve a request from and the endpoint's route in it.

        An endpoint the snapshot does not hold yet (the watch has not delivered it) is read
        from the registry once; NotFoundError when it has no deployment. A route with no
        READY target asks inference once (ListModelVersions) before the request is refused,
        unless the state stream is live: then the snapshot already holds what inference
        would answer.
        """
        snapshot = self.snapshot
        route = snapshot.routes.get(endpoint)
        if route is None:
            deployment = await self._deployments.get_deployment(f"deployments/{endpoint}")
            await self._apply(Route.from_proto(deployment), sequence=None)
            snapshot = self.snapshot
            route = snapshot.routes[endpoint]
        if not self._states_live and not any(
            t.model_version in snapshot.ready for t in route.traffic if t.percent > 0
        ):
            await self.refresh_ready()
            snapshot = self.snapshot
        return snapshot, route

    async def refresh_ready(self) -> None:
        """Asks inference for its READY versions now; concurrent callers share one call."""
        if self._ready_refresh is None or self._ready_refresh.done():
            self._ready_refresh = asyncio.create_task(self._read_ready())
        await asyncio.shield(self._ready_refresh)

    async def _read_ready(self) -> None:
        applied = self._states_applied
        served = await self._serving.ready_versions()
        if self._states_applied != applied:
            # The stream told of a change while the call was out: the answer may predate it.
            return
        self._set_ready({v.model_version: v for v in served}, source="list")

    def _set_ready(self, ready: dict[str, ServedVersion], *, source: str) -> None:
        if ready != self.snapshot.ready:
            self.snapshot = replace(self.snapshot, ready=ready)
            log.info("ready_versions_changed", ready=sorted(ready), source=source)

    def _apply_states(self, change: ServingChange) -> None:
        self._states_applied += 1
        self._set_ready(apply_serving_change(self.snapshot.ready, change), source="stream")
        if change.initial:
            self._states_live = True
            log.info("model_states_followed", ready=len(self.snapshot.ready))

    async def _follow_states(self) -> None:
        backoff = self._backoff_initial_s
        while True:
            try:
                async for change in self._serving.watch_states(timeout_s=self._watch_timeout_s):
                    self._apply_states(change)
                    backoff = self._backoff_initial_s
            except ModelServeError as exc:
                log.warning("model_state_watch_lost", error=exc.message, retry_in_s=backoff)
            # Until the next whole state arrives, the READY versions last seen keep serving.
            self._states_live = False
            # Pacing the reconnects to an inference that is down, not waiting for a result.
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._backoff_max_s)

    async def _follow_deployments(self) -> None:
        backoff = self._backoff_initial_s
        while True:
            try:
                async for revision in self._deployments.watch_deployments(
                    self.snapshot.sequence, timeout_s=self._watch_timeout_s
                ):
                    await self._apply(
                        Route.from_proto(revision.deployment), sequence=revision.sequence
                    )
                    backoff = self._backoff_initial_s
            except ModelServeError as exc:
                log.warning(
                    "deployment_watch_lost",
                    error=exc.message,
                    sequence=self.snapshot.sequence,
                    retry_in_s=backoff,
                )
            # Pacing the reconnects to a registry that is down, not waiting for a result.
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._backoff_max_s)

    async def _apply(self, route: Route, *, sequence: int | None) -> None:
        """Reads the metadata of versions the route names that the snapshot lacks, then swaps
        in a snapshot with the route. A revision older than the one held changes nothing but
        the sequence."""
        missing = [v for v in dict.fromkeys(route.versions) if v not in self.snapshot.versions]
        fetched = await asyncio.gather(*(self._deployments.get_model_version(v) for v in missing))
        snapshot = self.snapshot
        held = snapshot.routes.get(route.endpoint)
        routes = dict(snapshot.routes)
        if held is None or held.revision <= route.revision:
            routes[route.endpoint] = route
        versions = {**snapshot.versions, **dict(zip(missing, fetched, strict=True))}
        self.snapshot = replace(
            snapshot,
            routes=routes,
            versions=versions,
            sequence=snapshot.sequence if sequence is None else sequence,
        )
        if held is None or held.revision < route.revision:
            log.info(
                "deployment_applied",
                endpoint=route.endpoint,
                revision=route.revision,
                traffic={t.model_version: t.percent for t in route.traffic},
                routing_key=route.routing_key,
                shadow=list(route.shadow),
            )


def routing_keys(user_id: str, entities: Mapping[str, str]) -> dict[str, str]:
    """The values a route's `routing_key` may name: `user` and each entity type."""
    keys = dict(entities)
    if user_id:
        keys[USER_KEY] = user_id
    return keys
