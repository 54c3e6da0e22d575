"""The load tools the README hands to users work: `loadtests/locustfile.py` drives the router
with as many concurrent calls as it has users (gRPC made gevent-friendly; otherwise each call
would block the whole locust process, and `-u 32` would be one call at a time),
`loadtests/locustfile_rest.py` drives its Open Inference Protocol over HTTP/REST and Predict
over Connect, and
`loadtests/ghz-predict.json` is a Predict the router answers, its API read from the router's
server reflection."""

from __future__ import annotations

import asyncio
import csv
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format, message_factory
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from modelserve.router.v1 import router_service_pb2 as router_pb
from modelserve.router.v1 import router_service_pb2_grpc as router_grpc
from modelserve_cli.demo import DemoDeployment
from modelserve_cli.stack import Stack

ROOT = Path(__file__).resolve().parents[2]
LOCUSTFILE = ROOT / "loadtests" / "locustfile.py"
LOCUSTFILE_REST = ROOT / "loadtests" / "locustfile_rest.py"
GHZ_CONFIG = ROOT / "loadtests" / "ghz-predict.json"
LOCUST = Path(sys.executable).parent / "locust"
USERS = 4


async def _locust(
    host: str,
    out: Path,
    seconds: int = 3,
    locustfile: Path = LOCUSTFILE,
    row_name: str = "RouterService/Predict",
) -> dict[str, int]:
    """Runs a locustfile headless against `host`; its `row_name` row's request and failure
    counts, and locust's exit code."""
    return (await _locust_rows(host, out, seconds, locustfile, (row_name,)))[row_name]


async def _locust_rows(
    host: str, out: Path, seconds: int, locustfile: Path, row_names: tuple[str, ...]
) -> dict[str, dict[str, int]]:
    """Runs a locustfile headless against `host`; for each of `row_names` its request and
    failure counts, and locust's exit code."""
    process = await asyncio.create_subprocess_exec(
        str(LOCUST),
        "-f", str(locustfile), "--headless", "-u", str(USERS), "-r", str(USERS),
        "-t", f"{seconds}s", "--host", host, "--csv", str(out / "run"), "--only-summary",
        "--loglevel", "WARNING",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    output, _ = await asyncio.wait_for(process.communicate(), seconds + 60)
    with (out / "run_stats.csv").open() as stats:
        rows = {row["Name"]: row for row in csv.DictReader(stats)}
    counts = {}
    for name in row_names:
        assert name in rows, output.decode()
        counts[name] = {
            "requests": int(rows[name]["Request Count"]),
            "failures": int(rows[name]["Failure Count"]),
            "exit": process.returncode or 0,
        }
    return counts


class _Together(router_grpc.RouterServiceServicer):
    """Answers a Predict only once USERS calls are in flight at once (a cyclic barrier), so
    calls made one at a time all fail their deadline instead."""

    def __init__(self) -> None:
        self.barrier = asyncio.Barrier(USERS)
        self.answered = 0

    async def Predict(self, request: Any, context: Any) -> router_pb.PredictResponse:
        try:
            async with asyncio.timeout(2.0):
                await self.barrier.wait()
        except TimeoutError:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "alone at the barrier")
        self.answered += 1
        return router_pb.PredictResponse(model_version="models/fraud/versions/1")


@pytest.fixture
async def together() -> AsyncIterator[tuple[str, _Together]]:
    server = grpc.aio.server()
    servicer = _Together()
    router_grpc.add_RouterServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        await server.stop(grace=None)


class TestLocust:
    async def test_users_call_at_the_same_time(
        self, together: tuple[str, _Together], tmp_path: Path
    ) -> None:
        host, servicer = together
        counts = await _locust(host, tmp_path)
        assert counts["failures"] == 0, counts
        assert counts["requests"] >= 2 * USERS, counts
        assert servicer.answered >= 2 * USERS

    async def test_drives_the_router_without_failures(
        self, stack: Stack, demo: DemoDeployment, tmp_path: Path
    ) -> None:
        counts = await _locust(stack.targets["router"], tmp_path)
        assert counts == {"requests": counts["requests"], "failures": 0, "exit": 0}
        assert counts["requests"] > USERS


class TestLocustRest:
    async def test_drives_the_routers_http_binding_without_failures(
        self, stack: Stack, demo: DemoDeployment, tmp_path: Path
    ) -> None:
        """`loadtests/locustfile_rest.py` posts JSON to the router's Open Inference Protocol
        over HTTP/REST, and Predict requests over Connect; every request is answered with
        outputs."""
        assert stack.router_http_port is not None
        rows = await _locust_rows(
            f"http://127.0.0.1:{stack.router_http_port}",
            tmp_path,
            3,
            LOCUSTFILE_REST,
            ("OIP REST infer", "Connect Predict"),
        )
        for counts in rows.values():
            assert counts == {"requests": counts["requests"], "failures": 0, "exit": 0}
            assert counts["requests"] > USERS // 2


def _reflected_request(target: str, method: str, data: dict[str, Any]) -> tuple[str, bytes]:
    """What a reflection-based client such as ghz does: learns the method and its request
    type from the server's reflection service alone, and builds the request from JSON. The
    method's path and the serialized request."""
    with grpc.insecure_channel(target) as channel:
        pool = DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        service, name = method.rsplit(".", 1)
        found = pool.FindServiceByName(service).methods_by_name[name]
        request = message_factory.GetMessageClass(found.input_type)()
        json_format.ParseDict(data, request)
        return f"/{found.containing_service.full_name}/{found.name}", request.SerializeToString()


class TestGhz:
    async def test_config_is_a_predict_the_router_answers(
        self, stack: Stack, demo: DemoDeployment
    ) -> None:
        """The config names no proto file: ghz then reads the API from the router's server
        reflection, as this test does, and its data, read as protobuf JSON into the request
        type reflection gives, is a request the router answers from the demo deployment."""
        config = json.loads(GHZ_CONFIG.read_text())
        assert "proto" not in config and "protoset" not in config
        path, payload = await asyncio.to_thread(
            _reflected_request, stack.targets["router"], config["call"], config["data"]
        )
        assert path == "/modelserve.router.v1.RouterService/Predict"
        async with grpc.aio.insecure_channel(stack.targets["router"]) as channel:
            call = channel.unary_unary(path, lambda b: b, router_pb.PredictResponse.FromString)
            answer = await call(payload, timeout=10)
        assert answer.model_version == demo.model_version
        assert not answer.degraded
        assert answer.outputs
