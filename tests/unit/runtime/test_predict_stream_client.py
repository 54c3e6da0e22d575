"""`PredictStreamClient` against a router that is not there: every predict raises the
stream's own error (UNAVAILABLE), never grpc.aio's `InvalidStateError` from writing to a
stream that finished before the write."""

from __future__ import annotations

import grpc
import pytest

from modelserve.router.v1 import router_service_pb2 as pb
from modelserve_cli.stack import free_port
from modelserve_runtime.channels import create_channel
from modelserve_runtime.predict_stream import PredictStreamClient


async def test_a_stream_refused_before_the_write_raises_its_error() -> None:
    channel = create_channel(f"127.0.0.1:{free_port()}")
    codes = []
    try:
        async with PredictStreamClient(channel, timeout_s=5) as client:
            for n in range(20):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await client.predict(pb.PredictRequest(endpoint="fraud", request_id=f"r{n}"))
                codes.append(refused.value.code())
    finally:
        await channel.close()
    assert codes == [grpc.StatusCode.UNAVAILABLE] * 20
