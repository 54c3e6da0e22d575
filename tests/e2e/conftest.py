"""The whole stack as `make up` runs it (redis-server, Triton, five service processes), with the
demo model deployed and every span sent to an in-test OTLP receiver."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from otlp_receiver import OtlpReceiver
from stacks import running_stack

from modelserve_cli.demo import DemoDeployment, deploy_demo
from modelserve_cli.stack import Stack


@pytest.fixture(scope="session")
def otlp() -> Iterator[OtlpReceiver]:
    """The trace receiver, for the session."""
    receiver = OtlpReceiver()
    receiver.start()
    yield receiver
    receiver.stop()


@pytest.fixture(scope="session")
async def stack(
    otlp: OtlpReceiver, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stack]:
    """The session's stack, its spans sent to the in-test receiver, the router serving HTTP
    too."""
    async with running_stack(
        tmp_path_factory.mktemp("stack"),
        otlp_endpoint=otlp.grpc_endpoint,
        triton_trace_endpoint=otlp.http_endpoint,
        router_http_port=0,
    ) as stack:
        yield stack


@pytest.fixture(scope="session")
async def demo(stack: Stack) -> DemoDeployment:
    """The demo fraud model, registered, loaded and routed at endpoint `fraud`."""
    return await deploy_demo(stack.targets)
