"""Benchmark: GetOnlineFeatures against raw Redis, a bare gRPC hop and Feast's SDK, in one run.

Starts its own redis-server and the feature service (separate processes, as `make up` runs
them), applies a 20-feature view and writes `--entities` entities through `WriteFeatures`;
starts a bare grpc.aio echo server in another process; and, unless `--no-feast`, runs
Feast's SDK in its own virtual environment (`.bench/feast-venv`, created on the first run
with `pip install 'feast[redis]'`, never the project's `.venv`): a driver process (this file
with `--feast-driver`) applies a Feast repo with the same 20 features on the same Redis,
writes the same values with Feast's own write path (`write_to_online_store`) and runs the
timed reads when asked, answering with JSON lines.

Then for 1 and 10 entities x 20 features and each concurrency, one path after another (so
they never compete for the CPU), it drives for `--duration` seconds after a warm-up:

- feature GetOnlineFeatures: the feature service through a plain grpc.aio channel;
- feature GetOnlineFeatures (lists): the same with `layout: FEATURE_LAYOUT_LISTS`, the
  answer as lists in request order rather than maps keyed by the reference;
- redis raw: `redis.asyncio` straight to the same hashes (one HGETALL per entity, in one
  pipeline for 10): the floor, with no decoding;
- echo (bare hop): a grpc.aio server whose one method answers the request's bytes, i.e. one
  Python gRPC hop with no work: the ceiling of a Python gRPC service on this machine;
- bare Redis proxy: a grpc.aio server whose GetOnlineFeatures parses the request, reads each
  entity's hash (HGETALL, one pipeline for 10) and answers the stored bytes as they are, with
  no decoding, checks, protobuf answer, interceptors or tracing: the floor under any Python
  feature service that reads Redis, on this machine;
- feast SDK: `FeatureStore.get_online_features_async(...).to_dict()` in the driver's own
  event loop (`--feast-mode threads`: the synchronous call from that many threads).

Every loop runs on uvloop, client and Feast driver alike. Before timing, each path's answer
is checked against the written values. The lists read is also made over the Connect protocol
on the service's HTTP port (binary protobuf, aiohttp client), beside a bare aiohttp server
that answers the body it gets (the HTTP hop it wraps). Prints p50/p95/p99 and req/s per path, entities and
concurrency; the CPU microseconds per request (user + system, over the timed window) of each
process: the feature service, Redis, the echo server, this client and the Feast driver, the
number to compare changes by on a shared machine, where throughput moves with whatever else
runs; the ratios to the echo server, raw Redis and Feast; and the issue's targets at
concurrency 16 (throughput >= 0.8x echo and above Feast; p99 <= 1.5x echo).

    .venv/bin/python loadtests/bench_features.py --duration 5 --concurrency 1 16 64

With the service as several processes (they split connections, not calls):

    MODELSERVE_FEATURE_SERVER__WORKERS=4 .venv/bin/python loadtests/bench_features.py --channels 16

This file must run in Feast's environment too (`--feast-driver`), so its module-level imports
are the standard library only; the harness imports the project inside its functions.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from modelserve_cli.stack import Stack

ROOT = Path(__file__).resolve().parent.parent
FEAST_VENV = ROOT / ".bench" / "feast-venv"
VIEW = "user"
ENTITY_TYPE = "user"
#: The 20 features: (name, dtype), the same in the feature service's view and in Feast's.
FEATURES: tuple[tuple[str, str], ...] = (
    *((f"amount_avg_{d}d", "double") for d in (1, 7, 30, 90)),
    *((f"amount_max_{d}d", "double") for d in (1, 7, 30, 90)),
    *((f"score_{k}", "double") for k in ("risk", "churn", "ltv", "engagement", "credit", "fraud")),
    *((f"orders_{d}d", "int64") for d in (7, 30, 90)),
    ("segment", "string"),
    ("country", "string"),
    ("is_verified", "bool"),
)
REFS = [f"{VIEW}:{name}" for name, _ in FEATURES]
BATCHES = (1, 10)
_ECHO_SERVICE, _ECHO_METHOD = "bench.Echo", "Echo"
_FEATURE_SERVICE, _FEATURE_METHOD = "modelserve.feature.v1.FeatureService", "GetOnlineFeatures"
ECHO, PROXY = "echo (bare hop)", "bare Redis proxy"
SERVICE, SERVICE_LISTS = "feature GetOnlineFeatures", "feature GetOnlineFeatures (lists)"
#: The same call over the Connect protocol on the service's HTTP port (binary protobuf), and
#: the bare hop it wraps: an aiohttp server answering the body it gets.
CONNECT_LISTS = "feature GetOnlineFeatures (lists) over Connect"
HTTP_ECHO = "HTTP echo (bare aiohttp hop)"
#: The event time of every written value (microseconds); well within both views' max age.
_MAX_AGE_S = 7 * 86_400


def entity_id(i: int) -> str:
    """The id of entity number `i`."""
    return f"u-{i}"


def feature_value(dtype: str, i: int, j: int) -> float | int | str | bool:
    """The value written for feature `j` of entity `i`: the same in both stores."""
    if dtype == "double":
        return i * 0.25 + j * 1.5
    if dtype == "int64":
        return i * 7 + j
    if dtype == "string":
        return ("gold", "silver", "bronze", "new")[(i + j) % 4]
    return (i + j) % 3 == 0


def entity_ids(call: int, batch: int, entities: int) -> list[str]:
    """The ids the `call`-th request reads: consecutive, wrapping around the written ones."""
    first = call * batch
    return [entity_id((first + k) % entities) for k in range(batch)]


# -- measuring, shared by the harness and the Feast driver -------------------------------


@dataclass
class Result:
    """Latencies of one path at one batch size and concurrency."""

    path: str
    entities: int
    concurrency: int
    latencies_ms: list[float]
    seconds: float
    errors: int
    first_error: str = ""
    cpu_s: dict[str, float] = field(default_factory=dict)
    """CPU seconds (user + system) each process spent during the timed window."""

    @property
    def rps(self) -> float:
        return len(self.latencies_ms) / self.seconds if self.seconds else 0.0

    def cpu_us_per_request(self, process: str) -> float:
        """CPU microseconds `process` spent per answered request (NaN when not measured)."""
        done = len(self.latencies_ms)
        return self.cpu_s[process] / done * 1e6 if done and process in self.cpu_s else math.nan

    def percentile(self, q: float) -> float:
        """The q-th percentile, interpolated linearly (numpy's default)."""
        ordered = sorted(self.latencies_ms)
        if not ordered:
            return math.nan
        rank = (len(ordered) - 1) * q / 100
        low = math.floor(rank)
        high = min(low + 1, len(ordered) - 1)
        return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


async def drive(
    call: Callable[[int], Awaitable[object]], concurrency: int, duration: float
) -> tuple[list[float], float, int, str]:
    """`concurrency` loops calling `call(i)` back to back for `duration` seconds; returns
    (latencies in ms, seconds, errors, the first error)."""
    latencies: list[float] = []
    errors: list[str] = []
    stop_at = time.perf_counter() + duration

    async def loop(worker: int) -> None:
        i = worker
        while time.perf_counter() < stop_at:
            start = time.perf_counter()
            try:
                await call(i)
            except Exception as exc:
                errors.append(repr(exc))
                continue
            latencies.append((time.perf_counter() - start) * 1000)
            i += concurrency

    started = time.perf_counter()
    await asyncio.gather(*(loop(w) for w in range(concurrency)))
    return latencies, time.perf_counter() - started, len(errors), errors[0] if errors else ""


def drive_threads(
    call: Callable[[int], object], concurrency: int, duration: float
) -> tuple[list[float], float, int, str]:
    """As `drive`, with `concurrency` threads calling a blocking `call`."""
    latencies: list[float] = []
    errors: list[str] = []
    stop_at = time.perf_counter() + duration

    def loop(worker: int) -> None:
        i = worker
        while time.perf_counter() < stop_at:
            start = time.perf_counter()
            try:
                call(i)
            except Exception as exc:
                errors.append(repr(exc))
                continue
            latencies.append((time.perf_counter() - start) * 1000)
            i += concurrency

    threads = [threading.Thread(target=loop, args=(w,)) for w in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, time.perf_counter() - started, len(errors), errors[0] if errors else ""


def _redis_parser() -> str:
    """Which parser redis-py reads replies with in this environment: hiredis's C one when
    installed, else its own in Python (several times the client CPU per reply)."""
    from redis.utils import HIREDIS_AVAILABLE

    return "hiredis" if HIREDIS_AVAILABLE else "redis-py's Python parser"


def _new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


# -- the Feast driver (runs in Feast's virtual environment) -------------------------------


def feast_driver() -> None:
    """Applies the Feast repo, writes the values, then answers one JSON line per command read
    from stdin: {"run": {...}} -> a Result, {"quit": true} -> exit."""
    loop = _new_event_loop()
    try:
        loop.run_until_complete(_feast_session())
    finally:
        loop.close()


async def _feast_session() -> None:
    import feast
    import pandas as pd
    from feast import Entity, FeatureStore, FeatureView, Field, FileSource, RepoConfig
    from feast.types import Bool, Float64, Int64, String
    from feast.value_type import ValueType

    loop = asyncio.get_running_loop()
    setup = json.loads(await loop.run_in_executor(None, sys.stdin.readline))
    work = Path(setup["work_dir"])
    entities: int = setup["entities"]
    mode: str = setup["mode"]
    event_time = pd.Timestamp(setup["event_time_us"], unit="us", tz="UTC")

    dtypes = {"double": Float64, "int64": Int64, "string": String, "bool": Bool}
    frame = pd.DataFrame(
        {
            "user_id": [entity_id(i) for i in range(entities)],
            "event_timestamp": [event_time] * entities,
            **{
                name: [feature_value(dtype, i, j) for i in range(entities)]
                for j, (name, dtype) in enumerate(FEATURES)
            },
        }
    )
    frame.to_parquet(work / "user.parquet")
    user = Entity(name=ENTITY_TYPE, join_keys=["user_id"], value_type=ValueType.STRING)
    view = FeatureView(
        name=VIEW,
        entities=[user],
        ttl=pd.Timedelta(seconds=_MAX_AGE_S).to_pytimedelta(),
        schema=[Field(name=name, dtype=dtypes[dtype]) for name, dtype in FEATURES],
        source=FileSource(path=str(work / "user.parquet"), timestamp_field="event_timestamp"),
        online=True,
    )
    store = FeatureStore(
        config=RepoConfig(
            project="modelserve_bench",
            registry=str(work / "registry.db"),
            provider="local",
            online_store={"type": "redis", "connection_string": setup["redis"]},
            entity_key_serialization_version=3,
        )
    )
    store.apply([user, view])
    started = time.perf_counter()
    store.write_to_online_store(VIEW, frame)
    write_seconds = time.perf_counter() - started

    def rows(i: int, batch: int) -> list[dict[str, Any]]:
        return [{"user_id": e} for e in entity_ids(i, batch, entities)]

    check = (await store.get_online_features_async(REFS, rows(3, 1))).to_dict()
    wrong = [
        name
        for j, (name, dtype) in enumerate(FEATURES)
        if check[name] != [feature_value(dtype, 3, j)]
    ]
    _answer(
        {
            "ready": True,
            "feast_version": feast.__version__,
            "redis_parser": _redis_parser(),
            "write_seconds": write_seconds,
            "wrong_values": wrong,
        }
    )
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        command = json.loads(line) if line.strip() else {"quit": True}
        if command.get("quit"):
            return
        run = command["run"]
        batch, concurrency, duration = run["entities"], run["concurrency"], run["duration"]
        if mode == "threads":

            def call(i: int, batch: int = batch) -> object:
                return store.get_online_features(REFS, rows(i, batch)).to_dict()

            await loop.run_in_executor(None, drive_threads, call, concurrency, run["warmup"])
            cpu_before = time.process_time()
            measured = await loop.run_in_executor(None, drive_threads, call, concurrency, duration)
        else:

            async def acall(i: int, batch: int = batch) -> object:
                return (await store.get_online_features_async(REFS, rows(i, batch))).to_dict()

            await drive(acall, concurrency, run["warmup"])
            cpu_before = time.process_time()
            measured = await drive(acall, concurrency, duration)
        # Its own process's CPU, every thread's: the SDK runs in the driver.
        cpu_s = {"feast": time.process_time() - cpu_before}
        result = Result("feast SDK", batch, concurrency, *measured, cpu_s=cpu_s)
        _answer({"result": asdict(result)})


def _answer(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


# -- the echo server (its own process, on the project's environment) ---------------------


def serve_echo() -> None:
    """A bare grpc.aio server whose one unary method answers the request's bytes, and a bare
    aiohttp server doing the same for `POST /bench.Echo/Echo`; prints the gRPC port, then
    the HTTP port, on stdout."""
    loop = _new_event_loop()
    try:
        loop.run_until_complete(_serve_echo())
    finally:
        loop.close()


async def _serve_echo() -> None:
    from aiohttp import web

    async def echo(request: bytes, context: Any) -> bytes:
        return request

    async def http_echo(request: web.Request) -> web.Response:
        return web.Response(body=await request.read(), content_type="application/proto")

    app = web.Application()
    app.add_routes([web.post(f"/{_ECHO_SERVICE}/{_ECHO_METHOD}", http_echo)])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    http_port = runner.addresses[0][1]
    await _serve_unary(_ECHO_SERVICE, _ECHO_METHOD, echo, then=str(http_port))


def serve_redis_proxy(url: str) -> None:
    """The bare Redis proxy (see the module's doc) on the Redis at `url`; prints its port."""
    loop = _new_event_loop()
    try:
        loop.run_until_complete(_serve_redis_proxy(url))
    finally:
        loop.close()


async def _serve_redis_proxy(url: str) -> None:
    import redis.asyncio as aioredis

    from modelserve.feature.v1 import feature_service_pb2 as pb
    from modelserve_features.redis_store import EntityKey, redis_key

    client = aioredis.Redis.from_url(url)

    async def read(request: bytes, context: Any) -> bytes:
        entities = pb.GetOnlineFeaturesRequest.FromString(request).entities
        keys = [redis_key(EntityKey(e.entity_type, e.entity_id), VIEW) for e in entities]
        if len(keys) == 1:
            rows = [await client.hgetall(keys[0])]
        else:
            async with client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.hgetall(key)
                rows = await pipe.execute()
        return b"".join(value for row in rows for value in row.values())

    await _serve_unary(_FEATURE_SERVICE, _FEATURE_METHOD, read)


async def _serve_unary(
    service: str, method: str, answer: Callable[[bytes, Any], Awaitable[bytes]], then: str = ""
) -> None:
    """Serves one unary method on bytes on a free port, printed on stdout (followed by the
    line `then` when given), until killed."""
    import grpc

    handler = grpc.method_handlers_generic_handler(
        service, {method: grpc.unary_unary_rpc_method_handler(answer)}
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    if then:
        print(then, flush=True)
    await server.wait_for_termination()


# -- the harness (the project's environment) ---------------------------------------------


class FeastDriver:
    """The driver process in Feast's virtual environment, spoken to in JSON lines."""

    def __init__(self, process: subprocess.Popen[str], log: Path) -> None:
        self._process = process
        self.log = log

    @classmethod
    def start(
        cls, python: Path, work: Path, redis_port: int, entities: int, event_time_us: int, mode: str
    ) -> tuple[FeastDriver, dict[str, Any]]:
        log = work / "feast-driver.log"
        # Feast's environment is its own: nothing of ours on its path.
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        with log.open("w") as stderr:
            process = subprocess.Popen(
                [str(python), __file__, "--feast-driver"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                env=env,
                start_new_session=True,
            )
        driver = cls(process, log)
        ready = driver.ask(
            {
                "work_dir": str(work),
                "redis": f"127.0.0.1:{redis_port}",
                "entities": entities,
                "event_time_us": event_time_us,
                "mode": mode,
            }
        )
        return driver, ready

    def ask(self, message: dict[str, Any]) -> dict[str, Any]:
        assert self._process.stdin is not None and self._process.stdout is not None
        self._process.stdin.write(json.dumps(message) + "\n")
        self._process.stdin.flush()
        line = self._process.stdout.readline()
        if not line:
            tail = "\n".join(self.log.read_text(errors="replace").splitlines()[-15:])
            raise RuntimeError(f"the Feast driver exited ({self._process.wait()}):\n{tail}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def run(self, entities: int, concurrency: int, duration: float, warmup: float) -> Result:
        answer = self.ask(
            {
                "run": {
                    "entities": entities,
                    "concurrency": concurrency,
                    "duration": duration,
                    "warmup": warmup,
                }
            }
        )
        return Result(**answer["result"])

    def stop(self) -> None:
        if self._process.poll() is None:
            assert self._process.stdin is not None
            try:
                self._process.stdin.write(json.dumps({"quit": True}) + "\n")
                self._process.stdin.close()
                self._process.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self._process.kill()
                self._process.wait()


def feast_python(args: argparse.Namespace) -> tuple[Path | None, str]:
    """A Python that imports feast (installing `feast[redis]` into `--feast-venv` first when
    it has none), or None and why not."""
    if args.feast_python:
        return Path(args.feast_python), ""
    venv = Path(args.feast_venv)
    python = venv / "bin" / "python"
    imports = [str(python), "-c", "import feast, redis"]
    if python.exists() and subprocess.run(imports, capture_output=True).returncode == 0:
        return python, ""
    print(f"installing {args.feast_spec!r} into {venv} (once; may take minutes)", flush=True)
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        [str(python), "-m", "pip", "install", "--quiet", args.feast_spec],
    ]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True)
        if done.returncode != 0:
            tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
            return None, f"`{' '.join(step)}` failed ({done.returncode}):\n{tail}"
    if subprocess.run(imports, capture_output=True).returncode != 0:
        return None, f"{python} still cannot import feast after installing {args.feast_spec!r}"
    return python, ""


async def harness(args: argparse.Namespace) -> None:
    from modelserve_cli.stack import Stack, StackOptions, free_port

    task = asyncio.current_task()
    if task is not None:
        # SIGTERM (from `timeout`, say) unwinds like Ctrl-C, so the `finally` below stops
        # the service, Redis, the echo and proxy servers and the Feast driver.
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)

    run_dir = Path(tempfile.mkdtemp(prefix="modelserve-bench-features-"))
    env = {"MODELSERVE_FEATURE_TELEMETRY__LOG_LEVEL": "warning"}
    # The HTTP port too, for the Connect path (fixed: workers share it).
    http_port = int(os.environ.get("MODELSERVE_FEATURE_SERVER__HTTP_PORT") or free_port())
    env["MODELSERVE_FEATURE_SERVER__HTTP_PORT"] = str(http_port)
    stack = Stack(StackOptions(run_dir=run_dir, env=env))
    echo = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--serve-echo",
        stdout=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    driver: FeastDriver | None = None
    proxy: asyncio.subprocess.Process | None = None
    try:
        await asyncio.to_thread(stack.redis.start)
        proxy = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "--serve-redis-proxy",
            stack.redis.url,
            stdout=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        assert proxy.stdout is not None
        proxy_target = f"127.0.0.1:{(await proxy.stdout.readline()).decode().strip()}"
        stack.spawn("feature")
        await stack.wait_serving("feature")
        from bench import wait_workers

        workers = await wait_workers(stack, "feature")
        assert echo.stdout is not None
        echo_target = f"127.0.0.1:{(await echo.stdout.readline()).decode().strip()}"
        http_echo_url = f"http://127.0.0.1:{(await echo.stdout.readline()).decode().strip()}"
        event_time_us = time.time_ns() // 1000
        written = await _write(stack, args.entities, event_time_us)
        print(
            f"feature service ({workers} process(es), {args.channels} channel(s)): wrote"
            f" {args.entities:,} entities x 20 features in {written:.2f} s;"
            f" client and service parse Redis replies with {_redis_parser()}"
        )
        feast_note = "not run (--no-feast)"
        if not args.no_feast:
            python, why = await asyncio.to_thread(feast_python, args)
            if python is None:
                feast_note = f"not run: {why}"
            else:
                driver, ready = await asyncio.to_thread(
                    FeastDriver.start,
                    python,
                    run_dir,
                    stack.redis.port,
                    args.entities,
                    event_time_us,
                    args.feast_mode,
                )
                if ready.get("wrong_values"):
                    raise RuntimeError(f"Feast read other values: {ready['wrong_values']}")
                feast_note = (
                    f"feast {ready['feast_version']} ({args.feast_mode}, Redis replies parsed "
                    f"with {ready['redis_parser']}), wrote {args.entities:,} entities in "
                    f"{ready['write_seconds']:.2f} s"
                )
        print(feast_note, flush=True)
        assert echo.pid is not None
        assert proxy.pid is not None
        results = await _measure(
            args,
            stack,
            (echo_target, echo.pid),
            (proxy_target, proxy.pid),
            driver,
            (f"http://127.0.0.1:{http_port}", http_echo_url),
        )
        _print(results, args, feast_note.splitlines()[0])
    finally:
        if driver is not None:
            await asyncio.to_thread(driver.stop)
        for server in (echo, proxy):
            if server is not None:
                server.terminate()
                await server.wait()
        await stack.stop()


async def _write(stack: Stack, entities: int, event_time_us: int) -> float:
    """Applies the view and writes every entity's values through the feature service."""
    from google.protobuf.timestamp_pb2 import Timestamp

    from modelserve.feature.v1 import feature_service_pb2 as pb
    from modelserve.feature.v1 import feature_service_pb2_grpc as pb_grpc
    from modelserve.feature.v1 import feature_view_pb2 as view_pb
    from modelserve.type.v1.feature_value_pb2 import FeatureValue
    from modelserve_runtime.channels import create_channel

    dtypes = {
        "double": view_pb.FEATURE_DTYPE_DOUBLE,
        "int64": view_pb.FEATURE_DTYPE_INT64,
        "string": view_pb.FEATURE_DTYPE_STRING,
        "bool": view_pb.FEATURE_DTYPE_BOOL,
    }
    view = view_pb.FeatureView(
        name=f"featureViews/{VIEW}",
        entity_type=ENTITY_TYPE,
        features=[view_pb.FeatureSpec(name=n, dtype=dtypes[d]) for n, d in FEATURES],
    )
    view.max_age.FromSeconds(_MAX_AGE_S)
    event_time = Timestamp()
    event_time.FromMicroseconds(event_time_us)
    started = time.perf_counter()
    async with create_channel(stack.targets["feature"], default_timeout_s=60) as channel:
        stub = pb_grpc.FeatureServiceStub(channel)
        await stub.ApplyFeatureView(pb.ApplyFeatureViewRequest(feature_view=view, force=True))
        for first in range(0, entities, 500):
            writes = [
                pb.EntityFeatureWrite(
                    entity=pb.EntityKey(entity_type=ENTITY_TYPE, entity_id=entity_id(i)),
                    feature_view=f"featureViews/{VIEW}",
                    event_time=event_time,
                    values={
                        name: FeatureValue(**{f"{dtype}_value": feature_value(dtype, i, j)})
                        for j, (name, dtype) in enumerate(FEATURES)
                    },
                )
                for i in range(first, min(first + 500, entities))
            ]
            await stub.WriteFeatures(pb.WriteFeaturesRequest(writes=writes))
    return time.perf_counter() - started


async def _measure(
    args: argparse.Namespace,
    stack: Stack,
    echo_server: tuple[str, int],
    proxy_server: tuple[str, int],
    driver: FeastDriver | None,
    http: tuple[str, str],
) -> list[Result]:
    import aiohttp
    import grpc
    import redis.asyncio as aioredis
    from bench import cpu_seconds, process_groups

    from modelserve.feature.v1 import feature_service_pb2 as pb
    from modelserve.feature.v1 import feature_service_pb2_grpc as pb_grpc
    from modelserve_features.redis_store import EntityKey, redis_key

    n = args.entities
    # Requests are built before timing, one per call slot, so the client measures the hop.
    slots = 4096
    requests = {
        batch: [
            pb.GetOnlineFeaturesRequest(
                entities=[
                    pb.EntityKey(entity_type=ENTITY_TYPE, entity_id=e)
                    for e in entity_ids(i, batch, n)
                ],
                features=REFS,
            )
            for i in range(slots)
        ]
        for batch in BATCHES
    }
    payloads = {b: [r.SerializeToString() for r in rs] for b, rs in requests.items()}
    list_requests = {
        b: [pb.GetOnlineFeaturesRequest(entities=r.entities, features=REFS) for r in rs]
        for b, rs in requests.items()
    }
    for rs in list_requests.values():
        for r in rs:
            r.layout = pb.FEATURE_LAYOUT_LISTS
    keys = {
        b: [
            [redis_key(EntityKey(ENTITY_TYPE, e), VIEW) for e in entity_ids(i, b, n)]
            for i in range(slots)
        ]
        for b in BATCHES
    }
    # One connection per channel (equal arguments would share one): SO_REUSEPORT workers
    # (SERVER__WORKERS) split connections, not calls.
    feature_channels = [
        grpc.aio.insecure_channel(stack.targets["feature"], options=[("grpc.channel_id", k)])
        for k in range(args.channels)
    ]
    (echo_target, echo_pid), (proxy_target, proxy_pid) = echo_server, proxy_server
    echo_channel = grpc.aio.insecure_channel(echo_target)
    proxy_channel = grpc.aio.insecure_channel(proxy_target)
    proxy = proxy_channel.unary_unary(f"/{_FEATURE_SERVICE}/{_FEATURE_METHOD}")
    stubs = [pb_grpc.FeatureServiceStub(channel) for channel in feature_channels]
    features = stubs[0]
    echo = echo_channel.unary_unary(f"/{_ECHO_SERVICE}/{_ECHO_METHOD}")
    redis_client = aioredis.Redis.from_url(stack.redis.url)

    async def redis_read(batch: int, i: int) -> object:
        if batch == 1:
            return await redis_client.hgetall(keys[1][i % slots][0])
        async with redis_client.pipeline(transaction=False) as pipe:
            for key in keys[batch][i % slots]:
                pipe.hgetall(key)
            return await pipe.execute()

    feature_url, http_echo_url = http
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    connect_url = f"{feature_url}/{_FEATURE_SERVICE}/{_FEATURE_METHOD}"
    list_payloads = {b: [r.SerializeToString() for r in rs] for b, rs in list_requests.items()}
    proto = {"content-type": "application/proto", "connect-protocol-version": "1"}

    async def post(url: str, body: bytes) -> bytes:
        async with session.post(url, data=body, headers=proto) as response:
            payload = await response.read()
            if response.status != 200:
                raise RuntimeError(f"{url} answered {response.status}: {payload[:200]!r}")
            return payload

    async def connect_read(batch: int, i: int) -> object:
        body = await post(connect_url, list_payloads[batch][i % slots])
        return pb.GetOnlineFeaturesResponse.FromString(body)

    http_echo_path = f"{http_echo_url}/{_ECHO_SERVICE}/{_ECHO_METHOD}"
    over_connect = await connect_read(1, 3)
    if list(over_connect.results[0].ordered_statuses) != [pb.FEATURE_STATUS_PRESENT] * len(REFS):
        raise RuntimeError("GetOnlineFeatures over Connect does not find the written features")
    await _check_feature_service(features, requests[1][3], pb.FEATURE_STATUS_PRESENT)
    await _check_feature_service_lists(features, list_requests[1][3], pb.FEATURE_STATUS_PRESENT)
    if len(await redis_read(1, 3)) != len(FEATURES):  # type: ignore[arg-type]
        raise RuntimeError("raw Redis read does not find the 20 written features")
    paths: dict[str, Callable[[int, int], Awaitable[object]]] = {
        SERVICE: lambda b, i: stubs[i % len(stubs)].GetOnlineFeatures(requests[b][i % slots]),
        SERVICE_LISTS: lambda b, i: stubs[i % len(stubs)].GetOnlineFeatures(
            list_requests[b][i % slots]
        ),
        "redis raw": redis_read,
        ECHO: lambda b, i: echo(payloads[b][i % slots]),
        PROXY: lambda b, i: proxy(payloads[b][i % slots]),
        CONNECT_LISTS: connect_read,
        HTTP_ECHO: lambda b, i: post(http_echo_path, payloads[b][i % slots]),
    }
    warmup = min(1.0, args.duration)
    # The feature service, Redis and this client (as bench.py groups them), and the echo server.
    processes = {**process_groups(stack), "echo": [echo_pid], "proxy": [proxy_pid]}
    results: list[Result] = []
    try:
        for batch in BATCHES:
            for concurrency in args.concurrency:
                for name, call in paths.items():

                    async def one(i: int, call: Any = call, batch: int = batch) -> object:
                        return await call(batch, i)

                    await drive(one, concurrency, warmup)
                    before = cpu_seconds(processes)
                    measured = await drive(one, concurrency, args.duration)
                    after = cpu_seconds(processes)
                    cpu_s = {p: after[p] - before[p] for p in after}
                    results.append(Result(name, batch, concurrency, *measured, cpu_s=cpu_s))
                if driver is not None:
                    results.append(
                        await asyncio.to_thread(
                            driver.run, batch, concurrency, args.duration, warmup
                        )
                    )
                print(f"done: {batch} entities, concurrency {concurrency}", flush=True)
    finally:
        for channel in feature_channels:
            await channel.close()
        await echo_channel.close()
        await proxy_channel.close()
        await redis_client.aclose()
        await session.close()
    return results


async def _check_feature_service(stub: Any, request: Any, present: int) -> None:
    """The service answers the written values, each PRESENT."""
    answer = await stub.GetOnlineFeatures(request)
    (result,) = answer.results
    for j, (name, dtype) in enumerate(FEATURES):
        ref = f"{VIEW}:{name}"
        got = getattr(result.values[ref], f"{dtype}_value")
        if got != feature_value(dtype, 3, j) or result.statuses[ref] != present:
            raise RuntimeError(f"the feature service answers {ref} = {got!r}, not the written")


async def _check_feature_service_lists(stub: Any, request: Any, present: int) -> None:
    """With the lists layout, the service answers the written values in request order."""
    answer = await stub.GetOnlineFeatures(request)
    (result,) = answer.results
    got = [
        getattr(v, f"{dtype}_value")
        for v, (_, dtype) in zip(result.ordered_values, FEATURES, strict=True)
    ]
    if got != [feature_value(dtype, 3, j) for j, (_, dtype) in enumerate(FEATURES)] or set(
        result.ordered_statuses
    ) != {present}:
        raise RuntimeError(f"the feature service's lists answer {got!r}, not the written")


def _print(results: Sequence[Result], args: argparse.Namespace, feast_note: str) -> None:
    out = sys.stdout
    print(
        f"\nduration={args.duration}s per point, {args.entities:,} entities written, "
        f"20 features; {feast_note}\n",
        file=out,
    )
    print("| path | entities | conc | p50 ms | p95 ms | p99 ms | req/s | errors |", file=out)
    print("|---|---:|---:|---:|---:|---:|---:|---:|", file=out)
    for r in results:
        print(
            f"| {r.path} | {r.entities} | {r.concurrency} | {r.percentile(50):.2f} | "
            f"{r.percentile(95):.2f} | {r.percentile(99):.2f} | {r.rps:.0f} | {r.errors} |",
            file=out,
        )
    errors = [r for r in results if r.first_error]
    for r in errors:
        print(f"first error of {r.path} ({r.entities}, {r.concurrency}): {r.first_error}")
    _print_cpu(out, results)
    by = {(r.path, r.entities, r.concurrency): r for r in results}
    _ratios(out, by, args)


def _print_cpu(out: IO[str], results: Sequence[Result]) -> None:
    """CPU microseconds per answered request, by process: unlike throughput on a shared
    machine, this hardly moves with what else runs."""
    order = ("feature", "redis", "echo", "proxy", "client", "feast")
    processes = [p for p in order if any(p in r.cpu_s for r in results)]
    processes += sorted({p for r in results for p in r.cpu_s} - set(processes))
    print("\nCPU us per request (user + system), by process:\n", file=out)
    print("| path | entities | conc | " + " | ".join(processes) + " |", file=out)
    print("|---|---:|---:|" + "---:|" * len(processes), file=out)
    for r in results:
        cells = [_us(r.cpu_us_per_request(p)) for p in processes]
        print(
            f"| {r.path} | {r.entities} | {r.concurrency} | " + " | ".join(cells) + " |", file=out
        )


def _us(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.0f}"


def _ratios(out: IO[str], by: dict[tuple[str, int, int], Result], args: argparse.Namespace) -> None:
    redis_raw, echo, feast = "redis raw", ECHO, "feast SDK"
    print(
        "\n| layout | entities | conc | req/s / echo | p99 / echo | req/s / feast | p50 / feast "
        "| p50 / redis | req/s / redis | feast req/s / echo |",
        file=out,
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|", file=out)

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}" if b and not math.isnan(a) and not math.isnan(b) else "n/a"

    targets: list[str] = []
    for batch in BATCHES:
        for c in args.concurrency:
            r, e, f = by[(redis_raw, batch, c)], by[(echo, batch, c)], by.get((feast, batch, c))
            for layout, service in (
                ("maps", SERVICE),
                ("lists", SERVICE_LISTS),
                ("lists, Connect", CONNECT_LISTS),
            ):
                s = by[(service, batch, c)]
                print(
                    f"| {layout} | {batch} | {c} | {ratio(s.rps, e.rps)} | "
                    f"{ratio(s.percentile(99), e.percentile(99))} | "
                    f"{ratio(s.rps, f.rps) if f else 'n/a'} | "
                    f"{ratio(s.percentile(50), f.percentile(50)) if f else 'n/a'} | "
                    f"{ratio(s.percentile(50), r.percentile(50))} | {ratio(s.rps, r.rps)} | "
                    f"{ratio(f.rps, e.rps) if f else 'n/a'} |",
                    file=out,
                )
                if c != 16:
                    continue
                targets.append(
                    f"| {batch} | {layout}: req/s >= 0.8 x echo | {ratio(s.rps, e.rps)} | "
                    f"{_verdict(s.rps >= 0.8 * e.rps)} |"
                )
                if f is not None:
                    targets.append(
                        f"| {batch} | {layout}: req/s > feast | {ratio(s.rps, f.rps)} | "
                        f"{_verdict(s.rps > f.rps)} |"
                    )
                targets.append(
                    f"| {batch} | {layout}: p99 <= 1.5 x echo | "
                    f"{ratio(s.percentile(99), e.percentile(99))} | "
                    f"{_verdict(s.percentile(99) <= 1.5 * e.percentile(99))} |"
                )
            if c == 16:
                connect, http_echo = by[(CONNECT_LISTS, batch, c)], by[(HTTP_ECHO, batch, c)]
                targets.append(
                    f"| {batch} | lists, Connect, against its own hop ({HTTP_ECHO}): req/s, p99"
                    f" | {ratio(connect.rps, http_echo.rps)},"
                    f" {ratio(connect.percentile(99), http_echo.percentile(99))} | |"
                )
                floor = by[(PROXY, batch, c)]
                targets.append(
                    f"| {batch} | the floor, {PROXY}: req/s / echo, p99 / echo | "
                    f"{ratio(floor.rps, e.rps)}, {ratio(floor.percentile(99), e.percentile(99))}"
                    " | |"
                )
    if targets:
        print("\nTargets at concurrency 16 (feature service):\n", file=out)
        print("| entities | target | ratio | |", file=out)
        print("|---:|---|---:|---|", file=out)
        for line in targets:
            print(line, file=out)


def _verdict(met: bool) -> str:
    return "met" if met else "MISSED"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per point")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--entities", type=int, default=10_000, help="entities written")
    parser.add_argument("--no-feast", action="store_true", help="leave Feast out")
    parser.add_argument(
        "--channels",
        type=int,
        default=1,
        help="gRPC channels (connections) the feature service's calls spread over; with"
        " MODELSERVE_FEATURE_SERVER__WORKERS=N, give it several",
    )
    parser.add_argument("--feast-mode", choices=["async", "threads"], default="async")
    parser.add_argument(
        "--feast-venv", default=str(FEAST_VENV), help="Feast's own venv (made when missing)"
    )
    parser.add_argument("--feast-spec", default="feast[redis]", help="what pip installs there")
    parser.add_argument("--feast-python", help="a Python that imports feast (skips the venv)")
    parser.add_argument("--feast-driver", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--serve-echo", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--serve-redis-proxy", metavar="REDIS_URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.feast_driver:
        feast_driver()
    elif args.serve_redis_proxy:
        serve_redis_proxy(args.serve_redis_proxy)
    elif args.serve_echo:
        serve_echo()
    else:
        loop = _new_event_loop()
        try:
            loop.run_until_complete(harness(args))
        except asyncio.CancelledError:
            print("terminated; the processes this benchmark started are stopped", file=sys.stderr)
            raise SystemExit(128 + signal.SIGTERM) from None
        finally:
            loop.close()


if __name__ == "__main__":
    # Loopback traffic must not go through a proxy from the environment.
    os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"
    main()
