"""`modelserve demo`: the demo model deployed onto a suite that is already running (what a
Docker Compose file or a Kubernetes Job runs once the services are up), here with API keys
on at the registry and the router."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from support import expected_probabilities

from modelserve.registry.v1 import registry_service_pb2 as registry_pb
from modelserve.registry.v1 import registry_service_pb2_grpc as registry_grpc
from modelserve.router.v1 import router_service_pb2_grpc as router_grpc
from modelserve_cli.demo import DemoDeployment, demo_request
from modelserve_cli.stack import Stack, StackOptions
from modelserve_demo import fraud
from modelserve_runtime.auth import Role, new_api_key
from modelserve_runtime.channels import create_channel

CLI = str(Path(sys.executable).parent / "modelserve")


@pytest.fixture(scope="module")
async def secured(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[Stack, str]]:
    """A stack whose registry and router ask for API keys, and a `deployer` key, which may
    deploy and predict (the services' own calls to the registry carry it too)."""
    key, record = new_api_key("demo-operator", [Role.DEPLOYER], n=2**10)
    keys = json.dumps([record.model_dump(mode="json")])
    env = {
        "MODELSERVE_REGISTRY_AUTH__ENABLED": "true",
        "MODELSERVE_REGISTRY_AUTH__KEYS": keys,
        "MODELSERVE_ROUTER_AUTH__ENABLED": "true",
        "MODELSERVE_ROUTER_AUTH__KEYS": keys,
        **{
            f"MODELSERVE_{service}_REGISTRY_API_KEY": key
            for service in ("ROUTER", "INFERENCE", "MONITOR")
        },
    }
    stack = Stack(StackOptions(run_dir=tmp_path_factory.mktemp("demo-command"), env=env))
    await stack.start()
    try:
        yield stack, key
    finally:
        await stack.stop()


async def _demo(targets: dict[str, str], *args: str, api_key: str | None = None) -> tuple[int, str]:
    """Runs `modelserve demo` with the services' addresses in its environment."""
    return await _cli(targets, "demo", *args, api_key=api_key)


async def _cli(targets: dict[str, str], *args: str, api_key: str | None = None) -> tuple[int, str]:
    """Runs the console script with the services' addresses in its environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELSERVE_")}
    env.update(
        MODELSERVE_REGISTRY=targets["registry"],
        MODELSERVE_INFERENCE=targets["inference"],
        MODELSERVE_FEATURE=targets["feature"],
        COLUMNS="200",
    )
    if "router" in targets:
        env["MODELSERVE_ROUTER"] = targets["router"]
    if api_key is not None:
        env["MODELSERVE_API_KEY"] = api_key
    done = await asyncio.to_thread(
        subprocess.run, [CLI, *args], env=env, capture_output=True, text=True, timeout=300
    )
    return done.returncode, done.stdout + done.stderr


async def _versions(stack: Stack, key: str) -> list[str]:
    async with create_channel(stack.targets["registry"], api_key=key) as channel:
        try:
            answer = await registry_grpc.RegistryServiceStub(channel).ListModelVersions(
                registry_pb.ListModelVersionsRequest(parent="models/fraud")
            )
        except grpc.aio.AioRpcError as exc:
            assert exc.code() is grpc.StatusCode.NOT_FOUND, exc
            return []
    return [v.name for v in answer.model_versions]


class TestDemoCommand:
    async def test_deploys_onto_a_running_suite_and_predicts(
        self, secured: tuple[Stack, str]
    ) -> None:
        """Without a key the registry refuses the first call and nothing is registered; with
        one, a version is registered, loaded and routed, the router answers from it as
        onnxruntime does (`modelserve predict` too, with the key, and not without), and a
        second run rolls endpoint `fraud` on to a new version."""
        stack, key = secured

        code, output = await _demo(stack.targets)
        assert code == 1, output
        assert "error: UNAUTHENTICATED" in output, output
        assert await _versions(stack, key) == []

        code, output = await _demo(stack.targets, api_key=key)
        assert code == 0, output
        assert "deployed models/fraud/versions/1 to endpoint fraud" in output, output
        assert "from models/fraud/versions/1" in output, output

        request = demo_request("c-1002", 99.0)
        async with create_channel(stack.targets["router"], api_key=key) as channel:
            response = await router_grpc.RouterServiceStub(channel).Predict(request)
        assert response.model_version == "models/fraud/versions/1"
        probabilities = next(o for o in response.outputs if o.name == "probabilities")
        demo = DemoDeployment(
            model_version=response.model_version,
            trained=fraud.train(seed=0),
            customers=fraud.demo_customers(),
        )
        np.testing.assert_allclose(
            probabilities.contents.fp32_contents, expected_probabilities(demo, request), atol=1e-5
        )

        predicted = await _cli(stack.targets, "predict", "--customer", "c-1003", api_key=key)
        refused = await _cli(stack.targets, "predict", "--customer", "c-1003")
        assert predicted[0] == 0, predicted[1]
        assert "models/fraud/versions/1" in predicted[1], predicted[1]
        assert refused[0] == 1 and "UNAUTHENTICATED" in refused[1], refused[1]

        code, output = await _demo(stack.targets, "--seed", "1", api_key=key)
        assert code == 0, output
        assert "from models/fraud/versions/2" in output, output
        assert sorted(await _versions(stack, key)) == [
            "models/fraud/versions/1",
            "models/fraud/versions/2",
        ]


async def test_a_suite_that_is_not_up_is_named_with_what_it_answered() -> None:
    """Nobody listens: the command gives up after --wait-s with one line naming each service
    it waited for and its last answer, and exits 1."""
    ports = []
    for _ in range(3):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
    targets = {
        "registry": f"127.0.0.1:{ports[0]}",
        "inference": f"127.0.0.1:{ports[1]}",
        "feature": f"127.0.0.1:{ports[2]}",
    }
    code, output = await _demo(targets, "--wait-s", "1")
    assert code == 1, output
    line = " ".join(output.split())
    assert "error: not serving after 1s:" in line, output
    for service, target in targets.items():
        assert f"{service} at {target} (UNAVAILABLE" in line, output
