"""The local stack: redis-server plus the five services as child processes, started and stopped in order."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from redis.backoff import NoBackoff
from redis.retry import Retry

from modelserve_runtime.parent_death import dying_with_this_process
from modelserve_runtime.server import CANNOT_BIND, CANNOT_BIND_HTTP
from modelserve_triton.process import TRITON_LOG_FILE

#: Start order; the reverse is the stop order (the router first, so no request is orphaned).
SERVICES: tuple[str, ...] = ("registry", "feature", "monitor", "inference", "router")


class StackError(RuntimeError):
    """A process of the stack did not start; the message holds the tail of its log."""


#: Where `free_port` looks when the kernel's ephemeral range leaves room below it.
_LISTEN_PORTS_FROM = 20_000


def _ephemeral_low() -> int:
    """The lowest port the kernel gives outgoing connections."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, taken below the kernel's ephemeral
    range where it leaves room: a port from that range, once released, can become the local
    port of any outgoing connection (to Redis, say) before the service binds it."""
    low = _ephemeral_low()
    if low - _LISTEN_PORTS_FROM >= 1_000:
        for _ in range(50):
            port = random.randrange(_LISTEN_PORTS_FROM, low)
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return ""


class _PortTaken(Exception):
    """redis-server could not bind its port; the message is what it said."""


class RedisProcess:
    """A redis-server child on a free port, persistence off; waited for by PING."""

    def __init__(self, work_dir: Path, port: int = 0) -> None:
        """`port` 0: a free one, and another if it is taken before the server binds it."""
        self.work_dir = work_dir
        self.port = port or free_port()
        self._port_fixed = bool(port)
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """`redis://` URL of the server."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        """The child's pid once started."""
        return None if self._process is None else self._process.pid

    def start(self, timeout_s: float = 10.0, *, end_with_caller: bool = False) -> None:
        """Starts the server and returns once it answers PING. `end_with_caller`: Linux ends it
        when this process does, even by SIGKILL (modelserve_runtime.parent_death); only from
        a thread that lives as long as the process, since the calling thread's end counts."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise StackError("redis-server is not installed (Debian: apt-get install redis-server)")
        self.work_dir.mkdir(parents=True, exist_ok=True)
        for attempt in range(1, 4):
            try:
                self._start_once(binary, timeout_s, end_with_caller)
                return
            except _PortTaken as taken:
                if self._port_fixed or attempt == 3:
                    raise StackError(f"redis-server did not start:\n{taken}") from None
                self.port = free_port()

    def _start_once(self, binary: str, timeout_s: float, end_with_caller: bool) -> None:
        log_path = self.work_dir / "redis.log"
        offset = log_path.stat().st_size if log_path.exists() else 0
        with log_path.open("ab") as log_file:
            argv = [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.work_dir),
            ]
            self._process = subprocess.Popen(
                dying_with_this_process(argv) if end_with_caller else argv,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        # No retries: a port held by something that is not Redis must not stall the probe.
        client = redis.Redis(
            port=self.port,
            socket_connect_timeout=0.5,
            socket_timeout=0.5,
            retry=Retry(NoBackoff(), 0),
        )
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                if self._process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    with log_path.open("rb") as log:
                        log.seek(offset)
                        said = log.read().decode(errors="replace")
                    if "Address already in use" in said:
                        raise _PortTaken(said.strip())
                    raise StackError(f"redis-server did not start:\n{_tail(log_path)}")
                # The server that answers must be this one: another one may hold the port.
                with contextlib.suppress(redis.RedisError):
                    if client.info("server").get("process_id") == self._process.pid:
                        return
                time.sleep(0.02)
        finally:
            client.close()

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after `timeout_s`."""
        if self._process is None or self._process.poll() is not None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


@dataclass
class StackOptions:
    """What differs between `make up` and a test's stack."""

    run_dir: Path
    ports: Mapping[str, int] = field(default_factory=dict)
    """Fixed ports per service; the others get free ones."""
    otlp_endpoint: str | None = None
    """OTLP/gRPC collector for the services' spans."""
    triton_trace_endpoint: str | None = None
    """OTLP/HTTP receiver (`host:port`) for Triton's spans."""
    env: Mapping[str, str] = field(default_factory=dict)
    """Extra environment for every service (e.g. MODELSERVE_ROUTER_MODEL_RUNNER=triton)."""
    start_timeout_s: float = 180.0
    services: tuple[str, ...] = SERVICES
    """The services to run, a subset of SERVICES (started in SERVICES' order). A benchmark
    of the request path on a small machine leaves out the monitor, which in production runs
    on its own hosts and here would take CPU from the router."""
    router_http_port: int | None = None
    """The router's HTTP port (Connect, and the Open Inference Protocol's HTTP/REST binding):
    None for none, 0 for a free one."""
    http: bool = False
    """Every other service gets an HTTP port too (Connect), a free one."""


class Stack:
    """Redis and the five services on this machine, wired by static discovery."""

    def __init__(self, options: StackOptions) -> None:
        self.options = options
        self.redis = RedisProcess(options.run_dir / "redis")
        self.targets = {s: f"127.0.0.1:{options.ports.get(s) or free_port()}" for s in SERVICES}
        http_port = options.router_http_port
        self.router_http_port = free_port() if http_port == 0 else http_port
        """The router's HTTP port, None without one."""
        self.http_ports = (
            {s: free_port() for s in SERVICES if s != "router"} if options.http else {}
        )
        """The HTTP port (Connect) of each other service, with `options.http`."""
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self._log_offsets: dict[str, int] = {}
        unknown = set(options.services) - set(SERVICES)
        if unknown:
            raise StackError(f"unknown services {sorted(unknown)}; known: {list(SERVICES)}")
        self.services = tuple(s for s in SERVICES if s in options.services)

    def log_path(self, service: str) -> Path:
        """Where a service's stdout and stderr go."""
        return self.options.run_dir / "logs" / f"{service}.log"

    @property
    def triton_log_path(self) -> Path:
        """tritonserver's own log, in the work directory the inference service gives it."""
        return self.options.run_dir / "triton" / TRITON_LOG_FILE

    def _environment(self, service: str) -> dict[str, str]:
        prefix = f"MODELSERVE_{service.upper()}_"
        env = dict(os.environ)
        env.pop("MODELSERVE_CONFIG", None)
        env.update(
            {
                f"{prefix}SERVER__PORT": self.targets[service].rsplit(":", 1)[1],
                f"{prefix}DISCOVERY__STATIC": json.dumps(self.targets),
                f"{prefix}TELEMETRY__LOG_FORMAT": "json",
                "NO_PROXY": "127.0.0.1,localhost",
                "no_proxy": "127.0.0.1,localhost",
                "PYTHONUNBUFFERED": "1",
            }
        )
        if service in ("feature", "router", "monitor"):
            env[f"{prefix}REDIS_URL"] = self.redis.url
        if service == "router" and self.router_http_port is not None:
            env[f"{prefix}SERVER__HTTP_PORT"] = str(self.router_http_port)
        if service in self.http_ports:
            env[f"{prefix}SERVER__HTTP_PORT"] = str(self.http_ports[service])
        if service == "registry":
            env[f"{prefix}DATA_DIR"] = str(self.options.run_dir / "registry")
            # The laptop stack runs without API keys, so no one could approve a version for
            # PRODUCTION; its demo deploys a DEVELOPMENT version. A real deployment keeps this on.
            env.setdefault(f"{prefix}PRODUCTION_TRAFFIC_ONLY", "false")
        if service == "inference":
            env[f"{prefix}TRITON_WORK_DIR"] = str(self.options.run_dir / "triton")
            if self.options.triton_trace_endpoint:
                env[f"{prefix}TRITON_TRACE_ENDPOINT"] = self.options.triton_trace_endpoint
                env[f"{prefix}TRITON_TRACE_EXPORT_DELAY_MS"] = "100"
        if self.options.otlp_endpoint:
            env["OTEL_EXPORTER_OTLP_ENDPOINT"] = self.options.otlp_endpoint
        else:
            env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
        env.update(self.options.env)
        return env

    def _command(self, service: str) -> list[str]:
        script = Path(sys.executable).parent / f"modelserve-{service}"
        if script.exists():
            return [str(script)]
        return [sys.executable, "-c", f"from modelserve_{service}.server import main; main()"]

    def spawn(self, service: str) -> subprocess.Popen[bytes]:
        """Starts one service process (in its own session, so a terminal's Ctrl-C reaches only
        us) that Linux stops (SIGTERM) when this process ends, even by SIGKILL. Call it from
        the event loop's thread, whose end counts (modelserve_runtime.parent_death)."""
        log_path = self.log_path(service)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log_file:
            process = subprocess.Popen(
                dying_with_this_process(self._command(service)),
                env=self._environment(service),
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.processes[service] = process
        return process

    async def start(self, attempts: int = 3) -> None:
        """Starts Redis, then every service, and returns once each reports SERVING. A
        service whose port was taken between `free_port` and its bind (it exits saying
        "cannot bind") gets another, and every service starts again with the new map, up
        to `attempts` times; a port fixed in the options is never changed."""
        self.options.run_dir.mkdir(parents=True, exist_ok=True)
        # In the loop's own thread, so that Redis too ends with this process (a moment's
        # block: nothing else runs yet).
        self.redis.start(end_with_caller=True)
        try:
            for attempt in range(1, attempts + 1):
                try:
                    await self._start_services()
                    return
                except StackError:
                    taken = [s for s in self.services if self._could_not_bind(s, CANNOT_BIND)]
                    http_taken = [
                        s for s in self.services if self._could_not_bind(s, CANNOT_BIND_HTTP)
                    ]
                    fixed = set(taken) & set(self.options.ports) or (
                        "router" in http_taken and self.options.router_http_port != 0
                    )
                    if attempt == attempts or not (taken or http_taken) or fixed:
                        raise
                await self._stop_services()
                for service in taken:
                    self.targets[service] = f"127.0.0.1:{free_port()}"
                for service in http_taken:
                    if service == "router":
                        self.router_http_port = free_port()
                    else:
                        self.http_ports[service] = free_port()
        except BaseException:
            await self.stop()
            raise

    async def _start_services(self) -> None:
        self._log_offsets = {}
        for service in self.services:
            log_path = self.log_path(service)
            self._log_offsets[service] = log_path.stat().st_size if log_path.exists() else 0
            self.spawn(service)
        waits = [asyncio.ensure_future(self.wait_serving(s)) for s in self.services]
        try:
            await asyncio.gather(*waits)
        finally:
            for wait in waits:
                wait.cancel()
            await asyncio.gather(*waits, return_exceptions=True)

    def _could_not_bind(self, service: str, error: str) -> bool:
        """Whether the service's last start ended on a port being taken (`error` starts the
        service's line: CANNOT_BIND, or CANNOT_BIND_HTTP for its HTTP port)."""
        process = self.processes.get(service)
        if process is None or process.poll() is None:
            return False
        with self.log_path(service).open("rb") as log_file:
            log_file.seek(self._log_offsets.get(service, 0))
            return error.encode() in log_file.read()

    async def wait_serving(self, service: str) -> None:
        """Polls the service's standard health check until SERVING; fails when it exits first."""
        process = self.processes[service]
        deadline = time.monotonic() + self.options.start_timeout_s
        async with grpc.aio.insecure_channel(self.targets[service]) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                if process.poll() is not None:
                    raise StackError(
                        f"{service} exited with code {process.returncode} before it was serving;"
                        f" log {self.log_path(service)}:\n{_tail(self.log_path(service))}"
                    )
                if time.monotonic() > deadline:
                    raise StackError(
                        f"{service} was not serving after {self.options.start_timeout_s}s:\n"
                        f"{_tail(self.log_path(service))}"
                    )
                with contextlib.suppress(grpc.aio.AioRpcError):
                    answer = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                    if answer.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                await asyncio.sleep(0.05)

    def pids(self) -> list[int]:
        """Every process the stack started, their children (Triton and its stubs) included."""
        import psutil

        pids: list[int] = []
        roots = [p.pid for p in self.processes.values()]
        if self.redis.pid is not None:
            roots.append(self.redis.pid)
        for pid in roots:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc = psutil.Process(pid)
                pids.append(pid)
                pids.extend(child.pid for child in proc.children(recursive=True))
        return pids

    async def stop(self, grace_s: float = 15.0) -> None:
        """Stops services in reverse start order (SIGTERM, then SIGKILL after `grace_s`), then Redis."""
        await self._stop_services(grace_s)
        await asyncio.to_thread(self.redis.stop)

    async def _stop_services(self, grace_s: float = 15.0) -> None:
        for service in reversed(self.services):
            process = self.processes.get(service)
            if process is None or process.poll() is not None:
                continue
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(process.wait, grace_s)
            except subprocess.TimeoutExpired:
                process.kill()
                await asyncio.to_thread(process.wait)
