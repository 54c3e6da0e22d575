"""Router replicas: two routers, each started as the real service starts (`serve()`, which
registers it in Consul), serve a sticky A/B endpoint on the running stack; a caller that finds
them through discovery gets the same version for a customer from either, and a change to the
deployment reaches both."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import pytest
from consul_fake import FakeConsul, fake_consul, key
from stack_router import stack_router_settings
from support import eventually

from modelserve.registry.v1 import registry_service_pb2 as registry_pb
from modelserve.registry.v1 import registry_service_pb2_grpc as registry_grpc
from modelserve.router.v1 import router_service_pb2 as router_pb
from modelserve.router.v1 import router_service_pb2_grpc as router_grpc
from modelserve_cli.demo import DemoDeployment, add_ready_version, demo_request
from modelserve_cli.stack import Stack
from modelserve_router.server import build_server
from modelserve_runtime.channels import create_channel
from modelserve_runtime.discovery import ConsulDiscovery
from modelserve_runtime.server import serve

ENDPOINT = "fraud-replicas"
STREAM = "test:router-replicas"
CUSTOMERS = [f"c-{2000 + i}" for i in range(40)]
#: The longest a test waits for something that must happen; never a fixed sleep.
WAIT_S = 20.0


@dataclass
class Arms:
    """The two versions behind `fraud-replicas` and a stub on the registry."""

    blue: str
    """The demo version."""
    green: str
    """A second READY version of the demo model (same artifact, so the same answers)."""
    registry: registry_grpc.RegistryServiceAsyncStub


def split(blue: str, green: str, blue_percent: int) -> registry_pb.Deployment:
    """`fraud-replicas` split between the two versions, sticky by customer, with its own salt."""
    return registry_pb.Deployment(
        name=f"deployments/{ENDPOINT}",
        traffic=[
            registry_pb.TrafficTarget(model_version=blue, percent=blue_percent),
            registry_pb.TrafficTarget(model_version=green, percent=100 - blue_percent),
        ],
        routing_key="customer",
        salt="replicas",
    )


async def deploy(arms: Arms, blue_percent: int) -> None:
    await arms.registry.UpdateDeployment(
        registry_pb.UpdateDeploymentRequest(
            deployment=split(arms.blue, arms.green, blue_percent), allow_missing=True
        )
    )


@pytest.fixture(scope="module")
async def arms(stack: Stack, demo: DemoDeployment) -> AsyncIterator[Arms]:
    """A new READY version of the demo model and `fraud-replicas` split 50/50 between it and
    the demo version."""
    green = await add_ready_version(stack.targets, demo)
    async with create_channel(stack.targets["registry"], default_timeout_s=60) as channel:
        registry = registry_grpc.RegistryServiceStub(channel)
        deployed = Arms(demo.model_version, green, registry)
        await deploy(deployed, 50)
        yield deployed


@pytest.fixture
def consul(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeConsul]:
    """A fake Consul agent that reports a registered instance while its gRPC health check
    answers SERVING, as a real agent does."""
    for name in ("CONSUL_HTTP_TOKEN", "CONSUL_HTTP_SSL", "CONSUL_HTTP_ADDR"):
        monkeypatch.delenv(name, raising=False)
    with fake_consul(check_registered=True) as state:
        yield state


@contextlib.asynccontextmanager
async def replicas(stack: Stack, consul: FakeConsul, count: int) -> AsyncIterator[None]:
    """`count` routers in this process, each run by `serve()` as `modelserve-router` runs it
    (so each registers itself in Consul once SERVING, and deregisters on stop), all at once."""
    settings = stack_router_settings(
        stack,
        STREAM,
        server={"host": "127.0.0.1", "port": 0, "grace_period_s": 1},
        discovery={"mode": "consul", "consul_host": "127.0.0.1", "consul_port": consul.port},
    )
    stop = asyncio.Event()
    services = [
        asyncio.create_task(serve("router", settings, build_server, stop_event=stop))
        for _ in range(count)
    ]

    def all_registered() -> bool:
        for service in services:
            if service.done():
                service.result()  # a router that could not start fails here with its error
                pytest.fail("a router replica stopped by itself")
        return len(consul.registered) == count

    try:
        await eventually(all_registered, f"{count} routers registered in Consul", within_s=WAIT_S)
        yield
    finally:
        stop.set()
        await asyncio.gather(*services)


def request(customer: str) -> router_pb.PredictRequest:
    asked = demo_request(customer, 50.0)
    asked.endpoint = ENDPOINT
    return asked


class TestReplicas:
    async def test_replicas_behind_discovery_agree_and_converge(
        self, stack: Stack, arms: Arms, consul: FakeConsul
    ) -> None:
        """Two routers running at once, found through Consul, give each customer the same
        sticky version, both arms are used, and both follow a new split from the registry."""
        async with replicas(stack, consul, 2):
            registered = {(key(b, "Name"), key(b, "Address")) for b in consul.registered}
            assert registered == {("router", "127.0.0.1")}
            discovery = ConsulDiscovery("127.0.0.1", consul.port)
            addresses: set[str] = set()

            async def both_resolved() -> bool:
                addresses.add(await discovery.resolve("router"))
                return len(addresses) == 2

            await eventually(both_resolved, "both routers resolved through Consul")
            async with (
                create_channel(sorted(addresses)[0]) as first,
                create_channel(sorted(addresses)[1]) as second,
            ):
                routers = [router_grpc.RouterServiceStub(c) for c in (first, second)]

                async def each_routes_sticky() -> bool:
                    # A replica answers `sticky` once its snapshot holds the deployment and both
                    # versions READY (from the registry's and inference's watch streams).
                    answers = [await r.Predict(request(CUSTOMERS[0])) for r in routers]
                    return {a.route_reason for a in answers} == {"sticky"}

                await eventually(each_routes_sticky, "both replicas routing", within_s=WAIT_S)
                answers: dict[str, list[router_pb.PredictResponse]] = {}
                for i, customer in enumerate(CUSTOMERS):
                    # Round robin over the resolved addresses: every customer reaches both,
                    # half of them the first replica first.
                    order = routers[i % 2 :] + routers[: i % 2]
                    answers[customer] = [await r.Predict(request(customer)) for r in order]
                assert {a.route_reason for pair in answers.values() for a in pair} == {"sticky"}
                disagree = {
                    c: [a.model_version for a in pair]
                    for c, pair in answers.items()
                    if pair[0].model_version != pair[1].model_version
                }
                assert disagree == {}
                assert {pair[0].model_version for pair in answers.values()} == {
                    arms.blue,
                    arms.green,
                }

                await deploy(arms, 100)

                async def both_converged() -> bool:
                    for i, customer in enumerate(CUSTOMERS):
                        for r in routers[i % 2 :] + routers[: i % 2]:
                            answer = await r.Predict(request(customer))
                            if (answer.model_version, answer.route_reason) != (
                                arms.blue,
                                "single_target",
                            ):
                                return False
                    return True

                await eventually(
                    both_converged, "both replicas on the 100/0 split", within_s=WAIT_S
                )
        assert sorted(consul.deregistered) == sorted(key(b, "ID") for b in consul.registered)
