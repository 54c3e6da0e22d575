"""Inference as several processes on one port (`server.workers` > 1).

The first process owns Triton as a single process does: it starts (or waits for) Triton,
follows the registry, loads, warms and unloads versions. Every other worker serves `Infer`
and the Open Inference Protocol on the shared port, with the same checks, straight to the
same Triton, from a mirror of the first process's versions: it follows that process's
WatchModelStates and health over a private Unix socket. Load and unload calls that reach a
worker are relayed to the first process, and its answer (or its error, status and details as
they were) comes back. So the request path spreads over cores while Triton keeps one owner.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelserve.inference.v1 import inference_service_pb2 as pb
from modelserve.inference.v1 import inference_service_pb2_grpc as pb_grpc
from modelserve_inference.models import ModelVersions, VersionArtifact
from modelserve_inference.servicer import InferenceServicer, held_from_proto
from modelserve_runtime.errors import FailedPreconditionError, UnavailableError
from modelserve_runtime.waiting import cancel_all

log = structlog.get_logger()

#: Set by the first process in the environment of the workers it starts: an `Owner` as JSON.
OWNER_ENV = "MODELSERVE_INFERENCE_WORKER_OWNER"
#: The first wait before reconnecting a broken stream to the first process; it doubles.
_BACKOFF_INITIAL_S = 0.05


@dataclass(frozen=True, slots=True)
class Owner:
    """What a worker needs from the first process: where to reach it, and Triton."""

    address: str
    """The first process's private gRPC address (`unix:/path`)."""
    triton_url: str
    """Triton's gRPC endpoint, as the first process calls it."""
    triton_http_url: str = ""
    """Triton's HTTP endpoint; empty where the first process has none (Triton over TLS)."""

    def to_env(self) -> dict[str, str]:
        """The environment variable that hands this to a worker."""
        return {OWNER_ENV: json.dumps(asdict(self))}

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Owner | None:
        """The owner named in the environment; None in the first (or only) process."""
        value = environ.get(OWNER_ENV)
        return cls(**json.loads(value)) if value else None


class OwnerLoads:
    """The artifact source of a worker, which never loads a version itself: the first
    process does, and the worker relays the calls that ask for one."""

    async def fetch(self, name: str) -> VersionArtifact:
        raise FailedPreconditionError(
            f"{name}: only the first inference process loads versions; this worker relays"
            " LoadModelVersion to it",
            reason="WORKER_DOES_NOT_LOAD",
        )


class OwnerMirror:
    """Keeps a worker's `ModelVersions` equal to the first process's, and the worker's health
    equal to its health (NOT_SERVING when Triton is down, or while the first process cannot be
    reached). Both streams reconnect after a break, waiting from 50 ms up to `backoff_max_s`;
    each reconnect starts again from the whole state."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        versions: ModelVersions,
        set_serving: Callable[[bool], Awaitable[None]],
        *,
        stream_timeout_s: float,
        backoff_max_s: float,
    ) -> None:
        self._states = pb_grpc.InferenceServiceStub(channel)
        self._health = health_pb2_grpc.HealthStub(channel)
        self._versions = versions
        self._set_serving = set_serving
        self._stream_timeout_s = stream_timeout_s
        self._backoff_max_s = backoff_max_s
        self._synced = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        """Starts following the first process's states and health."""
        self._tasks = [
            asyncio.create_task(
                self._follow(self._follow_states, "states"), name="worker-follow-states"
            ),
            asyncio.create_task(
                self._follow(self._follow_health, "health", on_break=self._owner_lost),
                name="worker-follow-health",
            ),
        ]

    async def wait_synced(self, timeout_s: float) -> None:
        """Returns once the whole state has arrived; UnavailableError after `timeout_s`."""
        try:
            await asyncio.wait_for(self._synced.wait(), timeout_s)
        except TimeoutError:
            raise UnavailableError(
                f"the first inference process sent no model states within {timeout_s:g} s"
            ) from None

    async def close(self) -> None:
        await cancel_all(self._tasks)

    async def _follow(
        self,
        stream: Callable[[], Awaitable[None]],
        what: str,
        *,
        on_break: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Runs `stream` again and again; after a break, `on_break`, then a doubling wait."""
        backoff_s = _BACKOFF_INITIAL_S
        while True:
            try:
                await stream()
            except grpc.aio.AioRpcError as exc:
                if exc.code() is grpc.StatusCode.DEADLINE_EXCEEDED:
                    continue  # the stream's own deadline: reopen it at once
                log.warning(
                    "owner_stream_broken", stream=what, code=exc.code().name, retry_s=backoff_s
                )
                if on_break is not None:
                    await on_break()
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, self._backoff_max_s)
                continue
            # The first process ended the stream (it is stopping): reopen it shortly.
            backoff_s = _BACKOFF_INITIAL_S
            await asyncio.sleep(backoff_s)

    async def _owner_lost(self) -> None:
        """The first process cannot be reached: Triton's state is unknown."""
        self._versions.mirror_triton_up(False)
        await self._set_serving(False)

    async def _follow_states(self) -> None:
        call = self._states.WatchModelStates(
            pb.WatchModelStatesRequest(), timeout=self._stream_timeout_s
        )
        try:
            async for message in call:
                self._versions.mirror(
                    [held_from_proto(v) for v in message.model_versions],
                    list(message.removed_names),
                    initial=message.initial,
                )
                if message.initial:
                    self._synced.set()
        finally:
            call.cancel()

    async def _follow_health(self) -> None:
        call = self._health.Watch(health_pb2.HealthCheckRequest(), timeout=self._stream_timeout_s)
        try:
            async for answer in call:
                serving = answer.status == health_pb2.HealthCheckResponse.SERVING
                self._versions.mirror_triton_up(serving)
                await self._set_serving(serving)
        finally:
            call.cancel()


class WorkerInferenceServicer(InferenceServicer):
    """InferenceService in a worker: answers from the mirror and runs Infer itself; relays
    LoadModelVersion and UnloadModelVersion to the first process, which owns Triton."""

    def __init__(
        self, versions: ModelVersions, owner: grpc.aio.Channel, *, relay_timeout_s: float
    ) -> None:
        super().__init__(versions)
        self._owner = pb_grpc.InferenceServiceStub(owner)
        self._relay_timeout_s = relay_timeout_s

    async def LoadModelVersion(
        self, request: pb.LoadModelVersionRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.LoadModelVersionResponse:
        response: pb.LoadModelVersionResponse = await self._relay(
            self._owner.LoadModelVersion, request, context
        )
        return response

    async def UnloadModelVersion(
        self, request: pb.UnloadModelVersionRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.UnloadModelVersionResponse:
        response: pb.UnloadModelVersionResponse = await self._relay(
            self._owner.UnloadModelVersion, request, context
        )
        return response

    async def _relay(
        self, method: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Any:
        """Calls the first process within the caller's deadline (else `relay_timeout_s`);
        its error ends this call with the same code, message and details."""
        remaining = context.time_remaining()
        try:
            return await method(
                request, timeout=remaining if remaining is not None else self._relay_timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            await context.abort(
                exc.code(), exc.details() or "", tuple(exc.trailing_metadata() or ())
            )
