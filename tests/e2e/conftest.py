"""The whole stack as `make up` runs it (redis-server, Triton, five service processes), with the
demo model deployed and every span sent to an in-test OTLP receiver."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from otlp_receiver import OtlpReceiver

from modelserve_cli.demo import DemoDeployment, deploy_demo
from modelserve_cli.stack import Stack, StackOptions


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
    """Every service running as its own process; fails (never skips) when one cannot start."""
    run_dir: Path = tmp_path_factory.mktemp("stack")
    stack = Stack(
        StackOptions(
            run_dir=run_dir,
            otlp_endpoint=otlp.grpc_endpoint,
            triton_trace_endpoint=otlp.http_endpoint,
            # Through the feature and inference services; test_direct_path covers the default.
            env={
                "MODELSERVE_ROUTER_FEATURE_READER": "service",
                "MODELSERVE_ROUTER_MODEL_RUNNER": "service",
            },
        )
    )
    await stack.start()
    try:
        yield stack
    finally:
        await stack.stop()


@pytest.fixture(scope="session")
async def demo(stack: Stack) -> DemoDeployment:
    """The demo fraud model, registered, loaded and routed at endpoint `fraud`."""
    return await deploy_demo(stack.targets)
