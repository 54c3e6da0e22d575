"""Fixtures for the registry service: a running service over a data directory in tmp_path."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from registry_testing import RunningRegistry
from support import running

from modelserve.registry.v1 import registry_service_pb2_grpc as pb_grpc
from modelserve_registry.config import RegistrySettings
from modelserve_registry.server import RegistryApp, build_server


@pytest.fixture
def registry_settings(tmp_path: Path) -> RegistrySettings:
    """Settings with the data directory in tmp_path and small read chunks."""
    return RegistrySettings(data_dir=tmp_path / "registry", read_chunk_bytes=100)


@pytest.fixture
async def registry(registry_settings: RegistrySettings) -> AsyncIterator[RunningRegistry]:
    """The registry service, running on port 0 over a fresh data directory."""
    async with running(build_server, registry_settings) as (_, channel, app):
        assert isinstance(app, RegistryApp)
        yield RunningRegistry(pb_grpc.RegistryServiceStub(channel), app, registry_settings)
