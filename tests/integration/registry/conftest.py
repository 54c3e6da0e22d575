"""Fixtures for the registry service: a running service over a data directory in tmp_path."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from registry_testing import (
    AuthRegistry,
    RunningRegistry,
    create_model,
    principal_keys,
    set_traffic,
    upload_version,
)
from support import running

from modelserve.registry.v1 import registry_service_pb2 as pb
from modelserve.registry.v1 import registry_service_pb2_grpc as pb_grpc
from modelserve_registry.config import RegistrySettings
from modelserve_registry.server import RegistryApp, build_server
from modelserve_runtime.auth import AuthSettings

V1 = "models/fraud/versions/1"


@pytest.fixture
def registry_settings(tmp_path: Path) -> RegistrySettings:
    """Settings with the data directory in tmp_path and small read chunks."""
    return RegistrySettings(
        production_traffic_only=False, data_dir=tmp_path / "registry", read_chunk_bytes=100
    )


@pytest.fixture
async def registry(registry_settings: RegistrySettings) -> AsyncIterator[RunningRegistry]:
    """The registry service, running on port 0 over a fresh data directory."""
    async with running(build_server, registry_settings) as (_, channel, app):
        assert isinstance(app, RegistryApp)
        yield RunningRegistry(pb_grpc.RegistryServiceStub(channel), app, registry_settings)


@pytest.fixture
async def secured(tmp_path: Path) -> AsyncIterator[AuthRegistry]:
    """A registry with auth on, a key for each of PRINCIPALS, and `models/fraud` version 1
    in STAGING deployed to `deployments/fraud`."""
    keys, records = principal_keys()
    # The stage tests here are about approvals; validation runs need inference and are
    # tested with a real one in test_registry_validation.py.
    settings = RegistrySettings(
        production_traffic_only=False,
        require_validation=False,
        data_dir=tmp_path / "registry",
        auth=AuthSettings(enabled=True, keys=records),
    )
    async with running(build_server, settings) as (_, channel, _app):
        registry = AuthRegistry(pb_grpc.RegistryServiceStub(channel), channel, keys)
        admin = registry.bearer("ada")
        await create_model(registry.stub, metadata=admin)
        await upload_version(registry.stub, metadata=admin)
        await registry.stub.TransitionModelVersionStage(
            pb.TransitionModelVersionStageRequest(name=V1, stage=pb.STAGE_STAGING),
            metadata=admin,
        )
        await set_traffic(registry.stub, "deployments/fraud", (V1, 100), metadata=admin)
        yield registry
