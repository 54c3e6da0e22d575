"""The registry over Connect on its HTTP port (`server.http_port`), called with connect-python's
client: an upload as a client stream, reads as JSON, the deployment watch as a server stream,
the same API keys and roles as over gRPC, and a bad upload that keeps nothing."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from connectrpc.client import ConnectClient
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from registry_testing import (
    AuthRegistry,
    create_model,
    files_under,
    principal_keys,
    set_traffic,
    stream,
    tiny_onnx,
    upload_requests,
    upload_version,
)
from support import connect_method, running

from modelserve.registry.v1 import registry_service_pb2 as pb
from modelserve.registry.v1 import registry_service_pb2_grpc as pb_grpc
from modelserve_registry.config import RegistrySettings
from modelserve_registry.server import build_server
from modelserve_runtime.auth import AuthSettings
from modelserve_runtime.config import ServerSettings

REGISTRY = pb.DESCRIPTOR.services_by_name["RegistryService"]


class _Connect:
    def __init__(self, base: str, keys: dict[str, str]) -> None:
        self.base = base
        self.keys = keys

    def headers(self, principal: str) -> dict[str, str]:
        return {"authorization": f"Bearer {self.keys[principal]}"}


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[AuthRegistry, _Connect, Path]]:
    keys, records = principal_keys()
    data_dir = tmp_path / "registry"
    settings = RegistrySettings(
        production_traffic_only=False,
        require_validation=False,
        data_dir=data_dir,
        auth=AuthSettings(enabled=True, keys=records),
        server=ServerSettings(http_port=0),
    )
    async with running(build_server, settings) as (server, channel, _app):
        assert server.http is not None
        registry = AuthRegistry(pb_grpc.RegistryServiceStub(channel), channel, keys)
        await create_model(registry.stub, metadata=registry.bearer("ada"))
        yield registry, _Connect(f"http://127.0.0.1:{server.http.port}", keys), data_dir


async def test_upload_as_a_client_stream_then_read_as_json(
    served: tuple[AuthRegistry, _Connect, Path],
) -> None:
    """CreateModelVersion's upload (metadata, then chunks) streamed over Connect, and the
    version read back as JSON: the same version gRPC reads."""
    registry, connect, _ = served
    uploaded = await ConnectClient(connect.base).execute_client_stream(
        request=stream(upload_requests(tiny_onnx(), chunk_bytes=50)),
        method=connect_method(REGISTRY, "CreateModelVersion"),
        headers=connect.headers("dan"),
    )
    assert uploaded.model_version.name == "models/fraud/versions/1"
    read = await ConnectClient(connect.base, proto_json=True).execute_unary(
        request=pb.GetModelVersionRequest(name="models/fraud/versions/1"),
        method=connect_method(REGISTRY, "GetModelVersion"),
        headers=connect.headers("vera"),
    )
    over_grpc = await registry.stub.GetModelVersion(
        pb.GetModelVersionRequest(name="models/fraud/versions/1"),
        metadata=registry.bearer("vera"),
    )
    assert read == over_grpc
    assert read.model_version.sha256 == uploaded.model_version.sha256


async def test_a_bad_upload_keeps_nothing(served: tuple[AuthRegistry, _Connect, Path]) -> None:
    """An upload whose bytes do not match its sha256 is refused over Connect as over gRPC,
    and leaves no file and no version behind."""
    registry, connect, data_dir = served
    before = files_under(data_dir)
    with pytest.raises(ConnectError) as raised:
        await ConnectClient(connect.base).execute_client_stream(
            request=stream(upload_requests(tiny_onnx(), sha256="0" * 64)),
            method=connect_method(REGISTRY, "CreateModelVersion"),
            headers=connect.headers("dan"),
        )
    assert raised.value.code is Code.INVALID_ARGUMENT
    assert "sha256" in str(raised.value)
    assert files_under(data_dir) == before
    versions = await registry.stub.ListModelVersions(
        pb.ListModelVersionsRequest(parent="models/fraud"), metadata=registry.bearer("vera")
    )
    assert list(versions.model_versions) == []


async def test_keys_and_roles_as_over_grpc(served: tuple[AuthRegistry, _Connect, Path]) -> None:
    """No key: unauthenticated (401); a viewer's key reads but may not change a deployment
    (permission_denied, 403); a deployer's may."""
    _, connect, _ = served
    url = f"{connect.base}/modelserve.registry.v1.RegistryService/UpdateDeployment"
    change = {
        "deployment": {"name": "deployments/fraud", "shadow": ["models/fraud/versions/9"]},
        "allowMissing": True,
    }
    async with aiohttp.ClientSession() as session:
        async with session.post(url, json=change) as response:
            anonymous = (response.status, (await response.json())["code"])
        async with session.post(url, json=change, headers=connect.headers("vera")) as response:
            viewer = (response.status, (await response.json())["code"])
        async with session.post(
            f"{connect.base}/modelserve.registry.v1.RegistryService/ListModels",
            json={},
            headers=connect.headers("vera"),
        ) as response:
            listed = (response.status, await response.json())
    assert anonymous == (401, "unauthenticated")
    assert viewer == (403, "permission_denied")
    assert listed[0] == 200
    assert [m["name"] for m in listed[1]["models"]] == ["models/fraud"]


async def test_watch_deployments_as_a_server_stream(
    served: tuple[AuthRegistry, _Connect, Path],
) -> None:
    """WatchDeployments over Connect: the current revision first, then each new revision
    as it is made."""
    registry, connect, _ = served
    admin = registry.bearer("ada")
    await upload_version(registry.stub, metadata=admin)
    await upload_version(registry.stub, metadata=admin)
    v1, v2 = "models/fraud/versions/1", "models/fraud/versions/2"
    await set_traffic(registry.stub, "deployments/fraud", (v1, 100), metadata=admin)
    watch = ConnectClient(connect.base).execute_server_stream(
        request=pb.WatchDeploymentsRequest(name="deployments/fraud"),
        method=connect_method(REGISTRY, "WatchDeployments"),
        headers=connect.headers("vera"),
        timeout_ms=20_000,
    )
    seen: list[tuple[int, str]] = []
    # Not under asyncio.timeout: connect-python 0.9.0's client then never yields the stream's
    # messages. The call's own timeout bounds it.
    async for item in watch:
        seen.append((item.revision.deployment.revision, item.revision.reason))
        if len(seen) == 2:
            break
        await set_traffic(
            registry.stub, "deployments/fraud", (v1, 90), (v2, 10), reason="canary", metadata=admin
        )
    assert seen == [(1, ""), (2, "canary")]
