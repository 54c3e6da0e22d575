"""Channels to a target with a resolver scheme spread their calls over every server it resolves
to (round robin), as the router needs to reach the pods of a Kubernetes headless Service; a
plain `host:port` keeps gRPC's one connection."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator

import grpc
import pytest

from modelserve_runtime.channels import create_channel

_METHOD = "/spread.Echo/Who"


async def _server(name: str, counts: Counter[str]) -> grpc.aio.Server:
    async def who(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        counts[name] += 1
        return name.encode()

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "spread.Echo", {"Who": grpc.unary_unary_rpc_method_handler(who)}
            ),
        )
    )
    return server


@pytest.fixture
async def servers() -> AsyncIterator[tuple[list[int], Counter[str]]]:
    counts: Counter[str] = Counter()
    started = []
    ports = []
    for name in ("a", "b"):
        server = await _server(name, counts)
        ports.append(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        started.append(server)
    try:
        yield ports, counts
    finally:
        for server in started:
            await server.stop(0)


async def _call(target: str, n: int) -> None:
    async with create_channel(target, default_timeout_s=10) as channel:
        who = channel.unary_unary(_METHOD)
        for _ in range(n):
            await who(b"", wait_for_ready=True)


async def test_a_resolver_target_spreads_calls_over_every_address(
    servers: tuple[list[int], Counter[str]],
) -> None:
    """`ipv4:` with both servers' addresses: twenty calls reach both, neither takes all."""
    ports, counts = servers
    await _call(f"ipv4:127.0.0.1:{ports[0]},127.0.0.1:{ports[1]}", 20)
    assert set(counts) == {"a", "b"}
    assert sum(counts.values()) == 20


async def test_a_plain_target_keeps_one_server(servers: tuple[list[int], Counter[str]]) -> None:
    """`host:port` is one server, as before."""
    ports, counts = servers
    await _call(f"127.0.0.1:{ports[1]}", 5)
    assert counts == Counter({"b": 5})
