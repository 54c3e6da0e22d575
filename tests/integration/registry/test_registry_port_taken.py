"""A port taken by another process: the service says so in one line and exits 2, and the
local stack gives a service (or its Redis) whose free port was taken before it could bind
another one (a port the caller fixed, never)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelserve_cli.stack import RedisProcess, Stack, StackError, StackOptions, free_port
from modelserve_runtime.channels import create_channel


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port another process (this one) listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", free_port()))
        sock.listen()
        yield int(sock.getsockname()[1])


def test_the_service_names_the_port_it_cannot_bind(taken_port: int, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELSERVE_")}
    env |= {
        "MODELSERVE_REGISTRY_SERVER__PORT": str(taken_port),
        "MODELSERVE_REGISTRY_DATA_DIR": str(tmp_path / "registry"),
    }
    done = subprocess.run(
        [sys.executable, "-c", "from modelserve_registry.server import main; main()"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert (
        f"modelserve-registry: server.port: cannot bind 127.0.0.1:{taken_port}: another process"
        " listens there" in done.stderr
    )
    assert "Traceback" not in done.stderr + done.stdout


async def test_the_stack_moves_a_service_whose_port_was_taken(
    taken_port: int, tmp_path: Path
) -> None:
    stack = Stack(StackOptions(run_dir=tmp_path, services=("registry",)))
    stack.targets["registry"] = f"127.0.0.1:{taken_port}"
    try:
        await stack.start()
        target = stack.targets["registry"]
        assert target != f"127.0.0.1:{taken_port}"
        async with create_channel(target) as channel:
            answer = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        assert "cannot bind" in stack.log_path("registry").read_text()
    finally:
        await stack.stop()


async def test_a_port_the_caller_fixed_is_never_moved(taken_port: int, tmp_path: Path) -> None:
    stack = Stack(
        StackOptions(run_dir=tmp_path, services=("registry",), ports={"registry": taken_port})
    )
    with pytest.raises(StackError, match=f"cannot bind 127.0.0.1:{taken_port}"):
        await stack.start()
    assert stack.targets["registry"] == f"127.0.0.1:{taken_port}"
    assert stack.redis.pid is None or not _running(stack.redis.pid)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_free_ports_are_taken_below_the_ephemeral_range() -> None:
    """Below it, no outgoing connection takes the port between the pick and the bind."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = {free_port() for _ in range(20)}
    assert all(port < low for port in ports), ports
    assert len(ports) > 1
    for port in ports:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_redis_moves_off_a_port_taken_before_it_binds(taken_port: int, tmp_path: Path) -> None:
    server = RedisProcess(tmp_path / "redis")
    server.port = taken_port  # as if another process took its free port meanwhile
    server.start()
    try:
        assert server.port != taken_port
        assert redis.Redis.from_url(server.url).info("server")["process_id"] == server.pid
    finally:
        server.stop()


def test_redis_does_not_take_another_redis_for_its_own(tmp_path: Path) -> None:
    """A Redis already on the port answers PING too: the server started must be the one
    that answers."""
    other = RedisProcess(tmp_path / "other")
    other.start()
    server = RedisProcess(tmp_path / "redis")
    server.port = other.port
    try:
        server.start()
        assert server.port != other.port
        assert redis.Redis.from_url(server.url).info("server")["process_id"] == server.pid
    finally:
        server.stop()
        other.stop()


def test_redis_on_a_fixed_port_that_is_taken_fails_saying_so(
    taken_port: int, tmp_path: Path
) -> None:
    server = RedisProcess(tmp_path / "redis", port=taken_port)
    with pytest.raises(StackError, match="Address already in use"):
        server.start()
    assert server.port == taken_port
