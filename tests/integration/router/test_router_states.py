"""The router follows inference's WatchModelStates: a version leaves the READY set the moment
inference stops serving it and comes back once it is READY again, over one long-lived stream;
while inference is away the last state keeps serving, and the state of the inference that
comes back replaces it whole."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from router_testing import (
    V1,
    V2,
    WAIT_S,
    Dependencies,
    deploy,
    refused,
    register_copy,
    reload,
    request,
    router,
)
from structlog.testing import capture_logs
from support import eventually, running

from modelserve.inference.v1 import inference_service_pb2 as inference_pb
from modelserve.inference.v1 import inference_service_pb2_grpc as inference_grpc
from modelserve_cli.stack import free_port
from modelserve_inference import server as inference_server
from modelserve_inference.config import InferenceSettings
from modelserve_router.routing import RoutingTable
from modelserve_router.sources import InferenceServing
from modelserve_runtime.channels import create_channel
from modelserve_runtime.clients import InferenceClient, RegistryClient

pytestmark = pytest.mark.triton


class TestModelStates:
    async def test_unload_and_load_reach_the_router_over_one_stream(
        self, dependencies: Dependencies
    ) -> None:
        """A version inference unloads stops getting traffic at once (its share goes to the
        other target) and gets it again once inference says READY, with its Triton endpoint,
        all on one WatchModelStates stream that outlives the channel's default deadline."""
        deps = dependencies
        await deploy(deps, "states", {V1: 50, V2: 50})
        with capture_logs() as logs:
            # Calls to inference get 0.2 s by default; the stream must not be one of them.
            async with router(deps, inference_timeout_s=0.2) as (stub, app):
                await eventually(
                    lambda: {V1, V2} <= app.routes.snapshot.ready.keys(),
                    "both versions READY in the router",
                    within_s=WAIT_S,
                )
                await deps.inference.UnloadModelVersion(
                    inference_pb.UnloadModelVersionRequest(name=V2)
                )
                try:
                    await eventually(
                        lambda: V2 not in app.routes.snapshot.ready,
                        "the unload reaching the router",
                        within_s=WAIT_S,
                    )
                    alone = [
                        await stub.Predict(request("states", f"c-{1000 + i}")) for i in range(20)
                    ]
                finally:
                    await reload(deps, V2)
                await eventually(
                    lambda: V2 in app.routes.snapshot.ready,
                    "the load reaching the router",
                    within_s=WAIT_S,
                )
                served = app.routes.snapshot.ready[V2]
                split = [
                    await stub.Predict(request("states", f"c-{1000 + i % 20}")) for i in range(40)
                ]
        assert {a.model_version for a in alone} == {V1}
        # 40 draws of a 50/50 split all landing on one side: about 1 in 5e11.
        assert {a.model_version for a in split} == {V1, V2}
        assert served.triton_endpoint == deps.triton_endpoint
        changes = [e["ready"] for e in logs if e["event"] == "ready_versions_changed"]
        assert [V1] in changes
        # V2 went LOADING and WARMING before READY: it came back only once READY.
        assert changes[-1] == sorted([V1, V2])
        assert [e for e in logs if e["event"] == "model_state_watch_lost"] == []

    async def test_asks_inference_once_only_while_the_stream_is_not_live(
        self, dependencies: Dependencies
    ) -> None:
        """Before the state stream has delivered the whole state, requests for a route with no
        READY target share one ListModelVersions, whose answer routes them; once the stream
        is live, a route whose version is not READY is refused without asking."""
        deps = dependencies
        await deploy(deps, "states-refresh", V1)
        not_loaded = await register_copy(deps, "fraud-not-loaded")
        await deploy(deps, "states-not-loaded", not_loaded)
        async with create_channel(deps.inference_target) as channel:
            table = RoutingTable(
                RegistryClient(deps.registry_channel),
                InferenceServing(InferenceClient(channel), channel),
            )
            with capture_logs() as logs:
                # Not started: no stream yet, as in the moment after the router starts.
                resolved = await asyncio.gather(
                    *(table.resolve("states-refresh") for _ in range(5))
                )
                listed = _list_calls(logs)
                table.start()
                try:
                    await eventually(
                        lambda: any(e["event"] == "model_states_followed" for e in logs),
                        "the state stream's whole state",
                        within_s=WAIT_S,
                    )
                    snapshot, _ = await table.resolve("states-not-loaded")
                finally:
                    await table.close()
        assert all(V1 in s.ready for s, _ in resolved)
        assert listed == 1
        assert not_loaded not in snapshot.ready
        assert _list_calls(logs) == 1

    async def test_inference_away_and_back(self, dependencies: Dependencies) -> None:
        """While inference is away the router keeps routing by the READY versions it last
        knew; the inference that comes back holds nothing, and its first message replaces the
        router's state whole, so the version is refused until inference loads it again."""
        deps = dependencies
        version = await register_copy(deps, "fraud-states")
        await deploy(deps, "states-restart", version, default_outputs=False)
        settings = InferenceSettings.model_validate(
            {
                # Remote mode on the tests' Triton: stopping this inference leaves Triton, and
                # the model it loaded, serving.
                "triton_mode": "remote",
                "triton_url": deps.triton_endpoint,
                "registry_target": deps.registry_target,
                "reconcile": False,
                "server": {"port": free_port()},
            }
        )
        target = f"127.0.0.1:{settings.server.port}"
        with capture_logs() as logs:
            async with router(deps, inference_target=target) as (stub, app):
                async with running(inference_server.build_server, settings) as (_, channel, _):
                    inference = inference_grpc.InferenceServiceStub(channel)
                    # The router's channel to this address has been refused until now, and
                    # gRPC shares the connection (and its backoff) with this one.
                    loaded = await inference.LoadModelVersion(
                        inference_pb.LoadModelVersionRequest(name=version),
                        timeout=WAIT_S,
                        wait_for_ready=True,
                    )
                    assert loaded.model_version.state == inference_pb.MODEL_VERSION_STATE_READY
                    await eventually(
                        lambda: version in app.routes.snapshot.ready,
                        "the version READY in the router",
                        within_s=WAIT_S,
                    )
                    before = await stub.Predict(request("states-restart"))
                await eventually(
                    lambda: any(e["event"] == "model_state_watch_lost" for e in logs),
                    "the router noticing that inference went away",
                    within_s=WAIT_S,
                )
                away = [await stub.Predict(request("states-restart")) for _ in range(3)]
                async with running(inference_server.build_server, settings) as (_, channel, _):
                    inference = inference_grpc.InferenceServiceStub(channel)
                    await eventually(
                        lambda: version not in app.routes.snapshot.ready,
                        "the new inference's whole state replacing the old one",
                        within_s=WAIT_S,
                    )
                    error = await refused(stub.Predict(request("states-restart")))
                    try:
                        await inference.LoadModelVersion(
                            inference_pb.LoadModelVersionRequest(name=version),
                            timeout=WAIT_S,
                            wait_for_ready=True,
                        )
                        await eventually(
                            lambda: version in app.routes.snapshot.ready,
                            "the version READY again",
                            within_s=WAIT_S,
                        )
                        again = await stub.Predict(request("states-restart"))
                    finally:
                        await inference.UnloadModelVersion(
                            inference_pb.UnloadModelVersionRequest(name=version), timeout=WAIT_S
                        )
        assert before.model_version == version
        assert [a.model_version for a in away] == [version] * 3
        assert (error.code, error.reason) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "VERSION_NOT_READY",
        )
        assert again.model_version == version


def _list_calls(logs: list[dict[str, Any]]) -> int:
    """ListModelVersions calls that inference (in this process) logged."""
    method = "/modelserve.inference.v1.InferenceService/ListModelVersions"
    return sum(1 for e in logs if e["event"] == "rpc" and e.get("method") == method)
