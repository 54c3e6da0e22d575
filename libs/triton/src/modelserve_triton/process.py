"""Runs the tritonserver binary from the nvidia-pytriton wheel as a child process."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from modelserve_runtime.parent_death import dying_with_this_process
from modelserve_triton.runner import TritonError, TritonRunner

log = structlog.get_logger()

#: tritonserver's log, in its work directory.
TRITON_LOG_FILE = "tritonserver.log"


class TritonStartError(RuntimeError):
    """tritonserver did not become ready; the message ends with the tail of its log."""


@dataclass(frozen=True, slots=True)
class GrpcServerTls:
    """Triton's gRPC endpoint over TLS (`--grpc-use-ssl`)."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None
    """When set, clients must present a certificate signed by this CA (mutual TLS)."""


#: tritonserver flags that TritonServer sets itself: the model repository and control, the
#: backends, where each endpoint listens, its TLS, and the readiness and exit behaviour the
#: supervisor relies on. `extra_args` may not set them again.
OWNED_FLAGS: tuple[str, ...] = (
    "--model-repository",
    "--model-store",
    "--model-control-mode",
    "--backend-directory",
    "--strict-readiness",
    "--exit-on-error",
    "--grpc-address",
    "--grpc-port",
    "--http-address",
    "--http-port",
    "--metrics-address",
    "--metrics-port",
    "--grpc-use-ssl",
    "--grpc-use-ssl-mutual",
    "--grpc-server-cert",
    "--grpc-server-key",
    "--grpc-root-cert",
)


def check_extra_args(args: Sequence[str]) -> None:
    """Refuses flags that are not `--name[=value]` or that TritonServer sets itself."""
    for arg in args:
        if not arg.startswith("--"):
            raise ValueError(f"{arg!r} is not a tritonserver flag (--name=value)")
        name = arg.split("=", 1)[0]
        if name in OWNED_FLAGS:
            raise ValueError(f"{name} is set by modelserve and cannot be given again")


@dataclass(frozen=True, slots=True)
class TritonOptions:
    """How to run one tritonserver; a port of 0 means "pick a free one"."""

    work_dir: Path
    grpc_port: int = 0
    http_port: int = 0
    metrics_port: int = 0
    trace_otlp_endpoint: str | None = None
    """``host:port`` of an OTLP/HTTP receiver; Triton posts spans to its /v1/traces."""
    log_verbose: int = 0
    extra_args: tuple[str, ...] = ()
    """Further tritonserver flags, appended last; none of `OWNED_FLAGS`."""
    grpc_tls: GrpcServerTls | None = None
    """Serve gRPC over TLS; None: plaintext. (Triton's HTTP endpoint has no TLS; it stays on
    127.0.0.1, where readiness is asked.)"""

    def __post_init__(self) -> None:
        check_extra_args(self.extra_args)


@dataclass(frozen=True, slots=True)
class TritonInstall:
    """Where the nvidia-pytriton wheel keeps the server, its libraries and backend pieces."""

    binary: Path
    libs_dir: Path
    python_backend_dir: Path
    python_stub: Path

    @classmethod
    def locate(cls) -> TritonInstall:
        """Finds the wheel's files in the running interpreter's environment."""
        spec = importlib.util.find_spec("pytriton")
        if spec is None or not spec.submodule_search_locations:
            raise TritonStartError("nvidia-pytriton is not installed in this environment")
        package_dir = Path(next(iter(spec.submodule_search_locations)))
        server_dir = package_dir / "tritonserver"
        python_version = f"{sys.version_info.major}.{sys.version_info.minor}"
        install = cls(
            binary=server_dir / "bin" / "tritonserver",
            libs_dir=package_dir.parent / "nvidia_pytriton.libs",
            python_backend_dir=server_dir / "backends" / "python",
            python_stub=server_dir
            / "python_backend_stubs"
            / python_version
            / "triton_python_backend_stub",
        )
        needed = (install.binary, install.libs_dir, install.python_backend_dir, install.python_stub)
        for path in needed:
            if not path.exists():
                raise TritonStartError(f"nvidia-pytriton is missing {path}")
        return install

    def backends(self) -> dict[str, Path]:
        """The backends the wheel ships, by name (each a directory holding its
        ``libtriton_<name>.so``); nvidia-pytriton 0.7.0 ships only ``python``."""
        return _backends_in(self.python_backend_dir.parent)


def _backends_in(directory: Path) -> dict[str, Path]:
    if not directory.is_dir():
        return {}
    return {
        path.name: path
        for path in sorted(directory.iterdir())
        if (path / f"libtriton_{path.name}.so").exists()
    }


def _free_port() -> int:
    # The port is free when we look; Triton cannot bind port 0 itself and report it.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class TritonServer:
    """One tritonserver child process in explicit model-control mode, on 127.0.0.1.

    The child leads its own process group, so stopping it also stops the python-backend
    stub processes it started.
    """

    def __init__(self, options: TritonOptions) -> None:
        self._options = options
        self._process: asyncio.subprocess.Process | None = None
        self._stopped = False
        self._grpc_port = options.grpc_port
        self._http_port = options.http_port
        self._metrics_port = options.metrics_port

    @property
    def grpc_endpoint(self) -> str:
        """``127.0.0.1:PORT`` of the gRPC (KServe v2) endpoint, known once started."""
        return f"127.0.0.1:{self._require_port(self._grpc_port)}"

    @property
    def http_endpoint(self) -> str:
        """``127.0.0.1:PORT`` of the HTTP endpoint, known once started."""
        return f"127.0.0.1:{self._require_port(self._http_port)}"

    @property
    def metrics_endpoint(self) -> str:
        """``127.0.0.1:PORT`` of the Prometheus metrics endpoint, known once started."""
        return f"127.0.0.1:{self._require_port(self._metrics_port)}"

    @property
    def pid(self) -> int | None:
        """The child's process id (and process group id), or None before start."""
        return None if self._process is None else self._process.pid

    @property
    def backends(self) -> frozenset[str]:
        """The backends this server can run models with (those in its backend directory,
        prepared at start): ``python`` and whatever else the wheel ships."""
        return frozenset(_backends_in(self._options.work_dir / "backends"))

    @property
    def log_path(self) -> Path:
        """The file that receives tritonserver's and the stubs' stdout and stderr."""
        return self._options.work_dir / TRITON_LOG_FILE

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the server log."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    async def start(self, timeout: float = 60) -> None:  # noqa: ASYNC109 - a deadline that also stops Triton
        """Starts tritonserver and returns once it answers that it is ready.

        Raises TritonStartError, with the log's tail, when the process exits first or is
        not ready within ``timeout`` seconds; the process is stopped then.
        """
        if self._process is not None:
            raise RuntimeError("this TritonServer was already started")
        started = time.monotonic()
        argv, env = await asyncio.to_thread(self._prepare)
        log_file = await asyncio.to_thread(self.log_path.open, "ab")
        try:
            self._process = await asyncio.create_subprocess_exec(
                # Not left behind, holding the models' memory and with fixed ports the
                # ports a restarted service needs, when the service is killed outright.
                *dying_with_this_process(argv),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_file,
                stderr=asyncio.subprocess.STDOUT,
                env=env,
                cwd=self._options.work_dir,
                start_new_session=True,
            )
        finally:
            log_file.close()
        log.info("triton_starting", pid=self._process.pid, grpc=self.grpc_endpoint)
        try:
            await self._wait_ready(self._process, timeout)
        except BaseException:
            # This attempt's process goes, not the server: `restart` may try again (a
            # restart was seen to die at once with SIGSEGV now and then, and start the next
            # time).
            await self._end(self._process, grace=2)
            raise
        log.info(
            "triton_ready",
            pid=self._process.pid,
            grpc=self.grpc_endpoint,
            seconds=round(time.monotonic() - started, 3),
        )

    async def wait_exited(self) -> int:
        """Returns the exit code once the current child process has exited."""
        process = self._process
        if process is None:
            raise RuntimeError("this TritonServer was not started")
        return await process.wait()

    async def restart(self, timeout: float = 60) -> None:  # noqa: ASYNC109 - as start()
        """Starts a fresh tritonserver on the same ports after the last one died or hung.

        Whatever is left of the old process group (python-backend stubs) is killed first.
        The new server holds no models: loading them again is the caller's job.
        """
        process = self._process
        if self._stopped:
            raise RuntimeError("this TritonServer was stopped")
        if process is not None:
            _signal_group(process.pid, signal.SIGKILL)
            await process.wait()
            log.warning("triton_restarting", old_pid=process.pid, returncode=process.returncode)
        self._process = None
        await self.start(timeout)

    async def stop(self, grace: float = 10) -> None:
        """Sends SIGTERM to the process group, then SIGKILL after ``grace`` seconds."""
        process = self._process
        if process is None or self._stopped:
            return
        self._stopped = True
        await self._end(process, grace)

    async def _end(self, process: asyncio.subprocess.Process, grace: float) -> None:
        """SIGTERM to the process group, SIGKILL after `grace` seconds; waits for the exit."""
        if process.returncode is None:
            _signal_group(process.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), grace)
            except TimeoutError:
                log.warning("triton_kill", pid=process.pid, grace=grace)
        # Whatever is left of the group (stubs that outlived the server included) goes now.
        _signal_group(process.pid, signal.SIGKILL)
        await process.wait()
        log.info("triton_stopped", pid=process.pid, returncode=process.returncode)

    def _require_port(self, port: int) -> int:
        if port == 0:
            raise RuntimeError("ports are chosen at start(); start the server first")
        return port

    def _prepare(self) -> tuple[list[str], dict[str, str]]:
        """Builds the work dir (backends, empty model repository) and the command line."""
        options = self._options
        install = TritonInstall.locate()
        work_dir = options.work_dir
        python_backend = work_dir / "backends" / "python"
        python_backend.mkdir(parents=True, exist_ok=True)
        for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
            _copy_if_changed(install.python_backend_dir / name, python_backend / name)
        _copy_if_changed(install.python_stub, python_backend / "triton_python_backend_stub")
        # Other backends (the native onnxruntime one, where a wheel ships it) need no stub.
        for name, directory in install.backends().items():
            link = work_dir / "backends" / name
            if name != "python" and not link.is_symlink() and not link.exists():
                link.symlink_to(directory, target_is_directory=True)
        model_repository = work_dir / "models"
        model_repository.mkdir(exist_ok=True)

        self._grpc_port = self._grpc_port or _free_port()
        self._http_port = self._http_port or _free_port()
        self._metrics_port = self._metrics_port or _free_port()
        argv = [
            str(install.binary),
            f"--model-repository={model_repository}",
            "--model-control-mode=explicit",
            f"--backend-directory={work_dir / 'backends'}",
            "--strict-readiness=true",
            "--exit-on-error=true",
            "--grpc-address=127.0.0.1",
            f"--grpc-port={self._grpc_port}",
            "--http-address=127.0.0.1",
            f"--http-port={self._http_port}",
            "--metrics-address=127.0.0.1",
            f"--metrics-port={self._metrics_port}",
            "--allow-gpu-metrics=false",
            # Pinned host memory only speeds Triton's own copies to and from GPU tensors, which
            # the python backend never hands it (its instances, GPU ones too, take and answer
            # host memory); without a GPU, Triton would try to pin it through CUDA anyway.
            "--pinned-memory-pool-byte-size=0",
            f"--log-verbose={options.log_verbose}",
        ]
        if options.grpc_tls is not None:
            tls = options.grpc_tls
            argv += [
                "--grpc-use-ssl=true",
                f"--grpc-server-cert={tls.cert_file}",
                f"--grpc-server-key={tls.key_file}",
            ]
            if tls.client_ca_file is not None:
                argv += ["--grpc-use-ssl-mutual=true", f"--grpc-root-cert={tls.client_ca_file}"]
        if options.trace_otlp_endpoint:
            argv += [
                "--trace-config=mode=opentelemetry",
                f"--trace-config=opentelemetry,url={options.trace_otlp_endpoint}/v1/traces",
                "--trace-config=opentelemetry,resource=service.name=triton",
                "--trace-config=rate=1",
                "--trace-config=level=TIMESTAMPS",
            ]
        argv += options.extra_args

        env = dict(os.environ)
        # The stub embeds Python and finds its prefix from the first python3 on PATH: put
        # this environment's first so the stub imports our numpy and onnxruntime.
        env["PATH"] = os.pathsep.join(
            [str(Path(sys.prefix) / "bin"), *filter(None, [env.get("PATH")])]
        )
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            [str(install.libs_dir), *filter(None, [env.get("LD_LIBRARY_PATH")])]
        )
        return argv, env

    async def _http_ready(self, *, timeout_s: float) -> bool:
        """Whether `GET /v2/health/ready` on the HTTP endpoint answers 200."""
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection("127.0.0.1", self._http_port)
            try:
                writer.write(
                    b"GET /v2/health/ready HTTP/1.1\r\nHost: triton\r\nConnection: close\r\n\r\n"
                )
                await writer.drain()
                status = await reader.readline()
            finally:
                writer.close()
        return status.split(b" ")[1:2] == [b"200"]

    async def _wait_ready(self, process: asyncio.subprocess.Process, limit_s: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit_s
        exited = asyncio.ensure_future(process.wait())
        runner = TritonRunner(self.grpc_endpoint)
        # Over TLS (mutual, perhaps) readiness is asked of the plaintext HTTP endpoint, bound
        # to 127.0.0.1, rather than with a client certificate this process may not have.
        ready = runner.is_server_ready if self._options.grpc_tls is None else self._http_ready
        try:
            while True:
                if exited.done():
                    raise TritonStartError(
                        f"tritonserver exited with code {process.returncode} before it was"
                        f" ready; log {self.log_path}:\n{self.log_tail()}"
                    )
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise TritonStartError(
                        f"tritonserver was not ready after {limit_s} s; log {self.log_path}:\n"
                        f"{self.log_tail()}"
                    )
                with contextlib.suppress(TritonError, OSError, TimeoutError):
                    if await ready(timeout_s=min(1.0, remaining)):
                        return
                # Ask again shortly, or wake at once if the process exits meanwhile.
                await asyncio.wait({exited}, timeout=min(0.05, max(remaining, 0)))
        finally:
            exited.cancel()
            await runner.close()


def _copy_if_changed(source: Path, target: Path) -> None:
    # On a restart, stubs of the killed server may still be exiting, and overwriting a
    # running executable fails (ETXTBSY); an identical copy need not be written again.
    if target.exists():
        have, want = target.stat(), source.stat()
        if (have.st_size, have.st_mtime_ns) == (want.st_size, want.st_mtime_ns):
            return
    shutil.copy2(source, target)


def _signal_group(pgid: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signum)
