"""gRPC server bootstrap: interceptors, health, reflection, and an orderly SIGTERM shutdown."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar, cast

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import REGISTRY, start_http_server

from modelserve_runtime.config import (
    ConfigError,
    ServerTlsSettings,
    ServiceSettings,
    load_settings,
)
from modelserve_runtime.discovery import Discovery, StaticDiscovery, create_discovery
from modelserve_runtime.interceptors import server_interceptors
from modelserve_runtime.logs import configure_logging
from modelserve_runtime.parent_death import ask_to_die_with_parent
from modelserve_runtime.tracing import configure_tracing
from modelserve_runtime.waiting import cancel_all
from modelserve_runtime.worker_metrics import WorkerMetrics

if TYPE_CHECKING:
    from modelserve_triton.oip_http import JsonRoute

log = structlog.get_logger()

SettingsT = TypeVar("SettingsT", bound=ServiceSettings)

#: How a service that cannot bind its port starts its one-line error (the local stack looks
#: for it to move the service to another port).
CANNOT_BIND = "server.port: cannot bind"
#: The Open Inference Protocol's gRPC service: a service hosting it serves its REST binding too.
_OIP_SERVICE = "inference.GRPCInferenceService"
#: The same for the HTTP port (`server.http_port`).
CANNOT_BIND_HTTP = "server.http_port: cannot bind"


class ServiceApp(Protocol):
    """The domain side of a service: dependencies to check at start and close at stop."""

    async def check_ready(self) -> None:
        """Returns once every dependency answers; raises when one cannot be reached."""
        ...

    async def begin_shutdown(self) -> None:
        """Called once the service is NOT_SERVING, before in-flight calls drain: end streams
        that never finish by themselves."""
        ...

    async def close(self) -> None:
        """Closes clients and background tasks."""
        ...


class HttpBinding(Protocol):
    """A second front door beside the gRPC port (HTTP/1.1: Connect, and the Open Inference
    Protocol's REST binding), bound when built, serving once started."""

    port: int

    async def start(self) -> None: ...

    async def stop(self) -> None:
        """Stops listening and lets calls in flight finish, up to the grace period."""
        ...


@dataclass
class GrpcServer:
    """A built, not yet started, server and the names of the services it hosts."""

    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    service_names: list[str]
    http: HttpBinding | None = None
    """The HTTP/REST binding, with `server.http_port` set."""
    interceptors: Sequence[grpc.aio.ServerInterceptor] = ()
    """The server interceptors, outermost first, which the HTTP binding runs too."""

    async def set_serving(self, serving: bool) -> None:
        """Sets the health of the server and of each hosted service."""
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ["", *self.service_names]:
            await self.health.set(name, status)


def server_credentials(tls: ServerTlsSettings) -> grpc.ServerCredentials:
    """The server's certificate and key, and with `client_ca_file` the demand that every client
    present a certificate signed by it (gRPC then verifies it during the handshake)."""
    if tls.cert_file is None or tls.key_file is None:
        raise ConfigError("server.tls: TLS needs cert_file and key_file")
    pair = (tls.key_file.read_bytes(), tls.cert_file.read_bytes())
    if tls.client_ca_file is None:
        return grpc.ssl_server_credentials([pair])
    return grpc.ssl_server_credentials(
        [pair], root_certificates=tls.client_ca_file.read_bytes(), require_client_auth=True
    )


def build_grpc_server(
    service: str,
    settings: ServiceSettings,
    register: Callable[[grpc.aio.Server], Sequence[str]],
    *,
    inner_interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    http_routes: Sequence[JsonRoute] = (),
) -> GrpcServer:
    """Creates the server with the standard interceptors, health and reflection, bound to its port.

    `register` adds the servicers and returns their full service names;
    `inner_interceptors` (authentication) run innermost, after the error interceptor.
    With `server.http_port` set, the HTTP port serves every method over Connect, and on a
    service with the Open Inference Protocol its REST binding and `http_routes` (unary
    methods as JSON).
    With `server.tls` set the port speaks only TLS (mutual TLS with `client_ca_file`).
    """
    options = [
        ("grpc.max_receive_message_length", settings.server.max_message_bytes),
        ("grpc.max_send_message_length", settings.server.max_message_bytes),
        # Off, so a port already taken fails the start, unless this service runs as several
        # workers that share the port on purpose.
        ("grpc.so_reuseport", 1 if settings.server.workers > 1 else 0),
        # Accept the keepalive pings of clients that hold quiet streams (see the setting).
        ("grpc.http2.min_ping_interval_without_data_ms", settings.server.min_ping_interval_ms),
        ("grpc.keepalive_permit_without_calls", 1),
    ]
    interceptors = server_interceptors(service, inner_interceptors)
    server = grpc.aio.server(
        interceptors=interceptors,
        options=options,
        maximum_concurrent_rpcs=settings.server.max_concurrent_rpcs,
    )
    recorder = _HandlerRecorder(server)
    names = list(register(cast(grpc.aio.Server, recorder)))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, cast(grpc.aio.Server, recorder))
    reflection.enable_server_reflection(
        [*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    address = f"{settings.server.host}:{settings.server.port}"
    tls = settings.server.tls
    try:
        if tls.enabled:
            port = server.add_secure_port(address, server_credentials(tls))
        else:
            port = server.add_insecure_port(address)
    except RuntimeError:
        # grpcio raises where older versions returned 0; its own line (add_port.cc) on
        # stderr says why, "Address already in use" most often.
        port = 0
    if port == 0:
        raise ConfigError(
            f"{CANNOT_BIND} {address}: another process listens there, or"
            f" {settings.server.host} is not an address of this machine"
        )
    http = (
        None
        if settings.server.http_port is None
        else _http_binding(settings, names, recorder.handlers, interceptors, http_routes)
    )
    return GrpcServer(
        server=server,
        port=port,
        health=health_servicer,
        service_names=names,
        http=http,
        interceptors=interceptors,
    )


class _HandlerRecorder:
    """The gRPC server as `register` sees it, keeping the generic handlers it is given (the
    HTTP binding calls the same ones)."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server
        self.handlers: list[grpc.GenericRpcHandler] = []

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self.handlers.extend(handlers)
        self._server.add_generic_rpc_handlers(handlers)

    def __getattr__(self, name: str) -> object:
        return getattr(self._server, name)


def _http_binding(
    settings: ServiceSettings,
    names: Sequence[str],
    handlers: Sequence[grpc.GenericRpcHandler],
    interceptors: Sequence[grpc.aio.ServerInterceptor],
    json_routes: Sequence[JsonRoute],
) -> HttpBinding:
    """The service's HTTP port (`server.http_port`): Connect for every hosted service (health
    included), and the Open Inference Protocol's REST binding with `json_routes` where the
    service serves the protocol; ConfigError for a port taken."""
    from modelserve_runtime.connect import ConnectRoutes, service_methods
    from modelserve_runtime.http_binding import HttpServer, bind, server_ssl_context

    host, port = settings.server.host, settings.server.http_port or 0
    try:
        sock = bind(host, port, reuse_port=settings.server.workers > 1)
    except OSError as exc:
        raise ConfigError(f"{CANNOT_BIND_HTTP} {host}:{port}: {exc}") from None
    tls = settings.server.tls
    context = None
    if tls.enabled and tls.cert_file is not None and tls.key_file is not None:
        context = server_ssl_context(
            str(tls.cert_file),
            str(tls.key_file),
            None if tls.client_ca_file is None else str(tls.client_ca_file),
        )
    server = HttpServer(
        handlers,
        interceptors,
        sock,
        max_body_bytes=settings.server.max_message_bytes,
        grace_s=settings.server.grace_period_s,
        ssl_context=context,
        cors_origins=settings.server.http_cors_origins,
        max_in_flight=settings.server.max_concurrent_rpcs,
    )
    if _OIP_SERVICE in names:
        # Imported here: only the services that serve the protocol need tritonclient.
        from modelserve_triton.oip_http import OipRoutes

        oip = OipRoutes(server, json_routes)
        server.add_routes(oip.routes(), oip.speaks())
    connect = ConnectRoutes(server, service_methods([*names, health.SERVICE_NAME]))
    server.add_routes(connect.routes(), connect.speaks())
    return server


def _tls_mode(tls: ServerTlsSettings) -> str:
    if not tls.enabled:
        return "off"
    return "mutual" if tls.client_ca_file is not None else "server"


async def serve(
    service: str,
    settings: SettingsT,
    build: Callable[[SettingsT], Awaitable[tuple[GrpcServer, ServiceApp]]],
    *,
    discovery: Discovery | None = None,
    stop_event: asyncio.Event | None = None,
    before_serving: Callable[[ServiceApp], Awaitable[None]] | None = None,
    on_serving: Callable[[ServiceApp], None] | None = None,
    on_stopping: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Runs one service until SIGTERM/SIGINT (or `stop_event`), then stops it in order:
    health NOT_SERVING, deregister, `stop(grace)` letting in-flight calls finish, close clients.
    `before_serving` is awaited once the app's checks pass, before the service reports
    SERVING; `on_serving` is called once the service is SERVING and registered; `on_stopping`
    runs alongside the drain, from the moment the service is NOT_SERVING, and ends before the
    clients close.
    """
    grpc_server, app = await build(settings)
    stop = stop_event or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    discovery = discovery or create_discovery(settings.discovery)
    await grpc_server.server.start()
    if grpc_server.http is not None:
        await grpc_server.http.start()
    await grpc_server.set_serving(False)
    try:
        if not await _ready_unless_stopped(app, before_serving, stop):
            log.info("service_stopping", grace_s=settings.server.grace_period_s, serving=False)
            return
        await grpc_server.set_serving(True)
        advertise = settings.discovery.advertise_host or settings.server.host
        await discovery.register(service, advertise, grpc_server.port)
        if on_serving is not None:
            on_serving(app)
        tune_gc(settings.server.gc_threshold)
        log.info(
            "service_started",
            port=grpc_server.port,
            http_port=None if grpc_server.http is None else grpc_server.http.port,
            host=settings.server.host,
            tls=_tls_mode(settings.server.tls),
            event_loop=type(asyncio.get_running_loop()).__module__,
            pid=os.getpid(),
        )
        await stop.wait()
        log.info("service_stopping", grace_s=settings.server.grace_period_s)
    finally:
        await grpc_server.health.enter_graceful_shutdown()
        stopping = asyncio.ensure_future(on_stopping()) if on_stopping is not None else None
        try:
            await discovery.deregister()
        except Exception:
            log.exception("deregister_failed")
        await app.begin_shutdown()
        draining = [grpc_server.server.stop(settings.server.grace_period_s)]
        if grpc_server.http is not None:
            draining.append(grpc_server.http.stop())
        await asyncio.gather(*draining)
        if stopping is not None:
            await stopping
        await app.close()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        log.info("service_stopped")


async def _ready_unless_stopped(
    app: ServiceApp,
    before_serving: Callable[[ServiceApp], Awaitable[None]] | None,
    stop: asyncio.Event,
) -> bool:
    """The app's checks, then `before_serving` (waiting for workers, say); False when the
    service is told to stop first, which a start that waits on others must not hold up."""

    async def ready() -> None:
        await app.check_ready()
        if before_serving is not None:
            await before_serving(app)

    readying = asyncio.ensure_future(ready())
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({readying, stopping}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        readying.cancel()
        raise
    finally:
        stopping.cancel()
    if readying.done():
        readying.result()  # what the checks raised, if they did
        return True
    readying.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await readying
    return False


#: Set in the environment of the extra worker processes `run_service` starts.
WORKER_ENV = "MODELSERVE_WORKER_INDEX"
#: The pid of the process that started a worker, beside WORKER_ENV.
WORKER_PARENT_ENV = "MODELSERVE_WORKER_PARENT"
#: A pipe's write end (a file descriptor) on which a worker reports that it is ready to serve.
WORKER_READY_FD_ENV = "MODELSERVE_WORKER_READY_FD"
#: A pipe's read end on which the first process lets a ready worker serve.
WORKER_GO_FD_ENV = "MODELSERVE_WORKER_GO_FD"


def run_service(
    service: str,
    settings_cls: type[SettingsT],
    build: Callable[[SettingsT], Awaitable[tuple[GrpcServer, ServiceApp]]],
    argv: Sequence[str] | None = None,
    *,
    workers_allowed: bool = False,
) -> None:
    """The body of every `modelserve-<service>` console script.

    With `server.workers` > 1 (only where `workers_allowed`) this process starts the other
    workers once its own checks pass, the same script with the same arguments on the same
    port, and lets any process report SERVING only once they are all ready (up to
    `server.workers_ready_timeout_s`), so that no client connects while only some of them
    listen; it stops them when it stops; only it registers in discovery and serves metrics.
    An app with a `worker_env()` method hands them what they need from it (its address, say)
    as environment variables.
    """
    parser = argparse.ArgumentParser(prog=f"modelserve-{service}")
    parser.add_argument("--config", type=Path, help="YAML settings file (env vars override it)")
    args = parser.parse_args(argv)
    worker = os.environ.get(WORKER_ENV)
    try:
        settings = load_settings(settings_cls, args.config)
        _check_workers(service, settings, workers_allowed)
        several = not worker and settings.server.workers > 1
        worker_command = _start_again(argv, getattr(build, "__module__", None)) if several else None
    except ConfigError as exc:
        print(f"modelserve-{service}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging(service, settings.telemetry.log_level, settings.telemetry.log_format)
    handshake: Callable[[ServiceApp], Awaitable[None]] | None = None
    if worker:
        structlog.contextvars.bind_contextvars(worker=int(worker))
        _die_with_parent(int(os.environ[WORKER_PARENT_ENV]))
        if WORKER_READY_FD_ENV in os.environ and WORKER_GO_FD_ENV in os.environ:
            ready_fd = int(os.environ[WORKER_READY_FD_ENV])
            go_fd = int(os.environ[WORKER_GO_FD_ENV])

            async def handshake(_: ServiceApp) -> None:
                await _ready_then_wait_to_serve(ready_fd, go_fd)

    provider = configure_tracing(service, settings.otlp_endpoint)
    metrics = WorkerMetrics() if several and settings.telemetry.metrics_port is not None else None
    if settings.telemetry.metrics_port is not None and not worker:
        start_http_server(
            settings.telemetry.metrics_port,
            addr=settings.server.host,
            registry=REGISTRY if metrics is None else metrics.registry,
        )
    workers = Workers(settings, argv, command=worker_command, metrics=metrics) if several else None
    # Only the first process registers the port in discovery.
    discovery = StaticDiscovery({}) if worker else None
    running = serve(
        service,
        settings,
        build,
        discovery=discovery,
        before_serving=handshake if workers is None else workers.start_and_wait,
        on_stopping=None if workers is None else workers.stop,
    )
    try:
        if settings.server.event_loop == "uvloop":
            import uvloop

            uvloop.run(running)
        else:
            asyncio.run(running)
    except ConfigError as exc:
        log.error("service_failed", error=str(exc))
        print(f"modelserve-{service}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except Exception:
        log.exception("service_failed")
        raise SystemExit(1) from None
    finally:
        if workers is not None:
            workers.stop_now()
        provider.shutdown()


def tune_gc(threshold: int) -> None:
    """Readies the garbage collector for serving, once the service is up: what start-up made
    (modules, clients, servicers) is collected once and then frozen out of every later
    collection, and the youngest generation is collected every `threshold` allocations
    (Python's default is 700). Measured on the router at 64 concurrent callers: without this,
    full collections walked the whole heap and each stalled every request for up to 59 ms."""
    gc.collect()
    gc.freeze()
    _, second, third = gc.get_threshold()
    gc.set_threshold(threshold, second, third)


def _check_workers(service: str, settings: ServiceSettings, allowed: bool) -> None:
    workers = settings.server.workers
    if workers == 1:
        return
    if not allowed:
        raise ConfigError(
            f"server.workers: {service} keeps state in its process and runs as one worker"
            f" (got {workers}); run more instances behind discovery instead"
        )
    if settings.server.port == 0:
        raise ConfigError(
            f"server.workers: {workers} workers share one port, so server.port must be set (not 0)"
        )
    if settings.server.http_port == 0:
        raise ConfigError(
            f"server.workers: {workers} workers share one HTTP port, so server.http_port must be"
            " set (not 0) or unset"
        )


class Workers:
    """Workers 1..n-1 of a service, run by its first process: this script again, with the
    same arguments and environment (so the same shared port).

    Started once the first process's own checks pass (`start`); `wait_ready` then waits for
    each to report, through a pipe, that it is ready, and `start_and_wait` then lets them
    serve, through another. A worker that exits while the service runs is started again: at
    once after a run of `stable_s` or more, else after a wait that doubles from
    `restart_initial_s` up to `restart_max_s`, so a worker that cannot start does not spin.
    `stop` ends them all with the service.
    """

    def __init__(
        self,
        settings: ServiceSettings,
        argv: Sequence[str] | None,
        *,
        poll_s: float = 0.2,
        stable_s: float = 10.0,
        restart_initial_s: float = 0.5,
        restart_max_s: float = 30.0,
        command: Sequence[str] | None = None,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        """`command` runs a worker; by default this process's own start again, with its
        arguments (`argv`; see `_start_again`). With `metrics`, the workers write their
        metrics where the first process reads them."""
        self._count = settings.server.workers - 1
        self._stop_timeout_s = settings.server.grace_period_s + 5
        self._command = list(command) if command is not None else _start_again(argv, None)
        self._poll_s = poll_s
        self._stable_s = stable_s
        self._restart_initial_s = restart_initial_s
        self._restart_max_s = restart_max_s
        self._env: dict[str, str] = {}
        self._metrics = metrics
        self._children: dict[int, subprocess.Popen[bytes]] = {}
        self._started_at: dict[int, float] = {}
        self._task: asyncio.Task[None] | None = None
        self._ready: set[int] = set()
        self._ready_changed = asyncio.Event()
        self._ready_fds: dict[int, int] = {}
        self._go_fds: dict[int, int] = {}
        self._serving = False
        self._ready_timeout_s = settings.server.workers_ready_timeout_s

    def start(self, app: ServiceApp) -> None:
        """Starts every worker; an app with a `worker_env()` method adds what it returns to
        their environment (its address, say)."""
        worker_env: Callable[[], Mapping[str, str]] | None = getattr(app, "worker_env", None)
        self._env = dict(worker_env()) if worker_env is not None else {}
        if self._metrics is not None:
            self._env |= self._metrics.worker_env()
        for index in range(1, self._count + 1):
            self._spawn(index)
        log.info("workers_started", pids=[c.pid for c in self._children.values()])
        self._task = asyncio.get_running_loop().create_task(self._watch(), name="workers-watch")

    async def start_and_wait(self, app: ServiceApp) -> None:
        """`start`, then `wait_ready` up to `server.workers_ready_timeout_s`, then lets the
        ready workers serve (each waits for that, so that no process answers SERVING before
        every one listens); a worker not ready by then is logged, the service goes on
        without it, and it serves once ready."""
        self.start(app)
        started = time.monotonic()
        missing = await self.wait_ready(self._ready_timeout_s)
        waited_s = round(time.monotonic() - started, 3)
        if missing:
            log.warning(
                "workers_not_ready",
                workers=missing,
                timeout_s=self._ready_timeout_s,
                hint="see the worker's own log lines (worker=N) for why",
            )
        else:
            log.info("workers_ready", count=self._count, waited_s=waited_s)
        self._serving = True
        for index in sorted(self._ready):
            self._let_serve(index)

    def _let_serve(self, index: int) -> None:
        fd = self._go_fds.pop(index, None)
        if fd is None:
            return
        try:
            os.write(fd, b"1")
        except OSError:
            pass  # The worker is gone; `_watch` starts it again.
        finally:
            os.close(fd)

    async def wait_ready(self, timeout_s: float) -> list[int]:
        """Waits until every worker has reported that it serves (a worker that exited and
        was started again reports anew), or `timeout_s`; returns the indices not ready."""
        deadline = time.monotonic() + timeout_s
        while True:
            missing = sorted(set(self._children) - self._ready)
            left = deadline - time.monotonic()
            if not missing or left <= 0:
                return missing
            self._ready_changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ready_changed.wait(), left)

    def _on_ready_byte(self, index: int, fd: int) -> None:
        try:
            data = os.read(fd, 1)
        except OSError:
            data = b""
        if data and self._ready_fds.get(index) == fd:
            self._ready.add(index)
            if self._serving:
                self._let_serve(index)
        self._close_ready_fd(index, fd)
        self._ready_changed.set()

    def _close_ready_fd(self, index: int, fd: int) -> None:
        asyncio.get_running_loop().remove_reader(fd)
        os.close(fd)
        if self._ready_fds.get(index) == fd:
            del self._ready_fds[index]

    async def stop(self) -> None:
        """Stops restarting, then stops every worker (SIGTERM, SIGKILL after the grace period
        plus 5 s), alongside the first process's own drain."""
        if self._task is not None:
            await cancel_all([self._task])
        for index, fd in list(self._ready_fds.items()):
            self._close_ready_fd(index, fd)
        await asyncio.to_thread(self.stop_now)

    def stop_now(self) -> None:
        """`stop`, blocking, for when no loop runs any more."""
        for fd in [*self._ready_fds.values(), *self._go_fds.values()]:
            os.close(fd)
        self._ready_fds.clear()
        self._go_fds.clear()
        _stop_workers(list(self._children.values()), self._stop_timeout_s)
        if self._metrics is not None:
            self._metrics.close()

    def _spawn(self, index: int) -> None:
        self._ready.discard(index)
        if index in self._ready_fds:
            self._close_ready_fd(index, self._ready_fds[index])
        if index in self._go_fds:
            os.close(self._go_fds.pop(index))
        read_fd, write_fd = os.pipe()
        go_read_fd, go_write_fd = os.pipe()
        env = {
            **os.environ,
            **self._env,
            WORKER_ENV: str(index),
            WORKER_PARENT_ENV: str(os.getpid()),
            WORKER_READY_FD_ENV: str(write_fd),
            WORKER_GO_FD_ENV: str(go_read_fd),
        }
        # No preexec_fn: this process runs gRPC's threads by now, and Python code between
        # fork and exec can deadlock on a lock one of them held. The worker arranges to die
        # with this process itself (`_die_with_parent`, see modelserve_runtime.parent_death).
        try:
            self._children[index] = subprocess.Popen(
                self._command, env=env, pass_fds=(write_fd, go_read_fd)
            )
        except BaseException:
            os.close(read_fd)
            os.close(go_write_fd)
            raise
        finally:
            os.close(write_fd)
            os.close(go_read_fd)
        self._started_at[index] = time.monotonic()
        # The worker writes one byte once it is ready; EOF alone means it exited before that.
        # It serves once it reads one byte from its go pipe (`_let_serve`).
        self._ready_fds[index] = read_fd
        self._go_fds[index] = go_write_fd
        asyncio.get_running_loop().add_reader(read_fd, self._on_ready_byte, index, read_fd)

    async def _watch(self) -> None:
        waits = dict.fromkeys(self._children, self._restart_initial_s)
        due: dict[int, float] = {}
        while True:
            await asyncio.sleep(self._poll_s)
            now = time.monotonic()
            for index, child in list(self._children.items()):
                if index not in due and child.poll() is not None:
                    ran_s = now - self._started_at[index]
                    if ran_s >= self._stable_s:
                        waits[index] = self._restart_initial_s
                        due[index] = now
                    else:
                        due[index] = now + waits[index]
                        waits[index] = min(2 * waits[index], self._restart_max_s)
                    if self._metrics is not None:
                        self._metrics.worker_exited(child.pid)
                    log.warning(
                        "worker_exited",
                        worker=index,
                        pid=child.pid,
                        code=child.returncode,
                        ran_s=round(ran_s, 3),
                        restart_in_s=round(due[index] - now, 3),
                    )
                if due.get(index, float("inf")) <= now:
                    del due[index]
                    self._spawn(index)
                    log.info("worker_restarted", worker=index, pid=self._children[index].pid)


def _start_again(argv: Sequence[str] | None, main_module: str | None) -> list[str]:
    """The command that starts this process again: its script (a console script, say), the
    same module for `python -m`, or, for `python -c`, which leaves nothing to run again,
    `main_module.main()`."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    script = sys.argv[0]
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None:
        return [sys.executable, "-m", spec.name, *arguments]
    if script not in ("", "-c") and Path(script).is_file():
        return [sys.executable, script, *arguments]
    if main_module is None or main_module == "__main__":
        raise ConfigError(
            "server.workers: this process was not started as a script, so its workers cannot"
            " be started the same way; start it with its console script (modelserve-<service>)"
        )
    return [sys.executable, "-c", f"from {main_module} import main; main()", *arguments]


async def _ready_then_wait_to_serve(ready_fd: int, go_fd: int) -> None:
    """In a worker whose checks passed and which listens: tells the first process so (see
    `Workers.wait_ready`), then waits until it lets this worker serve. The first process
    closing the pipe instead (it is stopping) ends the worker."""
    try:
        os.write(ready_fd, b"1")
    finally:
        os.close(ready_fd)
    loop = asyncio.get_running_loop()
    readable: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not readable.done():
            readable.set_result(None)

    loop.add_reader(go_fd, wake)
    try:
        await readable
        go = os.read(go_fd, 1)
    finally:
        loop.remove_reader(go_fd)
        os.close(go_fd)
    if not go:
        log.info("worker_not_let_serve", reason="the first process is stopping")
        raise SystemExit(0)


def _die_with_parent(parent: int) -> None:
    """In a worker, before it serves: Linux sends it SIGTERM when the first process (`parent`)
    dies, even by SIGKILL, so no worker is left serving the port alone. A parent already gone
    ends the worker at once."""
    if not ask_to_die_with_parent(parent):
        log.warning("worker_parent_gone", parent=parent)
        raise SystemExit(0)


def _stop_workers(children: Sequence[subprocess.Popen[bytes]], timeout_s: float) -> None:
    """SIGTERM to each worker, then SIGKILL to those still running after `timeout_s`."""
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for child in children:
        try:
            child.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
