"""Real Redis topologies for the connection-mode tests: an ACL server, a TLS server with
certificates made on the spot, a master + replica + Sentinel, a three-node Cluster; and the
feature service running on one of them.

Each is an async context manager that starts its redis-server processes on free ports, waits
until they answer (by asking, through `eventually`), and stops every process on the way out,
whatever happened inside.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import socket
import subprocess
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis
from pki import certificate_authority, client_certificate, server_certificate
from redis.exceptions import RedisError
from support import eventually

from modelserve.feature.v1 import feature_service_pb2_grpc as pb_grpc
from modelserve_cli.stack import free_port
from modelserve_feature.config import FeatureSettings
from modelserve_feature.server import FeatureApp, build_server
from modelserve_runtime.channels import create_channel

#: How long a topology may take to come up on a busy two-core machine.
START_WITHIN_S = 20.0


def _redis_server() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed; `make test` installs it")
    return binary


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return ""


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free as well."""
    while True:
        port = free_port()
        if port + 10000 < 65536 and _port_is_free(port + 10000):
            return port


@dataclass
class RedisServer:
    """One redis-server child (a Sentinel with `sentinel=True`), started by `start`."""

    name: str
    work_dir: Path
    port: int
    args: Sequence[str] = ()
    config_file: Path | None = None
    sentinel: bool = False
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)

    @property
    def log_path(self) -> Path:
        """Where the server's log goes."""
        return self.work_dir / f"{self.name}.log"

    def start(self) -> None:
        """Starts the process (it answers a moment later: see `wait_ready`)."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        command = [_redis_server()]
        if self.config_file is not None:
            command.append(str(self.config_file))
        if self.sentinel:
            command.append("--sentinel")
        command += ["--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.work_dir)]
        if not self.sentinel:
            command += ["--save", "", "--appendonly", "no"]
        command += list(self.args)
        with self.log_path.open("ab") as log_file:
            self.process = subprocess.Popen(
                command,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    async def wait_ready(self, client: aioredis.Redis) -> None:
        """Returns once `client` (pointed at this server) gets an answer to PING; fails with
        the server's log when the process exits or does not answer in time."""

        async def answers() -> bool:
            if self.process is not None and self.process.poll() is not None:
                pytest.fail(f"{self.name} exited:\n{_tail(self.log_path)}")
            try:
                return bool(await client.ping())
            except (RedisError, OSError):
                return False

        await eventually(answers, f"{self.name} answers PING", within_s=START_WITHIN_S)

    def signal(self, sig: signal.Signals) -> None:
        """Sends `sig` to the server (SIGSTOP hangs it, SIGCONT resumes it)."""
        assert self.process is not None
        self.process.send_signal(sig)

    def stop(self) -> None:
        """SIGKILL (nothing here needs a clean shutdown) and reap; safe to call twice."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGCONT)  # a hung server is killed all the same
        self.process.kill()
        self.process.wait(10)


@contextlib.contextmanager
def _stopping(servers: list[RedisServer]) -> Any:
    try:
        yield
    finally:
        for server in servers:
            server.stop()


@asynccontextmanager
async def _closing(*clients: Any) -> AsyncIterator[None]:
    try:
        yield
    finally:
        for client in clients:
            await client.aclose()


# --- ACL ---------------------------------------------------------------------------------------

ACL_USER = "feature"
ACL_PASSWORD = "feature-secret"
ADMIN_PASSWORD = "admin-secret"


@asynccontextmanager
async def acl_server(work_dir: Path) -> AsyncIterator[RedisServer]:
    """A server whose `default` user needs ADMIN_PASSWORD (`requirepass`) and whose ACL user
    ACL_USER (password ACL_PASSWORD) may touch only `fs:*` keys."""
    server = RedisServer(
        "redis-acl",
        work_dir,
        free_port(),
        [
            "--requirepass",
            ADMIN_PASSWORD,
            "--user",
            ACL_USER,
            "on",
            f">{ACL_PASSWORD}",
            "~fs:*",
            "+@all",
        ],
    )
    with _stopping([server]):
        server.start()
        admin = aioredis.Redis(port=server.port, password=ADMIN_PASSWORD)
        async with _closing(admin):
            await server.wait_ready(admin)
        yield server


# --- TLS ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Certificates:
    """PEM files: a CA, a server certificate for 127.0.0.1 and a client certificate it
    signed, and a second CA that signed nothing here."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path


def make_certificates(directory: Path) -> Certificates:
    """Generates the test PKI with the openssl command line (EC keys: quick to make)."""
    ca = certificate_authority(directory, "test-ca")
    server = server_certificate(directory, "server", ca)
    client = client_certificate(directory, "client", ca)
    other_ca = certificate_authority(directory, "other-ca")
    return Certificates(ca.cert, server.cert, server.key, client.cert, client.key, other_ca.cert)


@dataclass
class TlsServer:
    """A server that speaks only TLS, on `port`."""

    server: RedisServer
    port: int


@asynccontextmanager
async def tls_server(work_dir: Path, certs: Certificates) -> AsyncIterator[TlsServer]:
    """A server that speaks only TLS and requires a client certificate signed by `certs.ca`."""
    port = free_port()
    server = RedisServer(
        "redis-tls",
        work_dir,
        0,
        [
            "--tls-port", str(port),
            "--tls-cert-file", str(certs.server_cert),
            "--tls-key-file", str(certs.server_key),
            "--tls-ca-cert-file", str(certs.ca),
            "--tls-auth-clients", "yes",
        ],
    )  # fmt: skip
    with _stopping([server]):
        server.start()
        client = aioredis.Redis(
            port=port,
            ssl=True,
            ssl_ca_certs=str(certs.ca),
            ssl_certfile=str(certs.client_cert),
            ssl_keyfile=str(certs.client_key),
        )
        async with _closing(client):
            await server.wait_ready(client)
        yield TlsServer(server, port)


# --- Sentinel ----------------------------------------------------------------------------------

MASTER_NAME = "featurestore"


@dataclass
class SentinelSetup:
    """A master, its replica and one Sentinel watching them (quorum 1)."""

    master: RedisServer
    replica: RedisServer
    sentinel: RedisServer

    async def master_port(self) -> int:
        """The master's port, as the Sentinel names it now."""
        client = aioredis.Redis(port=self.sentinel.port)
        async with _closing(client):
            address: Any = await client.sentinel_get_master_addr_by_name(MASTER_NAME)
        return int(address[1])


@asynccontextmanager
async def sentinel_setup(work_dir: Path) -> AsyncIterator[SentinelSetup]:
    """Starts master, replica and Sentinel; returns once the Sentinel knows the replica as a
    healthy one, so a failover can promote it at once."""
    # A replica's first sync would wait out the default 5 s diskless-sync delay.
    master = RedisServer(
        "redis-master", work_dir / "master", free_port(), ["--repl-diskless-sync-delay", "0"]
    )
    replica = RedisServer(
        "redis-replica",
        work_dir / "replica",
        free_port(),
        ["--replicaof", "127.0.0.1", str(master.port)],
    )
    config = work_dir / "sentinel" / "sentinel.conf"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(
        f"sentinel monitor {MASTER_NAME} 127.0.0.1 {master.port} 1\n"
        # Small timings, so that a dead master is noticed and replaced within seconds.
        f"sentinel down-after-milliseconds {MASTER_NAME} 300\n"
        f"sentinel failover-timeout {MASTER_NAME} 5000\n"
    )
    sentinel = RedisServer(
        "redis-sentinel", config.parent, free_port(), config_file=config, sentinel=True
    )
    servers = [master, replica, sentinel]
    with _stopping(servers):
        clients = [aioredis.Redis(port=s.port) for s in servers]
        async with _closing(*clients):

            async def replica_in_sync() -> bool:
                info = await clients[1].info("replication")
                return bool(info.get("master_link_status") == "up")

            async def sentinel_sees_replica() -> bool:
                replicas = await clients[2].sentinel_slaves(MASTER_NAME)
                return any(
                    r["port"] == replica.port and not (r["is_sdown"] or r["is_disconnected"])
                    for r in replicas
                )

            for server, client in zip(servers[:2], clients[:2], strict=True):
                server.start()
                await server.wait_ready(client)
            await eventually(replica_in_sync, "replica in sync", within_s=START_WITHIN_S)
            # Started only now, the Sentinel's first INFO of the master lists the replica (a
            # later one would come 10 s after).
            sentinel.start()
            await sentinel.wait_ready(clients[2])
            await eventually(sentinel_sees_replica, "sentinel sees replica", within_s=30)
        yield SentinelSetup(master, replica, sentinel)


# --- Cluster -----------------------------------------------------------------------------------


@dataclass
class ClusterSetup:
    """Three primaries, no replicas, and which slots each serves."""

    nodes: list[RedisServer]
    slots: dict[int, list[tuple[int, int]]]
    """Port -> slot ranges (inclusive)."""

    def node_of(self, slot: int) -> int:
        """The port of the node that serves `slot`."""
        for port, ranges in self.slots.items():
            if any(low <= slot <= high for low, high in ranges):
                return port
        raise AssertionError(f"slot {slot} is served by no node")

    @property
    def seeds(self) -> list[str]:
        """`host:port` of every node."""
        return [f"127.0.0.1:{node.port}" for node in self.nodes]


async def _cluster_create(nodes: Sequence[RedisServer]) -> None:
    command = [shutil.which("redis-cli") or "redis-cli", "--cluster", "create"]
    command += [f"127.0.0.1:{n.port}" for n in nodes]
    command += ["--cluster-replicas", "0", "--cluster-yes"]
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    output, _ = await asyncio.wait_for(process.communicate(), START_WITHIN_S)
    if process.returncode != 0:
        pytest.fail(f"redis-cli --cluster create failed:\n{output.decode(errors='replace')}")


async def _cluster_state(client: aioredis.Redis) -> str:
    info: dict[str, Any] = await client.cluster("INFO")
    return str(info.get("cluster_state", ""))


@asynccontextmanager
async def cluster_setup(work_dir: Path, size: int = 3) -> AsyncIterator[ClusterSetup]:
    """Starts `size` cluster-enabled servers and joins them with `redis-cli --cluster create`
    (no replicas); returns once every node reports `cluster_state:ok`."""
    nodes: list[RedisServer] = []
    for i in range(size):
        port = free_cluster_port()
        cluster_args = ["--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf"]
        # Long enough that a node hung for a moment by a test is not voted out.
        cluster_args += ["--cluster-node-timeout", "5000"]
        nodes.append(RedisServer(f"redis-cluster-{i}", work_dir / f"node-{i}", port, cluster_args))
    with _stopping(nodes):
        for node in nodes:
            node.start()
        clients = [aioredis.Redis(port=n.port) for n in nodes]
        async with _closing(*clients):
            for node, client in zip(nodes, clients, strict=True):
                await node.wait_ready(client)
            await _cluster_create(nodes)

            async def all_ok() -> bool:
                return all([await _cluster_state(client) == "ok" for client in clients])

            await eventually(all_ok, "cluster_state:ok on every node", within_s=START_WITHIN_S)
            slots: dict[int, list[tuple[int, int]]] = {n.port: [] for n in nodes}
            for low, high, primary, *_ in await clients[0].cluster("SLOTS"):
                slots[int(primary[1])].append((int(low), int(high)))
        yield ClusterSetup(nodes, slots)


# --- The feature service ------------------------------------------------------------------------


@dataclass
class Service:
    """A feature service running in this process: its app, a channel to it and a stub."""

    app: FeatureApp
    channel: grpc.aio.Channel
    stub: pb_grpc.FeatureServiceAsyncStub


@asynccontextmanager
async def feature_service(
    settings: FeatureSettings, *, ready: bool = True
) -> AsyncIterator[Service]:
    """The feature service on port 0; with `ready`, once its readiness check passed and it
    reports SERVING (without, the test makes the check itself, expecting it to fail). Unlike
    `support.running`, the server is stopped and the app closed even when the readiness check
    fails, so a wrong connection fails its test instead of hanging the run at exit."""
    grpc_server, app = await build_server(settings)
    channel: grpc.aio.Channel | None = None
    try:
        await grpc_server.server.start()
        channel = create_channel(f"127.0.0.1:{grpc_server.port}")
        if ready:
            await app.check_ready()
            await grpc_server.set_serving(True)
        yield Service(app, channel, pb_grpc.FeatureServiceStub(channel))
    finally:
        if channel is not None:
            await channel.close()
        await grpc_server.server.stop(0)
        await app.close()
