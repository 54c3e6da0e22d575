"""Helpers the tests share: in-process services on port 0, the demo model's reference answer."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from connectrpc.method import IdempotencyLevel, MethodInfo
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor

from modelserve.router.v1 import router_service_pb2 as router_pb
from modelserve_cli.demo import DemoDeployment
from modelserve_demo import fraud
from modelserve_features.request_time import RequestFacts
from modelserve_runtime.channels import create_channel
from modelserve_runtime.server import GrpcServer, ServiceApp

S = TypeVar("S")


def connect_method(service: ServiceDescriptor, name: str) -> MethodInfo[Any, Any]:
    """connect-python's description of one method, from the protos (no generated client)."""
    method = service.methods_by_name[name]
    return MethodInfo(
        name=name,
        service_name=service.full_name,
        input=message_factory.GetMessageClass(method.input_type),
        output=message_factory.GetMessageClass(method.output_type),
        idempotency_level=IdempotencyLevel.UNKNOWN,
    )


@asynccontextmanager
async def running(
    build: Callable[[S], Awaitable[tuple[GrpcServer, Any]]], settings: S
) -> AsyncIterator[tuple[GrpcServer, grpc.aio.Channel, ServiceApp]]:
    """Builds and starts a service in this process; yields it, a channel to it, and its app."""
    grpc_server, app = await build(settings)
    await grpc_server.server.start()
    if grpc_server.http is not None:
        await grpc_server.http.start()
    channel = create_channel(f"127.0.0.1:{grpc_server.port}")
    try:
        # Inside the try: a service that fails its readiness check is still stopped, or the
        # test run would hang at exit on its server.
        await app.check_ready()
        await grpc_server.set_serving(True)
        yield grpc_server, channel, app
    finally:
        await channel.close()
        await grpc_server.server.stop(0)
        if grpc_server.http is not None:
            await grpc_server.http.stop()
        await app.close()


def expected_probabilities(demo: DemoDeployment, request: router_pb.PredictRequest) -> np.ndarray:
    """What onnxruntime in this process says for the feature vector the router should build."""
    customer = request.entities[fraud.ENTITY_TYPE]
    values = {f"{fraud.ENTITY_TYPE}:{k}": v for k, v in demo.customers[customer].items()}
    facts = RequestFacts(
        event_time=datetime.fromtimestamp(request.context.event_time.seconds, UTC),
        user_agent=request.context.user_agent,
        query=request.context.query,
    )
    values.update(fraud.request_feature_values(request.features["amount"].double_value, facts))
    row = fraud.feature_vector(values)[None, :]
    session = ort.InferenceSession(demo.trained.onnx_bytes, providers=["CPUExecutionProvider"])
    probabilities = session.run(["probabilities"], {"features": row})[0]
    return np.asarray(probabilities[0])


async def eventually(
    check: Callable[[], bool | Awaitable[bool]],
    what: str,
    *,
    within_s: float = 30.0,
    every_s: float = 0.02,
    nudge: Callable[[], Awaitable[object]] | None = None,
    nudge_every_s: float = 2.0,
    explain: Callable[[], str] | None = None,
) -> None:
    """Asks `check` (sync or async) until it holds; fails naming `what` after `within_s`,
    with what `explain` says of the state then (for a failure seen only where nobody can
    look, such as CI).

    The one way tests wait: by asking the system, never by sleeping a fixed time. `nudge`,
    when given, runs every `nudge_every_s` while the check fails: under load Triton's
    batch span processor was seen holding finished spans until another request arrived,
    so trace tests send one more request.
    """
    deadline = time.monotonic() + within_s
    nudge_at = time.monotonic() + nudge_every_s
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            detail = f"\n{explain()}" if explain is not None else ""
            pytest.fail(f"{what}: not seen within {within_s} s{detail}")
        if nudge is not None and time.monotonic() > nudge_at:
            await nudge()
            nudge_at = time.monotonic() + nudge_every_s
        await asyncio.sleep(every_s)


@asynccontextmanager
async def tls_tritonserver(work_dir: Path, server: Any, client_ca: Any) -> AsyncIterator[Any]:
    """A tritonserver whose gRPC endpoint requires TLS with `server`'s key pair (pki.KeyPair)
    and a client certificate signed by `client_ca`."""
    from modelserve_triton.process import GrpcServerTls, TritonOptions, TritonServer

    triton = TritonServer(
        TritonOptions(
            work_dir=work_dir, grpc_tls=GrpcServerTls(server.cert, server.key, client_ca.cert)
        )
    )
    await triton.start()
    try:
        yield triton
    finally:
        await triton.stop()
