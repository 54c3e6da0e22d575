"""Session fixtures: the real Redis server, and helpers to run services in-process on port 0."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from modelserve_cli.stack import RedisProcess, StackError

#: tests/gpu needs an NVIDIA GPU and onnxruntime-gpu, which CI has not: `make test-gpu` runs it
#: (with MODELSERVE_GPU_TESTS=1); `make test` leaves it out.
collect_ignore = [] if os.environ.get("MODELSERVE_GPU_TESTS") == "1" else ["gpu"]


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server on a free port, for the whole session; fails when it cannot start."""
    server = RedisProcess(tmp_path_factory.mktemp("redis"))
    try:
        server.start()
    except StackError as exc:
        pytest.fail(f"{exc}; `make test` installs redis-server")
    yield server.url
    server.stop()


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A client on a clean keyspace."""
    client = aioredis.Redis.from_url(redis_url)
    await client.flushall()
    yield client
    await client.aclose()


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root."""
    return Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True, scope="session")
def _no_proxy() -> None:
    """gRPC must not send loopback traffic through a proxy from the environment."""
    os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"
    asyncio.get_event_loop_policy()
